"""Engines made by frameworks (Flask-SQLAlchemy, SQLModel, FastAPI's tutorial) with plain
``sqlalchemy.create_engine``: refused until ``eventsource.configure_engine`` sets them
up, then safe under concurrent read-then-append requests from threads (SQLite files)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

import eventsource as es
from eventsource import database, rebuild

THREADS = 8
REQUESTS = 20
AGGREGATES = 4


def plain_engine(path: Path) -> sa.Engine:
    """What Flask-SQLAlchemy, SQLModel and FastAPI's tutorial make."""
    return sa.create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})


def recipe_engine(path: Path) -> sa.Engine:
    """SQLAlchemy's documented pysqlite recipe: driver transactions off, plain BEGIN."""
    engine = plain_engine(path)

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


MAKERS: dict[str, Callable[[Path], sa.Engine]] = {"plain": plain_engine, "recipe": recipe_engine}


@pytest.fixture(params=sorted(MAKERS))
def app_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A framework's engine on a SQLite file the library's migrations already ran on."""
    path = tmp_path / "app.db"
    es.upgrade(f"sqlite:///{path}")
    engine = MAKERS[request.param](path)
    yield engine
    engine.dispose()


def event(aggregate_id: str, n: int = 0) -> es.Event:
    return es.Event(
        bounded_context="shop",
        aggregate_type="Cart",
        aggregate_id=aggregate_id,
        event_type="ItemAdded",
        payload={"n": n},
    )


def count_events(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM events").scalar_one())


class Counter(es.Projection):
    name = "counter"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        pass


NAMES_CONFIGURE = r"eventsource\.configure_engine\(engine\)"


def test_the_library_refuses_an_engine_it_did_not_set_up(app_engine: sa.Engine) -> None:
    with pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE):
        es.upgrade(app_engine)
    with pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE):
        es.downgrade(app_engine)
    with pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE):
        es.Processor(app_engine)
    with pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE):
        es.Processor(sessionmaker(app_engine))
    with pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE):
        rebuild.rebuild(app_engine, Counter(), keep_read_model=True)
    with pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE):
        rebuild.reset(app_engine, "anything", keep_read_model=True)
    # The store sees only the session: it refuses at the append, before writing.
    with (
        Session(app_engine) as session,
        session.begin(),
        pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE),
    ):
        es.EventStore().append(session, [event("cart-1")])
    assert count_events(app_engine) == 0
    # Nothing was changed behind the application's back by being refused.
    assert database._sqlite_begin not in app_engine.dispatch.begin
    assert database._sqlite_setup(app_engine) is None


def test_once_configured_concurrent_requests_all_succeed(app_engine: sa.Engine) -> None:
    """8 threads x 20 requests, each reading a stream then appending at the version it
    read: deferred transactions (the driver's, or the recipe's plain BEGIN) fail some
    with "database is locked"; BEGIN IMMEDIATE queues them on the busy timeout."""
    assert es.configure_engine(app_engine) is app_engine
    assert es.configure_engine(app_engine) is app_engine  # twice: nothing added twice
    es.upgrade(app_engine)  # accepted now (already at head: nothing to do)
    es.Processor(app_engine).run_until_caught_up(Counter())
    store = es.EventStore()
    sessions = sessionmaker(app_engine)
    failures: list[BaseException] = []
    conflicts = 0
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def request(aggregate_id: str, n: int) -> None:
        nonlocal conflicts
        while True:
            try:
                with sessions() as session, session.begin():
                    if n % 2:
                        version = store.read_stream(session, "shop", "Cart", aggregate_id).version
                    else:
                        version = store.stream_version(session, "shop", "Cart", aggregate_id)
                    store.append(
                        session, [event(aggregate_id, n)], es.ExpectedVersion.exact(version)
                    )
                return
            except es.OptimisticConcurrencyError:
                with lock:
                    conflicts += 1

    def client(worker: int) -> None:
        start.wait()
        for n in range(REQUESTS):
            try:
                request(f"cart-{(worker + n) % AGGREGATES}", n)
            except BaseException as exc:  # collected, asserted below
                with lock:
                    failures.append(exc)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == [], f"{len(failures)} requests failed, first: {failures[0]!r}"
    # Under BEGIN IMMEDIATE the read already holds the write lock: no stale reads.
    assert conflicts == 0
    assert count_events(app_engine) == THREADS * REQUESTS
    with Session(app_engine) as session:
        for i in range(AGGREGATES):
            stream = store.read_stream(session, "shop", "Cart", f"cart-{i}")
            assert [e.aggregate_version for e in stream] == list(range(1, len(stream) + 1))
    assert es.Processor(app_engine).run_until_caught_up(Counter()) == THREADS * REQUESTS


def test_a_configured_write_transaction_holds_the_write_lock_from_its_begin(
    app_engine: sa.Engine, tmp_path: Path
) -> None:
    """Deterministic form of the above: after only a read, another writer is locked out
    (a deferred BEGIN, the recipe's included, would let it in)."""
    es.configure_engine(app_engine)
    other = sqlite3.connect(tmp_path / "app.db", timeout=0, isolation_level=None)
    try:
        with Session(app_engine) as session, session.begin():
            es.EventStore().stream_version(session, "shop", "Cart", "cart-1")
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        # A read-only connection begins deferred, beside a writer (WAL).
        with app_engine.connect() as conn:
            reader = conn.execution_options(eventsource_read_only=True)
            with reader.begin():
                reader.exec_driver_sql("SELECT count(*) FROM events").scalar()
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
    finally:
        other.close()


def test_configure_engine_is_idempotent(tmp_path: Path) -> None:
    engine = plain_engine(tmp_path / "app.db")
    try:
        for _ in range(3):
            es.configure_engine(engine)
        copy = engine.execution_options(isolation_level="SERIALIZABLE")
        assert list(engine.dispatch.begin).count(database._sqlite_begin) == 1
        assert list(copy.dispatch.begin).count(database._sqlite_begin) == 1
        setups = [f for f in engine.pool.dispatch.checkout if isinstance(f, database._SqliteSetup)]
        assert len(setups) == 1
        engine.dispose()  # the pool's listeners move on to the new pool
        es.configure_engine(engine)
        setups = [f for f in engine.pool.dispatch.checkout if isinstance(f, database._SqliteSetup)]
        assert len(setups) == 1
        # The same holds for an engine eventsource.create_engine made.
        made = es.create_engine(f"sqlite:///{tmp_path / 'made.db'}", sqlite_synchronous="NORMAL")
        es.configure_engine(made, sqlite_synchronous="NORMAL")
        assert list(made.dispatch.begin).count(database._sqlite_begin) == 1
        with pytest.raises(es.ConfigurationError, match="sqlite_synchronous='NORMAL'"):
            es.configure_engine(made)  # FULL, the default: a change is refused
        with pytest.raises(es.ConfigurationError, match="sqlite_synchronous must be one of"):
            es.configure_engine(engine, sqlite_synchronous="OFF")  # type: ignore[arg-type]
        with pytest.raises(es.ConfigurationError, match="needs a SQLAlchemy Engine"):
            es.configure_engine(sessionmaker(engine))  # type: ignore[arg-type]
        made.dispose()
    finally:
        engine.dispose()


def pragmas(conn: sa.Connection) -> tuple[Any, ...]:
    """The connection's set-up; ends the transaction they autobegin (a write lock)."""
    dbapi_connection: Any = conn.connection.dbapi_connection
    found = (
        dbapi_connection.isolation_level,
        conn.exec_driver_sql("PRAGMA busy_timeout").scalar(),
        conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
        conn.exec_driver_sql("PRAGMA synchronous").scalar(),
    )
    conn.rollback()
    return found


SET_UP = (None, database.SQLITE_BUSY_TIMEOUT_MS, "wal", 2)


def test_connections_pooled_before_configure_are_set_up_when_checked_out(
    tmp_path: Path,
) -> None:
    engine = plain_engine(tmp_path / "app.db")
    try:
        held = engine.connect()  # checked out while configure_engine runs
        held_dbapi = held.connection.dbapi_connection
        with engine.connect() as conn:
            pooled = conn.connection.dbapi_connection
            assert pragmas(conn)[0] is not None  # the driver manages transactions
        assert pooled is not held_dbapi
        es.configure_engine(engine)
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection is pooled  # reused, and set up
            with conn.begin():  # through the begin listener: BEGIN IMMEDIATE
                conn.exec_driver_sql("SELECT 1")
            assert pragmas(conn) == SET_UP
        # The held Connection keeps its old set-up until it is closed ...
        with pytest.raises(es.ConfigurationError, match=NAMES_CONFIGURE):
            database.require_configured(held, what="test")
        held.close()
        # ... then its DBAPI connection is set up at its next checkout.
        with engine.connect() as a, engine.connect() as b:
            assert {a.connection.dbapi_connection, b.connection.dbapi_connection} == {
                pooled,
                held_dbapi,
            }
            assert pragmas(a) == pragmas(b) == SET_UP
            database.require_configured(a, what="test")
    finally:
        engine.dispose()


def test_an_in_memory_engine_keeps_its_data(tmp_path: Path) -> None:
    """FastAPI's testing recipe: one shared in-memory connection (StaticPool). The pool
    is not emptied, so tables made before configure_engine survive it."""
    engine = sa.create_engine(
        "sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool
    )
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE app_users (name TEXT)")
            conn.exec_driver_sql("INSERT INTO app_users VALUES ('alice')")
        es.configure_engine(engine)
        es.upgrade(engine)
        with Session(engine) as session, session.begin():
            es.EventStore().append(session, [event("cart-1")])
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT name FROM app_users").scalar() == "alice"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
            assert count_events(engine) == 1
    finally:
        engine.dispose()


def test_a_connection_handed_to_upgrade_is_taken_as_it_is(tmp_path: Path) -> None:
    """A test's outer transaction: upgrade checks only engines; the store checks the
    connection when it writes."""
    engine = plain_engine(tmp_path / "app.db")
    try:
        with engine.begin() as conn:
            es.upgrade(conn)
        with engine.connect() as conn, pytest.raises(es.ConfigurationError):
            es.EventStore().append(conn, [event("cart-1")])
        assert es.database.current_revision(engine) == es.database.head_revision()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_on_postgresql_there_is_nothing_to_set_up(empty_pg_url: sa.URL) -> None:
    engine = sa.create_engine(empty_pg_url)
    try:
        listeners = (list(engine.dispatch.begin), list(engine.pool.dispatch.checkout))
        assert es.configure_engine(engine) is engine
        assert (list(engine.dispatch.begin), list(engine.pool.dispatch.checkout)) == listeners
        es.upgrade(engine)
        with Session(engine) as session, session.begin():
            es.EventStore().append(session, [event("cart-1")])
        assert es.Processor(engine).run_until_caught_up(Counter()) == 1
    finally:
        engine.dispose()
