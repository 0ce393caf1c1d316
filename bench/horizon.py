"""What the store's reading horizon costs a poll, next to the server's, behind a blocker.

Projections read only events below a horizon (DESIGN invariant 2, docs/horizon.md).
Under the "server" rule (``ProcessorConfig(horizon="server")``) any transaction that
holds an id anywhere on the server holds every projection back, even one in another
database; under the "store" rule (the default) only this store's writers do. The store
rule costs something only while committed events wait above the server's bound: then
the processor gets the store's horizon (``eventsource.horizon.StoreHorizon``: three
short statements), shared by the processors of the process. In ``Processor.run`` a
horizon up to one poll interval old will do (one computation per poll interval for
all of them); a direct ``process_batch`` wants one computed after it began. Three
variants poll, each with its own engine (so its own ``StoreHorizon``):

  store            rule "store", polls as ``run`` makes them (max age: poll interval)
  store, max_age 0 rule "store", plain ``process_batch`` calls (computed every poll)
  server           rule "server"

This measures, in one run, against a "foreign blocker": a write transaction left open
in another throwaway database while ``--behind`` events (default 100) are committed in
the store's database:

  1. one idle poll of a caught-up projection per variant, (a) with no blocker, (b) with
     the foreign blocker (under "server" the events wait behind it; under "store" the
     projection has read them, and each poll still finds them above the server's bound,
     so it gets the store horizon); ``--polls`` polls of (a), of (b), then of (a) again,
     so that the baseline brackets the blocked phase, the variants taking turns poll by
     poll; medians, the ratio b / a, the horizon computations they ran, and the median
     of one ``StoreHorizon.compute`` in state (b);
  2. the worst case: ``--projections`` (default 50) processors per variant on its one
     engine, each with its own projection, polled round-robin behind the blocker with
     ``--poll-interval`` (default 0.05 s), ``--rounds`` rounds per variant (taking
     turns): the time per round, against "server", and the horizon computations per
     round (about one per poll interval for "store", not one per poll);
  3. the lag the blocker causes: how many of the ``--behind`` events each variant's
     projection handles one poll interval after they commit while it is open, and
     after it ends (a correctness figure).

The server may be shared with other work (tests): a transaction holding an id there is
a blocker too. Before each unblocked phase the script waits up to ``--wait`` seconds
for none to be left, and names those that stay (then "(a) computations" is not 0). It
creates two throwaway databases beside ``--url`` and drops them.

Usage::

    python bench/horizon.py                  # 200 polls per phase, 50 x 40 rounds
    python bench/horizon.py --polls 500 --rounds 100 --projections 20
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
from _common import (
    add_url_argument,
    exit_on_sigterm,
    print_table,
    psycopg_conninfo,
    throwaway_database,
)
from sqlalchemy.orm import Session

import eventsource
from eventsource import PersistedEvent, Processor, ProcessorConfig, Projection, horizon
from eventsource.horizon import HorizonRule

SEEDED = 1000


@dataclass(frozen=True)
class Variant:
    label: str
    rule: HorizonRule
    as_in_run: bool  # accept a store horizon one poll interval old, as run() does


VARIANTS = (
    Variant("store", "store", as_in_run=True),
    Variant("store, max_age 0", "store", as_in_run=False),
    Variant("server", "server", as_in_run=True),
)


def processor_for(engine: sa.Engine, variant: Variant, poll_interval: float) -> Processor:
    config = ProcessorConfig(horizon=variant.rule, poll_interval=poll_interval)
    processor = Processor(engine, config=config)
    if variant.as_in_run and hasattr(processor, "_horizon_max_age"):
        # What run() sets while it polls. Versions without it used the poll interval
        # in every process_batch, so there is nothing to do for them.
        processor._horizon_max_age = poll_interval
    return processor


def turns(r: int) -> list[Variant]:
    """The variants in a rotating order, so none always goes first."""
    k = r % len(VARIANTS)
    return [*VARIANTS[k:], *VARIANTS[:k]]


class Counting(Projection):
    """A trivial projection that counts what it handles; one instance per name."""

    name = "counting"

    def __init__(self, name: str) -> None:
        self.name = name
        self.handled = 0

    def handle(self, event: PersistedEvent, session: Session) -> None:
        self.handled += 1


def append(engine: sa.Engine, count: int, prefix: str) -> None:
    """``count`` events, 10 per aggregate, committed in one transaction."""
    store = eventsource.EventStore()
    with Session(engine) as session, session.begin():
        for start in range(0, count, 10):
            events = [
                eventsource.Event(
                    bounded_context="shop",
                    aggregate_type="Order",
                    aggregate_id=f"{prefix}-{start}",
                    event_type="Placed",
                    payload={"n": i},
                )
                for i in range(start, min(start + 10, count))
            ]
            store.append(session, events)


def drain(processor: Processor, projection: Projection) -> int:
    """Poll until a batch reads nothing more; the events handled. Unlike
    ``run_until_caught_up`` it does not wait for a blocker to end."""
    handled = 0
    while True:
        result = processor.process_batch(projection)
        handled += result.handled
        if not result.full:
            return handled


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def idle_poll(processor: Processor, projection: Projection) -> float:
    """The time of one poll that handled nothing. A poll that handled events (a blocker
    outside this benchmark ended meanwhile) is not an idle poll: poll again."""
    while True:
        started = time.perf_counter()
        result = processor.process_batch(projection)
        elapsed = time.perf_counter() - started
        if result.handled == 0:
            return elapsed


def outside_blockers(conninfo: str, ours: list[str]) -> list[str]:
    """Transactions on the server, outside this benchmark's databases, that hold an id:
    each holds the server rule back (the server may be shared, with tests)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT format('pid %%s in %%s (%%s), open %%s s', pid, datname,
                        coalesce(nullif(application_name, ''), '?'),
                        round(extract(epoch FROM now() - xact_start)))
                FROM pg_stat_activity
                WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
                    AND datname <> ALL(%s)
            UNION ALL
            SELECT format('prepared %%L in %%s', gid, database) FROM pg_prepared_xacts""",
            (ours,),
        ).fetchall()
    return [str(row[0]) for row in rows]


def wait_for_quiet(conninfo: str, ours: list[str], timeout: float, when: str) -> list[str]:
    """Wait up to ``timeout`` s for no outside blocker; those left (reported)."""
    deadline = time.monotonic() + timeout
    while (found := outside_blockers(conninfo, ours)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if found:
        print(f"{when}: the server rule is held back by {'; '.join(found)}", file=sys.stderr)
    return found


@contextmanager
def foreign_blocker(conninfo: str) -> Iterator[None]:
    """A write transaction (it holds an id) open in another database until the exit."""
    conn = psycopg.connect(conninfo)
    try:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        yield
    finally:
        conn.rollback()
        conn.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_url_argument(parser)
    parser.add_argument("--behind", type=int, default=100, help="events behind the blocker")
    parser.add_argument("--polls", type=int, default=200, help="idle polls per variant and phase")
    parser.add_argument("--rounds", type=int, default=40, help="round-robin rounds per variant")
    parser.add_argument("--projections", type=int, default=50, help="processors per variant, 2.")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="in 2. (seconds)")
    parser.add_argument(
        "--wait",
        type=float,
        default=20.0,
        help="seconds to wait, before each unblocked phase, for transactions outside the "
        "benchmark that hold an id to end (default 20)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    admin = sa.make_url(args.url)
    admin_conninfo = psycopg_conninfo(admin.set(drivername="postgresql"))
    single_interval = ProcessorConfig().poll_interval  # the default, in 1. and 3.
    outside: dict[str, list[str]] = {}

    with (
        throwaway_database(admin, "es_bench_horizon_") as url,
        throwaway_database(admin, "es_bench_foreign_") as foreign_url,
    ):
        ours = [str(url.database), str(foreign_url.database)]

        def quiet(when: str) -> None:
            found = wait_for_quiet(admin_conninfo, ours, args.wait, when)
            if found:
                outside[when] = found

        # One engine per variant: horizon.for_store keys its StoreHorizon by URL, so
        # each variant's computations are its own.
        engines = {
            v.label: eventsource.create_engine(
                url.update_query_dict({"application_name": f"es_bench_horizon_{i}"})
            )
            for i, v in enumerate(VARIANTS)
        }
        eventsource.upgrade(engines["store"])
        names = eventsource.EventStore().tables.names
        horizons = {}
        for v in VARIANTS:
            with engines[v.label].connect() as conn:
                identity = horizon.identity_of(conn, names)
            horizons[v.label] = horizon.for_store(engines[v.label], names, identity)
        separate = horizon.StoreHorizon(names)  # for timing compute() alone
        append(engines["store"], SEEDED, "before")

        single = {
            v.label: (
                Counting(f"single_{i}"),
                processor_for(engines[v.label], v, single_interval),
            )
            for i, v in enumerate(VARIANTS)
        }
        many = {
            v.label: [
                (
                    Counting(f"many_{i}_{j}"),
                    processor_for(engines[v.label], v, args.poll_interval),
                )
                for j in range(args.projections)
            ]
            for i, v in enumerate(VARIANTS)
        }
        everything = [pair for pairs in many.values() for pair in pairs] + list(single.values())

        def catch_up() -> None:
            for projection, processor in everything:
                drain(processor, projection)

        quiet("(a) before")
        catch_up()

        polls: dict[tuple[str, str], list[float]] = {}
        computations: dict[tuple[str, str], int] = {}

        def measure(phase: str) -> None:
            for i in range(args.polls):
                for v in turns(i):
                    projection, processor = single[v.label]
                    key = (v.label, phase)
                    before = horizons[v.label].computations
                    polls.setdefault(key, []).append(idle_poll(processor, projection))
                    computations[key] = (
                        computations.get(key, 0) + horizons[v.label].computations - before
                    )

        measure("a")  # before the blocked phase...
        compute_times: list[float] = []
        rounds: dict[str, list[float]] = {v.label: [] for v in VARIANTS}
        round_computations = dict.fromkeys(rounds, 0)
        lag: dict[str, list[int]] = {}
        foreign = psycopg_conninfo(foreign_url.set(drivername="postgresql"))
        with foreign_blocker(foreign):
            append(engines["store"], args.behind, "behind")
            # 3., while it is open: what each variant reads a poll interval later.
            time.sleep(single_interval)
            for v in VARIANTS:
                projection, processor = single[v.label]
                lag[v.label] = [drain(processor, projection)]
            catch_up()
            measure("b")
            for _ in range(args.polls):
                compute_times.append(timed(lambda: separate.compute(engines["store"])))
            # 2.: round-robin, the variants taking turns round by round.
            for r in range(args.rounds):
                for v in turns(r):
                    before = horizons[v.label].computations
                    started = time.perf_counter()
                    for projection, processor in many[v.label]:
                        processor.process_batch(projection)
                    rounds[v.label].append(time.perf_counter() - started)
                    round_computations[v.label] += horizons[v.label].computations - before
        quiet("(a) after")
        for v in VARIANTS:
            projection, processor = single[v.label]
            lag[v.label].append(drain(processor, projection))
        catch_up()
        measure("a")  # ...and after it, so drift on a shared machine shows less
        expected = SEEDED + args.behind
        missed = [
            p.name
            for v in VARIANTS
            if v.rule == "store"
            for p, _ in [*many[v.label], single[v.label]]
            if p.handled != expected
        ]
        assert not missed, f"the store rule missed events: {missed}"
        for engine in engines.values():
            engine.dispose()

    rows = []
    for v in VARIANTS:
        free = statistics.median(polls[(v.label, "a")])
        held = statistics.median(polls[(v.label, "b")])
        rows.append(
            [
                v.label,
                ms(free),
                ms(held),
                f"{held / free:.2f}",
                str(computations[(v.label, "a")]),
                str(computations[(v.label, "b")]),
            ]
        )
    print(
        f"\n1. one idle poll, poll interval {single_interval} s; median of {2 * args.polls} "
        f"polls in (a), {args.polls} in (b): a write transaction open in another database, "
        f"{args.behind} events committed after it began"
    )
    print_table(
        [
            "variant",
            "(a) no blocker ms",
            "(b) foreign blocker ms",
            "b / a",
            "(a) computations",
            "(b) computations",
        ],
        rows,
        "<>>>>>",
    )
    print(
        f"one StoreHorizon.compute() in (b): median {ms(statistics.median(compute_times))} ms "
        f"of {args.polls}"
    )

    server_round = statistics.median(rounds["server"])
    rows = []
    for v in VARIANTS:
        per_round = statistics.median(rounds[v.label])
        rows.append(
            [
                v.label,
                ms(per_round),
                f"{per_round / args.projections * 1000:.3f}",
                f"{round_computations[v.label] / args.rounds:.2f}",
                f"{per_round / server_round:.2f}",
            ]
        )
    print(
        f"\n2. {args.projections} processors per variant on one engine, round-robin behind "
        f"the foreign blocker, poll interval {args.poll_interval} s; median of {args.rounds} "
        "rounds"
    )
    print_table(
        ["variant", "ms / round", "ms / poll", "computations / round", "/ server"], rows, "<>>>>"
    )

    rows = [[v.label, str(args.behind), *map(str, lag[v.label])] for v in VARIANTS]
    print(
        f"\n3. events committed behind the foreign blocker, handled by one projection "
        f"{single_interval} s later"
    )
    print_table(["variant", "committed", "while it is open", "after it ended"], rows, "<>>>")
    for when, found in outside.items():
        print(
            f"\nnote: in {when}, transactions outside this benchmark held the server rule "
            f"back (so (a) was not free of a blocker for it): {'; '.join(found)}"
        )


if __name__ == "__main__":
    main()
