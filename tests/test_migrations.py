"""The library's Alembic migrations: round trips, models == migrations, the command line.

Each test starts from an empty database: a SQLite file and an empty PostgreSQL database.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import cluster, database, models

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
#: The library's tables at its first revision.
AT_ES0001 = LIBRARY_TABLES - {
    "events_cluster",
    "events_dead_letters",
    "events_projection_versions",
    "events_partition_claims",
    "events_partition_workers",
}
#: The newest revision the library ships.
HEAD = "es0006"
VERSION_TABLE = "eventsource_alembic_version"
CUSTOM_NAMES = models.TableNames(
    events="app_events",
    aggregate_heads="app_heads",
    projection_checkpoints="app_checkpoints",
)


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def schema_diffs(
    engine: sa.Engine, metadata: sa.MetaData, names: models.TableNames | None = None
) -> list[object]:
    """What Alembic's autogenerate would change to make the database match ``metadata``."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": database.version_table(names),
                # Alembic's own bookkeeping tables are not part of the models.
                "include_name": lambda name, kind, _parent: (
                    not (kind == "table" and str(name).startswith(VERSION_TABLE))
                ),
                "compare_type": True,
                # SQLite cannot reflect an identity, so its server defaults never compare.
                "compare_server_default": engine.dialect.name == "postgresql",
            },
        )
        diffs: list[object] = compare_metadata(context, metadata)
        return diffs


def test_revisions() -> None:
    assert database.head_revision() == HEAD


def test_upgrade_downgrade_round_trip(empty_engine: sa.Engine) -> None:
    assert table_names(empty_engine) == set()
    assert database.current_revision(empty_engine) is None

    es.upgrade(empty_engine)
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}
    assert database.current_revision(empty_engine) == database.head_revision() == HEAD
    inspector = sa.inspect(empty_engine)
    indexes = inspector.get_indexes("events")  # PostgreSQL lists unique constraints too
    assert [ix["name"] for ix in indexes if not ix.get("duplicates_constraint")] == [
        "ix_events_read_order"
    ]
    assert {uq["name"] for uq in inspector.get_unique_constraints("events")} == {
        "uq_events_event_id",
        "uq_events_stream_version",
    }

    es.downgrade(empty_engine)
    assert table_names(empty_engine) <= {VERSION_TABLE}
    assert database.current_revision(empty_engine) is None

    es.upgrade(empty_engine)  # and back up: the round trip leaves nothing in the way
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}
    assert database.current_revision(empty_engine) == HEAD
    store = es.EventStore()
    with Session(empty_engine) as session, session.begin():
        store.append(
            session,
            [es.Event(bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E")],
        )
    with Session(empty_engine) as session:
        assert store.stream_version(session, "b", "A", "1") == 1


def test_models_equal_migrations(empty_engine: sa.Engine) -> None:
    es.upgrade(empty_engine)
    assert schema_diffs(empty_engine, models.metadata) == []

    # The comparison does look at the library's tables: against no models it would drop them.
    diffs = schema_diffs(empty_engine, sa.MetaData())
    dropped = {diff[1].name for diff in diffs if diff[0] == "remove_table"}  # type: ignore[index]
    assert dropped == LIBRARY_TABLES

    # The same holds for configured table names, which keep their own revision: a
    # second set of names beside the default one is migrated, not taken as done.
    es.upgrade(empty_engine, table_names=CUSTOM_NAMES)
    custom_version_table = f"{VERSION_TABLE}_app_events"
    assert table_names(empty_engine) == {
        *LIBRARY_TABLES,
        "app_events",
        "app_heads",
        "app_checkpoints",
        "app_events_cluster",
        "app_events_dead_letters",
        "app_events_projection_versions",
        "app_events_partition_claims",
        "app_events_partition_workers",
        VERSION_TABLE,
        custom_version_table,
    }
    es.downgrade(empty_engine)
    custom = models.tables_for(CUSTOM_NAMES).metadata
    assert schema_diffs(empty_engine, custom, CUSTOM_NAMES) == []
    es.downgrade(empty_engine, table_names=CUSTOM_NAMES)
    assert table_names(empty_engine) <= {VERSION_TABLE, custom_version_table}


def test_cluster_record_revision_steps_on_a_store_in_use(empty_engine: sa.Engine) -> None:
    """es0002 adds (and its downgrade removes) only the cluster record, keeping the events."""
    es.upgrade(empty_engine, "es0001")
    assert table_names(empty_engine) == AT_ES0001 | {VERSION_TABLE}
    store = es.EventStore()

    def event() -> es.Event:
        return es.Event(bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E")

    with Session(empty_engine) as session, session.begin():
        store.append(session, [event()])
    with empty_engine.begin() as conn:  # without the record table it checks ids only
        cluster.check(conn, store.tables)
    assert not cluster.rebase(empty_engine).rebased

    es.upgrade(empty_engine)
    assert database.current_revision(empty_engine) == HEAD
    assert schema_diffs(empty_engine, models.metadata) == []
    with empty_engine.begin() as conn:
        cluster.check(conn, store.tables)
    es.downgrade(empty_engine, "es0001")
    assert table_names(empty_engine) == AT_ES0001 | {VERSION_TABLE}
    with Session(empty_engine) as session, session.begin():
        assert store.stream_version(session, "b", "A", "1") == 1
    es.upgrade(empty_engine)
    with Session(empty_engine) as session, session.begin():
        store.append(session, [event()])
        assert store.stream_version(session, "b", "A", "1") == 2


def test_dead_letters_revision_steps_on_a_store_in_use(empty_engine: sa.Engine) -> None:
    """es0003 adds (and its downgrade removes) only the dead-letter table."""
    later = {  # the tables of es0003 and the revisions after it
        "events_dead_letters",
        "events_projection_versions",
        "events_partition_claims",
        "events_partition_workers",
    }
    before = (LIBRARY_TABLES - later) | {VERSION_TABLE}
    es.upgrade(empty_engine, "es0002")
    assert table_names(empty_engine) == before
    store = es.EventStore()
    event = es.Event(bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E")
    with Session(empty_engine) as session, session.begin():
        store.append(session, [event])

    es.upgrade(empty_engine)
    assert database.current_revision(empty_engine) == HEAD
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}
    assert schema_diffs(empty_engine, models.metadata) == []
    es.downgrade(empty_engine, "es0002")
    assert table_names(empty_engine) == before
    with Session(empty_engine) as session, session.begin():
        assert store.stream_version(session, "b", "A", "1") == 1


def run_alembic(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``alembic`` command line in the repository, as a user would."""
    env = {**os.environ, "DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"alembic {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_alembic_command_line(empty_engine: sa.Engine) -> None:
    url = empty_engine.url
    if url.get_backend_name() == "postgresql":
        # A plain postgresql:// URL, as users write it: it must mean psycopg 3
        # (psycopg2, SQLAlchemy's default driver for it, is not even installed).
        url = url.set(drivername="postgresql")
    database_url = url.render_as_string(hide_password=False)

    run_alembic(database_url, "upgrade", "head")
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}
    assert database.current_revision(empty_engine) == HEAD
    assert run_alembic(database_url, "current").stdout.strip() == f"{HEAD} (head)"

    run_alembic(database_url, "downgrade", "es0001")  # batch mode on SQLite
    assert table_names(empty_engine) == AT_ES0001 | {VERSION_TABLE}
    run_alembic(database_url, "upgrade", "head")
    assert table_names(empty_engine) == LIBRARY_TABLES | {VERSION_TABLE}

    run_alembic(database_url, "downgrade", "base")
    assert table_names(empty_engine) <= {VERSION_TABLE}
    assert database.current_revision(empty_engine) is None


# -- DATABASE_URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "postgresql://u:p%40ss@db.example:5433/app",
            "postgresql+psycopg://u:p%40ss@db.example:5433/app",
        ),
        ("postgres://u@db.example/app", "postgresql+psycopg://u@db.example/app"),
        ("postgresql+psycopg://u@db.example/app", "postgresql+psycopg://u@db.example/app"),
        ("postgresql+psycopg2://u@db.example/app", "postgresql+psycopg2://u@db.example/app"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_database_url_normalises_postgresql_to_psycopg3(given: str, expected: str) -> None:
    assert database.database_url(given).render_as_string(hide_password=False) == expected
    assert database.database_url(sa.make_url(given)).render_as_string(hide_password=False) == (
        expected
    )


def test_database_url_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert str(database.database_url()) == "sqlite:///eventsource.db"
    monkeypatch.setenv("DATABASE_URL", "")
    assert str(database.database_url()) == "sqlite:///eventsource.db"

    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.example/app")
    assert database.database_url().drivername == "postgresql+psycopg"
    # An explicit argument always wins over the environment.
    assert str(database.database_url("sqlite:///x.db")) == "sqlite:///x.db"

    engine = es.create_engine()  # creating an engine does not connect
    try:
        assert engine.dialect.name == "postgresql"
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()
