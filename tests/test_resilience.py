"""Workers survive transient failures (DESIGN invariant 8): a terminated backend, a
server restart, a reactor losing an append race, a deadlock between handlers, a batch
over its statement timeout; and give up with DatabaseUnavailableError, never
"a handler raised", when the database stays away. Every test checks exactly-once on
the read model afterwards.

Failures are staged step by step: gates in handlers hold a batch at a known point
while the test terminates its backend, commits a competing append, or takes a lock.
A server restart runs on a throwaway cluster (tests/pg_cluster.py), never on the
shared server.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource as es
from eventsource import retry
from tests.pg_cluster import Cluster, ClusterUnavailableError, throwaway_cluster
from tests.projection_support import Background, append_spread, event, wait_readable, wait_until

READ_MODEL_DDL = "CREATE TABLE seen (projection TEXT NOT NULL, global_position BIGINT NOT NULL)"
FAST_RETRY = es.RetryPolicy(initial_backoff=0.01, max_backoff=0.1, budget=60)


class Seen(es.Projection):
    """Inserts a row per event (no key: doubles show); can hold one event at a gate."""

    name = "seen"

    def __init__(self, hold_at: int | None = None) -> None:
        self.hold_at = hold_at
        self.inside = threading.Event()
        self.release = threading.Event()
        self.calls: Counter[int] = Counter()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        self.calls[event.global_position] += 1
        session.execute(
            sa.text("INSERT INTO seen (projection, global_position) VALUES (:p, :g)"),
            {"p": self.name, "g": event.global_position},
        )
        if event.global_position == self.hold_at:
            self.hold_at = None  # only the first attempt waits
            self.inside.set()
            assert self.release.wait(30), "the test never released the gate"


def seen(engine: sa.Engine, projection: str = "seen") -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT global_position FROM seen WHERE projection = :p ORDER BY 1"),
            {"p": projection},
        )
        return [int(row[0]) for row in rows]


def config(**overrides: object) -> es.ProcessorConfig:
    values: dict[str, object] = {"poll_interval": 0.01, "retry": FAST_RETRY}
    values.update(overrides)
    return es.ProcessorConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def pg(pg_engine: sa.Engine) -> sa.Engine:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    return pg_engine


def terminate_backends(engine: sa.Engine, application_name: str | None = None) -> int:
    """Terminate this database's other backends (only ``application_name``'s if given)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND (CAST(:name AS text) IS NULL OR application_name = :name)"
                ),
                {"name": application_name},
            ).scalar_one()
        )


# -- a terminated backend --------------------------------------------------------------


@pytest.mark.postgres
def test_a_batch_whose_backend_is_terminated_is_retried_and_applied_once(
    pg: sa.Engine, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    engine = pg
    append_spread(engine, store, 10)
    wait_readable(engine)
    projection = Seen(hold_at=5)
    processor = es.Processor(engine, store, config())
    catching_up = Background(lambda: processor.run_until_caught_up(projection)).start()
    try:
        assert projection.inside.wait(30)
        assert terminate_backends(engine) >= 1  # the batch's connection, mid-batch
    finally:
        projection.release.set()
    catching_up.join(60)

    assert catching_up.error is None, catching_up.error
    assert catching_up.result == 10
    assert seen(engine) == list(range(1, 11))
    assert projection.calls[5] == 2  # the first attempt was rolled back, then redone
    retried = [r for r in caplog.records if "transient failure" in r.getMessage()]
    assert retried, "the retry was not logged"
    assert retried[0].levelname == "WARNING"
    assert "AdminShutdown (57P01)" in retried[0].getMessage() or getattr(
        retried[0], "cause", ""
    ).startswith(("OperationalError", "AdminShutdown"))


@pytest.mark.postgres
def test_terminating_a_running_workers_backends_repeatedly_loses_and_doubles_nothing(
    pg: sa.Engine, store: es.EventStore
) -> None:
    engine = pg
    worker_engine = es.create_engine(
        engine.url, pool_size=2, connect_args={"application_name": "doomed-worker"}
    )
    processor = es.Processor(worker_engine, store, config(batch_size=7))
    projection = Seen()
    running = Background(lambda: processor.run(projection)).start()
    try:
        for round_ in range(6):
            append_spread(engine, store, 25, prefix=f"r{round_}")
            time.sleep(0.02)
            terminate_backends(engine, "doomed-worker")
        total = 150
        wait_until(lambda: len(seen(engine)) >= total, timeout=60)
    finally:
        processor.stop()
        running.join(30)
        worker_engine.dispose()
    assert running.error is None, running.error
    assert seen(engine) == list(range(1, 151))


# -- a server restart (throwaway cluster) ----------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    try:
        with throwaway_cluster() as started:
            yield started
    except ClusterUnavailableError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"cannot start a throwaway PostgreSQL cluster: {exc}")


@pytest.fixture
def cluster_engine(cluster: Cluster) -> Iterator[sa.Engine]:
    admin = sa.create_engine(cluster.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"es_restart_{int(time.time() * 1000) % 10**9}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine = es.create_engine(cluster.database_url(name), pool_size=5)
    es.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.mark.postgres
def test_a_worker_keeps_running_through_a_server_restart(
    cluster: Cluster, cluster_engine: sa.Engine, store: es.EventStore
) -> None:
    engine = cluster_engine
    processor = es.Processor(engine, store, config(batch_size=10))
    projection = Seen()
    running = Background(lambda: processor.run(projection)).start()
    try:
        append_spread(engine, store, 30, prefix="before")
        wait_until(lambda: len(seen(engine)) == 30, timeout=30)
        cluster.stop("fast")
        time.sleep(0.5)  # the worker polls a server that is down
        cluster.start()
        back = time.monotonic()
        append_spread(engine, store, 30, prefix="after")
        wait_until(lambda: len(seen(engine)) == 60, timeout=30)
        resumed_in = time.monotonic() - back
    finally:
        processor.stop()
        running.join(30)
    assert running.error is None, running.error
    assert seen(engine) == list(range(1, 61))
    assert resumed_in < 15  # generous: the backoff is capped at 0.1 s here


@pytest.mark.postgres
def test_a_database_that_stays_away_ends_in_database_unavailable_not_a_handler_error(
    cluster: Cluster, cluster_engine: sa.Engine, store: es.EventStore
) -> None:
    engine = cluster_engine
    append_spread(engine, store, 5)
    projection = Seen()
    short = es.RetryPolicy(initial_backoff=0.01, max_backoff=0.05, budget=1.0)
    processor = es.Processor(engine, store, config(retry=short))
    processor.run_until_caught_up(projection)
    cluster.stop("fast")
    try:
        runner = es.Runner(handle_signals=False)
        started = time.monotonic()
        with pytest.raises(es.DatabaseUnavailableError) as info:
            runner.run([(projection, processor)])
        assert time.monotonic() - started < 30
    finally:
        cluster.start()
    assert not isinstance(info.value, es.ProjectionError)
    assert "gave up after" in str(info.value)
    assert info.value.attempts >= 2
    assert retry.is_transient(info.value.__cause__ or info.value)
    assert seen(engine) == list(range(1, 6))


# -- a reactor losing an append race ---------------------------------------------------------


class Reactor(es.Projection):
    """Appends a reaction per order event to the customer's stream (ExpectedVersion.any)."""

    name = "reactor"
    aggregate_types = ("Order",)

    def __init__(self, store: es.EventStore) -> None:
        self.store = store
        self.gate_once = True
        self.inside = threading.Event()
        self.release = threading.Event()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(
            sa.text("INSERT INTO seen (projection, global_position) VALUES (:p, :g)"),
            {"p": self.name, "g": event.global_position},
        )  # the batch now has a transaction id
        if self.gate_once:
            self.gate_once = False
            self.inside.set()
            assert self.release.wait(30)
        self.store.append(
            session,
            [
                es.Event(
                    bounded_context="sales",
                    aggregate_type="Customer",
                    aggregate_id="c-1",
                    event_type="OrderNoted",
                    payload={"order": event.aggregate_id},
                    causation_id=str(event.event_id),
                )
            ],
        )


@pytest.mark.parametrize("use_runner", [False, True], ids=["processor", "runner"])
def test_a_reactor_that_loses_an_append_race_retries_and_reacts_once(
    engine: sa.Engine, store: es.EventStore, use_runner: bool
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    orders = [[event(f"o-{i}")] for i in range(5)]
    with Session(engine) as session, session.begin():
        for batch in orders:
            store.append(session, batch)
    wait_readable(engine)
    reactor = Reactor(store)

    class OrdersSeen(Seen):
        aggregate_types = ("Order",)

    other = OrdersSeen()  # an unrelated projection in the same runner keeps going
    reacting_proc = es.Processor(engine, store, config())
    if use_runner:
        runner = es.Runner(handle_signals=False)
        pairs = [(reactor, reacting_proc), (other, es.Processor(engine, store, config()))]
        work = Background(lambda: runner.run_until_caught_up(pairs)).start()
    else:
        work = Background(lambda: reacting_proc.run_until_caught_up(reactor)).start()
    try:
        assert reactor.inside.wait(30)
        if engine.dialect.name == "postgresql":
            # A newer transaction appends to the stream the reactor is about to append to.
            with Session(engine) as session, session.begin():
                store.append(session, [event("c-1", "Visited", aggregate_type="Customer")])
    finally:
        reactor.release.set()
    work.join(60)

    assert work.error is None, work.error
    with Session(engine) as session:
        stream = store.read_stream(session, "sales", "Customer", "c-1")
    reactions = Counter(e.causation_id for e in stream if e.event_type == "OrderNoted")
    assert len(reactions) == 5
    assert set(reactions.values()) == {1}  # each order reacted to exactly once
    assert [e.aggregate_version for e in stream] == list(range(1, len(stream.events) + 1))
    assert seen(engine, "reactor") == list(range(1, 6))
    if use_runner:
        assert seen(engine, "seen") == list(range(1, 6))


# -- a deadlock between two handlers ----------------------------------------------------------


class Transfer(es.Projection, abstract=True):
    """Updates two shared rows, in an order of its own, meeting the other at a barrier."""

    first: str
    second: str

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier
        self.applied: Counter[int] = Counter()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        bump = sa.text("UPDATE counters SET n = n + 1 WHERE name = :name")
        session.execute(bump, {"name": self.first})
        if self.barrier is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                self.barrier.wait(10)  # both now hold their first row
            self.barrier = None  # type: ignore[assignment]
        session.execute(bump, {"name": self.second})
        session.execute(
            sa.text("INSERT INTO seen (projection, global_position) VALUES (:p, :g)"),
            {"p": self.name, "g": event.global_position},
        )


class LeftFirst(Transfer):
    name = "left_first"
    first, second = "left", "right"


class RightFirst(Transfer):
    name = "right_first"
    first, second = "right", "left"


@pytest.mark.postgres
def test_a_deadlock_between_two_handlers_is_retried_and_both_apply_each_event_once(
    pg: sa.Engine, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    engine = pg
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE counters (name TEXT PRIMARY KEY, n INT NOT NULL)")
        conn.exec_driver_sql("INSERT INTO counters VALUES ('left', 0), ('right', 0)")
    append_spread(engine, store, 4)
    wait_readable(engine)
    barrier = threading.Barrier(2)
    pairs = [
        (LeftFirst(barrier), es.Processor(engine, store, config())),
        (RightFirst(barrier), es.Processor(engine, store, config())),
    ]
    es.Runner(handle_signals=False).run_until_caught_up(pairs)

    assert seen(engine, "left_first") == [1, 2, 3, 4]
    assert seen(engine, "right_first") == [1, 2, 3, 4]
    with engine.connect() as conn:
        counts = {str(k): int(v) for k, v in conn.execute(sa.text("SELECT name, n FROM counters"))}
    assert counts == {"left": 8, "right": 8}  # 4 events x 2 projections, once each
    causes = [getattr(r, "cause", "") for r in caplog.records if hasattr(r, "cause")]
    assert any("40P01" in cause for cause in causes), causes  # it really deadlocked


# -- a batch over its statement timeout ------------------------------------------------------


@pytest.mark.postgres
def test_a_batch_over_its_timeout_is_retried_then_gives_up_as_database_unavailable(
    pg: sa.Engine, store: es.EventStore
) -> None:
    engine = pg
    append_spread(engine, store, 3)
    wait_readable(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE hot (id INT PRIMARY KEY, n INT NOT NULL)")
        conn.exec_driver_sql("INSERT INTO hot VALUES (1, 0)")

    class Hot(es.Projection):
        name = "hot"

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            session.execute(sa.text("UPDATE hot SET n = n + 1 WHERE id = 1"))

    blocker = engine.connect()
    blocker.begin()
    blocker.exec_driver_sql("SELECT * FROM hot FOR UPDATE")  # a lock held elsewhere
    try:
        short = es.RetryPolicy(initial_backoff=0.01, max_backoff=0.05, budget=1.0)
        stuck = es.Processor(engine, store, config(batch_timeout=0.2, retry=short))
        with pytest.raises(es.DatabaseUnavailableError, match=r"QueryCanceled \(57014\)"):
            stuck.run_until_caught_up(Hot())
        # Retrying while the lock is released: the batch goes through, once.
        patient = es.Processor(engine, store, config(batch_timeout=0.2))
        done = Background(lambda: patient.run_until_caught_up(Hot())).start()
        time.sleep(0.5)
    finally:
        blocker.rollback()
        blocker.close()
    done.join(30)
    assert done.error is None, done.error
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT n FROM hot").scalar() == 3


# -- retrying an application's own transaction -------------------------------------------------


def test_run_in_transaction_serialises_eight_writers_on_one_aggregate(
    engine: sa.Engine, store: es.EventStore
) -> None:
    sessions = sessionmaker(engine, expire_on_commit=False)
    attempts: Counter[int] = Counter()
    lock = threading.Lock()

    def command(writer: int) -> int:
        def work(session: Session) -> int:
            with lock:
                attempts[writer] += 1
            version = store.stream_version(session, "sales", "Order", "hot")
            expected = (
                es.ExpectedVersion.no_stream()
                if version == 0
                else es.ExpectedVersion.exact(version)
            )
            time.sleep(0.002)  # widen the window between reading and appending
            result = store.append(session, [event("hot", f"By{writer}")], expected)
            return result.to_version

        return es.run_in_transaction(sessions, work, attempts=200)

    per_writer = 5
    results: list[int] = []

    def writer(number: int) -> None:
        for _ in range(per_writer):
            version = command(number)
            with lock:
                results.append(version)

    threads = [Background(lambda n=n: writer(n)).start() for n in range(8)]  # type: ignore[misc]
    for thread in threads:
        thread.join(120)
        assert thread.error is None, thread.error
    with Session(engine) as session:
        stream = store.read_stream(session, "sales", "Order", "hot")
    assert stream.version == 8 * per_writer == len(results)
    assert sorted(results) == list(range(1, 8 * per_writer + 1))  # gap-free, no repeats
    assert [e.aggregate_version for e in stream] == sorted(results)
    if engine.dialect.name == "postgresql":
        assert sum(attempts.values()) > 8 * per_writer  # conflicts really happened


def test_run_in_transaction_does_not_retry_a_permanent_error(engine: sa.Engine) -> None:
    calls = 0

    def work(session: Session) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        es.run_in_transaction(engine, work)
    assert calls == 1
    with pytest.raises(es.ConfigurationError, match="attempts"):
        es.run_in_transaction(engine, work, attempts=0)


# -- policy and connection defaults ---------------------------------------------------------


def test_retry_policy_validates_and_backs_off_within_its_bounds() -> None:
    policy = es.RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5)
    for failures, base in [(1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (50, 1.0)]:
        for _ in range(20):
            assert base * 0.5 <= policy.backoff(failures) <= base
    assert es.RetryPolicy(max_attempts=3).exhausted(3, 0.0, 0.0)
    assert not es.RetryPolicy(max_attempts=3).exhausted(2, 0.0, 0.0)
    assert es.RetryPolicy(budget=10).exhausted(1, 0.0, 10.0)
    for bad in ({"max_attempts": 0}, {"budget": -1}, {"jitter": 2}, {"multiplier": 0.5}):
        with pytest.raises(es.ConfigurationError):
            es.RetryPolicy(**bad)
    with pytest.raises(es.ConfigurationError, match="batch_timeout"):
        es.ProcessorConfig(batch_timeout=0)
    with pytest.raises(es.ConfigurationError, match="retry"):
        es.ProcessorConfig(retry=3)  # type: ignore[arg-type]


@pytest.mark.postgres
def test_postgres_connections_get_timeouts_unless_the_url_sets_them(pg_url: sa.URL) -> None:
    engine = es.create_engine(pg_url.update_query_dict({"keepalives_idle": "5"}))
    try:
        with engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    finally:
        engine.dispose()
    assert params["connect_timeout"] == "10"
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "5"  # the URL's own value wins
    assert params["tcp_user_timeout"] == "30000"


# -- the CLI worker ---------------------------------------------------------------------------

CLI_APP = """
import sqlalchemy as sa
import eventsource as es


class Seen(es.Projection):
    name = "seen"

    def handle(self, event, session):
        insert = sa.text("INSERT INTO seen (projection, global_position) VALUES ('seen', :g)")
        session.execute(insert, {"g": event.global_position})


PROJECTIONS = [Seen()]
"""


@pytest.mark.postgres
def test_eventsource_run_rides_out_terminated_backends_and_stops_cleanly(
    pg: sa.Engine, store: es.EventStore, tmp_path: Path
) -> None:
    engine = pg
    (tmp_path / "resilient_app.py").write_text(CLI_APP)
    url = engine.url.render_as_string(hide_password=False)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eventsource",
            "--database-url",
            url,
            "-v",
            "run",
            "resilient_app:PROJECTIONS",
            "--poll-interval",
            "0.02",
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        append_spread(engine, store, 10)
        wait_until(lambda: len(seen(engine)) == 10, timeout=30)
        for round_ in range(3):
            assert terminate_backends(engine) >= 1
            append_spread(engine, store, 10, prefix=f"after-{round_}")
            expected = 20 + 10 * round_
            wait_until(lambda: len(seen(engine)) == expected, timeout=30)  # noqa: B023
            assert worker.poll() is None, worker.communicate()[1]
    finally:
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "transient failure" in err
    assert "ProjectionError" not in err
    assert seen(engine) == list(range(1, 41))


def test_a_handler_whose_append_always_conflicts_fails_as_its_own_error(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """An OptimisticConcurrencyError inside a handler may be a race (retried) or the
    handler's mistake, e.g. no_stream() on a stream that exists: after
    conflict_attempts in a row it is the handler's ProjectionError, not an outage."""
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    append_spread(engine, store, 2)
    wait_readable(engine)

    class Mistaken(es.Projection):
        name = "mistaken"
        calls = 0

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            type(self).calls += 1
            store.append(session, [event_for("fixed")], es.ExpectedVersion.no_stream())

    def event_for(aggregate_id: str) -> es.Event:
        return event(aggregate_id, "Noted", aggregate_type="Note")

    with Session(engine) as session, session.begin():
        store.append(session, [event_for("fixed")])  # the stream exists already
    policy = es.RetryPolicy(initial_backoff=0.001, max_backoff=0.01, conflict_attempts=3)
    with pytest.raises(es.ProjectionError) as info:
        es.Processor(engine, store, config(retry=policy)).run_until_caught_up(Mistaken())
    assert not isinstance(info.value, es.DatabaseUnavailableError)
    assert isinstance(info.value.__cause__, es.OptimisticConcurrencyError)
    assert Mistaken.calls == 3


def test_classification_and_backoff_edges() -> None:
    operational = sa.exc.OperationalError("SELECT 1", {}, Exception("connection reset"))
    operational.connection_invalidated = True
    assert retry.is_transient(operational)
    gave_up = es.DatabaseUnavailableError("gave up", attempts=3)
    gave_up.__cause__ = operational
    assert not retry.is_transient(gave_up)  # a verdict is final, whatever it wraps
    assert retry.is_transient(sa.exc.TimeoutError("QueuePool limit reached"))
    assert not retry.is_transient(ValueError("a bug"))
    own = RuntimeError("handler's own error, raised while handling a lost connection")
    own.__context__ = operational  # implicit chaining is the handler's choice, not a cause
    assert not retry.is_transient(own)
    endless = es.RetryPolicy(budget=None, max_backoff=1.0)
    assert 0.5 <= endless.backoff(5000) <= 1.0  # no overflow after thousands of failures
