"""Store horizon: the sequence readers publish their reading horizon in, and the check.

Revision ID: es0005
Revises: es0004
Create Date: 2026-12-06

PostgreSQL only (SQLite serialises writers and needs no horizon); see
:mod:`eventsource.horizon` and docs/horizon.md. ``<events>_horizon`` holds the highest
horizon a projection reader published, through ``<events>_horizon_publish(bigint)``;
the statement-level trigger ``<events>_horizon_check`` refuses an insert from a
transaction that took its id before it marked itself as a writer, once a reader may
have read past that id, whatever does the insert (so writers on an older version of
the library are checked from this revision on). The sequence is unlogged where the
server has unlogged sequences (PostgreSQL 15 and later): publishing then writes no WAL
and takes no transaction id, and losing the value in a crash is harmless, since every
transaction it protected died with the crash.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
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
    unlogged = (bind.dialect.server_version_info or (0,)) >= (15,)
    for statement in horizon.schema_ddl(table_names(), unlogged):
        op.execute(sa.text(statement))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in horizon.drop_ddl(table_names()):
        op.execute(sa.text(statement))
