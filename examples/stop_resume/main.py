"""Stop a projection at any moment and resume exactly where it stopped.

Three modes, run one after another:

    python examples/stop_resume/main.py --mode append --count 300   # add work
    python examples/stop_resume/main.py --mode process              # Ctrl+C it midway...
    python examples/stop_resume/main.py --mode status               # ...see where it stopped
    python examples/stop_resume/main.py --mode process              # ...and it resumes there

``process`` handles events slowly (``--delay`` seconds each, to give you time to press
Ctrl+C) in batches of ``--batch-size``. Ctrl+C or SIGTERM lets the batch in hand
finish and commit, then the process exits with status 0. The read model and the
checkpoint are committed in the same transaction, so after any stop (even ``kill -9``)
the checkpoint says exactly which events the read model contains.

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import eventsource
import eventsource.status
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
from eventsource.models import EventRecord

BOUNDED_CONTEXT = "shipping"
PROJECTION_NAME = "sr_parcel_tracker"


class Base(DeclarativeBase):
    pass


class ParcelScan(Base):
    """One row per handled scan event; the primary key would reject a repeat."""

    __tablename__ = "sr_parcel_scans"

    global_position: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, autoincrement=False
    )
    parcel_id: Mapped[str]
    location: Mapped[str]


class ParcelTracker(Projection):
    name = PROJECTION_NAME
    bounded_contexts = (BOUNDED_CONTEXT,)

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def handle(self, event: PersistedEvent, session: Session) -> None:
        time.sleep(self.delay)  # pretend each event takes a while
        session.add(
            ParcelScan(
                global_position=event.global_position,
                parcel_id=event.aggregate_id,
                location=event.payload["location"],
            )
        )


def append(engine: sa.Engine, count: int) -> None:
    store = EventStore()
    locations = ("Rotterdam", "Antwerp", "Hamburg", "Le Havre", "Felixstowe")
    with Session(engine) as session, session.begin():
        for start in range(0, count, len(locations)):
            parcel_id = str(uuid.uuid4())  # each parcel is scanned at up to 5 locations
            scans = [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Parcel",
                    aggregate_id=parcel_id,
                    event_type="ParcelScanned",
                    payload={"location": location},
                )
                for location in locations[: count - start]
            ]
            store.append(session, scans, ExpectedVersion.no_stream())
    print(f"Appended {count} ParcelScanned events.")


def status(engine: sa.Engine) -> dict[str, int]:
    """The checkpoint (through the library's status API) next to the read model's count."""
    rows = eventsource.status.status(engine, projections=[PROJECTION_NAME])
    (row,) = [r for r in rows if r.projection == PROJECTION_NAME]  # it lists all projections
    with Session(engine) as session:
        in_store = session.scalar(
            sa.select(sa.func.count())
            .select_from(EventRecord)
            .where(EventRecord.bounded_context == BOUNDED_CONTEXT)
        )
        in_read_model = session.scalar(sa.select(sa.func.count()).select_from(ParcelScan))
    figures = {
        "events": int(in_store or 0),
        "read_model": int(in_read_model or 0),
        "checkpoint": row.checkpoint,
        "handled": row.events_handled,
    }
    print(f"Events in the store ({BOUNDED_CONTEXT}): {figures['events']}")
    print(
        f"Checkpoint of {PROJECTION_NAME}: position {row.checkpoint} of {row.head}, "
        f"{row.events_handled} events handled, lag {row.lag}"
    )
    print(f"Rows in the read model:      {figures['read_model']}")
    print(f"Still to process:            {figures['events'] - figures['handled']}")
    return figures


def process(engine: sa.Engine, delay: float, batch_size: int) -> None:
    projection = ParcelTracker(delay)
    processor = Processor(engine, EventStore(), ProcessorConfig(batch_size=batch_size))
    print(
        f"Processing (batches of {batch_size}, {delay:g} s per event); "
        "press Ctrl+C to stop midway.",
        flush=True,
    )
    started = time.perf_counter()
    # The Runner turns SIGINT / SIGTERM into "finish the batch in hand, commit, stop".
    handled = Runner().run_until_caught_up([(projection, processor)])
    elapsed = time.perf_counter() - started
    print(f"Handled {handled[(PROJECTION_NAME, 0)]} events in this run ({elapsed:.1f} s).")
    figures = status(engine)
    if figures["handled"] < figures["events"]:
        print("Stopped before the end: run --mode process again to resume from the checkpoint.")
    else:
        print("Caught up.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    parser.add_argument("--mode", choices=("append", "process", "status"), required=True)
    parser.add_argument("--count", type=int, default=100, help="events to append (default 100)")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per event (process)")
    parser.add_argument("--batch-size", type=int, default=10, help="events per transaction")
    args = parser.parse_args(argv)

    engine = eventsource.create_engine(args.database_url)
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model table
    try:
        if args.mode == "append":
            append(engine, args.count)
        elif args.mode == "process":
            process(engine, args.delay, args.batch_size)
        else:
            status(engine)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
