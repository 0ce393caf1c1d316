"""pytest plugin: a migrated database per test session and a rolled-back transaction per test.

Installed with the package (``pytest11`` entry point), so the fixtures are there in
any project that has eventsource installed; ``pytest_plugins = ["eventsource.testing"]``
works too. Fixtures:

``eventsource_engine`` (session)
    An Engine on a database migrated with the library's Alembic scripts. SQLite in a
    temporary file by default; with ``--eventsource-db-url`` (or
    ``EVENTSOURCE_TEST_DATABASE_URL``) pointing at PostgreSQL, a throwaway database is
    created on that server and dropped at the end. Each pytest-xdist worker gets its
    own: a SQLite file URL such as ``sqlite:///tests.db`` becomes ``tests-gw0.db``,
    ``tests-gw1.db``... and is emptied at session start (kept afterwards, to look at).
``eventsource_connection``
    A connection inside an outer transaction that is rolled back after the test.
``eventsource_session``
    A Session joined to that transaction through savepoints: code under test may call
    ``commit()``/``begin_nested()`` freely and no test sees another's data.
``event_store``
    An :class:`~eventsource.EventStore`.
``eventsource_async_engine``, ``eventsource_async_connection``,
``eventsource_async_session``, ``async_event_store``
    The async twins, for asyncio applications: an AsyncEngine
    (:func:`eventsource.create_async_engine`) on the same test database, made per test
    (an async engine's connections belong to the event loop that made them); an
    AsyncConnection inside an outer transaction rolled back after the test; an
    AsyncSession joined to it through savepoints; an
    :class:`~eventsource.AsyncEventStore`; and ``async_run_projections``,
    ``run_projections`` in that transaction (``await async_run_projections(...)``).
    They are async fixtures for anyio's pytest plugin, which FastAPI, Starlette and
    httpx already install: mark the tests (or the module) ``@pytest.mark.anyio``.
    Needs the ``asyncio`` extra.
``run_projections``
    ``run_projections(*projections)`` runs projections inside the test's transaction
    until they have handled everything appended so far and returns what each handled.
``wait_until_handled``
    ``wait_until_handled(projections, position, timeout=10.0, all_partitions=False)``:
    :func:`eventsource.wait_until_handled` on ``eventsource_engine``, for tests whose
    appends commit and whose processors run (in threads, or other processes) on that
    engine; a timeout fails the test with the message naming the partitions behind.
    Events appended in the test's transaction never commit: ``run_projections``
    handles those.

The application's own tables go into the same database, once per test session (and
per xdist worker), from ini options (pytest.ini, or ``[tool.pytest.ini_options]``):

``eventsource_app_metadata = myapp.models:Base.metadata``
    ``create_all`` of that MetaData (or declarative base), after the library's tables.
``eventsource_alembic_ini = alembic.ini``
    ``alembic upgrade heads`` with the application's Alembic (path relative to the ini
    file), first. When that applies the library's branch (README, "Using your own
    Alembic") the library's own upgrade is skipped; otherwise it runs next. During the
    upgrade ``sqlalchemy.url`` and ``$DATABASE_URL`` name the test database and
    ``config.attributes["connection"]`` holds a connection to it, so an ``env.py``
    that reads any of them migrates it; logging is restored afterwards (``fileConfig``
    in ``env.py`` would disable the loggers that exist).

A conftest.py that overrides ``eventsource_db_url`` with a database of its own can
call ``create_schema(url, request.config)`` to get the same schema there.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from eventsource import database, errors
from eventsource import handled as handled_events
from eventsource.async_store import AsyncEventStore
from eventsource.events import PersistedEvent
from eventsource.partition import PartitionStrategy
from eventsource.processor import Processor, ProcessorConfig
from eventsource.projection import Projection
from eventsource.store import EventStore

if TYPE_CHECKING:  # greenlet (the asyncio extra) is only needed by the async fixtures
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

URL_OPTION = "--eventsource-db-url"
URL_ENV = "EVENTSOURCE_TEST_DATABASE_URL"
#: ini option: ``module:attribute`` of the application's MetaData, created in the test database.
APP_METADATA_INI = "eventsource_app_metadata"
#: ini option: the application's ``alembic.ini``, upgraded to its heads in the test database.
ALEMBIC_INI_INI = "eventsource_alembic_ini"
#: Set by pytest-xdist in each worker process (gw0, gw1...).
XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("eventsource")
    group.addoption(
        URL_OPTION,
        dest="eventsource_db_url",
        default=None,
        help=(
            "database for eventsource fixtures: a PostgreSQL server URL (a throwaway "
            f"database is created on it) or a SQLite URL. Default: ${URL_ENV}, else a "
            "temporary SQLite file."
        ),
    )
    parser.addini(
        APP_METADATA_INI,
        type="args",
        default=[],
        help=(
            "the application's MetaData (or declarative base) as module:attribute, e.g. "
            "myapp.models:Base.metadata; its tables are created in the eventsource test "
            "database once per test session. Several may be given."
        ),
    )
    parser.addini(
        ALEMBIC_INI_INI,
        type="paths",
        default=[],
        help=(
            "the application's alembic.ini (relative to the ini file): `alembic upgrade "
            "heads` runs on the eventsource test database once per test session, before "
            "the library's own upgrade (skipped when this one applies its branch)."
        ),
    )


class ProjectionRun(dict[str, list[PersistedEvent]]):
    """Events each projection handled, by projection name, in the order handled."""

    @property
    def total(self) -> int:
        return sum(len(events) for events in self.values())


RunProjections = Callable[..., ProjectionRun]
AsyncRunProjections = Callable[..., Awaitable[ProjectionRun]]
WaitUntilHandled = Callable[..., None]


@pytest.fixture(scope="session")
def eventsource_db_url(request: pytest.FixtureRequest) -> Iterator[sa.URL]:
    """URL of this test session's database: the library's schema and the application's."""
    config = request.config
    given = config.getoption("eventsource_db_url") or os.environ.get(URL_ENV)
    if not given:
        with tempfile.TemporaryDirectory(prefix="eventsource-test-") as folder:
            url = sa.make_url(f"sqlite:///{Path(folder) / 'events.db'}")
            create_schema(url, config)
            yield url
        return
    server = database.database_url(given)
    if server.get_backend_name() == "sqlite":
        url = _fresh_sqlite_file(server)
        create_schema(url, config)
        yield url
        return
    if server.get_backend_name() != "postgresql":
        create_schema(server, config)
        yield server
        return
    name = f"eventsource_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = server.set(database=name)
    try:
        create_schema(url, config)
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def create_schema(url: sa.URL, config: pytest.Config) -> None:
    """Create every table the tests need in the empty database at ``url``.

    The application's Alembic first (``eventsource_alembic_ini``), then the library's
    migrations unless that already applied them, then ``create_all`` of the
    application's metadata (``eventsource_app_metadata``).
    """
    # Resolve the options before touching the database: a typo fails fast.
    alembic_inis: list[Path] = config.getini(ALEMBIC_INI_INI)
    if len(alembic_inis) > 1:
        raise pytest.UsageError(f"{ALEMBIC_INI_INI}: one alembic.ini, got {len(alembic_inis)}")
    for ini in alembic_inis:
        if not ini.is_file():
            raise pytest.UsageError(f"{ALEMBIC_INI_INI}: {ini} does not exist")
    metadatas = [_load_metadata(reference) for reference in config.getini(APP_METADATA_INI)]
    engine = database.create_engine(url, poolclass=sa.NullPool)
    try:
        for ini in alembic_inis:
            _alembic_upgrade_heads(ini, engine)
        if not database.managed_elsewhere(engine):
            database.upgrade(engine)
        for metadata in metadatas:
            metadata.create_all(engine)
    finally:
        engine.dispose()


def _load_metadata(reference: str) -> sa.MetaData:
    """The MetaData named by ``module:attribute`` (a declarative base's ``.metadata`` too)."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise pytest.UsageError(
            f"{APP_METADATA_INI}: {reference!r} is not module:attribute "
            "(e.g. myapp.models:Base.metadata)"
        )
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise pytest.UsageError(
            f"{APP_METADATA_INI}: cannot import {module_name!r} ({exc}); add its folder "
            "to pytest's `pythonpath` ini option"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise pytest.UsageError(f"{APP_METADATA_INI}: {reference!r}: {exc}") from exc
    if not isinstance(target, sa.MetaData):
        target = getattr(target, "metadata", target)
    if not isinstance(target, sa.MetaData):
        raise pytest.UsageError(
            f"{APP_METADATA_INI}: {reference!r} is a {type(target).__name__}, not a MetaData"
        )
    return target


def _fresh_sqlite_file(url: sa.URL) -> sa.URL:
    """The worker's own file for a SQLite URL, emptied so that reruns start clean."""
    if url.database in (None, "", ":memory:"):
        raise pytest.UsageError(
            f"{URL_OPTION}: an in-memory SQLite database lives in one connection and "
            "the tests use several; give a file (sqlite:///tests.db) or no URL at all "
            "(a temporary file)"
        )
    path = Path(url.database)
    worker = os.environ.get(XDIST_WORKER_ENV)
    if worker:
        path = path.with_name(f"{path.stem}-{worker}{path.suffix}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return url.set(database=str(path))


def _alembic_upgrade_heads(ini: Path, engine: sa.Engine) -> None:
    from alembic import command
    from alembic.config import Config

    rendered = engine.url.render_as_string(hide_password=False)
    alembic_config = Config(str(ini))
    alembic_config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    with (
        _preserved_logging(),
        _environment(database.DATABASE_URL_ENV, rendered),
        engine.connect() as connection,
    ):
        # Alembic's cookbook recipe for sharing a connection; an env.py that opens its
        # own finds the URL in sqlalchemy.url or $DATABASE_URL (this connection is idle).
        alembic_config.attributes["connection"] = connection
        command.upgrade(alembic_config, "heads")
        if connection.in_transaction():
            connection.commit()


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _preserved_logging() -> Iterator[None]:
    """Undo what ``logging.config.fileConfig`` in an ``env.py`` does to existing loggers.

    It disables every logger it does not name (the library's, the application's) and
    replaces the root logger's handlers and level: logs and ``caplog`` would go silent.
    """
    loggers = [logging.root] + [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    saved = [
        (logger, logger.level, logger.disabled, logger.propagate, list(logger.handlers))
        for logger in loggers
    ]
    try:
        yield
    finally:
        for logger, level, disabled, propagate, handlers in saved:
            logger.setLevel(level)
            logger.disabled = disabled
            logger.propagate = propagate
            logger.handlers[:] = handlers


@pytest.fixture(scope="session")
def eventsource_engine(eventsource_db_url: sa.URL) -> Iterator[sa.Engine]:
    engine = database.create_engine(eventsource_db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def eventsource_connection(eventsource_engine: sa.Engine) -> Iterator[sa.Connection]:
    with eventsource_engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()


@pytest.fixture
def eventsource_sessionmaker(eventsource_connection: sa.Connection) -> sessionmaker[Session]:
    """Sessions that join the test's transaction through savepoints."""
    return sessionmaker(
        bind=eventsource_connection,
        join_transaction_mode="create_savepoint",
        expire_on_commit=False,
    )


@pytest.fixture
def eventsource_session(
    eventsource_sessionmaker: sessionmaker[Session],
) -> Iterator[Session]:
    from eventsource.testing import factories

    with eventsource_sessionmaker() as session, factories.bound_session(session):
        yield session


@pytest.fixture
def event_store() -> EventStore:
    return EventStore()


@pytest.fixture
async def eventsource_async_engine(eventsource_db_url: sa.URL) -> AsyncIterator[AsyncEngine]:
    from eventsource.async_store import create_async_engine

    engine = create_async_engine(eventsource_db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def eventsource_async_connection(
    eventsource_async_engine: AsyncEngine,
) -> AsyncIterator[AsyncConnection]:
    async with eventsource_async_engine.connect() as connection:
        transaction = await connection.begin()
        try:
            yield connection
        finally:
            await transaction.rollback()


@pytest.fixture
async def eventsource_async_session(
    eventsource_async_connection: AsyncConnection,
) -> AsyncIterator[AsyncSession]:
    """An AsyncSession joined to the test's transaction through savepoints: code under
    test may ``await session.commit()`` freely and no test sees another's data."""
    from sqlalchemy.ext.asyncio import AsyncSession

    async with AsyncSession(
        bind=eventsource_async_connection,
        join_transaction_mode="create_savepoint",
        expire_on_commit=False,
    ) as session:
        yield session


@pytest.fixture
def async_event_store() -> AsyncEventStore:
    return AsyncEventStore()


@pytest.fixture
def run_projections(
    eventsource_sessionmaker: sessionmaker[Session],
    eventsource_session: Session,
    event_store: EventStore,
) -> RunProjections:
    """Run projections in the test's transaction until they have handled everything so far."""

    def run(
        *projections: Projection,
        batch_size: int = 100,
        total_partitions: int = 1,
    ) -> ProjectionRun:
        # What the test wrote through its session must be visible to the processor.
        eventsource_session.flush()
        result = _run_projections(
            eventsource_sessionmaker, event_store, projections, batch_size, total_partitions
        )
        # Let the test's session see what the handlers wrote.
        eventsource_session.expire_all()
        return result

    return run


@pytest.fixture
def async_run_projections(
    eventsource_async_connection: AsyncConnection,
    eventsource_async_session: AsyncSession,
    async_event_store: AsyncEventStore,
) -> AsyncRunProjections:
    """``await async_run_projections(*projections)``: ``run_projections`` for the async
    fixtures, in the test's async transaction (the processor runs through ``run_sync``)."""

    async def run(
        *projections: Projection,
        batch_size: int = 100,
        total_partitions: int = 1,
    ) -> ProjectionRun:
        await eventsource_async_session.flush()

        def in_transaction(connection: sa.Connection) -> ProjectionRun:
            maker = sessionmaker(
                bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
            )
            return _run_projections(
                maker, async_event_store.store, projections, batch_size, total_partitions
            )

        result = await eventsource_async_connection.run_sync(in_transaction)
        eventsource_async_session.expire_all()
        return result

    return run


def _run_projections(
    maker: sessionmaker[Session],
    store: EventStore,
    projections: Sequence[Projection],
    batch_size: int,
    total_partitions: int,
) -> ProjectionRun:
    result = ProjectionRun()
    for projection in projections:
        recorder = _Recorder(projection)
        for key in range(total_partitions):
            config = ProcessorConfig(
                batch_size=batch_size, partition_key=key, total_partitions=total_partitions
            )
            processor = Processor(maker, store, config)
            processor.warn_on_own_transaction = False  # the test's transaction rolls back
            try:
                processor.run_until_caught_up(recorder)
            except Exception as exc:
                cause = exc.__cause__
                if cause is not None and isinstance(cause, Exception):
                    cause.add_note(str(exc))
                    raise cause from None
                raise
        result[projection.name] = recorder.handled
    return result


@pytest.fixture
def wait_until_handled(eventsource_engine: sa.Engine) -> WaitUntilHandled:
    """Wait until projections have handled a committed event; fail the test on timeout."""

    def wait(
        projections: handled_events.Projections,
        position: handled_events.Position,
        *,
        timeout: float = handled_events.DEFAULT_TIMEOUT,
        all_partitions: bool = False,
        store: EventStore | None = None,
        partition_strategy: PartitionStrategy | None = None,
    ) -> None:
        try:
            handled_events.wait_until_handled(
                eventsource_engine,
                projections,
                position,
                timeout=timeout,
                all_partitions=all_partitions,
                store=store,
                partition_strategy=partition_strategy,
            )
        except errors.WaitTimeoutError as exc:
            message = str(exc)
        else:
            return
        pytest.fail(message, pytrace=False)  # outside the except: no chained traceback

    return wait


class _Recorder(Projection, abstract=True):
    """Delegates to a projection and remembers what it handled."""

    def __init__(self, inner: Projection) -> None:
        self.inner = inner
        self.name = inner.name
        self.aggregate_types = inner.aggregate_types
        self.bounded_contexts = inner.bounded_contexts
        self.on_error = inner.on_error  # quarantines as in production
        self.handled: list[PersistedEvent] = []

    def handle(self, event: PersistedEvent, session: Session) -> None:
        self.inner.handle(event, session)
        self.handled.append(event)

    def handle_batch(self, events: Sequence[PersistedEvent], session: Session) -> None:
        self.inner.handle_batch(events, session)
        self.handled.extend(events)


__all__ = [
    "AsyncRunProjections",
    "ProjectionRun",
    "RunProjections",
    "WaitUntilHandled",
    "async_event_store",
    "async_run_projections",
    "create_schema",
    "event_store",
    "eventsource_async_connection",
    "eventsource_async_engine",
    "eventsource_async_session",
    "eventsource_connection",
    "eventsource_db_url",
    "eventsource_engine",
    "eventsource_session",
    "eventsource_sessionmaker",
    "run_projections",
    "wait_until_handled",
]
