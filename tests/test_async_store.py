"""AsyncEventStore and create_async_engine on real SQLite (aiosqlite) and PostgreSQL
(psycopg's async driver): the synchronous store's statements, checks and errors, run on
the caller's async transaction."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.status import status

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def async_engine(db_url: sa.URL) -> AsyncIterator[AsyncEngine]:
    engine = es.create_async_engine(db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def order(aggregate_id: str = "o-1", **fields: Any) -> es.Event:
    fields.setdefault("payload", {"total": 10})
    return es.Event(
        bounded_context="sales",
        aggregate_type="Order",
        aggregate_id=aggregate_id,
        event_type="OrderPlaced",
        **fields,
    )


async def version_of(engine: AsyncEngine, aggregate_id: str = "o-1") -> int:
    async with engine.connect() as conn:
        return await es.AsyncEventStore().stream_version(conn, "sales", "Order", aggregate_id)


async def test_every_method_round_trips(async_engine: AsyncEngine) -> None:
    store = es.AsyncEventStore()
    first, second = order(), order(payload={"total": 20})
    async with AsyncSession(async_engine) as session, session.begin():
        result = await store.append(session, [first, second], es.ExpectedVersion.no_stream())
    assert [e.aggregate_version for e in result.events] == [1, 2]
    async with async_engine.connect() as conn:
        stream = await store.read_stream(conn, "sales", "Order", "o-1")
        assert [e.event_id for e in stream.events] == [first.event_id, second.event_id]
        assert [e.payload for e in stream.events] == [{"total": 10}, {"total": 20}]
        later = await store.read_stream(conn, "sales", "Order", "o-1", from_version=2)
        assert [e.aggregate_version for e in later.events] == [2]
        everything = await store.read_all(conn, after=0, limit=10)
        assert [e.event_id for e in everything] == [first.event_id, second.event_id]
        assert await store.stream_version(conn, "sales", "Order", "o-1") == 2
    async with async_engine.begin() as conn:  # an AsyncConnection as the target
        await store.mark_writer(conn)
        await store.append(conn, [order()], es.ExpectedVersion.exact(2))
    assert await version_of(async_engine) == 3


async def test_a_rolled_back_session_keeps_nothing(async_engine: AsyncEngine) -> None:
    store = es.AsyncEventStore()
    async with AsyncSession(async_engine) as session, session.begin():
        await store.append(session, [order()])
        await session.rollback()
    assert await version_of(async_engine) == 0


async def test_typed_errors_are_the_stores(async_engine: AsyncEngine) -> None:
    store = es.AsyncEventStore()
    taken = order()
    async with AsyncSession(async_engine) as session, session.begin():
        await store.append(session, [taken])
    async with AsyncSession(async_engine) as session:
        with pytest.raises(es.OptimisticConcurrencyError) as conflict:
            await store.append(session, [order()], es.ExpectedVersion.exact(5))
        assert conflict.value.actual == 1
    async with AsyncSession(async_engine) as session:
        with pytest.raises(es.DuplicateEventError):
            await store.append(session, [order("o-2", event_id=taken.event_id)])
    assert await version_of(async_engine, "o-2") == 0


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([], "empty"),
        ([order(payload={"x": float("nan")})], "not JSON-serialisable"),
        ([order("o-1"), order("o-2")], "one aggregate"),
        ("not events", "list of Event"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_written(
    async_engine: AsyncEngine, events: Any, message: str
) -> None:
    store = es.AsyncEventStore()
    async with AsyncSession(async_engine) as session, session.begin():
        with pytest.raises(es.ValidationError, match=message):
            await store.append(session, events)
        # Nothing was sent: the transaction is usable and commits nothing of it.
        await store.append(session, [order("o-3")])
    async with async_engine.connect() as conn:
        assert [e.aggregate_id for e in await store.read_all(conn)] == ["o-3"]


async def test_a_synchronous_session_is_refused_with_a_hint(db_url: sa.URL) -> None:
    engine = es.create_engine(db_url)
    try:
        with (
            Session(engine) as session,
            pytest.raises(es.ValidationError, match=r"use eventsource\.EventStore"),
        ):
            await es.AsyncEventStore().append(session, [order()])  # type: ignore[arg-type]
    finally:
        engine.dispose()


async def test_eight_tasks_read_then_append_exactly_without_gaps(
    async_engine: AsyncEngine,
) -> None:
    store = es.AsyncEventStore()
    successes: list[int] = []
    conflicts: list[es.OptimisticConcurrencyError] = []

    async def attempt(task: int) -> None:
        for _ in range(5):
            try:
                async with AsyncSession(async_engine) as session, session.begin():
                    version = await store.stream_version(session, "sales", "Order", "shared")
                    await anyio.sleep(0)  # let the others read the same version
                    await store.append(
                        session,
                        [order("shared", payload={"task": task})],
                        es.ExpectedVersion.exact(version),
                    )
                successes.append(task)
            except es.OptimisticConcurrencyError as exc:
                conflicts.append(exc)

    async with anyio.create_task_group() as group:
        for task in range(8):
            group.start_soon(attempt, task)
    async with async_engine.connect() as conn:
        stream = await store.read_stream(conn, "sales", "Order", "shared")
    versions = [e.aggregate_version for e in stream.events]
    assert versions == list(range(1, len(versions) + 1))  # gap-free
    assert len(versions) == len(successes) == 8 * 5 - len(conflicts)
    assert all(isinstance(c, es.OptimisticConcurrencyError) for c in conflicts)


async def test_schema_and_status_through_run_sync(empty_url: sa.URL) -> None:
    engine = es.create_async_engine(empty_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(es.upgrade)
        async with AsyncSession(engine) as session, session.begin():
            await es.AsyncEventStore().append(session, [order()])
        async with engine.connect() as conn:
            rows = await conn.run_sync(lambda c: status(c, projections=["counter"]))
        assert [(r.projection, r.head, r.lag) for r in rows] == [("counter", 1, 1)]
    finally:
        await engine.dispose()


async def test_sqlite_engines_get_the_stores_set_up(tmp_path: Path) -> None:
    engine = es.create_async_engine(f"sqlite:///{tmp_path / 'events.db'}")
    try:
        assert engine.dialect.driver == "aiosqlite"
        async with engine.connect() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
            timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        assert (mode, timeout) == ("wal", es.database.SQLITE_BUSY_TIMEOUT_MS)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgresql_urls_mean_psycopgs_async_driver(pg_url: sa.URL) -> None:
    plain = pg_url.set(drivername="postgresql").render_as_string(hide_password=False)
    engine = es.create_async_engine(plain, application_name=f"async-{uuid.uuid4().hex[:6]}")
    try:
        assert (engine.dialect.driver, engine.dialect.is_async) == ("psycopg", True)
        async with engine.connect() as conn:
            name = (await conn.exec_driver_sql("SHOW application_name")).scalar()
        assert str(name).startswith("async-")
    finally:
        await engine.dispose()


async def test_synchronous_calls_given_async_objects_say_how(async_engine: AsyncEngine) -> None:
    with pytest.raises(es.ConfigurationError, match="run_sync"):
        es.upgrade(async_engine)  # type: ignore[arg-type]
    with pytest.raises(es.ConfigurationError, match="run_sync"):
        status(async_engine)  # type: ignore[arg-type]
    async with AsyncSession(async_engine) as session:
        with pytest.raises(es.ConfigurationError, match="AsyncEventStore"):
            es.EventStore().append(session, [order()])  # type: ignore[arg-type]
    assert await version_of(async_engine) == 0
