"""The repository's Alembic environment (alembic.ini, alembic/) and the library's env.py.

- ``alembic upgrade head`` run in the repository, as a contributor would, migrates the
  database named by DATABASE_URL and says so ("Running upgrade ..." lines);
- the top-level ``alembic/`` folder never stands in for the installed ``alembic``
  package, and is not packaged;
- new revisions go into the package's versions folder, the only copy of the scripts;
- the library's env.py takes an Engine as well as a Connection, so pytest-alembic's
  built-in tests run against the library's migrations, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import alembic
import pytest
import setuptools  # type: ignore[import-untyped]  # no stubs installed
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

# pytest-alembic's built-in tests, run here against the library's migrations with the
# alembic_config and alembic_engine fixtures below.
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

import eventsource as es
from eventsource import database

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
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
VERSION_TABLE = "eventsource_alembic_version"
HEAD = "es0006"
REVISION_TITLES = {
    "es0001": "Initial schema",
    "es0002": "Cluster record",
    "es0003": "Dead letters",
    "es0004": "Projection versions",
    "es0005": "Store horizon",
    "es0006": "Claimed partitions and resharding",
}


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def run_in_repository(
    *args: str, database_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in the repository root, as a contributor would."""
    env = {**os.environ}
    env.pop("DATABASE_URL", None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    done = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"python {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


# -- alembic upgrade head, in the repository ------------------------------------------


def test_alembic_upgrade_head_in_the_repository(empty_engine: sa.Engine) -> None:
    url = empty_engine.url
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql")  # as users write it: psycopg 3 all the same
    database_url = url.render_as_string(hide_password=False)

    done = run_in_repository("-m", "alembic", "upgrade", "head", database_url=database_url)
    # Alembic's usual progress lines, from alembic.ini's logging sections.
    ran = [
        line for line in done.stderr.splitlines() if "[alembic.runtime.migration] Running" in line
    ]
    assert ran == [
        "INFO  [alembic.runtime.migration] Running upgrade  -> es0001, " + _title("es0001"),
        "INFO  [alembic.runtime.migration] Running upgrade es0001 -> es0002, " + _title("es0002"),
        "INFO  [alembic.runtime.migration] Running upgrade es0002 -> es0003, " + _title("es0003"),
        "INFO  [alembic.runtime.migration] Running upgrade es0003 -> es0004, " + _title("es0004"),
        "INFO  [alembic.runtime.migration] Running upgrade es0004 -> es0005, " + _title("es0005"),
        "INFO  [alembic.runtime.migration] Running upgrade es0005 -> es0006, " + _title("es0006"),
    ]
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}
    assert database.current_revision(empty_engine) == HEAD

    current = run_in_repository("-m", "alembic", "current", database_url=database_url)
    assert current.stdout.strip() == f"{HEAD} (head)"
    check = run_in_repository("-m", "alembic", "check", database_url=database_url)
    assert "No new upgrade operations detected" in check.stdout + check.stderr

    down = run_in_repository("-m", "alembic", "downgrade", "base", database_url=database_url)
    assert "Running downgrade es0001 -> , " + _title("es0001") in down.stderr
    assert table_names(empty_engine) <= {VERSION_TABLE}


def _title(revision: str) -> str:
    """The first line of a revision's docstring, as Alembic prints it."""
    script = ScriptDirectory.from_config(database.alembic_config()).get_revision(revision)
    assert script is not None
    assert script.doc.startswith(REVISION_TITLES[revision])
    return script.doc


def test_alembic_upgrade_defaults_to_the_sqlite_file_in_the_working_directory(
    tmp_path: Path,
) -> None:
    """Without DATABASE_URL, ``alembic -c <repo>/alembic.ini upgrade head`` makes eventsource.db."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Running upgrade es0004 -> es0005" in done.stderr
    assert "Running upgrade es0005 -> es0006" in done.stderr
    engine = es.create_engine(f"sqlite:///{tmp_path / 'eventsource.db'}", poolclass=sa.NullPool)
    try:
        assert table_names(engine) == LIBRARY_TABLES | {VERSION_TABLE}
    finally:
        engine.dispose()


def test_programmatic_upgrade_leaves_the_applications_logging_alone(
    empty_engine: sa.Engine,
) -> None:
    """eventsource.upgrade() runs the same environment but applies no logging config."""
    root = logging.getLogger()
    alembic_logger = logging.getLogger("alembic")
    before = (root.level, list(root.handlers), alembic_logger.level)
    es.upgrade(empty_engine)
    assert (root.level, list(root.handlers), alembic_logger.level) == before
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}


# -- the alembic/ folder is not the alembic package --------------------------------------


def test_the_repository_alembic_folder_does_not_shadow_the_alembic_package() -> None:
    folder = REPO_ROOT / "alembic"
    assert (folder / "env.py").is_file()
    # A regular package in any sys.path entry wins over a folder without __init__.py
    # (which could only be a namespace package), so the folder must never get one.
    assert not (folder / "__init__.py").exists()

    installed = Path(alembic.__file__).resolve()
    assert not installed.is_relative_to(folder)
    # `python -c` puts the working directory first on sys.path, as `python -m pytest` and
    # pytest's rootdir insertion do.
    done = run_in_repository(
        "-c",
        "import sys, alembic, alembic.command; "
        "print(sys.path[0] in ('', '.') or sys.path[0]); print(alembic.__file__)",
    )
    first_entry, imported = done.stdout.splitlines()
    assert first_entry == "True"
    assert Path(imported).resolve() == installed


def test_the_repository_alembic_folder_is_not_packaged() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    # pyproject-configured discovery includes namespace packages (folders without
    # __init__.py), which alembic/ would be were it not for the include pattern.
    packages = setuptools.find_namespace_packages(
        where=str(REPO_ROOT), include=find["include"], exclude=find.get("exclude", ())
    )
    assert "eventsource" in packages
    assert not [name for name in packages if name.split(".")[0] != "eventsource"]
    assert "alembic" in setuptools.find_namespace_packages(where=str(REPO_ROOT))


# -- one copy of the revision scripts -----------------------------------------------------


def test_the_repository_config_uses_the_package_scripts() -> None:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    scripts = ScriptDirectory.from_config(config)
    assert Path(scripts.dir).resolve() == REPO_ROOT / "alembic"
    assert [Path(p).resolve() for p in scripts.version_locations] == [
        (database.migrations_path() / "versions").resolve()
    ]
    library = ScriptDirectory.from_config(database.alembic_config())
    assert scripts.get_heads() == library.get_heads() == [HEAD]
    assert {s.revision for s in scripts.walk_revisions()} == set(REVISION_TITLES)


def test_alembic_revision_writes_into_the_versions_folder(tmp_path: Path) -> None:
    """``alembic revision -m x`` from the repository, into a copy of the versions folder."""
    versions = tmp_path / "versions"
    shutil.copytree(
        database.migrations_path() / "versions",
        versions,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("version_locations", str(versions))  # not the real folder
    command.revision(config, message="add something", rev_id="es9999")

    [new] = [path for path in versions.iterdir() if path.name.startswith("es9999")]
    text = new.read_text()
    assert '"""add something' in text
    assert "down_revision: str | Sequence[str] | None = 'es0006'" in text
    compile(text, str(new), "exec")
    assert ScriptDirectory.from_config(config).get_heads() == ["es9999"]


# -- env.py takes an Engine: pytest-alembic ---------------------------------------------


def test_library_env_accepts_an_engine(empty_engine: sa.Engine) -> None:
    config = database.alembic_config()
    config.attributes["connection"] = empty_engine
    command.upgrade(config, "head")
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}
    assert database.current_revision(empty_engine) == HEAD
    command.downgrade(config, "base")
    assert table_names(empty_engine) <= {VERSION_TABLE}


def test_library_env_refuses_anything_else_as_connection() -> None:
    config = database.alembic_config()
    config.attributes["connection"] = "sqlite://"
    with pytest.raises(TypeError, match="must be a SQLAlchemy Connection or Engine, got str"):
        command.upgrade(config, "head")


@pytest.fixture
def alembic_config() -> Config:
    """pytest-alembic's configuration: the library's migrations, as ``eventsource db`` runs them."""
    return database.alembic_config()


@pytest.fixture
def alembic_engine(empty_engine: sa.Engine) -> sa.Engine:
    """pytest-alembic's database; it hands the Engine itself to env.py."""
    return empty_engine


@pytest.mark.postgres
def test_offline_sql_creates_a_working_schema(empty_pg_url: sa.URL) -> None:
    """`alembic upgrade head --sql` writes a script that, run by hand, makes the same
    working store (the horizon's functions find their schema when the script runs)."""
    url = empty_pg_url.set(drivername="postgresql").render_as_string(hide_password=False)
    script = run_in_repository("-m", "alembic", "upgrade", "head", "--sql", database_url=url)
    assert "CREATE TRIGGER" in script.stdout
    engine = es.create_engine(empty_pg_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql(script.stdout)
        assert database.current_revision(engine) == HEAD
        assert table_names(engine) == LIBRARY_TABLES | {VERSION_TABLE}
        store = es.EventStore()
        with engine.begin() as conn:
            store.append(
                conn,
                [
                    es.Event(
                        bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E"
                    )
                ],
            )
        with engine.connect() as conn:
            published = conn.exec_driver_sql("SELECT events_horizon_publish(1)").scalar_one()
            triggers = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'events_horizon_check'"
            ).scalar_one()
        assert published >= 0
        assert triggers == 1
    finally:
        engine.dispose()
