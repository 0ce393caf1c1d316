"""Dead letters: events projections quarantined instead of stopping on them.

Revision ID: es0003
Revises: es0002
Create Date: 2026-12-09

Used only by projections that opt in (``on_error = OnError.QUARANTINE*``; see
:mod:`eventsource.deadletters`). Written out column by column (not generated from the
models); tests/test_migrations.py proves they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventsource.migrations_support import table_names
from eventsource.models import BigIntPk, UtcDateTime

revision: str = "es0003"
down_revision: str | Sequence[str] | None = "es0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    names = table_names()
    table = names.dead_letters
    op.create_table(
        table,
        sa.Column("id", BigIntPk, sa.Identity(), primary_key=True),
        sa.Column("projection_name", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Integer, nullable=False),
        sa.Column("total_partitions", sa.Integer, nullable=False),
        sa.Column("global_position", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("bounded_context", sa.Text, nullable=False),
        sa.Column("aggregate_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("aggregate_version", sa.BigInteger, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("parked_behind", sa.BigInteger, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error_type", sa.Text, nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("last_failed_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
        sa.UniqueConstraint("projection_name", "global_position", name=f"uq_{table}_event"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        f"ix_{table}_aggregate",
        table,
        [
            "projection_name",
            "partition_key",
            "bounded_context",
            "aggregate_type",
            "aggregate_id",
            "aggregate_version",
        ],
    )


def downgrade() -> None:
    table = table_names().dead_letters
    op.drop_index(f"ix_{table}_aggregate", table_name=table)
    op.drop_table(table)
