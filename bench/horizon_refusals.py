"""Ordinary writers against horizons computed nonstop: how many appends are refused.

Plain appends mark themselves before they take a transaction id, so the store's reading
horizon must never refuse them (docs/horizon.md). PostgreSQL gives a transaction its id
a moment before it locks that id; a horizon read in that moment sees the writer's mark
without its id. Before R1 counted such a writer as its snapshot's ``xmin``, it
published a horizon above the writer's id and the append was refused with
``AppendOrderError`` (3 of 16,011 appends in 20 s here). Wake-ups make processors
compute horizons right after each commit, which makes that moment far likelier to be hit.

``--writers`` threads (default 4) append one event per transaction while ``--readers``
threads (default 2) compute the store horizon in a loop, for ``--seconds`` (default 20),
on a throwaway database. It prints appends, refusals and computations; exit 1 on any
refusal. Timing-dependent: a run without refusals shows the window was not hit, not
that it cannot be.

Usage::

    python bench/horizon_refusals.py
    python bench/horizon_refusals.py --seconds 60 --writers 6 --readers 3
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import uuid

import sqlalchemy as sa
from _common import add_url_argument, exit_on_sigterm, throwaway_database
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import horizon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_url_argument(parser)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with throwaway_database(sa.make_url(args.url), "es_bench_refusals_") as url:
        engine = es.create_engine(url, pool_size=args.writers + args.readers)
        try:
            es.upgrade(engine)
            return run(engine, args.seconds, args.writers, args.readers)
        finally:
            engine.dispose()


def run(engine: sa.Engine, seconds: float, writers: int, readers: int) -> int:
    store = es.EventStore(notify=False)
    stop = threading.Event()
    refused: list[es.AppendOrderError] = []
    appended = [0] * writers

    def write(slot: int) -> None:
        while not stop.is_set():
            event = es.Event(
                bounded_context="bench",
                aggregate_type="Order",
                aggregate_id=str(uuid.uuid4()),
                event_type="Placed",
                payload={},
            )
            try:
                with Session(engine) as session, session.begin():
                    store.append(session, [event])
                appended[slot] += 1
            except es.AppendOrderError as exc:
                refused.append(exc)

    reader = horizon.StoreHorizon(store.tables.names)

    def read() -> None:
        while not stop.is_set():
            reader.compute(engine)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    threads += [threading.Thread(target=read) for _ in range(readers)]
    for thread in threads:
        thread.start()
    try:
        stop.wait(seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(
        f"{writers} writers, {readers} horizon readers, {seconds:.0f} s: "
        f"{sum(appended):,} appends, {len(refused)} refused, "
        f"{reader.computations:,} horizons computed"
    )
    for exc in refused[:3]:
        print(f"  refused: {exc}", file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
