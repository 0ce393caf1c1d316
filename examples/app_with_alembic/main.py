"""An application that owns its Alembic migrations and applies the library's with them.

The helpdesk app in this folder has an ``alembic.ini`` and a ``migrations/`` folder
like any SQLAlchemy application. Its ``version_locations`` also name the scripts
shipped inside the eventsource package, so one ``alembic upgrade heads`` (run here
programmatically, or from the command line) creates the event store's tables and the
app's read-model tables, recorded in one ``alembic_version`` table. No
``eventsource.upgrade()`` and no ``create_all()``: the app's migrations are the schema.

    python examples/app_with_alembic/main.py
    alembic -c examples/app_with_alembic/alembic.ini current     # the same, by hand

The database is ``$DATABASE_URL`` or, when unset, ``app_with_alembic.db`` in the
current directory. Give it a database of its own (see README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from app_models import AgentWorkload, Ticket
from sqlalchemy.orm import Session

import eventsource
import eventsource.database
from eventsource import (
    Event,
    EventStore,
    ExpectedVersion,
    PersistedEvent,
    Processor,
    ProcessorConfig,
    Projection,
    Runner,
)

HERE = Path(__file__).resolve().parent
BOUNDED_CONTEXT = "helpdesk"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config(str(HERE / "alembic.ini"))
    config.attributes["configure_logger"] = False  # keep this program's logging as it is
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(engine: sa.Engine) -> None:
    """``alembic upgrade heads`` with the app's own configuration."""
    if eventsource.database.current_revision(engine) is not None:
        # The library's tables exist already, created by eventsource.upgrade() (which keeps
        # its own version table): the two schemes must not both manage one database.
        raise SystemExit(
            "This database already has the event store tables, created by "
            "eventsource.upgrade() (e.g. by the other examples). Point DATABASE_URL at a "
            "database of its own for this example."
        )
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "heads")
    with engine.connect() as connection:
        heads = MigrationContext.configure(connection).get_current_heads()
    scripts = ScriptDirectory.from_config(alembic_config())
    applied = [  # the heads and everything they build on, branch by branch
        f"{rev.revision} ({', '.join(sorted(rev.branch_labels))})"
        for rev in scripts.revision_map.iterate_revisions(heads, "base")
        if rev is not None
    ]
    print(f"Schema up to date; applied revisions: {', '.join(sorted(applied))}")


class TicketBoard(Projection):
    name = "app_ticket_board"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        if event.event_type == "TicketOpened":
            ticket = Ticket(
                ticket_id=event.aggregate_id, title=event.payload["title"], status="open"
            )
            session.add(ticket)
        else:
            found = session.get(Ticket, event.aggregate_id)
            if found is None:
                return
            ticket = found
        if event.event_type == "TicketAssigned":
            ticket.assignee = event.payload["agent"]
            self._workload(session, ticket.assignee).open_tickets += 1
        elif event.event_type == "TicketClosed":
            ticket.status = "closed"
            if ticket.assignee is not None:
                workload = self._workload(session, ticket.assignee)
                workload.open_tickets -= 1
                workload.closed_tickets += 1
        print(f"[TicketBoard] {event.event_type}: {ticket.title}")

    @staticmethod
    def _workload(session: Session, agent: str) -> AgentWorkload:
        row = session.get(AgentWorkload, agent)
        if row is None:
            row = AgentWorkload(agent=agent, open_tickets=0, closed_tickets=0)
            session.add(row)
        return row


def append_sample(engine: sa.Engine, store: EventStore) -> None:
    tickets = [
        ("Printer on fire", "sam", True),
        ("Cannot log in", "kim", False),
        ("Coffee machine empty", "sam", False),
    ]
    with Session(engine) as session, session.begin():
        for title, agent, closed in tickets:
            ticket_id = str(uuid.uuid4())
            events = [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Ticket",
                    aggregate_id=ticket_id,
                    event_type=event_type,
                    payload=payload,
                )
                for event_type, payload in (
                    ("TicketOpened", {"title": title}),
                    ("TicketAssigned", {"agent": agent}),
                    *((("TicketClosed", {}),) if closed else ()),
                )
            ]
            store.append(session, events, ExpectedVersion.no_stream())
    print(f"Appended {len(tickets)} tickets.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlalchemy.url of alembic.ini)",
    )
    args = parser.parse_args(argv)
    url = (
        args.database_url
        or os.environ.get("DATABASE_URL")
        or alembic_config().get_main_option("sqlalchemy.url")
    )
    if args.database_url:
        os.environ["DATABASE_URL"] = args.database_url  # what migrations/env.py reads

    engine = eventsource.create_engine(url)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    migrate(engine)

    store = EventStore()
    append_sample(engine, store)
    Runner().run_until_caught_up([(TicketBoard(), Processor(engine, store, ProcessorConfig()))])

    with Session(engine) as session:
        open_tickets = session.scalar(
            sa.select(sa.func.count()).select_from(Ticket).where(Ticket.status == "open")
        )
        closed = session.scalar(
            sa.select(sa.func.count()).select_from(Ticket).where(Ticket.status == "closed")
        )
        workload = session.scalars(sa.select(AgentWorkload).order_by(AgentWorkload.agent)).all()
    print(f"Tickets: {open_tickets} open, {closed} closed")
    for row in workload:
        print(f"  {row.agent}: {row.open_tickets} open, {row.closed_tickets} closed")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
