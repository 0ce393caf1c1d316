"""What ``eventsource.status.status()`` costs on a large log (PostgreSQL), before and after.

Loads ``--events`` events (default 500,000) into a throwaway database with
``INSERT ... SELECT generate_series`` (valid rows: stream versions, FNV-1a partition
hashes, ``transaction_id`` from the column default, one transaction per
``--chunk`` events, aggregate heads to match), vacuums and analyses it, then times
``status()`` (median of ``--calls`` calls) in two states of the checkpoints table:

  * "caught up": 3 projections whose checkpoints are at the last event;
  * "lagging": 3 projections lagging by 1,000 events, by 100,000 events and by the
    whole log (never ran: checkpoint 0).

"before" is the implementation this one replaced, kept below as :func:`before_status`
(the head, a full ``count(*)`` of the log, then an exact ``count(*)`` after each
checkpoint); "after" is :func:`eventsource.status.status` (the head from the primary
key's index, lag counted over the lag range only, at most ``lag_cap`` rows). The two
run interleaved, call by call, so the ratio compares like with like on a noisy machine.
Also timed: a Prometheus scrape of ``metrics.track_lag`` (the same query), and
``status.blockers()`` with an open transaction holding 1,000 events back.

Usage::

    python bench/status.py                     # 500,000 events, 30 calls each
    python bench/status.py --events 100000 --calls 50
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from _common import (
    add_url_argument,
    exit_on_sigterm,
    print_table,
    psycopg_conninfo,
    throwaway_database,
)

import eventsource
from eventsource import cluster
from eventsource.models import _PGXid8
from eventsource.partition import fnv1a_32
from eventsource.status import ProjectionStatus, blockers, require_schema, status

AGGREGATES = 5_000


def load(conninfo: str, events: int, chunk: int) -> None:
    """``events`` events over AGGREGATES aggregates, ``chunk`` per transaction."""
    ids = [f"order-{i}" for i in range(AGGREGATES)]
    hashes = [fnv1a_32(aggregate_id) for aggregate_id in ids]
    insert = """
        INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version,
                            partition_hash, event_id, event_type, event_version, payload,
                            created_at)
        SELECT 'shop', 'Order', a.id, (g - 1) / %(aggregates)s::bigint + 1, a.hash,
               gen_random_uuid(), 'Placed', 1, jsonb_build_object('n', g), now()
        FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
        JOIN unnest(%(ids)s::text[], %(hashes)s::bigint[]) WITH ORDINALITY AS a(id, hash, i)
          ON a.i = (g - 1) %% %(aggregates)s::bigint + 1
        ORDER BY g
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for first in range(1, events + 1, chunk):
            last = min(events, first + chunk - 1)
            with conn.transaction():
                conn.execute(
                    insert,
                    {
                        "first": first,
                        "last": last,
                        "ids": ids,
                        "hashes": hashes,
                        "aggregates": AGGREGATES,
                    },
                )
        conn.execute(
            "INSERT INTO aggregate_heads (bounded_context, aggregate_type, aggregate_id, version)"
            " SELECT bounded_context, aggregate_type, aggregate_id, max(aggregate_version)"
            " FROM events GROUP BY 1, 2, 3"
        )
        conn.execute("VACUUM (ANALYZE) events")
        conn.execute("VACUUM (ANALYZE) aggregate_heads")


def set_checkpoints(conninfo: str, lags: dict[str, int | None]) -> None:
    """Replace every checkpoint: one per name, lagging by that many events (None: all)."""
    now = datetime.now(UTC)
    with psycopg.connect(conninfo) as conn:
        conn.execute("DELETE FROM projection_checkpoints")
        for name, lag in lags.items():
            tx, pos = 0, 0
            if lag is not None:
                row = conn.execute(
                    "SELECT transaction_id::text, global_position FROM events"
                    " ORDER BY transaction_id DESC, global_position DESC OFFSET %s LIMIT 1",
                    (lag,),
                ).fetchone()
                if row is not None:  # else fewer events than the lag: all of them
                    tx, pos = int(row[0]), int(row[1])
            conn.execute(
                "INSERT INTO projection_checkpoints (projection_name, partition_key,"
                " total_partitions, transaction_id, global_position, events_handled, updated_at)"
                " VALUES (%s, 0, 1, %s, %s, 0, %s)",
                (name, tx, pos, now),
            )


def before_status(engine: sa.Engine, store: eventsource.EventStore) -> list[tuple[str, int, int]]:
    """The replaced implementation's queries (the rows' other fields left out)."""
    with engine.connect() as conn:
        require_schema(conn, store)
        cluster.check(conn, store.tables, record=False)
        ev = store.tables.events
        ck = store.tables.projection_checkpoints
        head = int(conn.execute(sa.select(sa.func.max(ev.c.global_position))).scalar() or 0)
        conn.execute(sa.select(sa.func.count()).select_from(ev)).scalar()

        def after(tx: int, pos: int) -> sa.ColumnElement[bool]:
            xid = sa.cast(sa.cast(sa.literal(tx, sa.BigInteger), sa.Text), _PGXid8())
            return sa.tuple_(ev.c.transaction_id, ev.c.global_position) > sa.tuple_(xid, pos)

        rows = []
        for row in conn.execute(sa.select(ck).order_by(ck.c.projection_name)).mappings():
            lag = conn.execute(
                sa.select(sa.func.count())
                .select_from(ev)
                .where(after(row["transaction_id"], row["global_position"]))
            ).scalar()
            rows.append((row["projection_name"], head, int(lag or 0)))
        return rows


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_url_argument(parser)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--chunk", type=int, default=10_000, help="events per transaction")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    store = eventsource.EventStore()

    with throwaway_database(sa.make_url(args.url), "es_bench_status_") as url:
        engine = eventsource.create_engine(url)
        eventsource.upgrade(engine)
        conninfo = psycopg_conninfo(url.set(drivername="postgresql"))
        started = time.perf_counter()
        load(conninfo, args.events, args.chunk)
        print(f"loaded {args.events:,} events in {time.perf_counter() - started:.1f} s")

        states: dict[str, dict[str, int | None]] = {
            "3 caught up": {"caught_up_a": 0, "caught_up_b": 0, "caught_up_c": 0},
            "3 lagging (1k, 100k, all)": {
                "lag_1k": 1_000,
                "lag_100k": 100_000,
                "lag_all": None,
            },
        }
        results: list[list[str]] = []
        shown: dict[str, list[ProjectionStatus]] = {}
        for state, lags in states.items():
            set_checkpoints(conninfo, lags)
            before_times: list[float] = []
            after_times: list[float] = []
            for call in range(args.calls + 1):  # the first call of each warms up
                pair = [
                    (before_times, lambda: before_status(engine, store)),
                    (after_times, lambda: status(engine, store=store)),
                ]
                if call % 2:
                    pair.reverse()
                for sink, work in pair:
                    elapsed, _ = timed(work)
                    if call:
                        sink.append(elapsed)
            shown[state] = status(engine, store=store)
            before = statistics.median(before_times)
            after = statistics.median(after_times)
            results.append([state, ms(before), ms(after), f"{before / after:.1f}"])

        # A Prometheus scrape pays the same query (the lag gauge), here in state 2.
        scrape_ms = ""
        try:
            import prometheus_client

            from eventsource.metrics import PrometheusMetrics
        except ImportError:  # pragma: no cover - the metrics extra is not installed
            pass
        else:
            registry = prometheus_client.CollectorRegistry()
            PrometheusMetrics(registry=registry).track_lag(engine, store=store)
            prometheus_client.generate_latest(registry)  # warm-up
            scrapes = [
                timed(lambda: prometheus_client.generate_latest(registry))[0]
                for _ in range(args.calls)
            ]
            scrape_ms = ms(statistics.median(scrapes))

        # What holds them back: an open transaction with 1,000 events committed after it.
        blocker = psycopg.connect(conninfo, application_name="bench blocker")
        try:
            blocker.execute("SELECT pg_current_xact_id()")
            set_checkpoints(conninfo, {"caught_up_a": 0, "caught_up_b": 0, "caught_up_c": 0})
            load_more = args.events + 1
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO events (bounded_context, aggregate_type, aggregate_id,"
                    " aggregate_version, partition_hash, event_id, event_type, event_version,"
                    " payload, created_at)"
                    " SELECT 'shop', 'Late', 'late-' || g, 1, 0, gen_random_uuid(), 'Placed', 1,"
                    " '{}'::jsonb, now() FROM generate_series(%s::bigint, %s::bigint) AS g",
                    (load_more, load_more + 999),
                )
            held: list[float] = []
            named: list[float] = []
            for call in range(args.calls + 1):
                elapsed, rows = timed(lambda: status(engine, store=store))
                assert all(row.held_back and row.lag == 1_000 for row in rows), rows
                elapsed_blockers, found = timed(lambda: blockers(engine, store=store))
                assert blocker.info.backend_pid in [b.pid for b in found], found
                if call:
                    held.append(elapsed)
                    named.append(elapsed_blockers)
        finally:
            blocker.rollback()
            blocker.close()
        engine.dispose()

    print(
        f"\nstatus() on {args.events:,} events, median of {args.calls} calls each "
        "(interleaved); before: full count(*) + exact count per checkpoint"
    )
    print_table(["checkpoints", "before ms", "after ms", "before / after"], results, "<>>>")
    for name, rows in shown.items():
        shown_lags = ", ".join(
            f"{row.projection} {'> ' if row.lag_capped else ''}{row.lag:,}" for row in rows
        )
        print(f"  {name}: {shown_lags}")
    if scrape_ms:
        print(f"\nPrometheus scrape (lag gauge, 3 lagging projections): {scrape_ms} ms median")
    print(
        f"held back by an open transaction (1,000 events behind it, 3 projections): "
        f"status() {ms(statistics.median(held))} ms, blockers() "
        f"{ms(statistics.median(named))} ms median"
    )


if __name__ == "__main__":
    main()
