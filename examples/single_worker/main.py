"""The simplest projection: one read model, one Processor, a checkpoint, a clean stop.

A newsletter's subscriber list is kept as a table by one projection. Each batch of
events is one transaction: the table changes and the checkpoint moves together, so
stopping at any moment (Ctrl+C, SIGTERM, a crash) and starting again neither loses nor
repeats an event.

    python examples/single_worker/main.py                    # catch up, then exit
    python examples/single_worker/main.py --follow           # keep running; Ctrl+C stops

This uses a Processor directly: run() stops cleanly on Ctrl+C or SIGTERM by itself
(the batch in hand commits, then it returns); a Runner does the same for several
projections at once (see ../multiple_projections).
"""

from __future__ import annotations

import argparse
import sys
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import eventsource
from eventsource import (
    Event,
    EventStore,
    ExpectedVersion,
    PersistedEvent,
    Processor,
    ProcessorConfig,
    Projection,
)
from eventsource.models import ProjectionCheckpoint

BOUNDED_CONTEXT = "newsletter"


class Base(DeclarativeBase):
    pass


class Subscriber(Base):
    __tablename__ = "sw_subscribers"

    subscriber_id: Mapped[str] = mapped_column(primary_key=True)
    email: Mapped[str]
    active: Mapped[bool]


class SubscriberList(Projection):
    name = "sw_subscriber_list"
    bounded_contexts = (BOUNDED_CONTEXT,)
    aggregate_types = ("Subscriber",)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        if event.event_type == "SubscriberJoined":
            session.add(
                Subscriber(
                    subscriber_id=event.aggregate_id, email=event.payload["email"], active=True
                )
            )
            print(f"[SubscriberList] #{event.global_position} joined: {event.payload['email']}")
        elif event.event_type == "SubscriberLeft":
            subscriber = session.get(Subscriber, event.aggregate_id)
            if subscriber is not None:
                subscriber.active = False
                print(f"[SubscriberList] #{event.global_position} left:   {subscriber.email}")


def append_sample(engine: sa.Engine, store: EventStore) -> None:
    """Three new subscribers; the first of them leaves again."""
    run = uuid.uuid4().hex[:6]
    with Session(engine) as session, session.begin():
        ids = []
        for name in ("ada", "grace", "linus"):
            subscriber_id = str(uuid.uuid4())
            ids.append(subscriber_id)
            joined = Event(
                bounded_context=BOUNDED_CONTEXT,
                aggregate_type="Subscriber",
                aggregate_id=subscriber_id,
                event_type="SubscriberJoined",
                payload={"email": f"{name}.{run}@example.com"},
            )
            store.append(session, [joined], ExpectedVersion.no_stream())
        left = Event(
            bounded_context=BOUNDED_CONTEXT,
            aggregate_type="Subscriber",
            aggregate_id=ids[0],
            event_type="SubscriberLeft",
        )
        store.append(session, [left], ExpectedVersion.exact(1))
    print("Appended 3 SubscriberJoined and 1 SubscriberLeft events.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--follow", action="store_true", help="keep handling new events until Ctrl+C / SIGTERM"
    )
    mode.add_argument(
        "--until-caught-up",
        action="store_true",
        help="handle everything appended so far, then exit (the default)",
    )
    parser.add_argument("--no-sample", action="store_true", help="do not append sample events")
    args = parser.parse_args(argv)

    engine = eventsource.create_engine(args.database_url)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model table
    store = EventStore()
    if not args.no_sample:
        append_sample(engine, store)

    projection = SubscriberList()
    processor = Processor(engine, store, ProcessorConfig(batch_size=10))

    if args.follow:
        print("Following new events; press Ctrl+C to stop.")
        # Ctrl+C / SIGTERM: the batch in hand commits, then run() returns (a second
        # Ctrl+C stops at once, rolling that batch back). processor.stop() from another
        # thread does the same.
        processor.run(projection)
        print("Stopped.")
    else:
        handled = processor.run_until_caught_up(projection)
        print(f"Caught up: handled {handled} events in this run.")

    with Session(engine) as session:
        active = session.scalar(
            sa.select(sa.func.count()).select_from(Subscriber).where(Subscriber.active)
        )
        total = session.scalar(sa.select(sa.func.count()).select_from(Subscriber))
        checkpoint = session.get(ProjectionCheckpoint, (projection.name, 0))
    print(f"Subscribers: {active} active of {total}")
    if checkpoint is not None:
        print(
            f"Checkpoint of {projection.name}: position {checkpoint.global_position}, "
            f"{checkpoint.events_handled} events handled in total"
        )
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
