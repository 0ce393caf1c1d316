"""The helpdesk application's read-model tables (its migrations create them).

Kept in their own module so that both the application (main.py) and Alembic
(migrations/env.py, for ``revision --autogenerate``) import the same definitions.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints keep migrations portable (and SQLite batch mode happy).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class Base(DeclarativeBase):
    metadata = metadata


class Ticket(Base):
    __tablename__ = "app_tickets"

    ticket_id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    title: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.Text, index=True)
    assignee: Mapped[str | None] = mapped_column(sa.Text)


class AgentWorkload(Base):
    __tablename__ = "app_agent_workload"

    agent: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    open_tickets: Mapped[int] = mapped_column(sa.Integer)
    closed_tickets: Mapped[int] = mapped_column(sa.Integer)
