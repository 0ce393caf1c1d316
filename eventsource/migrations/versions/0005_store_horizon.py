"""Store horizon: the sequence readers publish their reading horizon in.

Revision ID: es0005
Revises: es0004
Create Date: 2026-12-06

PostgreSQL only (SQLite serialises writers and needs no horizon). One sequence,
``<events>_horizon``, holding the highest horizon a projection reader has published;
event writers compare their transaction id with it (see :mod:`eventsource.horizon` and
docs/horizon.md). Unlogged where the server has unlogged sequences (PostgreSQL 15 and
later): publishing then writes no WAL and takes no transaction id, and losing the value
in a crash is harmless, since every transaction it protected died with the crash.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from eventsource import horizon
from eventsource.migrations_support import table_names

revision: str = "es0005"
down_revision: str | Sequence[str] | None = "es0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    name = horizon.sequence_identifier(table_names())
    unlogged = "UNLOGGED " if (bind.dialect.server_version_info or (0,)) >= (15,) else ""
    op.execute(f"CREATE {unlogged}SEQUENCE {name} AS bigint MINVALUE 0 START WITH 0")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(f"DROP SEQUENCE {horizon.sequence_identifier(table_names())}")
