"""What an idle poll costs on PostgreSQL, with and without an open write transaction.

A caught-up projection polls (``Processor.process_batch``) every ``poll_interval``. While
a write transaction is open anywhere on the server, events committed after it started
wait behind it (DESIGN invariant 2). This measures the cost of one idle poll:

  (a) "no blocker": the projection is caught up and nothing waits;
  (b) "blocker": a writer of the store (marked, see docs/horizon.md) that took its id
      before ``--behind`` events (default 100,000) were committed is still open, so all
      of them wait behind it.

for an unscoped projection and for a scoped one (``aggregate_types``, which also runs
the horizon query). The poll must not scan what waits: the figure that matters is
the ratio blocker / no blocker per projection, measured in the same run (
``--polls`` polls of (a), then of (b), then of (a) again, so that the baseline brackets
the blocked phase), printed as medians.

Run it against another checkout (``PYTHONPATH=/path/to/checkout python bench/poll.py``)
to compare versions. It creates a throwaway database beside ``--url`` and drops it.

Usage::

    python bench/poll.py                     # 100,000 events behind, 200 polls each
    python bench/poll.py --behind 200000 --polls 100
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import statistics
import time
import uuid
from datetime import UTC, datetime

import psycopg
import sqlalchemy as sa
from _common import (
    EVENT_WRITE_COLUMNS,
    add_url_argument,
    exit_on_sigterm,
    print_table,
    psycopg_conninfo,
    throwaway_database,
)
from sqlalchemy.orm import Session

import eventsource
from eventsource import PersistedEvent, Processor, ProcessorConfig, Projection


class Everything(Projection):
    name = "everything"

    def handle(self, event: PersistedEvent, session: Session) -> None:
        pass


class RareOnly(Projection):
    name = "rare_only"
    aggregate_types = ("Rare",)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        pass


def seed(conninfo: str, count: int, prefix: str) -> None:
    """``count`` events of type Order, committed in one COPY (one transaction)."""
    buffer = io.StringIO()
    now = datetime.now(UTC).isoformat()
    for i in range(count):
        row = [
            "shop",
            "Order",
            f"{prefix}-{i}",
            "1",
            str(eventsource.partition.fnv1a_32(f"{prefix}-{i}")),
            str(uuid.uuid4()),
            "Placed",
            "1",
            json.dumps({"n": i}),
            "\\N",
            "\\N",
            "\\N",
            "\\N",
            now,
        ]
        buffer.write("\t".join(row) + "\n")
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        columns = ", ".join(EVENT_WRITE_COLUMNS)
        with cur.copy(f"COPY events ({columns}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())


def poll_seconds(processor: Processor, projection: Projection) -> float:
    started = time.perf_counter()
    result = processor.process_batch(projection)
    elapsed = time.perf_counter() - started
    assert result.handled == 0, "the projection was meant to be caught up"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_url_argument(parser)
    parser.add_argument("--behind", type=int, default=100_000)
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)

    with throwaway_database(sa.make_url(args.url), "es_bench_poll_") as url:
        engine = eventsource.create_engine(url)
        eventsource.upgrade(engine)
        conninfo = psycopg_conninfo(url.set(drivername="postgresql"))
        seed(conninfo, 1000, "before")
        processors = {
            projection.name: (projection, Processor(engine, config=ProcessorConfig()))
            for projection in (Everything(), RareOnly())
        }
        times: dict[tuple[str, str], list[float]] = {}

        def measure(phase: str) -> None:
            for _ in range(args.polls):
                for name, (projection, processor) in processors.items():
                    times.setdefault((name, phase), []).append(poll_seconds(processor, projection))

        for projection, processor in processors.values():
            processor.run_until_caught_up(projection)
        measure("no blocker")  # before the blocked phase...
        blocker = psycopg.connect(conninfo)
        try:
            # A writer of the store (its mark, then its id), open: it holds projections
            # back under either horizon rule (docs/horizon.md).
            blocker.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")
            blocker.execute("SELECT pg_current_xact_id()")
            seed(conninfo, args.behind, "behind")
            measure("blocker")
        finally:
            blocker.rollback()
            blocker.close()
        for projection, processor in processors.values():
            processor.run_until_caught_up(projection)
        measure("no blocker")  # ...and after it, so drift on a shared machine shows less
        engine.dispose()

    rows = []
    for name in processors:
        free = statistics.median(times[(name, "no blocker")])
        held = statistics.median(times[(name, "blocker")])
        rows.append([name, f"{free * 1000:.2f}", f"{held * 1000:.2f}", f"{held / free:.2f}"])
    print(
        f"\nidle poll, median of {args.polls} polls each; {args.behind:,} events waiting "
        "behind an open write transaction in the 'blocker' column"
    )
    print_table(["projection", "no blocker ms", "blocker ms", "blocker / no blocker"], rows, "<>>>")


if __name__ == "__main__":
    main()
