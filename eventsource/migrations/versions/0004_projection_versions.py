"""Projection versions: which version of a projection readers use.

Revision ID: es0004
Revises: es0003
Create Date: 2026-12-16

One row per versioned projection that was switched (blue/green rebuilds, see
:mod:`eventsource.versions`). Written out column by column (not generated from the
models); tests/test_migrations.py proves they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventsource.migrations_support import table_names
from eventsource.models import UtcDateTime

revision: str = "es0004"
down_revision: str | Sequence[str] | None = "es0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = table_names().projection_versions
    op.create_table(
        table,
        sa.Column("projection_name", sa.Text, nullable=False),
        sa.Column("active_version", sa.Integer, nullable=False),
        sa.Column("previous_version", sa.Integer, nullable=True),
        sa.Column("switched_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("projection_name", name=f"pk_{table}"),
    )


def downgrade() -> None:
    op.drop_table(table_names().projection_versions)
