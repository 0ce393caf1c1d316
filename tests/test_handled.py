"""Read-your-writes (issue 13): wait_until_handled / is_handled, exact under
out-of-order commits, per partition and per scope, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import eventsource as es
from eventsource import handled
from eventsource.partition import fnv1a_32
from eventsource.processor import read_committed
from eventsource.reshard import _set_boundary
from tests.projection_support import (
    AppliedLog,
    LogA,
    LogB,
    applied,
    checkpoint,
    checkpoint_position,
    create_applied_table,
    event,
    wait_readable,
    wait_until,
)
from tests.test_gaps import OpenAppend, id_in_partition

pytest_plugins = ["pytester"]

TOTAL = 4


class Carts(AppliedLog):
    name = "carts"
    aggregate_types = ("Cart",)


def commit(engine: sa.Engine, store: es.EventStore, *events: es.Event) -> es.AppendResult:
    """One committed transaction appending ``events`` (one aggregate's); its result."""
    with Session(engine) as session, session.begin():
        return store.append(session, list(events))


def catch_up(
    engine: sa.Engine, store: es.EventStore, projection: es.Projection, **config: Any
) -> None:
    es.Processor(engine, store, es.ProcessorConfig(**config)).run_until_caught_up(projection)


def timed_out(call: Any) -> es.WaitTimeoutError:
    with pytest.raises(es.WaitTimeoutError) as caught:
        call()
    return caught.value


class Running:
    """``Processor.run`` in a thread, polling every 30 s: only wake-ups move it."""

    def __init__(
        self, engine: sa.Engine, store: es.EventStore, projection: es.Projection, **config: Any
    ) -> None:
        config.setdefault("poll_interval", 30.0)
        self.processor = es.Processor(engine, store, es.ProcessorConfig(**config))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(projection,), daemon=True)
        self.thread.start()
        key = config.get("partition_key", 0)
        # Started: its checkpoint exists, and it has subscribed to wake-ups before that.
        wait_until(lambda: checkpoint(engine, projection.checkpoint_name, key) is not None)

    def _run(self, projection: es.Projection) -> None:
        try:
            self.processor.run(projection, handle_signals=False)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.processor.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.error is None


# -- waiting ------------------------------------------------------------------------


def test_returns_at_once_when_handled_and_names_what_is_behind_on_timeout(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    first = commit(engine, store, event("order-1"))
    assert not es.is_handled(engine, LogA(), first)
    error = timed_out(lambda: es.wait_until_handled(engine, LogA(), first, timeout=0.1))
    assert isinstance(error, TimeoutError)
    assert error.position == first.events[0].global_position
    assert "'log_a': no checkpoint (it never ran, or was reset)" in str(error)

    catch_up(engine, store, LogA())
    started = time.monotonic()
    es.wait_until_handled(engine, [LogA()], first)
    assert time.monotonic() - started < 1.0
    assert es.is_handled(engine, "log_a", first.events[0].global_position)

    second = commit(engine, store, event("order-2"))
    error = timed_out(lambda: es.wait_until_handled(engine, [LogA(), LogB()], second, timeout=0.1))
    at = first.events[0].global_position
    assert f"the event at position {second.events[0].global_position}" in str(error)
    assert error.behind[0].startswith(f"projection 'log_a' partition 0/1 at position {at}")
    assert error.behind[1] == "projection 'log_b': no checkpoint (it never ran, or was reset)"
    assert len(error.behind) == 2


def test_a_running_processor_wakes_the_waiter_and_the_read_model_shows_the_event(
    engine: sa.Engine, store: es.EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sides run on hints only: the processor polls every 30 s, and the waiter's
    fallback polls are made longer than the test, so only its wake-up can end it."""
    create_applied_table(engine)
    for name in ("FIRST_POLL_INTERVAL", "MAX_POLL_INTERVAL", "MAX_POLL_INTERVAL_UNHEARD"):
        monkeypatch.setattr(handled, name, 60.0)
    running = Running(engine, store, LogA())
    try:
        for n in range(3):
            result = commit(engine, store, event(f"order-{n}"))
            started = time.monotonic()
            es.wait_until_handled(engine, LogA(), result, timeout=10)
            assert time.monotonic() - started < 5.0
            position = result.events[0].global_position
            assert position in [row.global_position for row in applied(engine, "log_a")]
    finally:
        running.stop()


# -- exact under out-of-order commits (PostgreSQL) ---------------------------------


@pytest.mark.postgres
def test_not_handled_while_an_older_transaction_before_it_is_open(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """T1 appends (lower transaction id and position) and stays open; T2 appends and
    commits. T1's event comes before T2's in read order, in partition 0's scope, T2's
    in partition 1's: no partition may count as past T2's event while T1 is open."""
    create_applied_table(pg_engine)
    # Polling briefly: partition 1, held back by T1, is not woken when T1 ends (T1's hint
    # names partition 0), so it reads T2's event at its next poll.
    runners = [
        Running(
            pg_engine,
            store,
            LogA(partition=k),
            partition_key=k,
            total_partitions=2,
            poll_interval=0.05,
        )
        for k in range(2)
    ]
    try:
        t1 = OpenAppend(pg_engine, store, [event(id_in_partition("held", 0))])
        try:
            t2 = commit(pg_engine, store, event(id_in_partition("quick", 1)))
            assert t2.events[0].global_position > t1.position
            for everyone in (False, True):
                assert not es.is_handled(pg_engine, LogA(), t2, all_partitions=everyone)
                error = timed_out(
                    lambda everyone=everyone: es.wait_until_handled(
                        pg_engine, LogA(), t2, timeout=0.2, all_partitions=everyone
                    )
                )
                assert "partition 1/2 at position" in str(error)
                assert ("partition 0/2 at position" in str(error)) is everyone
        finally:
            t1.commit()
        es.wait_until_handled(pg_engine, LogA(), t2, all_partitions=True, timeout=30)
        positions = [row.global_position for row in applied(pg_engine, "log_a")]
        assert positions == [t1.position, t2.events[0].global_position]
    finally:
        for running in runners:
            running.stop()


@pytest.mark.postgres
def test_a_checkpoint_past_the_position_but_before_the_event_in_read_order(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """T1 takes its transaction id first but appends last, at the higher position: read
    order is A (T1) then B (T2). A checkpoint on A is past B's position, not past B."""
    create_applied_table(pg_engine)
    with pg_engine.connect() as t1:
        with t1.begin():
            store.mark_writer(t1)  # a writer from its start, so its late append is allowed
            t1.execute(sa.text("SELECT pg_current_xact_id()"))  # its id, older than T2's
            b = commit(pg_engine, store, event("b")).events[0]
            a = store.append(t1, [event("a")]).events[0]
        assert a.global_position > b.global_position
    processor = es.Processor(pg_engine, store, es.ProcessorConfig(batch_size=1))
    wait_readable(pg_engine)  # both events can be read now
    assert processor.process_batch(LogA()).handled == 1
    found = checkpoint(pg_engine, "log_a")
    assert found is not None
    assert found.global_position == a.global_position > b.global_position
    assert es.is_handled(pg_engine, LogA(), a)
    assert not es.is_handled(pg_engine, LogA(), b)
    error = timed_out(lambda: es.wait_until_handled(pg_engine, LogA(), b, timeout=0.1))
    assert f"at position {a.global_position} (transaction {found.transaction_id})" in str(error)
    assert processor.process_batch(LogA()).handled == 1
    assert es.is_handled(pg_engine, LogA(), b)
    assert [r.aggregate_id for r in applied(pg_engine, "log_a")] == ["b", "a"]


# -- partitions and scopes ----------------------------------------------------------


def test_the_owning_partition_by_default_every_partition_when_asked(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    ids = [id_in_partition("agg", k, TOTAL) for k in range(TOTAL)]
    e0 = commit(engine, store, event(ids[0]))
    for key in (0, 1):  # partitions 2 and 3 never run
        catch_up(engine, store, LogA(partition=key), partition_key=key, total_partitions=TOTAL)
    es.wait_until_handled(engine, LogA(), e0, timeout=5)
    error = timed_out(
        lambda: es.wait_until_handled(engine, LogA(), e0, timeout=0.1, all_partitions=True)
    )
    assert [line for line in error.behind] == [
        "projection 'log_a' partition 2/4: no checkpoint (it never ran)",
        "projection 'log_a' partition 3/4: no checkpoint (it never ran)",
    ]
    e2 = commit(engine, store, event(ids[2]))
    error = timed_out(lambda: es.wait_until_handled(engine, LogA(), e2, timeout=0.1))
    assert error.behind == ("projection 'log_a' partition 2/4: no checkpoint (it never ran)",)
    for key in (2, 3):
        catch_up(engine, store, LogA(partition=key), partition_key=key, total_partitions=TOTAL)
    # Partitions 0 and 1 are idle behind e2, with nothing of theirs before it: handled.
    es.wait_until_handled(engine, LogA(), e2, timeout=10, all_partitions=True)
    for key in (0, 1):
        assert checkpoint_position(engine, "log_a", key) < e2.events[0].global_position
    # An event of partition 1 before one of partition 0: partition 1 has not handled it.
    commit(engine, store, event(ids[1]))
    e0_again = commit(engine, store, event(ids[0]))
    catch_up(engine, store, LogA(partition=0), partition_key=0, total_partitions=TOTAL)
    assert es.is_handled(engine, LogA(), e0_again)
    assert not es.is_handled(engine, LogA(), e0_again, all_partitions=True)
    error = timed_out(
        lambda: es.wait_until_handled(engine, LogA(), e0_again, timeout=0.1, all_partitions=True)
    )
    # Partitions 2 and 3 stand on e2, with nothing of theirs after it: handled.
    assert [line.split(" at ")[0] for line in error.behind] == ["projection 'log_a' partition 1/4"]


def test_an_event_out_of_scope_is_handled_once_the_checkpoint_has_nothing_before_it(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    cart = commit(engine, store, event("cart-1", aggregate_type="Cart"))
    catch_up(engine, store, Carts())
    order = commit(engine, store, event("order-1", aggregate_type="Order"))
    # The processor never ran after the order: its checkpoint is behind it...
    assert checkpoint_position(engine, "carts") == cart.events[0].global_position
    # ...but nothing of its scope lies between: the order is handled (clause (b)).
    assert es.is_handled(engine, Carts(), order)
    es.wait_until_handled(engine, Carts(), order, timeout=10)
    # Given by name, its scope is unknown: every event counts, the order too.
    assert not es.is_handled(engine, "carts", order)

    commit(engine, store, event("cart-2", aggregate_type="Cart"))
    order_2 = commit(engine, store, event("order-2", aggregate_type="Order"))
    assert not es.is_handled(engine, Carts(), order_2)  # cart-2 is before it
    error = timed_out(lambda: es.wait_until_handled(engine, Carts(), order_2, timeout=0.1))
    assert error.behind[0].startswith("projection 'carts' partition 0/1 at position")
    catch_up(engine, store, Carts())
    assert es.is_handled(engine, [Carts(), "carts"], order_2)
    assert [row.aggregate_id for row in applied(engine, "carts")] == ["cart-1", "cart-2"]


def test_a_partition_on_a_reshard_boundary_has_not_handled_what_is_after_it(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """Read afresh at every check: the boundary, then the new count after the switch."""
    create_applied_table(engine)
    ids = [id_in_partition("agg", k, 2) for k in range(2)]
    commit(engine, store, event(ids[1]))
    for key in range(2):
        catch_up(engine, store, LogA(partition=key), partition_key=key, total_partitions=2)
    with Session(read_committed(engine)) as session, session.begin():
        begun = _set_boundary(session, store, "log_a", 4, None)
    assert begun is not None
    boundary = begun[1][1]
    after = commit(engine, store, event(ids[0]))
    catch_up(engine, store, LogA(partition=0), partition_key=0, total_partitions=2)
    assert checkpoint_position(engine, "log_a", 0) == boundary  # it stops there
    # Partition 0 owns the event but stands on the boundary, before it.
    assert not es.is_handled(engine, LogA(), after)
    assert es.reshard(engine, LogA(), 4).boundary_position == boundary
    owner = fnv1a_32(ids[0]) % 4
    for key in sorted(range(4), key=lambda k: k == owner):  # the owner last
        assert not es.is_handled(engine, LogA(), after)
        catch_up(engine, store, LogA(partition=key), partition_key=key, total_partitions=4)
    assert es.is_handled(engine, LogA(), after, all_partitions=True)
    assert [r.aggregate_id for r in applied(engine, "log_a")] == [ids[1], ids[0]]


def test_inside_the_callers_transaction_with_a_sessionmaker(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """A sessionmaker bound to a connection checks inside its transaction (a test's)."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            conn.exec_driver_sql(
                "CREATE TABLE applied (projection TEXT, global_position BIGINT, "
                "bounded_context TEXT, aggregate_type TEXT, aggregate_id TEXT, "
                "aggregate_version BIGINT, event_type TEXT, partition_key INTEGER, seq BIGINT)"
            )
            result = store.append(conn, [event("own")])
            sessions = sessionmaker(bind=conn, join_transaction_mode="create_savepoint")
            assert not es.is_handled(sessions, LogA(), result)
            processor = es.Processor(sessions, store)
            processor.warn_on_own_transaction = False
            processor.run_until_caught_up(LogA())
            assert es.is_handled(sessions, LogA(), result)
            es.wait_until_handled(sessions, LogA(), result, timeout=1)
            with pytest.raises(es.ValidationError, match="committed"):
                es.is_handled(engine, LogA(), result)  # not committed: not there for others
        finally:
            transaction.rollback()


# -- bad input ----------------------------------------------------------------------


@pytest.fixture
def sqlite_engine(sqlite_url: sa.URL) -> Iterator[sa.Engine]:
    """No query runs in these tests: one database is enough."""
    engine = es.create_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def statements(sqlite_engine: sa.Engine) -> Iterator[list[str]]:
    """Every statement the engine runs while the test does."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(sqlite_engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(sqlite_engine, "before_cursor_execute", record)


BAD_ARGUMENTS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "no-projections": ({"projections": []}, es.ConfigurationError, "no projections"),
    "not-a-projection": ({"projections": [42]}, es.ConfigurationError, "Projection instance"),
    "empty-name": ({"projections": ""}, es.ConfigurationError, "Projection instance"),
    "not-a-list": ({"projections": 7}, es.ConfigurationError, "projections must be"),
    "position-0": ({"position": 0}, es.ValidationError, ">= 1"),
    "negative-position": ({"position": -3}, es.ValidationError, ">= 1"),
    "bool-position": ({"position": True}, es.ValidationError, "global position"),
    "text-position": ({"position": "1"}, es.ValidationError, "global position"),
    "empty-result": ({"position": es.AppendResult(())}, es.ValidationError, "no event"),
    "negative-timeout": ({"timeout": -1}, es.ValidationError, "timeout"),
    "nan-timeout": ({"timeout": math.nan}, es.ValidationError, "timeout"),
    "bool-timeout": ({"timeout": True}, es.ValidationError, "timeout"),
    "all-partitions": ({"all_partitions": "yes"}, es.ValidationError, "all_partitions"),
    "store": ({"store": "events"}, es.ConfigurationError, "EventStore"),
    "strategy": ({"partition_strategy": object()}, es.ConfigurationError, "should_process"),
    "url": ({"engine": "sqlite://"}, es.ConfigurationError, "Engine or a sessionmaker"),
    "unbound": ({"engine": sessionmaker()}, es.ConfigurationError, "bound to an Engine"),
}


@pytest.mark.parametrize(("bad", "error", "match"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS)
def test_bad_arguments_raise_before_any_query(
    sqlite_engine: sa.Engine, statements: list[str], bad: dict[str, Any], error: type, match: str
) -> None:
    arguments: dict[str, Any] = {"engine": sqlite_engine, "projections": [LogA()], "position": 1}
    arguments.update(bad)
    timeout = arguments.pop("timeout", 1.0)
    with pytest.raises(error, match=match):
        es.wait_until_handled(**arguments, timeout=timeout)
    if "timeout" not in bad:
        with pytest.raises(error, match=match):
            es.is_handled(**arguments)
    assert statements == []


def test_a_scoped_session_is_refused(sqlite_engine: sa.Engine) -> None:
    with pytest.raises(es.ConfigurationError, match="scoped_session"):
        es.is_handled(scoped_session(sessionmaker(sqlite_engine)), LogA(), 1)  # type: ignore[arg-type]


def test_a_position_without_a_committed_event_is_refused(
    engine: sa.Engine, store: es.EventStore
) -> None:
    with pytest.raises(es.ValidationError, match="after the append's transaction has committed"):
        es.wait_until_handled(engine, LogA(), 1)
    with Session(engine) as session:
        rolled_back = store.append(session, [event("gone")])
        session.rollback()
    commit(engine, store, event("kept"))  # on SQLite it takes the same position
    with pytest.raises(es.ValidationError, match=r"committed|not the appended"):
        es.wait_until_handled(engine, LogA(), rolled_back)


# -- the pytest plugin's fixture ----------------------------------------------------

PLUGIN_TESTS = """
import threading

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es


class Names(es.Projection):
    name = "names"

    def handle(self, event, session):
        session.execute(sa.text("INSERT INTO names (id) VALUES (:id)"), {"id": event.aggregate_id})


def append(engine, aggregate_id):
    with Session(engine) as session, session.begin():
        return es.EventStore().append(session, [es.Event(
            bounded_context="shop", aggregate_type="User", aggregate_id=aggregate_id,
            event_type="Named")])


def test_waits_for_a_running_processor(eventsource_engine, wait_until_handled):
    with eventsource_engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE names (id TEXT PRIMARY KEY)")
    processor = es.Processor(eventsource_engine, config=es.ProcessorConfig(poll_interval=0.05))
    thread = threading.Thread(
        target=processor.run, args=(Names(),), kwargs={"handle_signals": False}
    )
    thread.start()
    try:
        wait_until_handled([Names()], append(eventsource_engine, "alice"))
    finally:
        processor.stop()
        thread.join()
    with eventsource_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id FROM names").scalar() == "alice"


def test_fails_when_nothing_handles_it(eventsource_engine, wait_until_handled):
    wait_until_handled("nobody", append(eventsource_engine, "bob"), timeout=0.1)
"""


def test_the_plugin_fixture_passes_and_fails_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DATABASE_URL", "EVENTSOURCE_TEST_DATABASE_URL", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(test_waits=PLUGIN_TESTS)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:benchmark")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "the event at position * was not handled within 0.1 s by: projection 'nobody': "
            "no checkpoint (it never ran, or was reset)",
            "FAILED test_waits.py::test_fails_when_nothing_handles_it - Failed: the event *",
        ]
    )
    assert "WaitTimeoutError" not in result.stdout.str()  # the message, not a traceback
