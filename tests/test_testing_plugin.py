"""The pytest plugin, exercised the way users meet it: in a separate pytest run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

import eventsource
from tests.conftest import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE_ALEMBIC_INI = ROOT / "examples" / "app_with_alembic" / "alembic.ini"

pytest_plugins = ["pytester"]

PROJECT = """
from __future__ import annotations

import factory
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.testing.factories import EventFactory


class UserPayload(factory.DictFactory):
    name = factory.Faker("name")


class UserCreatedFactory(EventFactory):
    bounded_context = "shop"
    aggregate_type = "User"
    event_type = "UserCreated"
    payload = factory.SubFactory(UserPayload)


class UserNames(es.Projection):
    name = "user_names"
    aggregate_types = ("User",)

    def handle(self, event, session):
        session.execute(
            sa.text("INSERT INTO user_names (id, name) VALUES (:id, :name)"),
            {"id": event.aggregate_id, "name": event.payload["name"]},
        )


class Exploding(es.Projection):
    name = "exploding"

    def handle(self, event, session):
        raise LookupError(f"no handler for {event.event_type}")


@pytest.fixture
def read_model(eventsource_session):
    eventsource_session.execute(
        sa.text("CREATE TABLE user_names (id TEXT PRIMARY KEY, name TEXT NOT NULL)")
    )


def count(session, table):
    return session.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
"""

TESTS = """
from __future__ import annotations

import pytest
import sqlalchemy as sa

import eventsource as es
from helpers import *


@pytest.mark.parametrize("round", [1, 2])
def test_commit_leaves_nothing_behind(eventsource_session, event_store, round):
    assert count(eventsource_session, "events") == 0
    assert count(eventsource_session, "projection_checkpoints") == 0
    event_store.append(eventsource_session, [es.Event(
        bounded_context="shop", aggregate_type="User", aggregate_id="same-id",
        event_type="UserCreated", payload={"name": "x"})])
    eventsource_session.commit()
    eventsource_session.begin_nested()
    UserCreatedFactory.create()
    eventsource_session.commit()
    assert count(eventsource_session, "events") == 2


@pytest.mark.parametrize("round", [1, 2])
def test_same_aggregate_starts_at_version_one(eventsource_session, round):
    events = UserCreatedFactory.create_batch(3, aggregate_id="user-1")
    assert [e.aggregate_version for e in events] == [1, 2, 3]


def test_helper_applies_events_of_this_test(eventsource_session, read_model, run_projections):
    alice = UserCreatedFactory.create(payload={"name": "Alice"})
    UserCreatedFactory.create()
    EventFactory.create(aggregate_type="Order")
    handled = run_projections(UserNames())
    assert [e.aggregate_id for e in handled["user_names"]][0] == alice.aggregate_id
    assert len(handled["user_names"]) == 2
    assert count(eventsource_session, "user_names") == 2
    name = eventsource_session.execute(
        sa.text("SELECT name FROM user_names WHERE id = :id"), {"id": alice.aggregate_id}
    ).scalar_one()
    assert name == "Alice"
    # A second run continues from the checkpoint.
    UserCreatedFactory.create()
    assert len(run_projections(UserNames())["user_names"]) == 1


def test_helper_partitions(eventsource_session, read_model, run_projections):
    for _ in range(20):
        UserCreatedFactory.create()
    handled = run_projections(UserNames(), total_partitions=4, batch_size=3)
    assert len(handled["user_names"]) == 20
    assert count(eventsource_session, "user_names") == 20


def test_handler_error_surfaces(eventsource_session, run_projections):
    UserCreatedFactory.create()
    with pytest.raises(LookupError, match="no handler for UserCreated"):
        run_projections(Exploding())
"""


URL_OPTION = "--eventsource-db-url"
#: Inner runs: no cache folder, and no pytest-benchmark warning (errors here) under xdist.
QUIET = ("-p", "no:cacheprovider", "-p", "no:benchmark")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_args(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "sqlite":
        return []
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.admin_url.render_as_string(hide_password=False)
    return ["--eventsource-db-url", url]


@pytest.fixture
def inner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner runs start from a user's environment, not from this run's.

    No ``DATABASE_URL`` (so a stray default SQLite file would show up in the inner run's
    folder) and, when this run is itself under xdist, no worker id of ours.
    """
    for name in (
        "DATABASE_URL",
        "EVENTSOURCE_TEST_DATABASE_URL",
        "PYTEST_ADDOPTS",
        "PYTEST_XDIST_WORKER",
        "PYTEST_XDIST_WORKER_COUNT",
        "PYTEST_XDIST_TESTRUNUID",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(pytester: pytest.Pytester, inner_env: None) -> pytest.Pytester:
    pytester.makepyfile(helpers=PROJECT, test_user_project=TESTS)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    return pytester


def sqlite_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if re.search(r"\.db\b", p.name))


def test_plugin_in_a_user_project(project: pytest.Pytester, db_args: list[str]) -> None:
    result = project.runpytest_subprocess(*QUIET, *db_args)
    result.assert_outcomes(passed=7)
    assert sqlite_files(project.path) == []  # no stray eventsource.db in the working folder


def test_plugin_under_xdist(project: pytest.Pytester, db_args: list[str]) -> None:
    result = project.runpytest_subprocess(*QUIET, "-n", "2", *db_args)
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*2 workers*"])


def test_factory_without_session_says_how_to_bind(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_unbound="""
        import pytest
        import eventsource as es
        from helpers import UserCreatedFactory

        def test_unbound():
            assert UserCreatedFactory.build().event_type == "UserCreated"
            with pytest.raises(es.ConfigurationError, match="eventsource_session"):
                UserCreatedFactory.create()
        """
    )
    result = project.runpytest_subprocess(*QUIET, "test_unbound.py")
    result.assert_outcomes(passed=1)


# -- an explicit SQLite file ----------------------------------------------------------


def leftover_file(path: Path) -> None:
    """A database a previous run left behind: migrated, one committed event, a table."""
    engine = eventsource.create_engine(f"sqlite:///{path}")
    try:
        eventsource.upgrade(engine)
        with engine.begin() as conn:
            eventsource.EventStore().append(
                conn,
                [
                    eventsource.Event(
                        bounded_context="old",
                        aggregate_type="Run",
                        aggregate_id="1",
                        event_type="Left",
                    )
                ],
            )
            conn.exec_driver_sql("CREATE TABLE leftover (x INTEGER)")
    finally:
        engine.dispose()


def table_names(path: Path) -> set[str]:
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_explicit_sqlite_file_starts_empty_on_every_run(project: pytest.Pytester) -> None:
    leftover_file(project.path / "tests.db")
    for _ in range(2):
        # test_commit_leaves_nothing_behind counts no event: the old one is gone.
        result = project.runpytest_subprocess(*QUIET, URL_OPTION, "sqlite:///tests.db")
        result.assert_outcomes(passed=7)
        assert "events" in table_names(project.path / "tests.db")
        assert "leftover" not in table_names(project.path / "tests.db")


def test_explicit_sqlite_file_is_one_per_xdist_worker(project: pytest.Pytester) -> None:
    leftover_file(project.path / "tests-gw0.db")
    result = project.runpytest_subprocess(*QUIET, "-n", "2", URL_OPTION, "sqlite:///tests.db")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*2 workers*"])
    files = [name for name in sqlite_files(project.path) if name.endswith(".db")]
    assert files == ["tests-gw0.db", "tests-gw1.db"]
    for name in files:
        tables = table_names(project.path / name)
        assert "events" in tables
        assert "leftover" not in tables


def test_in_memory_sqlite_is_refused_with_the_remedy(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess(*QUIET, URL_OPTION, "sqlite://", "-k", "commit")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*in-memory SQLite*give a file (sqlite:///tests.db)*"])


# -- the application's own schema -----------------------------------------------------


def readme_block(marker: str, language: str = "python") -> str:
    """The README's one ``language`` block containing ``marker``."""
    text = README.read_text(encoding="utf-8")
    found = [b for b in re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL) if marker in b]
    assert len(found) == 1, f"expected one README {language} block with {marker!r}"
    return str(found[0])


#: Not in the README: the app's own engine was never made, so no test touched its database.
APP_ENGINE_UNUSED = """
import pytest

import shop


@pytest.fixture(scope="session", autouse=True)
def app_engine_never_made():
    yield
    assert shop.engine.cache_info().currsize == 0, "a test used the application's engine"
"""


def test_the_readme_application_example(
    pytester: pytest.Pytester, inner_env: None, db_args: list[str]
) -> None:
    pytester.makepyfile(
        shop=readme_block("# shop.py\n"),
        test_shop=readme_block("# test_shop.py"),
        conftest=APP_ENGINE_UNUSED,
    )
    ini = readme_block("eventsource_app_metadata = shop:Base.metadata", "ini")
    pytester.makeini(ini + "filterwarnings = error\n")
    result = pytester.runpytest_subprocess(*QUIET, *db_args)
    result.assert_outcomes(passed=2)
    # With no DATABASE_URL the app's engine would have made eventsource.db here.
    assert sqlite_files(pytester.path) == []


def test_app_metadata_that_cannot_be_imported(pytester: pytest.Pytester, inner_env: None) -> None:
    pytester.makepyfile(test_it="def test_it(eventsource_session):\n    pass\n")
    pytester.makeini("[pytest]\neventsource_app_metadata = myapp.models:Base.metadata\n")
    result = pytester.runpytest_subprocess(*QUIET)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*cannot import 'myapp.models'*pythonpath*"])


SCHEMA_CHECKS = """
import logging

import sqlalchemy as sa


def versions(engine, table):
    with engine.connect() as conn:
        return sorted(v for (v,) in conn.exec_driver_sql(f"SELECT version_num FROM {table}"))


def test_schema(eventsource_engine):
    tables = set(sa.inspect(eventsource_engine).get_table_names())
    assert {"events", "aggregate_heads", "projection_checkpoints"} <= tables
    assert EXPECTED_APP_TABLES <= tables
    assert ("eventsource_alembic_version" in tables) == LIBRARY_UPGRADED
    assert versions(eventsource_engine, "alembic_version")[0] == APP_REVISION


def test_app_tables_in_the_test_transaction(eventsource_session):
    for table in EXPECTED_APP_TABLES:
        count = eventsource_session.execute(sa.text(f"SELECT count(*) FROM {table}"))
        assert count.scalar_one() == 0


def test_env_py_file_config_did_not_silence_loggers():
    # env.py's logging.config.fileConfig() disables every logger it does not name.
    assert not logging.getLogger("eventsource.processor").disabled
    # ... and replaces the root logger's handlers with its console handler.
    assert all(type(h) is not logging.StreamHandler for h in logging.getLogger().handlers)
"""


def test_app_alembic_that_applies_the_eventsource_branch(
    pytester: pytest.Pytester, inner_env: None, db_args: list[str]
) -> None:
    """examples/app_with_alembic: its env.py takes the connection handed over, and
    applies the library's scripts itself, so the library's own upgrade must not run."""
    pytester.makepyfile(
        test_schema=(
            "EXPECTED_APP_TABLES = {'app_tickets', 'app_agent_workload'}\n"
            "LIBRARY_UPGRADED = False\n"
            "APP_REVISION = 'app0001'\n" + SCHEMA_CHECKS
        )
    )
    pytester.makeini(
        f"[pytest]\neventsource_alembic_ini = {EXAMPLE_ALEMBIC_INI}\nfilterwarnings = error\n"
    )
    result = pytester.runpytest_subprocess(*QUIET, *db_args)
    result.assert_outcomes(passed=3)
    assert sqlite_files(pytester.path) == []  # not its default app_with_alembic.db either


PLAIN_ENV_PY = """
from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
fileConfig(config.config_file_name)

connectable = engine_from_config(
    config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
"""

NOTES_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "notes1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("app_notes", sa.Column("id", sa.Integer, primary_key=True))
"""

PLAIN_ALEMBIC_INI = """
[alembic]
script_location = %(here)s/migrations
sqlalchemy.url = sqlite:///never-this-one.db

[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
formatter = generic

[formatter_generic]
format = %(levelname)s %(message)s
"""

TAGS_MODEL = """
import sqlalchemy as sa

metadata = sa.MetaData()
tags = sa.Table("app_tags", metadata, sa.Column("id", sa.Integer, primary_key=True))
"""


def test_app_alembic_without_the_branch_and_app_metadata(
    pytester: pytest.Pytester, inner_env: None, db_args: list[str]
) -> None:
    """The ``alembic init`` env.py (sqlalchemy.url, its own engine, fileConfig): the
    library's upgrade runs after it; the metadata option adds its tables too."""
    (pytester.path / "app" / "migrations" / "versions").mkdir(parents=True)
    (pytester.path / "app" / "alembic.ini").write_text(PLAIN_ALEMBIC_INI)
    (pytester.path / "app" / "migrations" / "env.py").write_text(PLAIN_ENV_PY)
    (pytester.path / "app" / "migrations" / "versions" / "notes1.py").write_text(NOTES_REVISION)
    pytester.makepyfile(
        tag_models=TAGS_MODEL,
        test_schema=(
            "EXPECTED_APP_TABLES = {'app_notes', 'app_tags'}\n"
            "LIBRARY_UPGRADED = True\n"
            "APP_REVISION = 'notes1'\n" + SCHEMA_CHECKS
        ),
    )
    pytester.makeini(
        "[pytest]\neventsource_alembic_ini = app/alembic.ini\n"
        "eventsource_app_metadata = tag_models:metadata\nfilterwarnings = error\n"
    )
    result = pytester.runpytest_subprocess(*QUIET, *db_args)
    result.assert_outcomes(passed=3)
    assert sqlite_files(pytester.path) == []


ASYNC_TESTS = """
import pytest
import sqlalchemy as sa

import eventsource as es

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def opened(number):
    return es.Event(
        bounded_context="shop", aggregate_type="Cart", aggregate_id="cart-1",
        event_type="CartOpened", payload={"n": number},
    )


@pytest.mark.parametrize("round", [1, 2])
async def test_commit_leaves_nothing_behind(eventsource_async_session, async_event_store, round):
    store = async_event_store
    assert await store.stream_version(eventsource_async_session, "shop", "Cart", "cart-1") == 0
    await store.append(eventsource_async_session, [opened(round)], es.ExpectedVersion.no_stream())
    await eventsource_async_session.commit()  # a savepoint: the test's transaction rolls back
    assert await store.stream_version(eventsource_async_session, "shop", "Cart", "cart-1") == 1


async def test_the_connection_sees_the_sessions_writes(
    eventsource_async_session, eventsource_async_connection, async_event_store
):
    await async_event_store.append(eventsource_async_session, [opened(3)])
    await eventsource_async_session.flush()
    events = await async_event_store.read_all(eventsource_async_connection)
    assert [e.payload for e in events] == [{"n": 3}]


async def test_a_conflict_is_typed(eventsource_async_session, async_event_store):
    await async_event_store.append(eventsource_async_session, [opened(4)])
    with pytest.raises(es.OptimisticConcurrencyError):
        await async_event_store.append(
            eventsource_async_session, [opened(5)], es.ExpectedVersion.no_stream()
        )
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_async_fixtures_in_a_user_project(
    pytester: pytest.Pytester, inner_env: None, db_args: list[str], workers: list[str]
) -> None:
    pytester.makepyfile(test_async_project=ASYNC_TESTS)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    result = pytester.runpytest_subprocess(*QUIET, *workers, *db_args)
    result.assert_outcomes(passed=4)
