"""pytest plugin: a migrated database per test session and a rolled-back transaction per test.

Installed with the package (``pytest11`` entry point), so the fixtures are there in
any project that has eventsource installed; ``pytest_plugins = ["eventsource.testing"]``
works too. Fixtures:

``eventsource_engine`` (session)
    An Engine on a database migrated with the library's Alembic scripts. SQLite in a
    temporary file by default; with ``--eventsource-db-url`` (or
    ``EVENTSOURCE_TEST_DATABASE_URL``) pointing at PostgreSQL, a throwaway database is
    created on that server and dropped at the end. Each pytest-xdist worker gets its own.
``eventsource_connection``
    A connection inside an outer transaction that is rolled back after the test.
``eventsource_session``
    A Session joined to that transaction through savepoints: code under test may call
    ``commit()``/``begin_nested()`` freely and no test sees another's data.
``event_store``
    An :class:`~eventsource.EventStore`.
``run_projections``
    ``run_projections(*projections)`` runs projections inside the test's transaction
    until they have handled everything appended so far and returns what each handled.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from eventsource import database
from eventsource.events import PersistedEvent
from eventsource.processor import Processor, ProcessorConfig
from eventsource.projection import Projection
from eventsource.store import EventStore

URL_OPTION = "--eventsource-db-url"
URL_ENV = "EVENTSOURCE_TEST_DATABASE_URL"


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


class ProjectionRun(dict[str, list[PersistedEvent]]):
    """Events each projection handled, by projection name, in the order handled."""

    @property
    def total(self) -> int:
        return sum(len(events) for events in self.values())


RunProjections = Callable[..., ProjectionRun]


@pytest.fixture(scope="session")
def eventsource_db_url(request: pytest.FixtureRequest) -> Iterator[sa.URL]:
    """URL of a database migrated to the library's head revision, for this test session."""
    given = request.config.getoption("eventsource_db_url") or os.environ.get(URL_ENV)
    if not given:
        with tempfile.TemporaryDirectory(prefix="eventsource-test-") as folder:
            url = sa.make_url(f"sqlite:///{Path(folder) / 'events.db'}")
            database.upgrade(url)
            yield url
        return
    server = database.database_url(given)
    if server.get_backend_name() != "postgresql":
        database.upgrade(server)
        yield server
        return
    name = f"eventsource_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = server.set(database=name)
    try:
        database.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


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
        result = ProjectionRun()
        for projection in projections:
            recorder = _Recorder(projection)
            for key in range(total_partitions):
                config = ProcessorConfig(
                    batch_size=batch_size, partition_key=key, total_partitions=total_partitions
                )
                processor = Processor(eventsource_sessionmaker, event_store, config)
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
        # Let the test's session see what the handlers wrote.
        eventsource_session.expire_all()
        return result

    return run


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
    "ProjectionRun",
    "RunProjections",
    "event_store",
    "eventsource_connection",
    "eventsource_db_url",
    "eventsource_engine",
    "eventsource_session",
    "eventsource_sessionmaker",
    "run_projections",
]
