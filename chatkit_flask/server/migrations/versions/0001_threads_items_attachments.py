"""Threads, their items and attachments, each row owned by one visitor or user.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

DOCUMENT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# MySQL and MariaDB: InnoDB (foreign keys), utf8mb4 whatever the server's default, and a binary
# collation: ids and owners compare and sort exactly, as on the other databases (a server's
# default collation is case-insensitive). Other databases ignore these.
MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in ("mysql", "mariadb")
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def upgrade() -> None:
    p = context.config.attributes["table_prefix"]
    op.create_table(
        f"{p}threads",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("data", DOCUMENT, nullable=False),
        **MYSQL_TABLE,
    )
    # A visitor's listing in creation order, and prune's scan by last activity.
    op.create_index(f"{p}threads_by_owner", f"{p}threads", ["owner", "created_us", "id"])
    op.create_index(f"{p}threads_by_activity", f"{p}threads", ["updated_at"])
    op.create_table(
        f"{p}items",
        sa.Column(
            "thread_id",
            sa.String(64),
            sa.ForeignKey(f"{p}threads.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("data", DOCUMENT, nullable=False),
        **MYSQL_TABLE,
    )
    op.create_index(f"{p}items_by_thread", f"{p}items", ["thread_id", "created_us", "id"])
    op.create_table(
        f"{p}attachments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("data", DOCUMENT, nullable=False),
        **MYSQL_TABLE,
    )
    op.create_index(f"{p}attachments_by_owner", f"{p}attachments", ["owner"])
    op.create_index(f"{p}attachments_by_activity", f"{p}attachments", ["updated_at"])


def downgrade() -> None:
    p = context.config.attributes["table_prefix"]
    op.drop_table(f"{p}attachments")
    op.drop_table(f"{p}items")
    op.drop_table(f"{p}threads")
