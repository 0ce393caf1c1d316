"""Identical workers share a projection's partitions through PostgreSQL (eventsource.claims,
eventsource.reshard), as separate processes, under a writer appending throughout.

Each worker is ``tests/scripts/claim_worker.py``. Its handler records, in the batch's
own transaction, which worker handled each event and which worker the partition's claim
names at that moment: every test ends by checking that each event was handled exactly
once, that each aggregate's events were handled in version order, and that no batch was
committed by a worker that no longer owned its partition.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import claims

pytestmark = pytest.mark.postgres

WORKER = Path(__file__).parent / "scripts" / "claim_worker.py"
NAME = "claimed_log"
LEASE = 2.0
AGGREGATES = 40


class Writer:
    """Appends one event per transaction to AGGREGATES aggregates in turn until stopped."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.store = es.EventStore()
        self.stopping = threading.Event()
        self.appended = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                agg = f"agg-{self.appended % AGGREGATES}"
                with Session(self.engine) as session, session.begin():
                    self.store.append(
                        session,
                        [
                            es.Event(
                                bounded_context="shop",
                                aggregate_type="Order",
                                aggregate_id=agg,
                                event_type="Touched",
                                payload={"n": self.appended},
                            )
                        ],
                        es.ExpectedVersion.any(),
                    )
                self.appended += 1
                time.sleep(0.004)
        except BaseException as exc:
            self.error = exc


class Worker:
    def __init__(self, url: sa.URL, total: int, log: Path) -> None:
        self.log = log
        self.output = log.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), url.render_as_string(False), str(total), str(LEASE)],
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.id = str(wait_for(self._read_id, what=f"worker id in {log}"))

    def _read_id(self) -> str | None:
        for line in self.log.read_text().splitlines():
            if line.startswith("worker "):
                return line.split(" ", 1)[1]
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited early:\n{self.log.read_text()}")
        return None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        code = self.process.wait(timeout=60)
        assert code in (0, -signal.SIGKILL), self.log.read_text()


def wait_for(check: Callable[[], object], *, timeout: float = 60.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


@pytest.fixture
def workers(pg_url: sa.URL, tmp_path: Path) -> Iterator[Callable[[int], Worker]]:
    started: list[Worker] = []

    def start(total: int) -> Worker:
        worker = Worker(pg_url, total, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)
            worker.process.kill()
            worker.process.wait()
        worker.output.close()


@pytest.fixture
def engine(pg_url: sa.URL) -> Iterator[sa.Engine]:
    eng = es.create_engine(pg_url, pool_size=5)
    with eng.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE claimed_log (seq bigserial PRIMARY KEY, global_position bigint, "
            "aggregate_id text, aggregate_version bigint, worker text, claim_owner text)"
        )
    yield eng
    eng.dispose()


def owners(engine: sa.Engine) -> dict[str | None, list[int]]:
    """Live owners of the projection's partitions and their keys (None: free/expired)."""
    with engine.connect() as conn:
        held = claims.partition_claims(conn, projection=NAME)
    found: dict[str | None, list[int]] = defaultdict(list)
    for claim in held:
        found[None if claim.expired else claim.owner].append(claim.partition_key)
    return dict(found)


def shares(engine: sa.Engine, live: list[Worker], total: int) -> bool:
    """Every one of ``total`` partitions is held by one of ``live``, in fair shares."""
    held = owners(engine)
    ids = {worker.id for worker in live}
    if set(held) != ids or sum(len(keys) for keys in held.values()) != total:
        return False
    counts = sorted(len(keys) for keys in held.values())
    return counts[-1] - counts[0] <= 1


def drain_and_check(engine: sa.Engine, writer: Writer) -> None:
    """Stop the writer, wait for the read model to catch up, then check it."""
    writer.stop()
    with engine.connect() as conn:
        total = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
    assert total == writer.appended > 0

    def caught_up() -> bool:
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(DISTINCT global_position) FROM claimed_log"))
            return bool(count.scalar_one() == total)

    wait_for(caught_up, what="the workers to handle every event")
    assert_exactly_once_in_order(engine)


def assert_exactly_once_in_order(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        events = conn.execute(
            sa.text("SELECT global_position, aggregate_id, aggregate_version FROM events")
        ).all()
        handled = conn.execute(
            sa.text(
                "SELECT global_position, aggregate_id, aggregate_version, worker, claim_owner "
                "FROM claimed_log ORDER BY seq"
            )
        ).all()
    twice = [pos for pos, n in Counter(row[0] for row in handled).items() if n > 1]
    assert not twice, f"handled more than once: {twice[:10]}"
    assert {row[0] for row in handled} == {row[0] for row in events}
    versions: dict[str, list[int]] = defaultdict(list)
    for row in handled:
        versions[row[1]].append(row[2])
    for aggregate, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"{aggregate} out of order: {seen}"
    stale = [row for row in handled if row[3] != row[4]]
    assert not stale, f"committed by a worker that did not own the partition: {stale[:5]}"


def test_three_workers_share_twelve_partitions_and_a_fourth_gets_a_share(
    engine: sa.Engine, workers: Callable[[int], Worker]
) -> None:
    with Writer(engine) as writer:
        live = [workers(12) for _ in range(3)]
        wait_for(lambda: shares(engine, live, 12), what="3 shares of 4")
        live.append(workers(12))
        wait_for(lambda: shares(engine, live, 12), what="4 shares of 3")
        drain_and_check(engine, writer)
    for worker in live:
        worker.terminate()
    # Stopped workers release their partitions at once.
    assert set(owners(engine)) == {None}


def test_a_killed_workers_partitions_resume_elsewhere_once_its_lease_expires(
    engine: sa.Engine, workers: Callable[[int], Worker]
) -> None:
    with Writer(engine) as writer:
        live = [workers(12) for _ in range(3)]
        wait_for(lambda: shares(engine, live, 12), what="3 shares of 4")
        victim = live.pop(0)
        orphaned = set(owners(engine)[victim.id])
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)

        def taken_over() -> bool:
            held = owners(engine)
            return orphaned <= {key for w in live for key in held.get(w.id, [])}

        wait_for(taken_over, timeout=LEASE + 30, what="the killed worker's partitions")
        # Within the lease and a heartbeat's slack (one poll, plus a loaded machine's).
        assert time.monotonic() - killed < LEASE + 4.0
        wait_for(lambda: shares(engine, live, 12), what="2 shares of 6")
        drain_and_check(engine, writer)
    for worker in live:
        worker.terminate()


def test_a_worker_paused_past_its_lease_commits_nothing_stale(
    engine: sa.Engine, workers: Callable[[int], Worker]
) -> None:
    with Writer(engine) as writer:
        live = [workers(12) for _ in range(3)]
        wait_for(lambda: shares(engine, live, 12), what="3 shares of 4")
        paused = live[0]
        its = set(owners(engine)[paused.id])
        paused.signal(signal.SIGSTOP)

        # A partition whose batch was in hand when it stopped stays locked by it until
        # it resumes (its batch then commits first); the others move on.
        def some_taken() -> bool:
            held = owners(engine)
            return bool(its & {key for w in live[1:] for key in held.get(w.id, [])})

        wait_for(some_taken, timeout=LEASE + 30, what="the paused worker's partitions")
        time.sleep(LEASE)  # the new owners commit batches meanwhile
        paused.signal(signal.SIGCONT)
        # It finds its leases gone, stops those partitions and joins in again.
        wait_for(lambda: shares(engine, live, 12), what="3 shares of 4 again")
        drain_and_check(engine, writer)
    for worker in live:
        worker.terminate()


def test_reshard_12_to_5_to_16_under_load(
    engine: sa.Engine, workers: Callable[[int], Worker]
) -> None:
    with Writer(engine) as writer:
        live = [workers(12) for _ in range(3)]
        wait_for(lambda: shares(engine, live, 12), what="3 shares of 4")
        time.sleep(0.5)
        for new in (5, 16):
            result = es.reshard(engine, NAME, new, timeout=60)
            assert (result.to_partitions, result.projection) == (new, NAME)
            wait_for(functools.partial(shares, engine, live, new), what=f"shares of {new}")
            time.sleep(0.5)
        with engine.connect() as conn:
            totals = conn.execute(
                sa.text(
                    "SELECT DISTINCT total_partitions FROM projection_checkpoints "
                    "WHERE projection_name = :n"
                ),
                {"n": NAME},
            ).all()
        assert totals == [(16,)]
        drain_and_check(engine, writer)
    for worker in live:
        worker.terminate()
