"""Helpdesk read models: app_tickets, app_agent_workload.

Revision ID: app0001
Revises:
Create Date: 2026-11-28

The first revision of the application's own branch ("app"). It depends on the
library's branch ("eventsource"), so ``alembic upgrade heads`` creates the event store
first; the application's later revisions simply follow this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "app0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("app",)
depends_on: str | Sequence[str] | None = ("eventsource",)


def upgrade() -> None:
    op.create_table(
        "app_tickets",
        sa.Column("ticket_id", sa.Text, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("assignee", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("ticket_id", name="pk_app_tickets"),
    )
    op.create_index("ix_app_tickets_status", "app_tickets", ["status"])
    op.create_table(
        "app_agent_workload",
        sa.Column("agent", sa.Text, nullable=False),
        sa.Column("open_tickets", sa.Integer, nullable=False),
        sa.Column("closed_tickets", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("agent", name="pk_app_agent_workload"),
    )


def downgrade() -> None:
    op.drop_table("app_agent_workload")
    op.drop_index("ix_app_tickets_status", table_name="app_tickets")
    op.drop_table("app_tickets")
