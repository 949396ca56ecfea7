"""The SQL store's tables and the migrations that make them.

The tables are described here once (SQLAlchemy Core) for the store's queries; the database gets
them only from the Alembic revisions shipped in ``chatkit_flask/server/migrations`` and run by
``flask chatkit db upgrade`` (or :func:`upgrade`): nothing creates or alters a table at start-up.
Every name starts with the table prefix (``CHATKIT_STORE_TABLE_PREFIX``, default ``chatkit_``),
the revision table too (``chatkit_alembic_version``), so the store sits in a site's own database
next to its tables and its own Alembic history without touching either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "MIGRATIONS",
    "Tables",
    "check_prefix",
    "current_revision",
    "head_revision",
    "sync_url",
    "upgrade",
    "upgrade_sql",
]

DEFAULT_TABLE_PREFIX = "chatkit_"
MIGRATIONS = Path(__file__).with_name("migrations")
_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,29}")

# MySQL's TEXT holds 64 KB: a long answer would not fit.
DOCUMENT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# As revision 0001 makes them on MySQL and MariaDB: utf8mb4 and a binary collation (ids and owners
# compare exactly, as elsewhere).
MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in ("mysql", "mariadb")
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}
ID = sa.String(64)  # "thr_" + 32 hex digits; the SDK's item ids are shorter
OWNER = sa.String(255)  # "visitor:..." or "user:<the site's user id>"


def check_prefix(prefix: str) -> str:
    """``prefix`` if it makes safe table names (lower-case letters, digits, ``_``), else
    ``ValueError``."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"{prefix!r} is not a table prefix: lower-case letters, digits and _, starting with a "
            "letter, at most 30 characters"
        )
    return prefix


@dataclass(frozen=True)
class Tables:
    """The store's tables under one prefix (the description the queries use)."""

    prefix: str
    metadata: sa.MetaData
    threads: sa.Table
    items: sa.Table
    attachments: sa.Table

    @classmethod
    def under(cls, prefix: str = DEFAULT_TABLE_PREFIX) -> Tables:
        p = check_prefix(prefix)
        metadata = sa.MetaData()
        threads = sa.Table(
            f"{p}threads", metadata,
            sa.Column("id", ID, primary_key=True),
            sa.Column("owner", OWNER, nullable=False),
            sa.Column("created_us", sa.BigInteger, nullable=False),  # the paging order
            sa.Column("updated_at", sa.Double, nullable=False),  # last write: expiry
            sa.Column("data", DOCUMENT, nullable=False),
            **MYSQL_TABLE,
        )  # fmt: skip
        items = sa.Table(
            f"{p}items", metadata,
            sa.Column("thread_id", ID, sa.ForeignKey(threads.c.id, ondelete="CASCADE"),
                      primary_key=True),
            sa.Column("id", ID, primary_key=True),
            sa.Column("created_us", sa.BigInteger, nullable=False),
            sa.Column("data", DOCUMENT, nullable=False),
            **MYSQL_TABLE,
        )  # fmt: skip
        attachments = sa.Table(
            f"{p}attachments", metadata,
            sa.Column("id", ID, primary_key=True),
            sa.Column("owner", OWNER, nullable=False),
            # NULL until sent in a message; then it goes with that thread.
            sa.Column("thread_id", ID, sa.ForeignKey(threads.c.id, ondelete="CASCADE")),
            sa.Column("created_at", sa.Double, nullable=False),  # an unsent one's expiry
            sa.Column("data", DOCUMENT, nullable=False),
            **MYSQL_TABLE,
        )  # fmt: skip
        return cls(p, metadata, threads, items, attachments)

    @property
    def version_table(self) -> str:
        return f"{self.prefix}alembic_version"


# -- migrations ------------------------------------------------------------------------------------


def sync_url(url: sa.URL | str) -> sa.URL:
    """The same database through a blocking driver, for Alembic (psycopg serves both)."""
    url = sa.make_url(url)
    backend = url.get_backend_name()
    driver = {"sqlite": "pysqlite", "mysql": "pymysql", "mariadb": "pymysql"}.get(backend)
    if backend == "postgresql":
        driver = "psycopg"
    return url.set(drivername=f"{backend}+{driver}") if driver else url


def _config(prefix: str, **attributes: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes.update(attributes, table_prefix=check_prefix(prefix))
    return config


def head_revision() -> str:
    """The revision this version of the package needs."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(connection: sa.Connection, prefix: str) -> str | None:
    """The revision the database is at (None: the store's tables were never made)."""
    version_table = Tables.under(prefix).version_table
    if not sa.inspect(connection).has_table(version_table):
        return None
    return connection.execute(
        sa.text(f"SELECT version_num FROM {version_table}")  # noqa: S608 (a checked prefix)
    ).scalar()


def upgrade(url: sa.URL | str, prefix: str = DEFAULT_TABLE_PREFIX, revision: str = "head") -> str:
    """Run the migrations up to ``revision`` on the database at ``url`` (any driver: a blocking
    one is used); returns the revision reached."""
    from alembic import command

    engine = sa.create_engine(sync_url(url), poolclass=sa.NullPool)
    try:
        with engine.begin() as connection:
            command.upgrade(_config(prefix, connection=connection), revision)
        with engine.connect() as connection:
            reached = current_revision(connection, prefix)
    finally:
        engine.dispose()
    assert reached is not None
    return reached


def upgrade_sql(
    url: sa.URL | str, prefix: str = DEFAULT_TABLE_PREFIX, start: str | None = None
) -> str:
    """The SQL that :func:`upgrade` would run from ``start`` (None: an empty database) to this
    version's revision, in ``url``'s dialect, without connecting: for a site whose database
    administrator applies schema changes by hand."""
    import io

    from alembic import command

    output = io.StringIO()
    revisions = f"{start}:head" if start else "head"
    command.upgrade(_config(prefix, url=sync_url(url), output=output), revisions, sql=True)
    return output.getvalue()
