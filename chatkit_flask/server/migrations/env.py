"""Alembic's entry for the SQL store's revisions. Run through ``flask chatkit db upgrade`` (or
``chatkit_flask.server.sql_schema.upgrade``), which hands over the connection and the table
prefix; the revision table is ``<prefix>alembic_version``, apart from the site's own. Offline
(``flask chatkit db upgrade --sql``) it writes the SQL for a database administrator instead."""

from alembic import context

config = context.config
prefix = config.attributes["table_prefix"]
if context.is_offline_mode():
    context.configure(
        url=config.attributes["url"],
        literal_binds=True,
        version_table=f"{prefix}alembic_version",
        transaction_per_migration=True,
        output_buffer=config.attributes["output"],
    )
else:
    context.configure(
        connection=config.attributes["connection"],
        version_table=f"{prefix}alembic_version",
        transaction_per_migration=True,
    )
with context.begin_transaction():
    context.run_migrations()
