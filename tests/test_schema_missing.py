"""A database never migrated: the store and processors raise SchemaMissingError naming
the command that fixes it, chained from the driver's error, and fail fast; a handler's
own missing read-model table stays the handler's error."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import eventsource as es

NAMES_COMMANDS = r"`eventsource db upgrade` \(or `alembic upgrade head`"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine on a database nothing was ever migrated on."""
    if request.param == "sqlite":
        url: sa.URL = sa.make_url(f"sqlite:///{tmp_path / 'fresh.db'}")
    else:
        url = request.getfixturevalue("empty_pg_url")
    engine = es.create_engine(url)
    yield engine
    engine.dispose()


def driver_error(engine: sa.Engine) -> type[sa.exc.DBAPIError]:
    """What the driver raises for a missing table, wrapped by SQLAlchemy."""
    return (
        sa.exc.ProgrammingError if engine.dialect.name == "postgresql" else sa.exc.OperationalError
    )


def event(aggregate_id: str = "order-1") -> es.Event:
    return es.Event(
        bounded_context="shop",
        aggregate_type="Order",
        aggregate_id=aggregate_id,
        event_type="OrderPlaced",
        payload={},
    )


STORE_CALLS: dict[str, Callable[[es.EventStore, Any], object]] = {
    "append": lambda store, s: store.append(s, [event()], es.ExpectedVersion.no_stream()),
    "append_many": lambda store, s: store.append(s, [event(), event()]),
    "read_stream": lambda store, s: store.read_stream(s, "shop", "Order", "order-1"),
    "read_all": lambda store, s: store.read_all(s),
    "stream_version": lambda store, s: store.stream_version(s, "shop", "Order", "order-1"),
}


def assert_schema_missing(
    info: pytest.ExceptionInfo[es.SchemaMissingError], engine: sa.Engine
) -> None:
    assert isinstance(info.value.__cause__, driver_error(engine))
    assert "eventsource.upgrade(engine)" in str(info.value)


@pytest.mark.parametrize("call", sorted(STORE_CALLS))
def test_store_on_a_database_never_migrated(fresh_engine: sa.Engine, call: str) -> None:
    store = es.EventStore()
    with (
        Session(fresh_engine) as session,
        pytest.raises(es.SchemaMissingError, match=NAMES_COMMANDS) as info,
    ):
        STORE_CALLS[call](store, session)
    assert_schema_missing(info, fresh_engine)
    table = "events" if call in ("read_stream", "read_all") else "aggregate_heads"
    assert f"the database has no {table} table: " in str(info.value)
    # Through a Connection too.
    with fresh_engine.connect() as conn, pytest.raises(es.SchemaMissingError):
        STORE_CALLS[call](store, conn)


def test_store_with_table_names_that_were_never_migrated(db_url: sa.URL) -> None:
    """The default tables exist; the store's own names do not."""
    engine = es.create_engine(db_url)
    names = es.TableNames(events="shop_events", aggregate_heads="shop_heads")
    try:
        store = es.EventStore(table_names=names)
        with Session(engine) as session, pytest.raises(es.SchemaMissingError) as info:
            store.append(session, [event()])
        assert "shop_heads" in str(info.value)
        with Session(engine) as session, pytest.raises(es.SchemaMissingError) as info:
            store.read_all(session)
        assert "shop_events" in str(info.value)
    finally:
        engine.dispose()


class Noop(es.Projection):
    name = "noop"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        pass


def run_in_thread(work: Callable[[], object], timeout: float = 20) -> BaseException | None:
    """Run ``work`` in a thread; the error it raised (None if it returned)."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # handed back to the test
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "kept retrying a missing schema"
    return raised[0] if raised else None


@pytest.mark.parametrize("mode", ["run_until_caught_up", "run", "process_batch", "runner"])
def test_processor_on_a_database_never_migrated_fails_fast(
    fresh_engine: sa.Engine, mode: str
) -> None:
    # The default retry policy: a missing schema must not be retried for its 300 s.
    processor = es.Processor(fresh_engine)
    projection = Noop()
    work: dict[str, Callable[[], object]] = {
        "run_until_caught_up": lambda: processor.run_until_caught_up(projection),
        "run": lambda: processor.run(projection),
        "process_batch": lambda: processor.process_batch(projection),
        "runner": lambda: es.Runner().run_until_caught_up([(projection, processor)]),
    }
    started = time.monotonic()
    error = run_in_thread(work[mode])
    assert time.monotonic() - started < 10
    assert isinstance(error, es.SchemaMissingError), repr(error)
    assert isinstance(error.__cause__, driver_error(fresh_engine))
    assert "`eventsource db upgrade`" in str(error)


def test_processor_in_a_callers_transaction_on_a_database_never_migrated(
    fresh_engine: sa.Engine,
) -> None:
    with fresh_engine.connect() as conn:
        processor = es.Processor(sessionmaker(bind=conn))
        with pytest.raises(es.SchemaMissingError, match=NAMES_COMMANDS):
            processor.run_until_caught_up(Noop())


class Base(DeclarativeBase):
    pass


class OrderSummary(Base):
    """A read model whose table the application forgot to create."""

    __tablename__ = "order_summaries"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[str]


class WritesWithSql(es.Projection):
    name = "writes_with_sql"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(
            sa.text("INSERT INTO order_summaries (order_id) VALUES (:id)"),
            {"id": event.aggregate_id},
        )


class WritesWithOrm(es.Projection):
    name = "writes_with_orm"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.add(OrderSummary(order_id=event.aggregate_id))  # flushed by the processor


@pytest.mark.parametrize("projection", [WritesWithSql(), WritesWithOrm()], ids=lambda p: p.name)
def test_a_handlers_missing_table_is_not_a_missing_schema(
    engine: sa.Engine, store: es.EventStore, projection: es.Projection
) -> None:
    with Session(engine) as session, session.begin():
        store.append(session, [event()])
    processor = es.Processor(engine, store)
    started = time.monotonic()
    with pytest.raises(es.ProjectionError) as info:
        processor.run_until_caught_up(projection)
    assert time.monotonic() - started < 10
    assert not isinstance(info.value, es.SchemaMissingError)
    chain: list[BaseException] = []
    current: BaseException | None = info.value
    while current is not None:
        chain.append(current)
        current = current.__cause__
    assert any("order_summaries" in str(exc) for exc in chain), chain
    assert info.value.global_position == 1  # the handler's failure, by SQL or ORM flush
