"""Attachments follow their thread: a ``thread_id`` that cascades, and their age from creation.

An attachment sent in a message is deleted with its thread (deleted, pruned, purged) and moved
with it at log-in; one never sent (``thread_id`` NULL) is pruned ``thread_ttl`` after it was
created. 0001's ``updated_at`` (the last save) becomes ``created_at`` (set once), rows written
under 0001 take their thread from their JSON when that thread is the same owner's, and the one
index prune needs is ``(thread_id, created_at)``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    p = context.config.attributes["table_prefix"]
    table, threads = f"{p}attachments", f"{p}threads"
    dialect = op.get_context().dialect.name
    op.drop_index(f"{p}attachments_by_activity", table_name=table)
    op.alter_column(table, "updated_at", new_column_name="created_at",
                    existing_type=sa.Double, existing_nullable=False)  # fmt: skip
    if dialect == "sqlite":  # SQLite alters no constraint, but takes one in ADD COLUMN
        op.execute(
            f"ALTER TABLE {table} ADD COLUMN thread_id VARCHAR(64) "
            f"REFERENCES {threads} (id) ON DELETE CASCADE"
        )
    else:
        op.add_column(table, sa.Column("thread_id", sa.String(64), nullable=True))
        op.create_foreign_key(f"{p}attachments_thread", table, threads, ["thread_id"], ["id"],
                              ondelete="CASCADE")  # fmt: skip
    op.execute(_backfill(dialect, table, threads))
    op.create_index(f"{p}attachments_by_thread", table, ["thread_id", "created_at"])


def _backfill(dialect: str, table: str, threads: str) -> str:
    """One ``UPDATE``: a row of 0001 takes the thread its JSON names, when that thread exists
    and is the same owner's (else it counts as never sent). The table names are made of a
    checked prefix (:func:`~chatkit_flask.server.sql_schema.check_prefix`)."""
    if dialect == "postgresql":
        return (
            f"UPDATE {table} a SET thread_id = t.id FROM {threads} t "  # noqa: S608
            f"WHERE t.id = (a.data::json ->> 'thread_id') AND t.owner = a.owner"
        )
    if dialect in ("mysql", "mariadb"):
        return (
            f"UPDATE {table} a JOIN {threads} t "  # noqa: S608
            f"ON t.id = JSON_UNQUOTE(JSON_EXTRACT(a.data, '$.thread_id')) AND t.owner = a.owner "
            f"SET a.thread_id = t.id"
        )
    return (
        f"UPDATE {table} SET thread_id = json_extract(data, '$.thread_id') WHERE EXISTS "  # noqa: S608
        f"(SELECT 1 FROM {threads} t WHERE t.id = json_extract({table}.data, '$.thread_id') "
        f"AND t.owner = {table}.owner)"
    )


def downgrade() -> None:
    p = context.config.attributes["table_prefix"]
    table = f"{p}attachments"
    op.drop_index(f"{p}attachments_by_thread", table_name=table)
    if op.get_context().dialect.name == "sqlite":
        op.drop_column(table, "thread_id")
    else:
        op.drop_constraint(f"{p}attachments_thread", table, type_="foreignkey")
        op.drop_column(table, "thread_id")
    op.alter_column(table, "created_at", new_column_name="updated_at",
                    existing_type=sa.Double, existing_nullable=False)  # fmt: skip
    op.create_index(f"{p}attachments_by_activity", table, ["updated_at"])
