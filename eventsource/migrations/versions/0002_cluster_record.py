"""Cluster record: which PostgreSQL cluster wrote the store's transaction ids.

Revision ID: es0002
Revises: es0001
Create Date: 2026-12-05

One row, kept by :mod:`eventsource.cluster`, so a restore into another cluster is
noticed. Written out column by column (not generated from the models);
tests/test_migrations.py proves they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventsource.migrations_support import table_names
from eventsource.models import UtcDateTime

revision: str = "es0002"
down_revision: str | Sequence[str] | None = "es0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    names = table_names()
    op.create_table(
        names.cluster,
        sa.Column("id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("system_identifier", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{names.cluster}"),
    )


def downgrade() -> None:
    op.drop_table(table_names().cluster)
