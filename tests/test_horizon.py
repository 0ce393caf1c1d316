"""The store's reading horizon: projections wait only for transactions that can append.

Each case of docs/horizon.md's argument is interleaved here step by step on a real
server, and the rule's promises are checked against the server rule as a control:
foreign transactions (another database, a non-appending writer, another projection's
batch) no longer hold projections back, while a writer still does, and nothing is
ever skipped or applied twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource as es
from eventsource import cluster, horizon
from eventsource.rebuild import rebuild
from eventsource.status import blockers, status
from tests.conftest import PostgresServer
from tests.pg_cluster import Cluster, ClusterUnavailableError, throwaway_cluster
from tests.projection_support import (
    AppliedLog,
    Background,
    LogA,
    LogB,
    applied,
    assert_versions_in_order,
    create_applied_table,
    event,
    wait_readable,
)

pytestmark = pytest.mark.postgres


def processor(
    engine: sa.Engine, store: es.EventStore, rule: str = "store", **config: object
) -> es.Processor:
    # poll_interval 0: a direct process_batch computes a fresh horizon whenever it needs one.
    return es.Processor(
        engine,
        store,
        es.ProcessorConfig(horizon=rule, poll_interval=0, **config),  # type: ignore[arg-type]
    )


def commit(engine: sa.Engine, store: es.EventStore, *events: es.Event) -> list[int]:
    """One committed transaction appending each event; their positions."""
    with Session(engine) as session, session.begin():
        return [store.append(session, [e]).events[0].global_position for e in events]


def handled_positions(engine: sa.Engine, name: str) -> list[int]:
    """In the order the projection handled them."""
    return [row.global_position for row in sorted(applied(engine, name), key=lambda r: r.seq)]


@contextmanager
def open_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction left open for the block, rolled back after it."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            yield conn
        finally:
            if transaction.is_active:
                transaction.rollback()


def take_id_by_writing(conn: sa.Connection) -> int:
    """Write a row outside the store (a transaction id, and no mark)."""
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS side_table (x int)")
    conn.exec_driver_sql("INSERT INTO side_table VALUES (1)")
    return int(conn.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar_one())


#: Whether the session's transaction holds the store's writer mark (DESIGN: horizon.py).
OWN_MARK = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND granted "
    "AND relation = 'events'::regclass AND mode = 'RowExclusiveLock' AND pid = pg_backend_pid()"
)


def publish(engine: sa.Engine, store: es.EventStore) -> int:
    """A reader computes (and publishes) the store horizon now."""
    return horizon.for_store(engine, store.tables.names).compute(engine)


@pytest.fixture
def other_database(pg_server: PostgresServer) -> Iterator[sa.Engine]:
    url = pg_server.create_database()
    engine = es.create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        pg_server.drop_database(url)


# -- what no longer holds projections back ------------------------------------------


@pytest.mark.parametrize("rule", ["store", "server"])
def test_a_write_transaction_in_another_database_does_not_hold_back_the_store_rule(
    pg_engine: sa.Engine, store: es.EventStore, other_database: sa.Engine, rule: str
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(other_database) as foreign:
        take_id_by_writing(foreign)
        positions = commit(pg_engine, store, event("A"), event("B"))
        handled = processor(pg_engine, store, rule).process_batch(projection).handled
        # The server rule (the control) waits for the foreign transaction.
        assert handled == (2 if rule == "store" else 0)
    processor(pg_engine, store, rule).run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == positions


@pytest.mark.parametrize("rule", ["store", "server"])
def test_a_non_appending_write_transaction_in_the_same_database_does_not_hold_back(
    pg_engine: sa.Engine, store: es.EventStore, rule: str
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(pg_engine) as writer:
        take_id_by_writing(writer)
        positions = commit(pg_engine, store, event("A"))
        handled = processor(pg_engine, store, rule).process_batch(projection).handled
        assert handled == (1 if rule == "store" else 0)
    processor(pg_engine, store, rule).run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == positions


class GatedLog(AppliedLog):
    """Writes its row, then waits at a gate: a batch with an id, held open."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.release = threading.Event()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        super().handle(event, session)
        session.flush()
        self.inside.set()
        assert self.release.wait(30)


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``check()`` comes true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("rule", ["store", "server"])
def test_a_slow_projection_batch_does_not_hold_back_the_others(
    pg_engine: sa.Engine, store: es.EventStore, rule: str
) -> None:
    create_applied_table(pg_engine)
    first = commit(pg_engine, store, event("A"))
    wait_readable(pg_engine, rule=rule)  # A, whatever else runs on the server (server rule)
    slow, fast = GatedLog(), LogB()
    batch = Background(lambda: processor(pg_engine, store, rule).process_batch(slow)).start()
    try:
        # The slow batch has written: it holds an id.
        assert slow.inside.wait(15), (batch.error, batch.alive)
        later = commit(pg_engine, store, event("B"))
        handled = processor(pg_engine, store, rule).process_batch(fast).handled
        assert handled == (2 if rule == "store" else 1)
    finally:
        slow.release.set()
        batch.join()
    processor(pg_engine, store, rule).run_until_caught_up(fast)
    assert handled_positions(pg_engine, fast.name) == first + later


# -- what still holds them back: writers ------------------------------------------


def test_an_open_appending_transaction_holds_back_and_nothing_is_skipped(
    pg_engine: sa.Engine, store: es.EventStore, other_database: sa.Engine
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store)
    with open_transaction(pg_engine) as writer, open_transaction(other_database) as foreign:
        take_id_by_writing(foreign)  # older, but no writer of the store: not named
        held = store.append(writer, [event("A")]).events[0].global_position
        later = commit(pg_engine, store, event("B"))
        assert proc.process_batch(projection).handled == 0  # B sorts after the writer
        (row,) = status(pg_engine, projections=[projection])
        assert (row.lag, row.held_back) == (1, True)  # B waits (A is not committed yet)
        pid = writer.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        assert [(b.kind, b.pid) for b in blockers(pg_engine, store=store)] == [("transaction", pid)]
        writer.commit()
    proc.run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == [held, *later]


def test_a_writer_marked_first_holds_back_from_its_first_write(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """mark_writer, then another write (the id), then the append: never refused."""
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store)
    with open_transaction(pg_engine) as writer:
        store.mark_writer(writer)
        take_id_by_writing(writer)
        later = commit(pg_engine, store, event("B"))
        assert proc.process_batch(projection).handled == 0
        publish(pg_engine, store)
        held = store.append(writer, [event("A")]).events[0].global_position
        writer.commit()
    proc.run_until_caught_up(projection)
    # In transaction order: the writer took its id before B's transaction.
    assert handled_positions(pg_engine, projection.name) == [held, *later]


def test_a_writer_that_takes_its_id_after_the_horizon_was_read_sorts_after_it(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Marked but with no id yet when the horizon is computed: its id comes later."""
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store)
    with open_transaction(pg_engine) as writer:
        store.mark_writer(writer)
        earlier = commit(pg_engine, store, event("B"))
        # No id: nothing of its own to wait for. The bound R1 gives a marked writer
        # with no visible id is the server's oldest running id, which under pytest -n
        # may be another database's for a moment: wait that out, the writer still open.
        assert eventually(lambda: proc.process_batch(projection).handled == 1)
        late = store.append(writer, [event("A")]).events[0].global_position  # not refused
        assert proc.process_batch(projection).handled == 0
        writer.commit()
    proc.run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == [*earlier, late]


# -- an early id: refused, never skipped --------------------------------------------


def test_a_transaction_that_wrote_first_is_refused_once_a_reader_passed_it(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store)
    with open_transaction(pg_engine) as early:
        own = take_id_by_writing(early)
        passed = commit(pg_engine, store, event("B"))
        assert proc.process_batch(projection).handled == 1  # read past the early id
        with pytest.raises(es.AppendOrderError, match="wrote before it appended") as refused:
            store.append(early, [event("A")])
        # Not a version conflict: code that takes one for "already there" and commits
        # the rest of its work would lose the event.
        assert not isinstance(refused.value, es.OptimisticConcurrencyError)
        assert refused.value.events_table == "events"
        assert str(own) in str(refused.value)
        # The transaction is aborted: its other writes cannot be committed without it.
        with pytest.raises(sa.exc.DBAPIError, match="current transaction is aborted"):
            early.exec_driver_sql("SELECT 1")
    with pg_engine.connect() as conn:  # nothing of it was written
        assert conn.exec_driver_sql("SELECT count(*) FROM events").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT count(*) FROM aggregate_heads").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT to_regclass('side_table')").scalar_one() is None
    retried = commit(pg_engine, store, event("A"))
    proc.run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == passed + retried


def test_an_early_id_is_not_refused_while_no_reader_passed_it(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The refusal needs a published horizon above the id: writes alone never cause it."""
    create_applied_table(pg_engine)
    with open_transaction(pg_engine) as early:
        take_id_by_writing(early)
        commit(pg_engine, store, event("B"))
        store.append(early, [event("A")])  # no reader computed a horizon meanwhile
        early.commit()
    processor(pg_engine, store).run_until_caught_up(LogA())
    assert len(applied(pg_engine, "log_a")) == 2


def test_run_in_transaction_marks_its_retry_so_an_early_writer_succeeds(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Every attempt writes first, then a reader passes it, then it appends."""
    create_applied_table(pg_engine)
    attempts: list[bool] = []

    def work(session: Session) -> int:
        conn = session.connection()
        take_id_by_writing(conn)
        commit(pg_engine, store, event(f"other-{len(attempts)}"))
        publish(pg_engine, store)
        attempts.append(bool(conn.exec_driver_sql(OWN_MARK).scalar_one()))
        return store.append(session, [event("A")]).events[0].global_position

    position = es.run_in_transaction(pg_engine, work)
    assert attempts == [False, True]  # refused once, then marked from its start
    processor(pg_engine, store).run_until_caught_up(LogA())
    positions = handled_positions(pg_engine, "log_a")
    assert sorted(positions) == sorted(set(positions))
    assert position in positions
    assert len(positions) == 3  # two others and A, each once


# -- the order inside the append statement --------------------------------------------


@contextmanager
def writers_held_at_their_mark(engine: sa.Engine) -> Iterator[None]:
    """Appends wait for their mark (the events table's ROW EXCLUSIVE lock, taken before
    their statement runs) while this holds a SHARE lock on the table; readers do not."""
    with open_transaction(engine) as gate:
        gate.exec_driver_sql("LOCK TABLE events IN SHARE MODE")
        yield


def test_a_writer_waiting_at_its_mark_reads_the_horizon_published_meanwhile(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Early id: it marks only after a reader published past it, then is refused."""
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(pg_engine) as early:
        own = take_id_by_writing(early)
        passed = commit(pg_engine, store, event("B"))
        with writers_held_at_their_mark(pg_engine):
            append = Background(lambda: store.append(early, [event("A")])).start()
            assert not append.finished_within(0.3)  # waiting for its mark
            assert processor(pg_engine, store).process_batch(projection).handled == 1
            assert publish(pg_engine, store) > own
        append.join()
        assert isinstance(append.error, es.AppendOrderError)
    processor(pg_engine, store).run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == passed


def test_a_writer_without_an_id_waiting_at_its_mark_is_not_refused(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Late id: its id is taken after the mark, so after everything published."""
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(pg_engine) as late:
        passed = commit(pg_engine, store, event("B"))
        with writers_held_at_their_mark(pg_engine):
            append = Background(lambda: store.append(late, [event("A")])).start()
            assert not append.finished_within(0.3)
            assert processor(pg_engine, store).process_batch(projection).handled == 1
            publish(pg_engine, store)
        append.join()
        assert append.error is None
        position = append.result.events[0].global_position
        late.commit()
    processor(pg_engine, store).run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == [*passed, position]


# -- subtransactions ----------------------------------------------------------------


def test_a_savepoint_rolled_back_drops_its_mark_and_a_later_append_is_checked(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store)
    with open_transaction(pg_engine) as writer:
        savepoint = writer.begin_nested()
        store.append(writer, [event("A")])  # the top-level id, and the mark, in the savepoint
        savepoint.rollback()  # the row and the mark go; the id stays
        passed = commit(pg_engine, store, event("B"))
        assert proc.process_batch(projection).handled == 1  # no writer left to wait for
        with pytest.raises(es.AppendOrderError):
            store.append(writer, [event("A")])
    proc.run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == passed


def test_a_savepoint_released_keeps_its_mark(pg_engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store)
    with open_transaction(pg_engine) as writer:
        savepoint = writer.begin_nested()
        held = store.append(writer, [event("A")]).events[0].global_position
        savepoint.commit()  # RELEASE: the mark passes to the transaction
        later = commit(pg_engine, store, event("B"))
        assert proc.process_batch(projection).handled == 0
        writer.commit()
    proc.run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == [held, *later]


# -- prepared transactions ---------------------------------------------------------


@pytest.fixture
def prepared_cluster() -> Iterator[Cluster]:
    """A server of our own that allows prepared transactions (the shared one does not)."""
    try:
        with throwaway_cluster(settings={"max_prepared_transactions": "2"}) as cluster:
            yield cluster
    except ClusterUnavailableError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"needs a throwaway PostgreSQL cluster: {exc}")


def test_a_prepared_writer_holds_back_across_a_restart_until_it_commits(
    prepared_cluster: Cluster,
) -> None:
    engine = es.create_engine(prepared_cluster.url)
    es.upgrade(engine)
    store = es.EventStore()
    create_applied_table(engine)
    projection = LogA()
    with engine.connect() as writer:
        writer.begin()
        held = store.append(writer, [event("A")]).events[0].global_position
        writer.exec_driver_sql("PREPARE TRANSACTION 'eventsource-test'")
        writer.rollback()  # SQLAlchemy's view of it; the transaction is prepared
    later = commit(engine, store, event("B"))
    with engine.connect() as conn:
        holders = conn.exec_driver_sql(
            "SELECT pid FROM pg_locks WHERE locktype = 'relation' "
            "AND relation = 'events'::regclass AND mode = 'RowExclusiveLock'"
        ).all()
    assert holders == [(None,)]  # held by the prepared transaction, with no process
    assert processor(engine, store).process_batch(projection).handled == 0
    assert [(b.kind, b.gid) for b in blockers(engine, store=store)] == [
        ("prepared", "eventsource-test")
    ]
    engine.dispose()
    prepared_cluster.stop()
    prepared_cluster.start()  # a prepared transaction survives, and takes its locks again
    assert processor(engine, store).process_batch(projection).handled == 0
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "COMMIT PREPARED 'eventsource-test'"
        )
    processor(engine, store).run_until_caught_up(projection)
    assert handled_positions(engine, projection.name) == [held, *later]
    engine.dispose()


# -- the processor's own appends ---------------------------------------------------


class Reactor(AppliedLog):
    """Writes its read model first, then appends: an early id in its batch.

    Before its append it lets another writer commit and a reader publish the horizon,
    so an unmarked batch is refused every time.
    """

    name = "reactor"

    def __init__(self, engine: sa.Engine, store: es.EventStore) -> None:
        super().__init__()
        self.engine = engine
        self.store = store
        self.marked: list[bool] = []

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        if event.aggregate_type != "Order":
            return
        super().handle(event, session)
        session.flush()  # the read-model write gives the batch its id
        commit(self.engine, self.store, event_of("Noise", f"n-{len(self.marked)}"))
        publish(self.engine, self.store)
        self.marked.append(bool(session.connection().exec_driver_sql(OWN_MARK).scalar_one()))
        reaction = event_of("Shipment", f"ship-{event.aggregate_id}")
        self.store.append(session, [reaction])


def event_of(aggregate_type: str, aggregate_id: str) -> es.Event:
    return event(aggregate_id, aggregate_type=aggregate_type)


def test_a_reactor_that_writes_then_appends_learns_to_mark_its_batches(
    pg_engine: sa.Engine, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    create_applied_table(pg_engine)
    orders = commit(pg_engine, store, event("o1"), event("o2"))
    reactor = Reactor(pg_engine, store)
    proc = processor(pg_engine, store, batch_size=1)
    with caplog.at_level(logging.INFO, logger="eventsource.processor"):
        proc.run_until_caught_up(reactor)
    # Refused once, unmarked (the batch rolled back and was retried), then marked.
    assert reactor.marked[:2] == [False, True]
    assert all(reactor.marked[1:])
    assert "mark themselves as writers" in caplog.text
    assert handled_positions(pg_engine, reactor.name) == orders
    # Every event, the reactions and the noise included, exactly once to a reader.
    everything = LogB()
    processor(pg_engine, store).run_until_caught_up(everything)
    with pg_engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT global_position FROM events").scalars().all()
        shipments = conn.exec_driver_sql(
            "SELECT count(*) FROM events WHERE aggregate_type = 'Shipment'"
        ).scalar_one()
    assert shipments == 2  # the refused batch's reaction was rolled back with it
    assert sorted(handled_positions(pg_engine, everything.name)) == sorted(stored)
    assert_versions_in_order(applied(pg_engine, everything.name))


# -- inside a caller's transaction (tests, rebuilds) ---------------------------------


def test_a_caller_transaction_reads_past_a_foreign_blocker_but_not_past_its_own_id(
    pg_engine: sa.Engine, store: es.EventStore, other_database: sa.Engine
) -> None:
    """The test plugin's case: append and project in one transaction, on a busy server."""
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(other_database) as foreign:
        take_id_by_writing(foreign)
        before = commit(pg_engine, store, event("A"))
        with pg_engine.connect() as conn, conn.begin():
            own = store.append(conn, [event("B")]).events[0].global_position
            newer = commit(pg_engine, store, event("C"))  # above the caller's own id
            proc = es.Processor(sessionmaker(bind=conn), store, es.ProcessorConfig())
            proc.warn_on_own_transaction = False
            proc.run_until_caught_up(projection)
            assert handled_positions_in(conn, projection.name) == [*before, own]
        # Committed with its checkpoint on its own event: C is read next, once.
        processor(pg_engine, store).run_until_caught_up(projection)
        assert handled_positions(pg_engine, projection.name) == [*before, own, *newer]


def handled_positions_in(conn: sa.Connection, name: str) -> list[int]:
    return list(
        conn.exec_driver_sql(
            "SELECT global_position FROM applied WHERE projection = %(n)s ORDER BY seq",
            {"n": name},
        ).scalars()
    )


# -- once per process, and the fallback -------------------------------------------


def test_the_horizon_is_computed_once_for_all_processors_of_a_poll(
    pg_engine: sa.Engine, store: es.EventStore, other_database: sa.Engine
) -> None:
    create_applied_table(pg_engine)
    commit(pg_engine, store, event("A"))
    with pg_engine.connect() as conn:
        identity = horizon.identity_of(conn, store.tables.names)
    shared = horizon.for_store(pg_engine, store.tables.names, identity)
    projections = [type(f"Log{i}", (AppliedLog,), {"name": f"log_{i}"})() for i in range(10)]
    with open_transaction(other_database) as foreign:
        take_id_by_writing(foreign)  # events wait above the server bound from now on
        commit(pg_engine, store, event("B"))
        processors = [
            es.Processor(pg_engine, store, es.ProcessorConfig(poll_interval=60))
            for _ in projections
        ]
        for proc in processors:
            proc._horizon_max_age = 60.0  # as inside run(): one computation per poll
        before = shared.computations
        for proc, projection in zip(processors, projections, strict=True):
            assert proc.process_batch(projection).handled == 2
        assert shared.computations - before == 1


def test_without_the_sequence_the_server_rule_applies_and_says_why(
    pg_engine: sa.Engine,
    store: es.EventStore,
    other_database: sa.Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(other_database) as foreign:
        take_id_by_writing(foreign)
        positions = commit(pg_engine, store, event("A"))
        with pg_engine.begin() as conn:
            conn.exec_driver_sql("DROP SEQUENCE events_horizon")
        with caplog.at_level(logging.WARNING, logger="eventsource.horizon"):
            assert processor(pg_engine, store).process_batch(projection).handled == 0
        assert "the server rule" in caplog.text
        assert "events_horizon" in caplog.text
        with pg_engine.connect() as conn:
            identity = horizon.identity_of(conn, store.tables.names)
        assert horizon.for_store(pg_engine, store.tables.names, identity).unavailable_reason
    processor(pg_engine, store).run_until_caught_up(projection)  # the blocker has ended
    assert handled_positions(pg_engine, projection.name) == positions


def test_the_horizon_rule_is_checked() -> None:
    with pytest.raises(es.ConfigurationError, match="horizon must be one of 'store', 'server'"):
        es.ProcessorConfig(horizon="database")  # type: ignore[arg-type]


# -- what the review found: isolation, stores behind one URL, restarts, restores -------


def test_a_caller_repeatable_read_transaction_reads_by_the_server_rule(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Its snapshot predates the horizon: a writer that ended in between has rows it
    cannot see below any horizon computed later, so only the server's bound is safe."""
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(pg_engine) as w:
        first = store.append(w, [event("W")]).events[0].global_position
        later = commit(pg_engine, store, event("V"))
        with pg_engine.connect() as conn:
            conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                conn.exec_driver_sql("SELECT 1")  # the snapshot: W still running
                w.commit()  # W ends; its row stays invisible to this snapshot
                proc = es.Processor(sessionmaker(bind=conn), store, es.ProcessorConfig())
                proc.process_batch(projection)
                assert handled_positions_in(conn, projection.name) == []  # not V before W
    processor(pg_engine, store).run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == [first, *later]


def test_two_stores_behind_one_url_keep_their_own_horizons(
    pg_engine: sa.Engine, pg_url: sa.URL
) -> None:
    """Schemas per tenant, told apart only by search_path: one's horizon never serves
    the other (horizon.store_identity)."""
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA tenant_a")
        conn.exec_driver_sql("CREATE SCHEMA tenant_b")
    engines = {
        name: es.create_engine(pg_url, connect_args={"options": f"-csearch_path={name}"})
        for name in ("tenant_a", "tenant_b")
    }
    store = es.EventStore()
    try:
        for engine in engines.values():
            es.upgrade(engine)
            create_applied_table(engine)
        a, b = engines["tenant_a"], engines["tenant_b"]
        with open_transaction(b) as writer:
            held = store.append(writer, [event("B1")]).events[0].global_position
            later = commit(b, store, event("B2"))
            commit(a, store, event("A1"))
            # A's processor computes A's horizon (no writer there) while B's is open...
            proc_a = es.Processor(a, store, es.ProcessorConfig(poll_interval=60))
            proc_b = es.Processor(b, store, es.ProcessorConfig(poll_interval=60))
            proc_a._horizon_max_age = proc_b._horizon_max_age = 60.0  # as in run()
            assert proc_a.process_batch(LogA()).handled == 1
            # ...which B's must not reuse: B2 sorts after B's open writer.
            assert proc_b.process_batch(LogA()).handled == 0
            writer.commit()
        processor(b, store).run_until_caught_up(LogA())
        assert handled_positions(b, "log_a") == [held, *later]
    finally:
        for engine in engines.values():
            engine.dispose()


def test_a_cached_horizon_above_the_servers_ids_is_computed_again(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """After a crash or a failover ids may be handed out again below a horizon cached
    before it: one above the batch's snapshot xmax is not used."""
    shared = horizon.StoreHorizon(store.tables.names)
    first = shared.get(pg_engine, max_age=60)
    assert first is not None
    assert shared.get(pg_engine, max_age=60, next_id=first) == first  # cached
    assert shared.computations == 1
    shared.get(pg_engine, max_age=60, next_id=first - 1)  # as if the server restarted
    assert shared.computations == 2


def test_a_published_horizon_alone_ahead_of_the_server_is_rebased(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """A restore can bring a published horizon ahead of the server while every stored
    id is behind it: appends are refused until `eventsource db rebase` brings it down."""
    commit(pg_engine, store, event("A"))
    with pg_engine.connect() as conn:
        ahead = int(
            conn.exec_driver_sql(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 100000"
            ).scalar_one()
        )
        conn.exec_driver_sql(f"SELECT setval('events_horizon', {ahead})")
    with pytest.raises(es.TransactionIdsAheadError, match="published reading horizon"):
        commit(pg_engine, store, event("B"))
    cluster.rebase(pg_engine)
    commit(pg_engine, store, event("B"))  # taken now
    with pg_engine.connect() as conn:
        published = conn.exec_driver_sql("SELECT last_value FROM events_horizon").scalar_one()
    assert published < ahead


class ReactorWithReset(Reactor):
    name = "reactor_reset"

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM applied WHERE projection = :p"), {"p": self.name})


def test_an_atomic_rebuild_of_a_reactor_runs_again_as_a_writer(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The rebuild's one transaction writes, then its handler appends after a reader
    passed it: refused, rolled back whole, and run again marked from its start."""
    create_applied_table(pg_engine)
    orders = commit(pg_engine, store, event("o1"), event("o2"))
    reactor = ReactorWithReset(pg_engine, store)
    rebuild(pg_engine, reactor, store=store, atomic=True)
    assert reactor.marked[:2] == [False, True]
    assert all(reactor.marked[1:])
    assert handled_positions(pg_engine, reactor.name) == orders
    with pg_engine.connect() as conn:
        shipments = conn.exec_driver_sql(
            "SELECT count(*) FROM events WHERE aggregate_type = 'Shipment'"
        ).scalar_one()
    assert shipments == 2  # the refused attempt's reactions were rolled back with it


@pytest.fixture
def limited_role(pg_engine: sa.Engine) -> Iterator[str]:
    """A login role with every right on the store but those on the horizon sequence."""
    role = f"es_limited_{uuid.uuid4().hex[:8]}"
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"REVOKE ALL ON SEQUENCE events_horizon FROM {role}")
    try:
        yield role
    finally:
        with pg_engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")


def test_a_role_without_rights_on_the_horizon_appends_and_reads_by_the_store_rule(
    pg_engine: sa.Engine, store: es.EventStore, limited_role: str, other_database: sa.Engine
) -> None:
    """The check and the publishing run as the migration's owner (SECURITY DEFINER):
    an application role needs no right on the sequence, and still cannot skip it."""
    create_applied_table(pg_engine)
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"GRANT ALL ON applied TO {limited_role}")
        conn.exec_driver_sql(f"GRANT CREATE ON SCHEMA public TO {limited_role}")  # side_table
    limited = es.create_engine(pg_engine.url.set(username=limited_role), poolclass=sa.NullPool)
    try:
        with open_transaction(other_database) as foreign:
            take_id_by_writing(foreign)
            positions = commit(limited, store, event("A"))
            assert processor(limited, store).process_batch(LogA()).handled == 1  # store rule
        with open_transaction(limited) as early:
            take_id_by_writing(early)
            positions += commit(limited, store, event("B"))
            processor(limited, store).process_batch(LogA())  # reads past the early id
            with pytest.raises(es.AppendOrderError):
                store.append(early, [event("C")])
    finally:
        limited.dispose()
    assert handled_positions(pg_engine, "log_a") == positions


def test_an_insert_that_bypasses_the_store_is_checked_too(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The check is the table's trigger: a writer on an older version of the library
    (or a hand-written INSERT) that wrote first is refused as well, never skipped."""
    create_applied_table(pg_engine)
    projection = LogA()
    with open_transaction(pg_engine) as early:
        take_id_by_writing(early)
        passed = commit(pg_engine, store, event("B"))
        assert processor(pg_engine, store).process_batch(projection).handled == 1
        with pytest.raises(sa.exc.DBAPIError, match="wrote before it appended") as refused:
            early.exec_driver_sql(
                "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, "
                "aggregate_version, partition_hash, event_id, event_type, event_version, "
                "payload, created_at) VALUES ('sales', 'Order', 'A', 1, 0, gen_random_uuid(), "
                "'Happened', 1, '{}', now())"
            )
        assert getattr(refused.value.orig, "sqlstate", None) == horizon.REFUSED_SQLSTATE
    processor(pg_engine, store).run_until_caught_up(projection)
    assert handled_positions(pg_engine, projection.name) == passed


def test_the_publish_function_never_publishes_above_the_servers_ids(pg_engine: sa.Engine) -> None:
    with pg_engine.connect() as conn:
        published = conn.exec_driver_sql(
            "SELECT events_horizon_publish(9000000000000)"
        ).scalar_one()
        next_id = conn.exec_driver_sql(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
        ).scalar_one()
    assert published <= next_id


def test_mark_writer_says_when_it_comes_too_late(
    pg_engine: sa.Engine, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="eventsource.store"):
        with open_transaction(pg_engine) as first:
            store.mark_writer(first)  # before anything: right
            take_id_by_writing(first)
            store.append(first, [event("A")])
            store.mark_writer(first)  # already a writer: nothing to say
        assert "too late" not in caplog.text
        with open_transaction(pg_engine) as late:
            take_id_by_writing(late)
            store.mark_writer(late)
    assert "too late" in caplog.text
