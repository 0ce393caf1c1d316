"""Initial schema: events, aggregate_heads, projection_checkpoints.

Revision ID: es0001
Revises:
Create Date: 2026-11-28

Written out column by column (not generated from the models) so that later model
changes never rewrite history; tests/test_migrations.py proves they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventsource.migrations_support import table_names
from eventsource.models import BigIntPk, JsonValue, UtcDateTime, Xid8, current_transaction_id

revision: str = "es0001"
down_revision: str | Sequence[str] | None = None
# Lets applications apply these scripts from their own Alembic as a separate branch.
branch_labels: str | Sequence[str] | None = ("eventsource",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    names = table_names()
    op.create_table(
        names.events,
        sa.Column("global_position", BigIntPk, sa.Identity(), primary_key=True),
        sa.Column("bounded_context", sa.Text, nullable=False),
        sa.Column("aggregate_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("aggregate_version", sa.BigInteger, nullable=False),
        sa.Column("partition_hash", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("event_version", sa.Integer, nullable=False),
        sa.Column("payload", JsonValue, nullable=False),
        sa.Column("metadata", JsonValue, nullable=True),
        sa.Column("causation_id", sa.Text, nullable=True),
        sa.Column("correlation_id", sa.Text, nullable=True),
        sa.Column("trace_id", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("transaction_id", Xid8, nullable=False, server_default=current_transaction_id()),
        sa.PrimaryKeyConstraint("global_position", name=f"pk_{names.events}"),
        sa.UniqueConstraint("event_id", name=f"uq_{names.events}_event_id"),
        sa.UniqueConstraint(
            "bounded_context",
            "aggregate_type",
            "aggregate_id",
            "aggregate_version",
            name=f"uq_{names.events}_stream_version",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        f"ix_{names.events}_read_order", names.events, ["transaction_id", "global_position"]
    )
    op.create_table(
        names.aggregate_heads,
        sa.Column("bounded_context", sa.Text, nullable=False),
        sa.Column("aggregate_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("transaction_id", Xid8, nullable=False, server_default=current_transaction_id()),
        sa.PrimaryKeyConstraint(
            "bounded_context",
            "aggregate_type",
            "aggregate_id",
            name=f"pk_{names.aggregate_heads}",
        ),
    )
    op.create_table(
        names.projection_checkpoints,
        sa.Column("projection_name", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("total_partitions", sa.Integer, nullable=False),
        sa.Column("transaction_id", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("global_position", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("events_handled", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint(
            "projection_name", "partition_key", name=f"pk_{names.projection_checkpoints}"
        ),
    )


def downgrade() -> None:
    names = table_names()
    op.drop_table(names.projection_checkpoints)
    op.drop_table(names.aggregate_heads)
    op.drop_index(f"ix_{names.events}_read_order", table_name=names.events)
    op.drop_table(names.events)
