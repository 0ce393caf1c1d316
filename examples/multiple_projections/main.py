"""Multiple projections running concurrently in one process, over one connection pool.

Three projections, each with its own batch size, its own checkpoint and its own
read-model table, run side by side in one :class:`eventsource.Runner`:

* ``UserCounter``        counts ``UserCreated`` events          (batch size 100)
* ``RevenueProjection``  sums the amounts of ``OrderPlaced``     (batch size 50)
* ``ActivityLog``        records every event in the store        (batch size 200)

Each run appends a few new users and orders, lets every projection catch up and prints
the totals read back from the read-model tables. Because ``handle()`` writes with the
processor's session, a read-model change commits together with the checkpoint: run it
again and the totals grow by exactly the new events, never twice.

    python examples/multiple_projections/main.py                  # catch up, then exit
    python examples/multiple_projections/main.py --follow         # keep running; Ctrl+C stops
    python examples/multiple_projections/main.py --append-only    # only append the sample
    python examples/multiple_projections/main.py --pattern fast-slow
    python examples/multiple_projections/main.py --pattern mixed-partitions

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
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
    ProjectionRunner,
    Runner,
)
from eventsource.models import ProjectionCheckpoint

BOUNDED_CONTEXT = "shop"
SAMPLE_USERS = ("Alice", "Bob", "Carol", "Dave", "Eve")
#: (buyer index into SAMPLE_USERS, amount in cents): 8 orders, $195.23 per run.
SAMPLE_ORDERS = (
    (0, 1250),
    (1, 899),
    (2, 4500),
    (0, 2000),
    (3, 1999),
    (4, 350),
    (2, 7525),
    (1, 1000),
)

_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line at a time: the projections print from their own threads."""
    with _print_lock:
        print(line, flush=True)


def dollars(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


# -- read models: plain tables, written in the projection's transaction ------------


class Base(DeclarativeBase):
    pass


class UserCount(Base):
    """One row: how many users were created."""

    __tablename__ = "mp_user_count"

    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[int] = mapped_column(sa.BigInteger)


class Revenue(Base):
    """One row: how many orders were placed and what they add up to (in cents, exact)."""

    __tablename__ = "mp_revenue"

    id: Mapped[int] = mapped_column(primary_key=True)
    orders: Mapped[int] = mapped_column(sa.BigInteger)
    total_cents: Mapped[int] = mapped_column(sa.BigInteger)


class ActivityEntry(Base):
    """One row per event in the store (the primary key makes a duplicate impossible)."""

    __tablename__ = "mp_activity_log"

    global_position: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, autoincrement=False
    )
    bounded_context: Mapped[str]
    aggregate_type: Mapped[str]
    aggregate_id: Mapped[str]
    event_type: Mapped[str]


class PatternCount(Base):
    """Events counted per projection, for the --pattern demos (one row per projection)."""

    __tablename__ = "mp_pattern_counts"

    projection: Mapped[str] = mapped_column(primary_key=True)
    events: Mapped[int] = mapped_column(sa.BigInteger)


class AggregateCount(Base):
    """Events counted per aggregate by the partitioned projection of --pattern mixed-partitions.

    A partitioned projection writes rows keyed by aggregate: every aggregate belongs to
    exactly one partition, so the partitions never write the same row.
    """

    __tablename__ = "mp_aggregate_counts"

    aggregate_id: Mapped[str] = mapped_column(primary_key=True)
    partition_key: Mapped[int]
    events: Mapped[int] = mapped_column(sa.BigInteger)


# -- the three projections of the seed example -------------------------------------


class UserCounter(Projection):
    name = "mp_user_counter"
    bounded_contexts = (BOUNDED_CONTEXT,)
    aggregate_types = ("User",)  # filtered in SQL: Order events never reach handle()

    def handle(self, event: PersistedEvent, session: Session) -> None:
        if event.event_type != "UserCreated":
            return
        row = session.get(UserCount, 1)
        if row is None:
            row = UserCount(id=1, total=0)
            session.add(row)
        row.total += 1
        # Printing is outside the transaction: should the batch roll back, it is retried
        # and a line may repeat. The table never double-counts.
        say(f"[UserCounter] User created: {event.payload['name']} - Total: {row.total}")


class RevenueProjection(Projection):
    name = "mp_revenue"
    bounded_contexts = (BOUNDED_CONTEXT,)
    aggregate_types = ("Order",)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        if event.event_type != "OrderPlaced":
            return
        amount = int(event.payload["amount_cents"])
        row = session.get(Revenue, 1)
        if row is None:
            row = Revenue(id=1, orders=0, total_cents=0)
            session.add(row)
        row.orders += 1
        row.total_cents += amount
        say(f"[Revenue] Order placed: {dollars(amount)} - Total: {dollars(row.total_cents)}")


class ActivityLog(Projection):
    name = "mp_activity_log"  # no scoping: every event of every bounded context

    def handle(self, event: PersistedEvent, session: Session) -> None:
        session.add(
            ActivityEntry(
                global_position=event.global_position,
                bounded_context=event.bounded_context,
                aggregate_type=event.aggregate_type,
                aggregate_id=event.aggregate_id,
                event_type=event.event_type,
            )
        )
        say(
            f"[ActivityLog] #{event.global_position} {event.event_type} "
            f"({event.bounded_context}/{event.aggregate_type} {event.aggregate_id[:8]})"
        )


# -- the seed's two configuration patterns ------------------------------------------


def count_event(session: Session, projection: str) -> int:
    row = session.get(PatternCount, projection)
    if row is None:
        row = PatternCount(projection=projection, events=0)
        session.add(row)
    row.events += 1
    return row.events


class FastProjection(Projection):
    """Cheap work per event: large batches for throughput."""

    name = "mp_fast"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        total = count_event(session, self.name)
        say(f"[Fast] #{event.global_position} {event.event_type} - Total: {total}")


class SlowProjection(Projection):
    """Expensive work per event (simulated): small batches, so each commit comes soon."""

    name = "mp_slow"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def handle(self, event: PersistedEvent, session: Session) -> None:
        time.sleep(self.delay)  # e.g. calling a slow external service
        total = count_event(session, self.name)
        say(f"[Slow] #{event.global_position} {event.event_type} - Total: {total}")


class UnpartitionedProjection(Projection):
    name = "mp_unpartitioned"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        total = count_event(session, self.name)
        say(f"[Unpartitioned] #{event.global_position} {event.event_type} - Total: {total}")


class PartitionedProjection(Projection):
    """One instance per partition; each sees only the aggregates hashed to its partition."""

    name = "mp_partitioned"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def __init__(self, partition_key: int) -> None:
        self.partition_key = partition_key

    def handle(self, event: PersistedEvent, session: Session) -> None:
        row = session.get(AggregateCount, event.aggregate_id)
        if row is None:
            row = AggregateCount(
                aggregate_id=event.aggregate_id, partition_key=self.partition_key, events=0
            )
            session.add(row)
        row.events += 1
        say(
            f"[Partitioned p{self.partition_key}] #{event.global_position} "
            f"{event.event_type} {event.aggregate_type} {event.aggregate_id[:8]}"
        )


# -- wiring -------------------------------------------------------------------------


def build_runners(
    engine: sa.Engine, store: EventStore, pattern: str, slow_delay: float
) -> list[ProjectionRunner]:
    """Each projection gets its own Processor (its own config); all share one engine."""

    def processor(batch_size: int, partition_key: int = 0, total_partitions: int = 1) -> Processor:
        config = ProcessorConfig(
            batch_size=batch_size, partition_key=partition_key, total_partitions=total_partitions
        )
        return Processor(engine, store, config)

    if pattern == "fast-slow":
        return [
            ProjectionRunner(FastProjection(), processor(batch_size=1000)),
            ProjectionRunner(SlowProjection(slow_delay), processor(batch_size=10)),
        ]
    if pattern == "mixed-partitions":
        partitions = 4
        return [
            ProjectionRunner(UnpartitionedProjection(), processor(batch_size=100)),
            *(
                ProjectionRunner(
                    PartitionedProjection(key),
                    processor(batch_size=100, partition_key=key, total_partitions=partitions),
                )
                for key in range(partitions)
            ),
        ]
    return [
        ProjectionRunner(UserCounter(), processor(batch_size=100)),
        ProjectionRunner(RevenueProjection(), processor(batch_size=50)),
        ProjectionRunner(ActivityLog(), processor(batch_size=200)),
    ]


def describe(pair: ProjectionRunner) -> str:
    config = pair.processor.config
    partition = (
        f", partition {config.partition_key}/{config.total_partitions}"
        if config.total_partitions > 1
        else ""
    )
    return f"{pair.projection.name}(batch {config.batch_size}{partition})"


def append_sample(engine: sa.Engine, store: EventStore) -> None:
    """New users and orders, with new aggregate ids every run, in one transaction."""
    with Session(engine) as session, session.begin():
        user_ids = []
        for name in SAMPLE_USERS:
            user_id = str(uuid.uuid4())
            user_ids.append(user_id)
            created = Event(
                bounded_context=BOUNDED_CONTEXT,
                aggregate_type="User",
                aggregate_id=user_id,
                event_type="UserCreated",
                payload={"name": name, "email": f"{name.lower()}@example.com"},
            )
            store.append(session, [created], ExpectedVersion.no_stream())
        for buyer, amount_cents in SAMPLE_ORDERS:
            placed = Event(
                bounded_context=BOUNDED_CONTEXT,
                aggregate_type="Order",
                aggregate_id=str(uuid.uuid4()),
                event_type="OrderPlaced",
                payload={"user_id": user_ids[buyer], "amount_cents": amount_cents},
            )
            store.append(session, [placed], ExpectedVersion.no_stream())
    revenue = sum(amount for _, amount in SAMPLE_ORDERS)
    say(
        f"Appended {len(SAMPLE_USERS)} users and {len(SAMPLE_ORDERS)} orders "
        f"({dollars(revenue)}) to the event store."
    )


def print_stats(engine: sa.Engine, runners: list[ProjectionRunner], pattern: str) -> None:
    """Everything here is read back from the database, not from memory."""
    with Session(engine) as session:
        print("\nFinal stats (read from the read-model tables):")
        if pattern == "default":
            users = session.get(UserCount, 1)
            revenue = session.get(Revenue, 1)
            activity = session.scalar(sa.select(sa.func.count()).select_from(ActivityEntry))
            print(f"  Users created:        {users.total if users else 0}")
            print(f"  Orders placed:        {revenue.orders if revenue else 0}")
            print(f"  Revenue:              {dollars(revenue.total_cents if revenue else 0)}")
            print(f"  Activity log entries: {activity}")
        else:
            rows = session.execute(sa.select(PatternCount.projection, PatternCount.events))
            counts = {name: events for name, events in rows}
            for pair in runners:
                if pair.processor.config.total_partitions == 1:
                    name = pair.projection.name
                    print(f"  {name:<17} events: {counts.get(name, 0)}")
            if pattern == "mixed-partitions":
                per_partition = session.execute(
                    sa.select(AggregateCount.partition_key, sa.func.sum(AggregateCount.events))
                    .group_by(AggregateCount.partition_key)
                    .order_by(AggregateCount.partition_key)
                ).all()
                for key, events in per_partition:
                    print(f"    partition {key}: {events} events")
                total = sum(int(events) for _, events in per_partition)
                print(f"  mp_partitioned    events: {total} (all partitions together)")
        print("Checkpoints (one per projection and partition):")
        names = sorted({pair.projection.name for pair in runners})
        checkpoints = session.scalars(
            sa.select(ProjectionCheckpoint)
            .where(ProjectionCheckpoint.projection_name.in_(names))
            .order_by(ProjectionCheckpoint.projection_name, ProjectionCheckpoint.partition_key)
        )
        for cp in checkpoints:
            print(
                f"  {cp.projection_name:<17} partition {cp.partition_key}/{cp.total_partitions}: "
                f"position {cp.global_position}, {cp.events_handled} events handled"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep running and handle new events until Ctrl+C / SIGTERM",
    )
    parser.add_argument(
        "--append-only",
        action="store_true",
        help="append the sample events and exit (a --follow process picks them up)",
    )
    parser.add_argument(
        "--pattern",
        choices=("default", "fast-slow", "mixed-partitions"),
        default="default",
        help="default: the three projections; fast-slow: batch 1000 vs 10; "
        "mixed-partitions: one unpartitioned projection next to one over 4 partitions",
    )
    parser.add_argument(
        "--slow-delay",
        type=float,
        default=0.05,
        help="seconds the slow projection spends per event (--pattern fast-slow)",
    )
    args = parser.parse_args(argv)

    engine = eventsource.create_engine(args.database_url)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model tables
    store = EventStore()

    append_sample(engine, store)
    if args.append_only:
        engine.dispose()
        return 0

    runners = build_runners(engine, store, args.pattern, args.slow_delay)
    described = ", ".join(describe(pair) for pair in runners)
    say(f"Running {len(runners)} processors in one process: {described}")
    runner = Runner()  # SIGINT / SIGTERM: finish the batch in hand, commit, stop
    if args.follow:
        say("Following new events; press Ctrl+C to stop.")
        runner.run(runners)
        say("Stopped gracefully: every batch in hand was committed.")
    else:
        runner.run_until_caught_up(runners)
        say("All projections have caught up.")
    print_stats(engine, runners, args.pattern)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
