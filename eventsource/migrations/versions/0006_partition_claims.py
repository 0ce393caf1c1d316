"""Claimed partitions and resharding: leases on partitions, and a stop boundary.

Revision ID: es0006
Revises: es0005
Create Date: 2026-12-06

Two tables for workers that share a projection's partitions (see
:mod:`eventsource.claims`): ``<events>_partition_claims`` (one row per partition: the
worker holding its lease, the lease's epoch and expiry) and
``<events>_partition_workers`` (the live workers of each claimed projection). Two
nullable columns on the checkpoints for :mod:`eventsource.reshard`: the (transaction id,
position) boundary a partition's batches stop at while the projection is resharded.
Written out column by column (not generated from the models); tests/test_migrations.py
proves they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventsource.migrations_support import table_names
from eventsource.models import UtcDateTime

revision: str = "es0006"
down_revision: str | Sequence[str] | None = "es0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    names = table_names()
    op.add_column(
        names.projection_checkpoints,
        sa.Column("stop_transaction_id", sa.BigInteger, nullable=True),
    )
    op.add_column(
        names.projection_checkpoints,
        sa.Column("stop_global_position", sa.BigInteger, nullable=True),
    )
    claims = names.partition_claims
    op.create_table(
        claims,
        sa.Column("projection_name", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("total_partitions", sa.Integer, nullable=False),
        sa.Column("owner", sa.Text, nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("claimed_at", UtcDateTime, nullable=True),
        sa.Column("renewed_at", UtcDateTime, nullable=True),
        sa.Column("lease_expires_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("projection_name", "partition_key", name=f"pk_{claims}"),
    )
    workers = names.partition_workers
    op.create_table(
        workers,
        sa.Column("projection_name", sa.Text, nullable=False),
        sa.Column("worker_id", sa.Text, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("renewed_at", UtcDateTime, nullable=False),
        sa.Column("lease_expires_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("projection_name", "worker_id", name=f"pk_{workers}"),
    )


def downgrade() -> None:
    names = table_names()
    op.drop_table(names.partition_workers)
    op.drop_table(names.partition_claims)
    with op.batch_alter_table(names.projection_checkpoints) as batch:
        batch.drop_column("stop_global_position")
        batch.drop_column("stop_transaction_id")
