"""Adding workers to a live system, one at a time: each catches up on its own.

Events keep arriving the whole time (a producer thread appends a few per second).
Worker 1 starts; a moment later worker 2 is added, then worker 3. Each worker is a
new projection (its own name, so its own checkpoint, starting at position 0) on its
own processor and thread: it replays the history at full speed while the others keep
up with the new events, and nobody waits for anybody. At the end the producer stops,
every worker drains what is left, and each must have seen every event: nothing lost.

This is how you add a read model to a running system, or deploy the new version of a
projection next to the old one (blue/green) before switching reads over.

    python examples/scaling/main.py
    python examples/scaling/main.py --workers 5 --step 2

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import sys
import threading
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import eventsource
from eventsource import (
    Event,
    EventStore,
    PersistedEvent,
    Processor,
    ProcessorConfig,
    Projection,
    ProjectionRunner,
    Runner,
)
from eventsource.models import EventRecord

BOUNDED_CONTEXT = "telemetry"
RUN_ID = uuid.uuid4().hex[:8]  # each run's workers are new projections


class Base(DeclarativeBase):
    pass


class WorkerCount(Base):
    __tablename__ = "sc_worker_counts"

    projection: Mapped[str] = mapped_column(primary_key=True)
    events: Mapped[int] = mapped_column(sa.BigInteger)
    last_position: Mapped[int] = mapped_column(sa.BigInteger)


class ReadingCounter(Projection):
    """Counts readings. Instances get their own name, so each keeps its own checkpoint."""

    name = "sc_reading_counter"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def __init__(self, worker: int) -> None:
        self.name = f"sc_reading_counter_{RUN_ID}_{worker}"

    def handle(self, event: PersistedEvent, session: Session) -> None:
        row = session.get(WorkerCount, self.name)
        if row is None:
            row = WorkerCount(projection=self.name, events=0, last_position=0)
            session.add(row)
        row.events += 1
        row.last_position = event.global_position


def append_reading(engine: sa.Engine, store: EventStore, sensor: str, n: int) -> None:
    with Session(engine) as session, session.begin():
        store.append(
            session,
            [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Sensor",
                    aggregate_id=sensor,
                    event_type="ReadingTaken",
                    payload={"celsius": 20 + n % 7},
                )
            ],
        )


def produce(engine: sa.Engine, store: EventStore, rate: float, stop: threading.Event) -> None:
    sensors = [str(uuid.uuid4()) for _ in range(5)]
    n = 0
    while not stop.wait(1 / rate):
        append_reading(engine, store, sensors[n % len(sensors)], n)
        n += 1


def report(engine: sa.Engine, workers: list[ProjectionRunner], label: str) -> tuple[int, list[int]]:
    with Session(engine) as session:
        in_store = session.scalar(
            sa.select(sa.func.count())
            .select_from(EventRecord)
            .where(EventRecord.bounded_context == BOUNDED_CONTEXT)
        )
        counts = {
            row.projection: row.events
            for row in session.scalars(
                sa.select(WorkerCount).where(
                    WorkerCount.projection.in_([w.projection.name for w in workers])
                )
            )
        }
    seen = [counts.get(w.projection.name, 0) for w in workers]
    columns = "  ".join(f"worker {n}: {count:>4}" for n, count in enumerate(seen, start=1))
    print(f"{label:<9} events in store: {in_store:>4}   {columns}", flush=True)
    return int(in_store or 0), seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    parser.add_argument("--workers", type=int, default=3, help="workers to add (default 3)")
    parser.add_argument("--step", type=float, default=1.0, help="seconds between additions")
    parser.add_argument("--rate", type=float, default=40.0, help="events appended per second")
    parser.add_argument("--backlog", type=int, default=100, help="events appended up front")
    args = parser.parse_args(argv)

    engine = eventsource.create_engine(args.database_url, pool_size=args.workers + 2)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model table
    store = EventStore()

    backlog_sensor = str(uuid.uuid4())
    for n in range(args.backlog):
        append_reading(engine, store, backlog_sensor, n)
    print(
        f"Appended a backlog of {args.backlog} readings; the producer now adds "
        f"{args.rate:g} per second."
    )

    stop_producing = threading.Event()
    producer = threading.Thread(
        target=produce, args=(engine, store, args.rate, stop_producing), daemon=True
    )
    producer.start()

    workers: list[ProjectionRunner] = []
    threads: list[threading.Thread] = []
    try:
        for number in range(1, args.workers + 1):
            pair = ProjectionRunner(
                ReadingCounter(number), Processor(engine, store, ProcessorConfig(batch_size=20))
            )
            thread = threading.Thread(
                target=pair.processor.run, args=(pair.projection,), daemon=True
            )
            workers.append(pair)
            threads.append(thread)
            thread.start()
            print(f"+ worker {number} started ({pair.projection.name}): catching up from 0")
            for tick in (1, 2):
                stop_producing.wait(args.step / 2)
                elapsed = (number - 1) * args.step + tick * args.step / 2
                report(engine, workers, f"  t+{elapsed:.1f}s")
    except KeyboardInterrupt:
        print("Interrupted: stopping the producer and draining the workers.")
    finally:
        stop_producing.set()
        producer.join()
        for pair in workers:
            pair.processor.stop()
        for thread in threads:
            thread.join()

    # Everything appended has been committed: drain the rest and compare.
    Runner().run_until_caught_up(workers)
    in_store, seen = report(engine, workers, "final")
    engine.dispose()
    if all(count == in_store for count in seen):
        print(
            f"OK: each of the {len(workers)} workers saw all {in_store} events; "
            "nothing lost, nothing twice."
        )
        return 0
    print("MISMATCH: a worker did not see every event")
    return 1


if __name__ == "__main__":
    sys.exit(main())
