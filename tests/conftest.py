"""Shared fixtures: real SQLite files and real PostgreSQL databases, one per test.

PostgreSQL comes from ``EVENTSOURCE_TEST_PG_URL`` or the libpq ``PG*`` variables
(default ``postgres@127.0.0.1:5432``). The schema is migrated once into a template
database and each test gets a fresh clone, dropped afterwards, so parallel runs and
reruns never collide. When the server is unreachable the PostgreSQL tests skip with
the reason, except under ``CI``, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from pytest_alembic.plugin.fixtures import alembic_runner

import eventsource
from eventsource import database

# pytest-alembic's fixture, for the tests that run its built-in migration tests: its
# plugin is off (pyproject.toml), so the fixture is brought in here.
__all__ = ["alembic_runner"]


def pg_admin_url() -> sa.URL:
    explicit = os.environ.get("EVENTSOURCE_TEST_PG_URL")
    if explicit:
        return database.database_url(explicit)
    return sa.URL.create(
        "postgresql+psycopg",
        username=os.environ.get("PGUSER", "postgres"),
        password=os.environ.get("PGPASSWORD"),
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=int(os.environ.get("PGPORT", "5432")),
        database=os.environ.get("PGDATABASE", "postgres"),
    )


class PostgresServer:
    """Creates and drops throwaway databases on the test server."""

    def __init__(self, admin_url: sa.URL) -> None:
        self.admin_url = admin_url
        self.admin = sa.create_engine(
            admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )

    def create_database(self, template: str | None = None) -> sa.URL:
        name = f"es_test_{uuid.uuid4().hex[:12]}"
        clause = f" TEMPLATE {template}" if template else ""
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}{clause}")
        return self.admin_url.set(database=name)

    def drop_database(self, url: sa.URL) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {url.database} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer(pg_admin_url())
    try:
        with server.admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as exc:
        reason = f"PostgreSQL not reachable at {server.admin_url.render_as_string()}: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so PostgreSQL tests may not skip)")
        pytest.skip(reason)
    yield server
    server.admin.dispose()


@pytest.fixture(scope="session")
def pg_template(pg_server: PostgresServer) -> Iterator[str]:
    """A database migrated to head, cloned by every PostgreSQL test."""
    url = pg_server.create_database()
    eventsource.upgrade(url)
    yield str(url.database)
    pg_server.drop_database(url)


@pytest.fixture
def pg_url(pg_server: PostgresServer, pg_template: str) -> Iterator[sa.URL]:
    url = pg_server.create_database(template=pg_template)
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def empty_pg_url(pg_server: PostgresServer) -> Iterator[sa.URL]:
    """A PostgreSQL database with no schema at all (for migration tests)."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = eventsource.create_engine(f"sqlite:///{path}")
    eventsource.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> sa.URL:
    path = tmp_path / "test.db"
    shutil.copyfile(sqlite_template, path)
    return sa.make_url(f"sqlite:///{path}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> sa.URL:
    """A migrated database URL, once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: sa.URL = request.getfixturevalue(fixture)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> sa.URL:
    """A database with no tables at all (never migrated), on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return sa.make_url(f"sqlite:///{tmp_path / 'empty.db'}")
    url: sa.URL = request.getfixturevalue("empty_pg_url")
    return url


@pytest.fixture
def empty_engine(empty_url: sa.URL) -> Iterator[sa.Engine]:
    """An engine on ``empty_url``."""
    eng = eventsource.create_engine(empty_url, poolclass=sa.NullPool)
    yield eng
    eng.dispose()


@pytest.fixture
def engine(db_url: sa.URL) -> Iterator[sa.Engine]:
    """An engine on a freshly migrated database (SQLite and PostgreSQL)."""
    eng = eventsource.create_engine(db_url, pool_size=10, max_overflow=10)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(pg_url: sa.URL) -> Iterator[sa.Engine]:
    eng = eventsource.create_engine(pg_url, pool_size=10, max_overflow=10)
    yield eng
    eng.dispose()


@pytest.fixture
def store() -> eventsource.EventStore:
    return eventsource.EventStore()


@pytest.fixture(
    scope="session",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def eventsource_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sa.URL]:
    """Dogfooding: the shipped plugin's fixtures (eventsource_session, run_projections...)
    run on both databases here, instead of the plugin's single configured one."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("plugin") / "events.db"
        url = sa.make_url(f"sqlite:///{path}")
        eventsource.upgrade(url)
        yield url
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.create_database()
    eventsource.upgrade(url)
    yield url
    server.drop_database(url)
