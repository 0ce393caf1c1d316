"""Rebuilding a hot-row read model on PostgreSQL: online (the default) against atomic.

The read model is ONE counter row updated for every event, the worst case for a
long transaction: every update leaves a dead version of the row that nothing can
prune while the transaction is open, so an atomic rebuild slows down as it goes. The
online rebuild commits each batch, like ``run``.

Measures over ``--events`` events (default 50,000), at ``--batch-size`` (default 1000):

  - ``run``: ``Processor.run_until_caught_up`` from an empty checkpoint (the baseline);
  - ``online``: ``eventsource.rebuild.rebuild(engine, projection)``;
  - ``atomic``: the same with ``atomic=True``;

each ``--rounds`` times (default 1), interleaved, and prints seconds, events/s and the
ratio atomic / online. For each rebuild it also checks the ETA against the time the
rebuild really took from that point: at 25%, 50% and 75% of the events, the ETA from
the recent rate (what the CLI shows) and the one from the average since the start,
each divided by the true remaining time (1.0 is exact).

The script creates its own throwaway database next to the admin URL's (``--url`` /
``EVENTSOURCE_BENCH_PG_URL``) and drops it afterwards. Run: ``python
bench/rebuild_hot_row.py``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa
from _common import add_url_argument, exit_on_sigterm, print_table, throwaway_database
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.rebuild import RebuildProgress, rebuild


class HotRow(es.Projection):
    name = "hot_row"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(sa.text("UPDATE hot_counter SET events = events + 1 WHERE id = 1"))

    def reset(self, session: Session) -> None:
        session.execute(sa.text("UPDATE hot_counter SET events = 0 WHERE id = 1"))


def seed(engine: sa.Engine, events: int) -> None:
    store = es.EventStore()
    per_stream = 100
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE hot_counter (id INT PRIMARY KEY, events BIGINT)")
        conn.exec_driver_sql("INSERT INTO hot_counter VALUES (1, 0)")
    for start in range(0, events, per_stream * 50):
        with Session(engine) as session, session.begin():
            for stream in range(start, min(events, start + per_stream * 50), per_stream):
                count = min(per_stream, events - stream)
                store.append(
                    session,
                    [
                        es.Event(
                            bounded_context="bench",
                            aggregate_type="Counter",
                            aggregate_id=f"c-{stream}",
                            event_type="Counted",
                            payload={},
                        )
                        for _ in range(count)
                    ],
                )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")


def counted(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT events FROM hot_counter")).scalar_one())


def eta_quality(samples: list[tuple[float, RebuildProgress]], ended: float) -> dict[str, str]:
    """ETA / true remaining time at 25, 50 and 75% (recent rate; average rate)."""
    out: dict[str, str] = {}
    for share in (0.25, 0.5, 0.75):
        at, progress = next((t, p) for t, p in samples if p.done >= share * p.total)
        remaining = ended - at
        recent = progress.eta_seconds or 0.0
        average = (progress.total - progress.done) / progress.average_rate
        out[f"{share:.0%}"] = f"{recent / remaining:.2f} / {average / remaining:.2f}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_url_argument(parser)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with throwaway_database(sa.make_url(args.url), "eventsource_bench_rebuild_") as url:
        es.upgrade(url)
        engine = es.create_engine(url)
        try:
            started = time.perf_counter()
            seed(engine, args.events)
            print(f"seeded {args.events:,} events in {time.perf_counter() - started:.1f} s")
            return measure(engine, args)
        finally:
            engine.dispose()


def measure(engine: sa.Engine, args: argparse.Namespace) -> int:
    seconds: dict[str, list[float]] = {"run": [], "online": [], "atomic": []}
    etas: dict[str, list[dict[str, str]]] = {"online": [], "atomic": []}

    def run_once() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM projection_checkpoints")
            conn.exec_driver_sql("UPDATE hot_counter SET events = 0")
        config = es.ProcessorConfig(batch_size=args.batch_size)
        es.Processor(engine, es.EventStore(), config).run_until_caught_up(HotRow())

    def rebuild_once(atomic: bool) -> Callable[[], None]:
        def go() -> None:
            samples: list[tuple[float, RebuildProgress]] = []
            rebuild(
                engine,
                HotRow(),
                batch_size=args.batch_size,
                atomic=atomic,
                on_progress=lambda p: samples.append((time.perf_counter(), p)),
            )
            etas["atomic" if atomic else "online"].append(eta_quality(samples, time.perf_counter()))

        return go

    variants = {"run": run_once, "online": rebuild_once(False), "atomic": rebuild_once(True)}
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for key in order:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM hot_counter")
                conn.exec_driver_sql("CHECKPOINT")
            started = time.perf_counter()
            variants[key]()
            seconds[key].append(time.perf_counter() - started)
            if counted(engine) != args.events:
                raise SystemExit(f"{key}: counted {counted(engine)} of {args.events}")
    rows = [
        [key, f"{statistics.median(s):.1f}", f"{args.events / statistics.median(s):,.0f}"]
        for key, s in seconds.items()
    ]
    print_table(["variant", "seconds", "events/s"], rows, "<>>")
    ratios = [a / o for a, o in zip(seconds["atomic"], seconds["online"], strict=True)]
    print(f"atomic / online: {statistics.median(ratios):.2f} (rounds: {len(ratios)})")
    for key, found in etas.items():
        for share in ("25%", "50%", "75%"):
            shown = ", ".join(f[share] for f in found)
            print(f"{key} ETA / true remaining at {share} (recent rate / average): {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
