"""Where a one-event append's time goes: the library, the Session, psycopg, in one run.

Three ways to run the same append, one transaction each, interleaved by round:

  (1) ``EventStore.append`` in a fresh ``Session`` and transaction (what applications do);
  (2) the same ``Session`` and transaction, the store's statement sent by hand through
      its connection's psycopg cursor with parameters built by the store's own
      validation (so (1) - (2) is the library's own work around the statement);
  (3) psycopg alone on one connection: the same statement and parameters, then
      ``COMMIT`` (so (2) - (3) is what the Session, the pool and SQLAlchemy's
      Connection cost per transaction).

Each builds its ``Event`` and validates it in the timed loop, appends to 100 aggregates
round robin, and reports transactions per second and the client's CPU per transaction
(steadier than wall time on a shared machine). The store runs with ``notify=False``,
so wake-up hints (measured by bench/notify_lock.py) are not counted.

The script creates its own throwaway database next to the admin URL's (``--url`` /
``EVENTSOURCE_BENCH_PG_URL``) and drops it at the end.

Usage::

    python bench/append_cost.py                    # about 40 s
    python bench/append_cost.py --transactions 500 --rounds 2
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource
from eventsource import Event, EventStore, ExpectedVersion
from eventsource.store import _validate

# isort: split
from _common import (
    add_url_argument,
    exit_on_sigterm,
    fmt_rate,
    print_setup,
    print_table,
    psycopg_conninfo,
    server_settings,
    throwaway_database,
)

PAYLOAD = {"name": "item-1", "amount": 12.5, "tags": ["bench", "append"], "note": "x" * 100}
SERVER_SETTINGS = ("server_version", "fsync", "synchronous_commit", "wal_sync_method")


def event(aggregate_id: str) -> Event:
    return Event(
        bounded_context="bench",
        aggregate_type="Order",
        aggregate_id=aggregate_id,
        event_type="OrderLinePriced",
        payload=PAYLOAD,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_url_argument(parser)
    parser.add_argument("--transactions", type=int, default=2000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    admin = sa.make_url(args.url)
    with throwaway_database(admin, "eventsource_bench_cost_") as url:
        engine = eventsource.create_engine(url)
        eventsource.upgrade(engine)
        conninfo = psycopg_conninfo(url)
        print("Where a one-event append's time goes (bench/append_cost.py)")
        print_setup(server_settings(conninfo, SERVER_SETTINGS), url)
        store = EventStore(notify=False)
        statement = store._pg.append[("any", True)]
        raw = psycopg.connect(conninfo)
        any_version = ExpectedVersion.any()

        def params(aggregate_id: str) -> dict[str, object]:
            return store._pg.params(_validate([event(aggregate_id)]), any_version)

        def append(aggregate_id: str) -> None:
            with Session(engine) as session, session.begin():
                store.append(session, [event(aggregate_id)])

        def by_hand(aggregate_id: str) -> None:
            with Session(engine) as session, session.begin():
                driver: Any = session.connection().connection.driver_connection
                cursor = driver.cursor()
                cursor.execute(statement, params(aggregate_id))
                cursor.fetchall()

        def psycopg_alone(aggregate_id: str) -> None:
            cursor = raw.cursor()
            cursor.execute(statement, params(aggregate_id))
            cursor.fetchall()
            raw.commit()

        paths: dict[str, Callable[[str], None]] = {
            "append in a Session": append,
            "Session + the statement by hand": by_hand,
            "psycopg alone + COMMIT": psycopg_alone,
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        try:
            for round_ in range(args.rounds):
                for name, run in paths.items():
                    ids = [f"{round_}-{name[:6]}-{i}" for i in range(100)]
                    run(ids[0])  # warm: the statement is prepared after a few runs
                    started, cpu = time.perf_counter(), time.process_time()
                    for n in range(args.transactions):
                        run(ids[n % 100])
                    wall = time.perf_counter() - started
                    spent = time.process_time() - cpu
                    results[name].append((args.transactions / wall, spent / args.transactions))
                print(f"round {round_ + 1}/{args.rounds} done")
        finally:
            raw.close()
            engine.dispose()
        rows = []
        for name, values in results.items():
            rate = statistics.median(v[0] for v in values)
            cpu_ms = statistics.median(v[1] for v in values) * 1e3
            rows.append([name, fmt_rate(rate), f"{cpu_ms:.3f}"])
        print()
        print_table(["path", "tx/s", "client CPU ms/tx"], rows, "<>>")
        print("medians over rounds; one event per transaction, notify off")


if __name__ == "__main__":
    main()
