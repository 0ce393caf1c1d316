"""The event store embedded in a SQLite file, with concurrent writers and retries.

No server: the database is a file next to you. Four threads (think: four web requests
at once) reserve units of one product, 15 in stock, 20 requests. Each loads the
product's stream, decides, and appends expecting the version it loaded; when another
thread got there first the append fails with ``OptimisticConcurrencyError`` and the
thread reloads and decides again. The result is exact: 15 reservations, 5 refusals,
never an oversold unit.

    python examples/sqlite_basic/main.py

Runs on PostgreSQL too (``DATABASE_URL=postgresql://...``); the code does not change.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource
from eventsource import Event, EventStore, ExpectedVersion, OptimisticConcurrencyError, Stream

BOUNDED_CONTEXT = "inventory"
AGGREGATE_TYPE = "Product"
STOCK = 15
THREADS = 4
REQUESTS_PER_THREAD = 5


@dataclass
class Tally:
    reserved: int = 0
    refused: int = 0
    conflicts: int = 0


def units_available(stream: Stream) -> int:
    available = 0
    for event in stream:
        if event.event_type == "StockReceived":
            available += event.payload["units"]
        elif event.event_type == "UnitReserved":
            available -= 1
    return available


def reserve_one(
    engine: sa.Engine, store: EventStore, product_id: str, who: str, tally: Tally
) -> None:
    """One request: load, decide, append with the loaded version; retry on a conflict."""
    while True:
        with Session(engine) as session:
            stream = store.read_stream(session, BOUNDED_CONTEXT, AGGREGATE_TYPE, product_id)
        if units_available(stream) == 0:
            tally.refused += 1
            return
        reservation = Event(
            bounded_context=BOUNDED_CONTEXT,
            aggregate_type=AGGREGATE_TYPE,
            aggregate_id=product_id,
            event_type="UnitReserved",
            payload={"by": who},
        )
        threading.Event().wait(random.uniform(0, 0.005))  # other requests get in here
        try:
            with Session(engine) as session, session.begin():
                store.append(session, [reservation], ExpectedVersion.exact(stream.version))
        except OptimisticConcurrencyError:
            tally.conflicts += 1  # somebody else changed the product: reload, decide again
            continue
        tally.reserved += 1
        return


def describe_sqlite(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        (_, _, path), *_ = conn.exec_driver_sql("PRAGMA database_list").all()
    print(f"SQLite file: {path}")
    print(f"  journal_mode={journal} (readers run beside the one writer)")
    print(f"  busy_timeout={timeout} ms (a writer waits its turn instead of failing)")
    print("  every transaction starts with BEGIN IMMEDIATE (eventsource.create_engine)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    args = parser.parse_args(argv)

    # A file, not ":memory:": an in-memory database belongs to one connection, and the
    # threads below each take their own connection from the pool.
    engine = eventsource.create_engine(args.database_url, pool_size=THREADS)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    if engine.dialect.name == "sqlite":
        describe_sqlite(engine)
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    store = EventStore()

    product_id = str(uuid.uuid4())
    with Session(engine) as session, session.begin():
        store.append(
            session,
            [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type=AGGREGATE_TYPE,
                    aggregate_id=product_id,
                    event_type="StockReceived",
                    payload={"units": STOCK},
                )
            ],
            ExpectedVersion.no_stream(),
        )
    print(f"Product {product_id}: {STOCK} units in stock")
    print(f"{THREADS} threads x {REQUESTS_PER_THREAD} requests to reserve one unit each...")

    tallies = {f"thread-{n}": Tally() for n in range(1, THREADS + 1)}

    def worker(name: str) -> None:
        for _ in range(REQUESTS_PER_THREAD):
            reserve_one(engine, store, product_id, name, tallies[name])

    threads = [threading.Thread(target=worker, args=(name,)) for name in tallies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for name, tally in tallies.items():
        print(
            f"  {name}: reserved {tally.reserved}, refused {tally.refused} (out of stock), "
            f"retried {tally.conflicts} conflicts"
        )
    with Session(engine) as session:
        stream = store.read_stream(session, BOUNDED_CONTEXT, AGGREGATE_TYPE, product_id)
        last = stream.events[-1].global_position
        tail = store.read_all(session, after=max(last - 3, 0), limit=3)
    reserved = sum(1 for event in stream if event.event_type == "UnitReserved")
    refused = sum(tally.refused for tally in tallies.values())
    conflicts = sum(tally.conflicts for tally in tallies.values())
    print(
        f"Stream version {stream.version}: {reserved} reservations, {refused} refusals, "
        f"{conflicts} conflicts retried"
    )
    print(f"Units left: {units_available(stream)} (never below zero: nothing oversold)")
    print("Last events of the global log (read_all):")
    for event in tail:
        print(
            f"  #{event.global_position} {event.aggregate_type} v{event.aggregate_version} "
            f"{event.event_type} {event.payload}"
        )
    engine.dispose()
    return 0 if reserved == STOCK and units_available(stream) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
