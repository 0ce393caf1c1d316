"""One projection spread across processes: each process runs one partition.

Start one process per partition key, all with the same ``--total-partitions``; each
handles only the aggregates whose id hashes to its key (FNV-1a, as the Go original),
keeps its own checkpoint row and commits its own transactions. PostgreSQL (or the
SQLite file) is the only coordinator: no broker, no leader.

    python examples/partitioned/main.py --append 200          # add events to process
    python examples/partitioned/main.py --partition-key 0 --total-partitions 4
    PARTITION_KEY=1 TOTAL_PARTITIONS=4 python examples/partitioned/main.py
    python examples/partitioned/main.py --check               # every event exactly once?

``launcher.py`` beside this file does all of it with 4 processes. A worker exits once
it has caught up; ``--follow`` keeps it running until Ctrl+C / SIGTERM.
"""

from __future__ import annotations

import argparse
import os
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
    Runner,
)
from eventsource.models import EventRecord

BOUNDED_CONTEXT = "ledger"
EVENTS_PER_ACCOUNT = 4
#: Any constant works: it only has to be the same in every process.
SCHEMA_LOCK_ID = 7_352_001


class Base(DeclarativeBase):
    pass


class HandledEvent(Base):
    """One row per handled event. The primary key makes handling one twice impossible."""

    __tablename__ = "pt_handled_events"

    global_position: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, autoincrement=False
    )
    aggregate_id: Mapped[str]
    partition_key: Mapped[int]
    process_id: Mapped[int]


class LedgerProjection(Projection):
    name = "pt_ledger"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def __init__(self, partition_key: int) -> None:
        self.partition_key = partition_key

    def handle(self, event: PersistedEvent, session: Session) -> None:
        session.add(
            HandledEvent(
                global_position=event.global_position,
                aggregate_id=event.aggregate_id,
                partition_key=self.partition_key,
                process_id=os.getpid(),
            )
        )


def prepare_schema(engine: sa.Engine) -> None:
    """Migrate and create the read model once, even when several workers start together."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Concurrent CREATE TABLEs race on PostgreSQL: serialise the set-up.
            # (SQLite already does: every transaction starts with BEGIN IMMEDIATE.)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK_ID})
        eventsource.upgrade(conn)  # the library's tables, through its Alembic migrations
        Base.metadata.create_all(conn)  # this example's read-model table


def append(engine: sa.Engine, count: int) -> None:
    store = EventStore()
    accounts = max(1, count // EVENTS_PER_ACCOUNT)
    with Session(engine) as session, session.begin():
        for n in range(accounts):
            size = EVENTS_PER_ACCOUNT if n < accounts - 1 else count - n * EVENTS_PER_ACCOUNT
            if size <= 0:
                break
            account_id = str(uuid.uuid4())
            events = [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Account",
                    aggregate_id=account_id,
                    event_type="Posted",
                    payload={"amount_cents": 100 * (i + 1)},
                )
                for i in range(size)
            ]
            store.append(session, events, ExpectedVersion.no_stream())
    print(f"Appended {count} events to {accounts} accounts.")


def work(engine: sa.Engine, partition_key: int, total_partitions: int, follow: bool) -> None:
    projection = LedgerProjection(partition_key)
    config = ProcessorConfig(
        batch_size=25, partition_key=partition_key, total_partitions=total_partitions
    )
    pair = (projection, Processor(engine, EventStore(), config))
    runner = Runner()  # SIGINT / SIGTERM: finish the batch in hand, commit, stop
    if follow:
        print(f"partition {partition_key}/{total_partitions}: following; Ctrl+C stops")
        runner.run([pair])
        handled = None
    else:
        handled = runner.run_until_caught_up([pair])[(projection.name, partition_key)]
    with Session(engine) as session:
        mine = session.scalar(
            sa.select(sa.func.count())
            .select_from(HandledEvent)
            .where(HandledEvent.partition_key == partition_key)
        )
    this_run = "" if handled is None else f"handled {handled} events in this run, "
    print(
        f"partition {partition_key}/{total_partitions} (pid {os.getpid()}): "
        f"{this_run}{mine} in total"
    )


def check(engine: sa.Engine) -> bool:
    """Compare the read model with the event store: every event once, no extra, no gap."""
    with Session(engine) as session:
        expected = set(
            session.scalars(
                sa.select(EventRecord.global_position).where(
                    EventRecord.bounded_context == BOUNDED_CONTEXT
                )
            )
        )
        handled = list(session.scalars(sa.select(HandledEvent.global_position)))
        per_partition = session.execute(
            sa.select(HandledEvent.partition_key, sa.func.count())
            .group_by(HandledEvent.partition_key)
            .order_by(HandledEvent.partition_key)
        ).all()
    missing = expected - set(handled)
    duplicated = len(handled) - len(set(handled))
    print("Handled per partition: " + ", ".join(f"{k}: {n}" for k, n in per_partition))
    if missing or duplicated or set(handled) - expected:
        print(f"CHECK FAILED: {len(missing)} missing, {duplicated} duplicated")
        return False
    print(
        f"CHECK OK: all {len(expected)} events handled exactly once "
        f"by {len(per_partition)} partitions"
    )
    return True


def env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    parser.add_argument(
        "--partition-key",
        type=int,
        default=env_int("PARTITION_KEY"),
        help="this worker's partition, 0..total-1 (default: $PARTITION_KEY, else 0)",
    )
    parser.add_argument(
        "--total-partitions",
        type=int,
        default=env_int("TOTAL_PARTITIONS"),
        help="number of partitions (default: $TOTAL_PARTITIONS, else 1)",
    )
    parser.add_argument("--follow", action="store_true", help="keep running until Ctrl+C")
    parser.add_argument("--append", type=int, metavar="N", help="append N events and exit")
    parser.add_argument("--check", action="store_true", help="verify exactly-once and exit")
    args = parser.parse_args(argv)

    engine = eventsource.create_engine(args.database_url)
    prepare_schema(engine)
    try:
        if args.append is not None:
            append(engine, args.append)
            return 0
        if args.check:
            return 0 if check(engine) else 1
        key = args.partition_key if args.partition_key is not None else 0
        total = args.total_partitions if args.total_partitions is not None else 1
        work(engine, key, total, args.follow)
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
