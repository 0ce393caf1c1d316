"""The event store for asyncio applications (FastAPI and friends), on the same SQL.

:class:`AsyncEventStore` runs :class:`~eventsource.EventStore`'s own methods on the
caller's ``AsyncSession`` or ``AsyncConnection`` through SQLAlchemy's ``run_sync``: the
synchronous code runs in a greenlet on the async connection, so every statement,
check, error and invariant is the store's, written once. The caller owns the
transaction, as with the synchronous store. :func:`create_async_engine` makes the
engine as :func:`~eventsource.create_engine` does (plain ``postgresql://`` URLs mean
psycopg 3, here its async driver; ``sqlite://`` URLs mean aiosqlite, set up with
``BEGIN IMMEDIATE``, WAL and a busy timeout).

Schema and status run the same way::

    async with engine.begin() as conn:
        await conn.run_sync(eventsource.upgrade)
    async with engine.connect() as conn:
        rows = await conn.run_sync(eventsource.status.status)

Projections run in workers (``eventsource run``), on a synchronous engine: they hold a
connection for each batch and are no better for an event loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session

from eventsource import database, errors, models
from eventsource.events import AppendResult, Event, ExpectedVersion, PersistedEvent, Stream
from eventsource.store import DEFAULT_READ_LIMIT, EventStore

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

    #: Where the async store reads and writes (the caller's transaction).
    AsyncSessionOrConnection = AsyncSession | AsyncConnection

_T = TypeVar("_T")


class AsyncEventStore:
    """:class:`~eventsource.EventStore` for ``AsyncSession`` and ``AsyncConnection``.

    The same arguments, the same methods as coroutines, the same results and errors;
    ``store`` wraps an EventStore you already have instead (its tables, its JSON hook).
    The caller begins and commits the transaction; the store never does.
    """

    def __init__(
        self,
        *,
        table_names: models.TableNames | None = None,
        json_default: Callable[[Any], Any] | None = None,
        notify: bool = True,
        store: EventStore | None = None,
    ) -> None:
        if store is not None and not isinstance(store, EventStore):
            raise errors.ConfigurationError(f"store must be an EventStore, got {store!r}")
        self.store = store or EventStore(
            table_names=table_names, json_default=json_default, notify=notify
        )

    async def append(
        self,
        session: AsyncSessionOrConnection,
        events: Sequence[Event],
        expected_version: ExpectedVersion | None = None,
    ) -> AppendResult:
        """:meth:`EventStore.append`: raises OptimisticConcurrencyError, ValidationError..."""
        return await _run(session, lambda s: self.store.append(s, events, expected_version))

    async def read_stream(
        self,
        session: AsyncSessionOrConnection,
        bounded_context: str,
        aggregate_type: str,
        aggregate_id: str | uuid.UUID,
        from_version: int | None = None,
        to_version: int | None = None,
    ) -> Stream:
        """:meth:`EventStore.read_stream`: one aggregate's events in version order."""
        return await _run(
            session,
            lambda s: self.store.read_stream(
                s, bounded_context, aggregate_type, aggregate_id, from_version, to_version
            ),
        )

    async def read_all(
        self,
        session: AsyncSessionOrConnection,
        after: int = 0,
        limit: int = DEFAULT_READ_LIMIT,
    ) -> list[PersistedEvent]:
        """:meth:`EventStore.read_all`: events after a position, in position order."""
        return await _run(session, lambda s: self.store.read_all(s, after, limit))

    async def stream_version(
        self,
        session: AsyncSessionOrConnection,
        bounded_context: str,
        aggregate_type: str,
        aggregate_id: str | uuid.UUID,
    ) -> int:
        """:meth:`EventStore.stream_version`: the aggregate's version, 0 when it has none."""
        return await _run(
            session,
            lambda s: self.store.stream_version(s, bounded_context, aggregate_type, aggregate_id),
        )

    async def mark_writer(self, session: AsyncSessionOrConnection) -> None:
        """:meth:`EventStore.mark_writer`."""
        await _run(session, self.store.mark_writer)


async def _run(session: AsyncSessionOrConnection, call: Callable[[Any], _T]) -> _T:
    """``call(sync Session or Connection)`` in the caller's async transaction."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    if isinstance(session, async_scoped_session):
        session = session()
    if isinstance(session, AsyncSession):
        return await session.run_sync(call)
    if isinstance(session, AsyncConnection):
        return await session.run_sync(call)
    synchronous = isinstance(session, Session | scoped_session | sa.Connection)
    raise errors.ValidationError(
        f"expected a SQLAlchemy AsyncSession or AsyncConnection, got {type(session).__name__}"
        + (" (a synchronous one: use eventsource.EventStore)" if synchronous else "")
    )


def create_async_engine(
    url: str | sa.URL | None = None,
    *,
    sqlite_synchronous: database.SqliteSynchronous = database.SQLITE_SYNCHRONOUS_DEFAULT,
    application_name: str = database.DEFAULT_APPLICATION_NAME,
    **kwargs: Any,
) -> AsyncEngine:
    """An AsyncEngine set up as :func:`eventsource.create_engine` sets up an Engine.

    ``postgresql://`` URLs use psycopg 3's async driver (with create_engine's libpq
    timeouts and ``application_name``); ``sqlite://`` URLs use aiosqlite, with
    ``BEGIN IMMEDIATE``, WAL, ``PRAGMA synchronous`` and a busy timeout. Needs the
    ``asyncio`` extra (``pip install 'eventsource[asyncio]'``).
    """
    try:
        from sqlalchemy.ext import asyncio as sa_asyncio
    except ImportError as exc:  # greenlet missing
        raise errors.ConfigurationError(
            f"async engines need the asyncio extra: pip install 'eventsource[asyncio]' ({exc})"
        ) from exc
    resolved, kwargs = database.engine_arguments(
        url, sqlite_synchronous=sqlite_synchronous, application_name=application_name, **kwargs
    )
    if resolved.get_backend_name() == "sqlite" and resolved.get_driver_name() == "pysqlite":
        resolved = resolved.set(drivername="sqlite+aiosqlite")
    engine = sa_asyncio.create_async_engine(resolved, **kwargs)
    database.configure_engine(engine.sync_engine, sqlite_synchronous=sqlite_synchronous)
    return engine
