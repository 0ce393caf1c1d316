"""What holds projections back: open transactions named by ``status.blockers()``, by
``eventsource status`` (table and ``--json``) and by the processor's WARNING; and the
``application_name`` that makes the library's own connections recognisable.

The blocker lives in ANOTHER database of the same server: the reading horizon is the
server's (DESIGN invariant 2), so it holds back every projection of every database.
Other tests may hold transactions open on the shared server too, so the assertions look
for this test's blocker by pid rather than expecting it to be the only one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import eventsource as es
from eventsource.status import Blocker, blockers, status
from tests.conftest import PostgresServer
from tests.pg_cluster import Cluster, ClusterUnavailableError, throwaway_cluster
from tests.projection_support import (
    SHARED_SERVER_WAIT,
    Background,
    LogA,
    append_spread,
    applied,
    create_applied_table,
    processor,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
BLOCKER_APP = "es-test-blocker"


def conninfo(url: sa.URL) -> str:
    return psycopg.conninfo.make_conninfo(
        host=url.host or "", port=url.port or 5432, user=url.username or "", dbname=url.database
    )


class OpenTransaction:
    """A psycopg session in another database that took a transaction id and stays open."""

    def __init__(self, url: sa.URL) -> None:
        self.database = url.database
        self.conn = psycopg.connect(conninfo(url), application_name=BLOCKER_APP)
        row = self.conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        self.transaction_id = int(row[0])
        self.pid = self.conn.info.backend_pid

    def mine(self, found: list[Blocker]) -> list[Blocker]:
        return [blocker for blocker in found if blocker.pid == self.pid]


@pytest.fixture
def other_database(pg_server: PostgresServer) -> Iterator[sa.URL]:
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


def run_cli(url: sa.URL, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "eventsource",
            "--database-url",
            url.render_as_string(hide_password=False),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.postgres
def test_a_transaction_open_in_another_database_is_named_then_clears(
    pg_engine: sa.Engine,
    other_database: sa.URL,
    store: es.EventStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under the server rule (horizon="server"); the store rule waits for writers only."""
    create_applied_table(pg_engine)
    blocker = OpenTransaction(other_database)
    try:
        append_spread(pg_engine, store, 3)  # committed after the blocker took its id

        (row,) = status(pg_engine, projections=[LogA()])  # the store rule: not a writer
        assert (row.lag, row.held_back) == (3, False)
        assert blockers(pg_engine, store=store, limit=1000) == []
        (row,) = status(pg_engine, projections=[LogA()], horizon="server")
        assert (row.projection, row.lag, row.lag_capped, row.held_back) == ("log_a", 3, False, True)
        server: dict[str, Any] = {"horizon": "server"}
        (named,) = blocker.mine(blockers(pg_engine, store=store, limit=1000, **server))
        assert named.kind == "transaction"
        assert named.transaction_id == blocker.transaction_id
        assert (named.database, named.user) == (other_database.database, "postgres")
        assert (named.application_name, named.state) == (BLOCKER_APP, "idle in transaction")
        assert named.query == "SELECT pg_current_xact_id()::text"
        assert named.gid is None
        assert named.age_seconds is not None
        assert named.age_seconds >= 0
        assert named.started_at is not None
        assert named.started_at.tzinfo is not None
        # Listed only when events wait: older than the oldest waiting one, oldest first.
        listed = blockers(pg_engine, store=store, limit=1000, **server)
        assert [b.transaction_id for b in listed] == sorted(b.transaction_id for b in listed)

        # The command, as JSON and as a table.
        as_json = run_cli(
            pg_engine.url,
            "status",
            "--app",
            "tests.projection_support:LogA",
            "--json",
            "--horizon",
            "server",
        )
        assert as_json.returncode == 0, as_json.stderr
        (shown,) = json.loads(as_json.stdout)
        assert (shown["projection"], shown["lag"], shown["held_back"]) == ("log_a", 3, True)
        (entry,) = [b for b in shown["held_back_by"] if b["pid"] == blocker.pid]
        assert entry["database"] == other_database.database
        assert entry["application_name"] == BLOCKER_APP
        assert entry["transaction_id"] == blocker.transaction_id
        assert entry["query"].startswith("SELECT pg_current_xact_id()")
        table = run_cli(
            pg_engine.url, "status", "--app", "tests.projection_support:LogA", "--horizon", "server"
        )
        assert table.returncode == 0, table.stderr
        assert "held back:" in table.stdout
        assert "in any database" in table.stdout
        assert f"pid {blocker.pid} in database '{other_database.database}'" in table.stdout
        assert f"application '{BLOCKER_APP}'" in table.stdout

        # The processor warns once it has waited blocked_warning_after behind it.
        caplog.set_level(logging.INFO, logger="eventsource.processor")
        proc = processor(
            pg_engine, store, blocked_warning_after=0.2, poll_interval=0.02, horizon="server"
        )
        worker = Background(lambda: proc.run(LogA(), handle_signals=False)).start()
        try:

            def warned() -> list[logging.LogRecord]:
                return [
                    record
                    for record in caplog.records
                    if record.levelno == logging.WARNING
                    and getattr(record, "blocker_pid", None) == blocker.pid
                ]

            # Named once it is the oldest open transaction on the server (others' may be
            # older for a while), then again after each further interval.
            wait_until(lambda: len(warned()) >= 2, timeout=SHARED_SERVER_WAIT)
            first = warned()[0]
            assert first.horizon_transaction_id == blocker.transaction_id  # type: ignore[attr-defined]
            assert first.blocker_database == other_database.database  # type: ignore[attr-defined]
            assert first.blocker_application_name == BLOCKER_APP  # type: ignore[attr-defined]
            message = first.getMessage()
            assert f"pid {blocker.pid} in database '{other_database.database}'" in message
            assert "in any database, delays every projection; nothing is lost" in message
            assert applied(pg_engine, "log_a") == []  # nothing read behind it

            blocker.conn.commit()
            assert blocker.mine(blockers(pg_engine, store=store, limit=1000, **server)) == []

            def cleared() -> bool:
                return any(
                    record.levelno == logging.INFO
                    and getattr(record, "horizon_transaction_id", None) == blocker.transaction_id
                    and getattr(record, "held_back", None) is False
                    for record in caplog.records
                )

            wait_until(cleared, timeout=SHARED_SERVER_WAIT)
            wait_until(lambda: len(applied(pg_engine, "log_a")) == 3, timeout=SHARED_SERVER_WAIT)
        finally:
            proc.stop()
            worker.join(30)
        assert worker.error is None
    finally:
        blocker.conn.close()


@pytest.fixture(scope="module")
def prepared_cluster() -> Iterator[Cluster]:
    """A server of our own that allows prepared transactions (the shared one does not)."""
    try:
        with throwaway_cluster() as cluster:
            admin = sa.create_engine(cluster.url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql("ALTER SYSTEM SET max_prepared_transactions = 4")
            admin.dispose()
            cluster.restart()
            yield cluster
    except ClusterUnavailableError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"cannot start a throwaway PostgreSQL cluster: {exc}")


@pytest.mark.postgres
def test_a_prepared_transaction_is_named_and_nothing_else_is_listed(
    prepared_cluster: Cluster, store: es.EventStore
) -> None:
    admin = sa.create_engine(prepared_cluster.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE shop")
        conn.exec_driver_sql("CREATE DATABASE other")
    admin.dispose()
    engine = es.create_engine(prepared_cluster.database_url("shop"))
    try:
        es.upgrade(engine)
        append_spread(engine, store, 2)
        # A server of our own: nothing else is open, so nothing waits.
        (row,) = status(engine, projections=["log_a"])
        assert (row.lag, row.held_back) == (2, False)
        assert blockers(engine, store=store) == []

        with psycopg.connect(conninfo(prepared_cluster.database_url("other"))) as conn:
            xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert xid is not None
            conn.execute("PREPARE TRANSACTION 'es-test-gid'")
        # Its session is gone; the prepared transaction stays until committed. It holds
        # projections back under the server rule (it is no writer of the store).
        append_spread(engine, store, 3, prefix="late")
        (row,) = status(engine, projections=["log_a"])
        assert (row.lag, row.held_back) == (5, False)
        assert blockers(engine, store=store) == []
        (row,) = status(engine, projections=["log_a"], horizon="server")
        assert (row.lag, row.held_back) == (5, True)
        (named,) = blockers(engine, store=store, horizon="server")
        assert named.kind == "prepared"
        assert (named.gid, named.database, named.user) == ("es-test-gid", "other", "postgres")
        assert named.transaction_id == int(xid[0])
        assert named.pid is None
        assert named.age_seconds is not None
        assert "COMMIT PREPARED or ROLLBACK PREPARED" in named.describe()

        # A snapshot alone (backend_xmin, no id) does not hold projections back.
        with psycopg.connect(conninfo(prepared_cluster.database_url("other"))) as reader:
            reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            reader.execute("SELECT 1")
            with psycopg.connect(
                conninfo(prepared_cluster.database_url("other")), autocommit=True
            ) as conn:
                conn.execute("ROLLBACK PREPARED 'es-test-gid'")
            append_spread(engine, store, 1, prefix="after")
            (row,) = status(engine, projections=["log_a"], horizon="server")
            assert (row.lag, row.held_back) == (6, False)
            assert blockers(engine, store=store, horizon="server") == []
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_create_engine_names_its_connections(
    pg_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGAPPNAME", raising=False)

    def name_seen(engine: sa.Engine) -> str:
        try:
            with engine.connect() as conn:
                return str(
                    conn.execute(
                        sa.text(
                            "SELECT application_name FROM pg_stat_activity "
                            "WHERE pid = pg_backend_pid()"
                        )
                    ).scalar()
                )
        finally:
            engine.dispose()

    assert name_seen(es.create_engine(pg_url)) == "eventsource"
    assert name_seen(es.create_engine(pg_url, application_name="billing worker")) == (
        "billing worker"
    )
    given = es.create_engine(pg_url, connect_args={"application_name": "mine"})
    assert name_seen(given) == "mine"
    in_url = pg_url.update_query_dict({"application_name": "from-url"})
    assert name_seen(es.create_engine(in_url, application_name="ignored")) == "from-url"
    monkeypatch.setenv("PGAPPNAME", "from-env")
    assert name_seen(es.create_engine(pg_url)) == "from-env"


def test_nothing_is_held_back_on_sqlite(sqlite_url: sa.URL, store: es.EventStore) -> None:
    engine = es.create_engine(sqlite_url)
    try:
        append_spread(engine, store, 3)
        (row,) = status(engine, projections=["log_a"])
        assert (row.lag, row.held_back) == (3, False)
        assert blockers(engine, store=store) == []
        table = run_cli(sqlite_url, "status", "--app", "tests.projection_support:LogA")
        assert table.returncode == 0, table.stderr
        assert "held back" not in table.stdout
    finally:
        engine.dispose()


@pytest.mark.parametrize("value", [0, -1.0, True, "30"])
def test_blocked_warning_after_is_checked(value: object) -> None:
    with pytest.raises(es.ConfigurationError, match="blocked_warning_after"):
        es.ProcessorConfig(blocked_warning_after=value)  # type: ignore[arg-type]
    assert es.ProcessorConfig(blocked_warning_after=None).blocked_warning_after is None
    assert es.ProcessorConfig().blocked_warning_after == 30.0
