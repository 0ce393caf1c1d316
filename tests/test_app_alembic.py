"""Using the library's migrations from an application's own Alembic environment.

The test writes a throwaway application project (alembic.ini, env.py, one migration of
its own) whose ``version_locations`` include the library's scripts, runs the real
``alembic`` command line on it, and checks that autogenerate is content with the result.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from pytest_alembic import MigrationContext as MigrationRunner

# pytest-alembic's built-in tests, run on the application's history below.
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import models

__all__ = ["test_model_definitions_match_ddl", "test_up_down_consistency", "test_upgrade"]

LIBRARY_TABLES = {
    "events",
    "aggregate_heads",
    "projection_checkpoints",
    "events_cluster",
    "events_dead_letters",
    "events_projection_versions",
    "events_partition_claims",
    "events_partition_workers",
}

APP_FILES = {
    "alembic.ini": """
        [alembic]
        script_location = %(here)s/migrations
        version_locations = %(here)s/migrations/versions eventsource:migrations/versions
        path_separator = space

        [loggers]
        keys = root,alembic

        [handlers]
        keys = console

        [formatters]
        keys = generic

        [logger_root]
        level = WARNING
        handlers = console

        [logger_alembic]
        level = INFO
        handlers =
        qualname = alembic

        [handler_console]
        class = StreamHandler
        args = (sys.stderr,)
        formatter = generic

        [formatter_generic]
        format = %(levelname)-5.5s [%(name)s] %(message)s
    """,
    "app_models.py": """
        from __future__ import annotations

        import sqlalchemy as sa

        metadata = sa.MetaData()
        orders = sa.Table(
            "orders",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("customer", sa.Text, nullable=False),
        )
    """,
    "migrations/env.py": """
        from __future__ import annotations

        import app_models
        import eventsource
        from eventsource import migrations_support

        # The application's tables and the library's, so autogenerate knows both.
        target_metadata = [app_models.metadata, eventsource.models.metadata]

        # On the connection or engine in config.attributes["connection"] (pytest-alembic
        # passes an engine), else on sqlalchemy.url or $DATABASE_URL.
        migrations_support.run_migrations(target_metadata)
    """,
    "migrations/versions/app0001_orders.py": '''
        """Create the orders table, after the library's schema."""

        from __future__ import annotations

        import sqlalchemy as sa
        from alembic import op

        revision = "app0001"
        down_revision = None
        branch_labels = ("app",)
        depends_on = "eventsource"  # the library's branch label


        def upgrade() -> None:
            op.create_table(
                "orders",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("customer", sa.Text, nullable=False),
            )


        def downgrade() -> None:
            op.drop_table("orders")
    ''',
}


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    project = tmp_path / "app"
    for name, text in APP_FILES.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return project


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def app_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine on an empty database for the application."""
    if request.param == "sqlite":
        url = sa.make_url(f"sqlite:///{tmp_path / 'app.db'}")
    else:
        url = request.getfixturevalue("empty_pg_url")
    engine = es.create_engine(url, poolclass=sa.NullPool)
    yield engine
    engine.dispose()


def run_app_alembic(app_dir: Path, engine: sa.Engine, *args: str) -> str:
    url = engine.url
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql")  # as an application would write it
    env = {
        **os.environ,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        # env.py imports the application's models, as real projects do.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(app_dir), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"alembic {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_application_alembic_applies_the_library_branch(
    app_dir: Path, app_engine: sa.Engine
) -> None:
    output = run_app_alembic(app_dir, app_engine, "upgrade", "heads")
    # The application's env.py hands over to migrations_support.run_migrations, which
    # applies the logging sections of its alembic.ini, as Alembic's own template does.
    assert "Running upgrade  -> es0001" in output
    assert "Running upgrade  -> app0001" in output

    tables = set(sa.inspect(app_engine).get_table_names())
    assert tables == LIBRARY_TABLES | {"orders", "alembic_version"}
    with app_engine.connect() as conn:
        applied = set(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
    assert "app0001" in applied
    assert applied <= {"app0001", "es0006"}

    # The library works on the schema the application migrated.
    store = es.EventStore()
    with Session(app_engine) as session, session.begin():
        store.append(
            session,
            [es.Event(bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E")],
        )
    with Session(app_engine) as session:
        assert store.stream_version(session, "b", "A", "1") == 1

    # Autogenerate proposes nothing: in particular it does not drop the library's tables.
    output = run_app_alembic(app_dir, app_engine, "check")
    assert "No new upgrade operations detected" in output

    # That is thanks to the library's metadata in target_metadata. Compared with the
    # library's models alone, only the application's table is unknown; compared with the
    # application's alone, autogenerate would drop every library table.
    app_only = sa.MetaData()
    sa.Table(
        "orders",
        app_only,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("customer", sa.Text, nullable=False),
    )
    with app_engine.connect() as conn:
        context = MigrationContext.configure(conn)
        library_diffs = compare_metadata(context, models.metadata)
        assert [(diff[0], diff[1].name) for diff in library_diffs] == [("remove_table", "orders")]
        assert removed_tables(compare_metadata(context, app_only)) == LIBRARY_TABLES

    # The library's own upgrade path knows the schema is managed elsewhere and refuses
    # to create it a second time.
    assert es.database.managed_elsewhere(app_engine)
    with pytest.raises(es.ConfigurationError, match="alembic upgrade heads"):
        es.upgrade(app_engine)


def removed_tables(diffs: list[object]) -> set[str]:
    return {diff[1].name for diff in diffs if diff[0] == "remove_table"}  # type: ignore[index]


# -- pytest-alembic on the application's history, the library's branch included --------
#
# test_upgrade, test_model_definitions_match_ddl and test_up_down_consistency, imported
# above, run here on the application's history; test_single_head_revision does not
# apply: the library's scripts are a branch of their own beside the application's.


@pytest.fixture
def alembic_config(app_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The application's alembic.ini, as the README shows it for pytest-alembic."""
    monkeypatch.syspath_prepend(str(app_dir))  # env.py imports app_models
    monkeypatch.delitem(sys.modules, "app_models", raising=False)
    # configure_logger=False: the test run's logging stays pytest's.
    return Config(str(app_dir / "alembic.ini"), attributes={"configure_logger": False})


@pytest.fixture
def alembic_engine(app_engine: sa.Engine) -> sa.Engine:
    """pytest-alembic hands this engine itself to the application's env.py."""
    return app_engine


def test_the_library_is_a_branch_of_its_own(alembic_runner: MigrationRunner) -> None:
    """Two heads, by design: the application's and the library's."""
    assert sorted(alembic_runner.heads) == ["app0001", "es0006"]
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    alembic_runner.migrate_up_to("heads")
    assert (root.level, list(root.handlers)) == before
    assert set(alembic_runner.current.split()) <= {"app0001", "es0006"}
