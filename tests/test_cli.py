"""The ``eventsource`` command, driven through its installed entry point in subprocesses.

Every test runs the real console script with a real database (SQLite file and
PostgreSQL) and a small application module written into a temporary directory (the
command's working directory): two projections whose read models are tables the test
creates, each with a ``reset`` hook that clears its table. Results are checked in the
database (read models against the events table, checkpoint rows) and in the command's
output and exit code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.database import head_revision
from eventsource.partition import fnv1a_32
from eventsource.status import status

#: Seconds any single command may take before the test fails.
TIMEOUT = 120

APP_SOURCE = '''\
"""A small application for the CLI tests: two projections writing read-model tables."""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es


class Orders(es.Projection):
    """One row per event: the primary key makes a double-applied event fail loudly."""

    name = "orders"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        time.sleep(float(os.environ.get("MYAPP_DELAY", "0")))
        if os.environ.get("MYAPP_FAIL_AT") == str(event.global_position):
            raise RuntimeError(f"refusing event {event.global_position}")
        session.execute(
            sa.text(
                "INSERT INTO orders_rm (global_position, aggregate_id, aggregate_version, "
                "amount) VALUES (:position, :aggregate_id, :version, :amount)"
            ),
            {
                "position": event.global_position,
                "aggregate_id": event.aggregate_id,
                "version": event.aggregate_version,
                "amount": event.payload["amount"],
            },
        )

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM orders_rm"))


class Totals(es.Projection):
    """One row per aggregate: events seen, amount summed, last version."""

    name = "totals"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        params = {
            "aggregate_id": event.aggregate_id,
            "version": event.aggregate_version,
            "amount": event.payload["amount"],
        }
        updated = session.execute(
            sa.text(
                "UPDATE totals_rm SET events = events + 1, amount = amount + :amount, "
                "last_version = :version WHERE aggregate_id = :aggregate_id"
            ),
            params,
        )
        if updated.rowcount == 0:
            session.execute(
                sa.text(
                    "INSERT INTO totals_rm (aggregate_id, events, amount, last_version) "
                    "VALUES (:aggregate_id, 1, :amount, :version)"
                ),
                params,
            )

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM totals_rm"))


PROJECTIONS = [Orders(), Totals()]


def projections() -> list[es.Projection]:
    """A factory, as an application might define one."""
    return [Orders(), Totals()]


NOT_PROJECTIONS = 42
NAMES = ["orders", "totals"]
'''

READ_MODEL_DDL = (
    "CREATE TABLE orders_rm (global_position BIGINT PRIMARY KEY, aggregate_id TEXT NOT NULL, "
    "aggregate_version BIGINT NOT NULL, amount BIGINT NOT NULL)",
    "CREATE TABLE totals_rm (aggregate_id TEXT PRIMARY KEY, events BIGINT NOT NULL, "
    "amount BIGINT NOT NULL, last_version BIGINT NOT NULL)",
)

STATUS_KEYS = {
    "projection",
    "partition_key",
    "total_partitions",
    "checkpoint",
    "head",
    "lag",
    "events_handled",
    "updated_at",
    "age_seconds",
    "lag_capped",
    "held_back",
    "held_back_by",
    "owner",
    "lease_age_seconds",
    "lease_expired",
    "reshard_boundary",
    "last_handled_at",
    "lag_seconds",
}


# -- running the command ------------------------------------------------------------


def entry_point() -> list[str]:
    """The installed ``eventsource`` console script (the one beside this interpreter)."""
    name = "eventsource.exe" if os.name == "nt" else "eventsource"
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("eventsource")
    if found:
        return [found]
    pytest.fail("the `eventsource` console script is not installed (pip install -e .)")


ENTRY_POINT = entry_point()


def url_text(url: sa.URL | str) -> str:
    return url if isinstance(url, str) else url.render_as_string(hide_password=False)


def command_env(url: sa.URL | str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "PARTITION_KEY", "TOTAL_PARTITIONS", "MYAPP_FAIL_AT")
    }
    if url is not None:
        env["DATABASE_URL"] = url_text(url)
    env.update(extra or {})
    return env


@dataclass
class Call:
    """One invocation: arguments, and the database URL given through DATABASE_URL."""

    args: Sequence[str]
    url: sa.URL | str | None = None
    env: dict[str, str] | None = None

    def popen(self, cwd: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*ENTRY_POINT, *self.args],
            cwd=cwd,
            env=command_env(self.url, self.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def cli(
    cwd: Path,
    *args: str,
    url: sa.URL | str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``eventsource ARGS`` to completion, stdin not a terminal."""
    return finish(Call(args, url, env).popen(cwd))


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args!r} did not finish in {TIMEOUT} s; stderr:\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def cli_many(cwd: Path, calls: Sequence[Call]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent invocations concurrently (they are slow to start)."""
    processes = [call.popen(cwd) for call in calls]
    return [finish(process) for process in processes]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_clean_error(
    result: subprocess.CompletedProcess[str],
    exit_code: int,
    *fragments: str,
    also: re.Pattern[str] | None = None,
) -> str:
    """The command failed with ``exit_code`` and one ``Error:`` line holding ``fragments``.

    Other stderr lines may only be click's usage hint, or lines matching ``also``.
    """
    detail = f"{result.args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == exit_code, detail
    assert "Traceback" not in result.stderr, detail
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    for line in lines:
        allowed = line.startswith(("Error: ", "Usage: ", "Try '"))
        assert allowed or (also is not None and also.search(line)), detail
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, detail
    for fragment in fragments:
        assert fragment in errors[0], detail
    return errors[0]


# -- the application and its database ------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """The command's working directory, holding the application module ``myapp.py``."""
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "myapp.py").write_text(APP_SOURCE)
    return directory


def load_app_module(app_dir: Path) -> ModuleType:
    """Import the same application module in the test process (under a private name)."""
    name = f"myapp_{id(app_dir)}"
    spec = importlib.util.spec_from_file_location(name, app_dir / "myapp.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def db(db_url: sa.URL) -> Iterator[sa.Engine]:
    """An engine on a migrated database that also has the application's read-model tables."""
    engine = with_read_models(db_url)
    yield engine
    engine.dispose()


def with_read_models(url: sa.URL) -> sa.Engine:
    engine = es.create_engine(url)
    with engine.begin() as conn:
        for ddl in READ_MODEL_DDL:
            conn.exec_driver_sql(ddl)
    return engine


def cli_url(engine: sa.Engine) -> str:
    """The URL handed to the command; PostgreSQL as a plain postgresql:// URL (psycopg 3)."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql")
    return url_text(url)


def append_events(engine: sa.Engine, count: int, *, first_amount: int = 1) -> None:
    """``count`` events, round-robin over 7 aggregates, amounts first_amount, +1, ..."""
    store = es.EventStore()
    with Session(engine) as session, session.begin():
        for i in range(count):
            amount = first_amount + i
            store.append(
                session,
                [
                    es.Event(
                        bounded_context="sales",
                        aggregate_type="Order",
                        aggregate_id=f"order-{amount % 7}",
                        event_type="OrderPlaced",
                        payload={"amount": amount},
                    )
                ],
            )


def events(engine: sa.Engine) -> list[tuple[int, str, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT global_position, aggregate_id, aggregate_version, payload FROM events "
                "ORDER BY global_position"
            )
        ).all()
    result = []
    for position, aggregate_id, version, payload in rows:
        data: Any = json.loads(payload) if isinstance(payload, str) else payload
        result.append((int(position), str(aggregate_id), int(version), int(data["amount"])))
    return result


def orders_rows(engine: sa.Engine) -> list[tuple[int, str, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT global_position, aggregate_id, aggregate_version, amount FROM orders_rm "
                "ORDER BY global_position"
            )
        ).all()
    return [(int(p), str(a), int(v), int(m)) for p, a, v, m in rows]


def totals_rows(engine: sa.Engine) -> list[tuple[str, int, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT aggregate_id, events, amount, last_version FROM totals_rm "
                "ORDER BY aggregate_id"
            )
        ).all()
    return [(str(a), int(n), int(m), int(v)) for a, n, m, v in rows]


def expected_totals(engine: sa.Engine) -> list[tuple[str, int, int, int]]:
    """What Totals must hold, computed from the events table."""
    by_aggregate: dict[str, tuple[int, int, int]] = {}
    for _, aggregate_id, version, amount in events(engine):
        count, total, _last = by_aggregate.get(aggregate_id, (0, 0, 0))
        by_aggregate[aggregate_id] = (count + 1, total + amount, version)
    return [(a, *values) for a, values in sorted(by_aggregate.items())]


def assert_read_models_complete(engine: sa.Engine) -> None:
    """Both read models hold every event exactly once."""
    assert orders_rows(engine) == events(engine)
    assert totals_rows(engine) == expected_totals(engine)


def checkpoint_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every column of every checkpoint row, as stored."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM projection_checkpoints ORDER BY projection_name, partition_key")
        ).all()
    return [tuple(row) for row in rows]


def status_json(result: subprocess.CompletedProcess[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """Parse ``status --json`` output, checking every row's schema."""
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        assert set(row) == STATUS_KEYS, row
        assert isinstance(row["projection"], str)
        for key in ("partition_key", "total_partitions", "checkpoint", "head", "lag"):
            assert type(row[key]) is int, (key, row)
        assert type(row["events_handled"]) is int, row
        assert type(row["lag_capped"]) is bool, row
        assert type(row["held_back"]) is bool, row
        assert isinstance(row["held_back_by"], list), row
        assert row["held_back"] or not row["held_back_by"], row
        if row["updated_at"] is None:
            assert row["age_seconds"] is None, row
        else:
            assert isinstance(row["updated_at"], str), row
            assert datetime.fromisoformat(row["updated_at"]).tzinfo is not None, row
            age = row["age_seconds"]
            assert isinstance(age, int | float), row
            assert not isinstance(age, bool), row
            assert 0 <= age < 600, row
        if row["last_handled_at"] is not None:
            assert datetime.fromisoformat(row["last_handled_at"]).tzinfo is not None, row
        waited = row["lag_seconds"]
        assert isinstance(waited, int | float), row
        assert not isinstance(waited, bool), row
        assert waited >= 0, row
        assert row["lag"] > 0 or waited == 0, row
        by_key[(row["projection"], row["partition_key"])] = row
    assert len(by_key) == len(rows), "one row per projection partition"
    return by_key


def status_lags(engine: sa.Engine) -> dict[tuple[str, int], int]:
    return {(row.projection, row.partition_key): row.lag for row in status(engine)}


def wait_until(condition: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


# -- db upgrade / current -------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no schema: a new SQLite file, or an empty PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    url: sa.URL = request.getfixturevalue("empty_pg_url")
    return url_text(url.set(drivername="postgresql"))


def test_db_upgrade_on_an_empty_database_then_current_is_up_to_date(
    empty_url: str, app_dir: Path
) -> None:
    before = ok(cli(app_dir, "db", "current", url=empty_url))
    assert before.stdout.startswith(f"current: none  head: {head_revision()}  (")
    assert "eventsource db upgrade" in before.stdout
    # Unmigrated: every command that needs the tables says what to run (the three
    # commands on SQLite; on PostgreSQL, status is enough: the check is the same code).
    calls = [Call(["status"], empty_url)]
    if empty_url.startswith("sqlite"):
        calls += [
            Call(["run", "myapp:PROJECTIONS", "--until-caught-up"], empty_url),
            Call(["rebuild", "orders", "--app", "myapp:PROJECTIONS", "--yes"], empty_url),
        ]
    unmigrated = cli_many(app_dir, calls)
    for result in unmigrated:
        if empty_url.startswith("sqlite"):  # no file yet: none is created by mistake
            assert_clean_error(result, 1, "no SQLite database at", "`eventsource db upgrade`")
        else:
            assert_clean_error(result, 1, "run `eventsource db upgrade`", "events")
    if empty_url.startswith("sqlite"):
        assert not (app_dir.parent / "fresh.db").exists()
        assert not any(app_dir.parent.glob("fresh.db*"))

    upgraded = ok(cli(app_dir, "db", "upgrade", url=empty_url))
    assert f"at revision {head_revision()}" in upgraded.stdout
    # Alembic's steps, as `alembic upgrade` shows them, and none of its other chatter.
    steps = [line for line in upgraded.stderr.splitlines() if "alembic" in line]
    assert steps, upgraded.stderr
    assert all("Running upgrade" in line for line in steps), upgraded.stderr
    assert f"-> {head_revision()}" in steps[-1]

    after = ok(cli(app_dir, "--database-url", empty_url, "db", "current"))
    assert (
        after.stdout.strip() == f"current: {head_revision()}  head: {head_revision()}  (up to date)"
    )
    engine = es.create_engine(empty_url)
    try:
        assert status(engine) == []  # the tables exist now
    finally:
        engine.dispose()


# -- status and run -------------------------------------------------------------------


def test_run_takes_the_horizon_rule_and_the_blocked_warning(db: sa.Engine, app_dir: Path) -> None:
    url = cli_url(db)
    append_events(db, 10)
    ran = ok(
        cli(
            app_dir,
            "run",
            "myapp:PROJECTIONS",
            "--horizon",
            "server",
            "--blocked-warning-after",
            "5",
            "--until-caught-up",
            url=url,
        )
    )
    assert ran.stdout.splitlines() == [
        "orders partition 0: handled 10 events",
        "totals partition 0: handled 10 events",
    ]
    for option, value in (("--horizon", "database"), ("--blocked-warning-after", "0")):
        refused = cli(app_dir, "run", "myapp:PROJECTIONS", option, value, url=url)
        assert refused.returncode == 2, refused.stderr
        assert option in refused.stderr


def test_status_shows_exact_lag_before_and_after_running(db: sa.Engine, app_dir: Path) -> None:
    url = cli_url(db)
    append_events(db, 30)

    never_run = cli(
        app_dir, "status", "--app", "myapp:PROJECTIONS", "--json", "--max-lag", "29", url=url
    )
    assert never_run.returncode == 3, never_run.stderr
    rows = status_json(never_run)
    assert set(rows) == {("orders", 0), ("totals", 0)}
    for row in rows.values():
        assert (row["checkpoint"], row["head"], row["lag"], row["events_handled"]) == (0, 30, 30, 0)
        assert (row["total_partitions"], row["updated_at"], row["age_seconds"]) == (1, None, None)
        assert row["last_handled_at"] is None
    assert never_run.stderr.splitlines() == [
        "orders partition 0 lags 30 events (max 29)",
        "totals partition 0 lags 30 events (max 29)",
    ]

    ran = ok(cli(app_dir, "run", "myapp:PROJECTIONS", "--until-caught-up", url=url))
    assert ran.stdout.splitlines() == [
        "orders partition 0: handled 30 events",
        "totals partition 0: handled 30 events",
    ]
    assert "running 2 processor(s): orders, totals" in ran.stderr
    assert_read_models_complete(db)

    caught_up = ok(cli(app_dir, "status", "--json", "--max-lag", "0", url=url))
    rows = status_json(caught_up)
    assert set(rows) == {("orders", 0), ("totals", 0)}
    for row in rows.values():
        assert (row["checkpoint"], row["head"], row["lag"], row["events_handled"]) == (
            30,
            30,
            0,
            30,
        )
        assert row["updated_at"] is not None
        assert row["last_handled_at"] is not None
        assert row["lag_seconds"] == 0
    assert caught_up.stderr == ""

    append_events(db, 7, first_amount=31)
    lagging = cli(app_dir, "--database-url", url, "status", "--json", "--max-lag", "6")
    assert lagging.returncode == 3, lagging.stderr
    rows = status_json(lagging)
    for row in rows.values():
        assert (row["checkpoint"], row["head"], row["lag"], row["events_handled"]) == (
            30,
            37,
            7,
            30,
        )
    assert lagging.stderr.splitlines() == [
        "orders partition 0 lags 7 events (max 6)",
        "totals partition 0 lags 7 events (max 6)",
    ]

    # The table for people: lag at the limit is healthy (exit 0).
    table = ok(cli(app_dir, "status", "--max-lag", "7", url=url))
    header, *lines = table.stdout.splitlines()
    assert header.split() == [
        "PROJECTION",
        "PARTITION",
        "CHECKPOINT",
        "HEAD",
        "LAG",
        "LAG_TIME",
        "UPDATED",
        "AGE",
    ]
    assert [line.split()[:5] for line in lines] == [
        ["orders", "0/1", "30", "37", "7"],
        ["totals", "0/1", "30", "37", "7"],
    ]
    assert table.stderr == ""


def test_status_shows_how_long_the_first_event_not_passed_has_waited(
    db: sa.Engine, app_dir: Path
) -> None:
    class NoOp(es.Projection, abstract=True):
        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            pass

    class Partial(NoOp):
        name = "partial"

    class Done(NoOp):
        name = "done"

    store = es.EventStore()
    now = datetime.now(UTC)
    with Session(db) as session, session.begin():
        for i, minutes in enumerate((10, 5)):
            placed = es.Event(
                bounded_context="sales",
                aggregate_type="Order",
                aggregate_id=f"order-{i}",
                event_type="OrderPlaced",
                payload={"amount": i},
                created_at=now - timedelta(minutes=minutes),
            )
            store.append(session, [placed])
    with Session(db) as session:
        first, second = (e.created_at for e in store.read_all(session))
    one_by_one = es.Processor(db, store, es.ProcessorConfig(batch_size=1, poll_interval=0.01))
    wait_until(lambda: one_by_one.process_batch(Partial()).handled == 1, "one event passed")
    assert es.Processor(db, store).run_until_caught_up(Done()) == 2

    before = datetime.now(UTC)
    shown = status_json(ok(cli(app_dir, "status", "--json", url=cli_url(db))))
    after = datetime.now(UTC)
    partial, done = shown[("partial", 0)], shown[("done", 0)]
    assert (partial["checkpoint"], partial["lag"]) == (1, 1)
    assert partial["last_handled_at"] == first.isoformat()
    waited = (before - second).total_seconds(), (after - second).total_seconds()
    assert waited[0] <= partial["lag_seconds"] <= waited[1]
    assert (done["lag"], done["lag_seconds"], done["last_handled_at"]) == (
        0,
        0.0,
        second.isoformat(),
    )

    header, *lines = ok(cli(app_dir, "status", url=cli_url(db))).stdout.splitlines()
    assert header.split()[4:6] == ["LAG", "LAG_TIME"]
    assert [line.split()[:6] for line in lines] == [
        ["done", "0/1", "2", "2", "0", "0s"],
        ["partial", "0/1", "1", "2", "1", "5m"],  # format_age: 300 s and up to 329 s
    ]


def test_run_partitions_in_two_processes_apply_every_event_once(
    db: sa.Engine, app_dir: Path
) -> None:
    url = cli_url(db)
    append_events(db, 60)
    first, second = cli_many(
        app_dir,
        [
            Call(
                [
                    "run",
                    "myapp:projections",
                    "--partition-key",
                    "0",
                    "--total-partitions",
                    "2",
                    "--batch-size",
                    "5",
                    "--until-caught-up",
                ],
                url,
            ),
            Call(
                ["run", "myapp:projections", "--batch-size", "5", "--until-caught-up"],
                url,
                env={"PARTITION_KEY": "1", "TOTAL_PARTITIONS": "2"},
            ),
        ],
    )
    ok(first)
    ok(second)
    assert_read_models_complete(db)

    # Each process handled exactly its partition's events (FNV-1a of the aggregate id).
    per_partition = Counter(fnv1a_32(aggregate_id) % 2 for _, aggregate_id, _, _ in events(db))
    assert per_partition[0] > 0, "both partitions get events"
    assert per_partition[1] > 0, "both partitions get events"
    for key, result in ((0, first), (1, second)):
        assert result.stdout.splitlines() == [
            f"orders partition {key}: handled {per_partition[key]} events",
            f"totals partition {key}: handled {per_partition[key]} events",
        ]
    rows = status(db)
    assert [(r.projection, r.partition_key, r.total_partitions) for r in rows] == [
        ("orders", 0, 2),
        ("orders", 1, 2),
        ("totals", 0, 2),
        ("totals", 1, 2),
    ]
    for row in rows:
        assert (row.checkpoint, row.head, row.lag) == (60, 60, 0)
        assert row.events_handled == per_partition[row.partition_key]


def run_until_signalled(engine: sa.Engine, app_dir: Path, signum: int) -> None:
    """``run`` (no --until-caught-up) keeps projecting new events, then stops on ``signum``."""
    append_events(engine, 10)
    call = Call(["run", "myapp:PROJECTIONS", "--poll-interval", "0.05"], cli_url(engine))
    process = call.popen(app_dir)
    try:
        wait_until(
            lambda: status_lags(engine) == {("orders", 0): 0, ("totals", 0): 0},
            "the first catch-up",
        )
        append_events(engine, 5, first_amount=11)  # it keeps polling
        wait_until(
            lambda: [(r.checkpoint, r.lag) for r in status(engine)] == [(15, 0), (15, 0)],
            "the new events",
        )
        assert process.poll() is None, "still running"
        process.send_signal(signum)
    except BaseException:
        process.kill()
        finish(process)
        raise
    result = ok(finish(process))
    assert result.stderr.splitlines()[-1] == "stopped"
    assert_read_models_complete(engine)


def test_identical_run_commands_share_the_partitions_and_status_names_their_owners(
    db: sa.Engine, app_dir: Path
) -> None:
    """``run --total-partitions N`` without a key: the processes claim shares of N."""
    append_events(db, 40)
    args = ["run", "myapp:PROJECTIONS", "--total-partitions", "4", "--lease", "2"]
    processes = [Call([*args, "--poll-interval", "0.05"], cli_url(db)).popen(app_dir)]
    try:
        wait_until(lambda: all(r.lag == 0 for r in status(db)) and len(status(db)) == 8, "catch-up")
        processes.append(Call(args, cli_url(db)).popen(app_dir))

        def owners() -> dict[str, int]:
            return Counter(row.owner for row in status(db) if row.owner)

        wait_until(lambda: sorted(owners().values()) == [4, 4], "two shares of 2 per projection")
        shown = ok(cli(app_dir, "status", "--json", url=cli_url(db)))
        assert {row["owner"] for row in status_json(shown).values()} == set(owners())
        table = ok(cli(app_dir, "status", url=cli_url(db))).stdout
        assert table.splitlines()[0].split()[-2:] == ["OWNER", "LEASE"]
        append_events(db, 20, first_amount=41)
        wait_until(lambda: all(r.lag == 0 for r in status(db)), "the new events")
        for process in processes:
            process.send_signal(signal.SIGTERM)
    except BaseException:
        for process in processes:
            process.kill()
            finish(process)
        raise
    for process in processes:
        result = ok(finish(process))
        assert "claiming shares of 4 partitions" in result.stderr
    assert_read_models_complete(db)
    assert {row.owner for row in status(db)} == {None}  # stopped workers release them


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--claim", "--partition-key", "0"], "drop --partition-key"),
        (["--claim", "--until-caught-up"], "does not claim"),
    ],
)
def test_run_refuses_claiming_with_a_fixed_key_or_a_catch_up(
    sqlite_url: sa.URL, app_dir: Path, extra: list[str], message: str
) -> None:
    args = ["run", "myapp:PROJECTIONS", "--total-partitions", "2", *extra]
    assert_clean_error(cli(app_dir, *args, url=url_text(sqlite_url)), 2, message)


def test_run_stops_gracefully_on_sigint(db: sa.Engine, app_dir: Path) -> None:
    run_until_signalled(db, app_dir, signal.SIGINT)


def test_run_until_caught_up_interrupted_exits_non_zero(sqlite_url: sa.URL, app_dir: Path) -> None:
    """A script must not mistake "stopped by a signal" for "caught up"."""
    engine = with_read_models(sqlite_url)
    try:
        append_events(engine, 60)
        args = ["run", "myapp:PROJECTIONS", "--until-caught-up", "--batch-size", "5"]
        process = Call(args, cli_url(engine), {"MYAPP_DELAY": "0.1"}).popen(app_dir)
        try:
            wait_until(lambda: status_lags(engine).get(("orders", 0), 60) < 60, "progress")
            process.send_signal(signal.SIGINT)
        except BaseException:
            process.kill()
            finish(process)
            raise
        result = finish(process)
        assert result.returncode == 130, result.stderr
        assert result.stderr.splitlines()[-1] == "interrupted before catching up"
        assert status_lags(engine)[("orders", 0)] > 0
    finally:
        engine.dispose()


def test_run_stops_gracefully_on_sigterm(sqlite_url: sa.URL, app_dir: Path) -> None:
    engine = with_read_models(sqlite_url)
    try:
        run_until_signalled(engine, app_dir, signal.SIGTERM)
    finally:
        engine.dispose()


# -- rebuild and reset -----------------------------------------------------------------


PROGRESS_LINE = re.compile(
    r"^rebuild orders: (\d+)% (\d+)/(\d+) events, elapsed ([\d:]+), ETA ([\d:?]+), "
    r"[ \d.?]+ events/s$"
)


def seconds(clock: str) -> int:
    """tqdm's [h:]mm:ss as seconds."""
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total


def test_rebuild_produces_the_same_read_model_as_a_first_run(db: sa.Engine, app_dir: Path) -> None:
    url = cli_url(db)
    append_events(db, 40)
    ok(cli(app_dir, "run", "myapp:PROJECTIONS", "--until-caught-up", url=url))
    first_orders = orders_rows(db)
    assert len(first_orders) == 40
    # Damage both read models; a rebuild of orders repairs orders only.
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM orders_rm WHERE global_position > 20"))
        conn.execute(sa.text("UPDATE orders_rm SET amount = -1"))
        conn.execute(sa.text("UPDATE totals_rm SET events = 999"))
    damaged_orders, damaged_totals = orders_rows(db), totals_rows(db)
    checkpoints_before = checkpoint_rows(db)

    refused = cli(app_dir, "rebuild", "orders", "--app", "myapp:PROJECTIONS", url=url)
    assert_clean_error(refused, 2, "--yes")
    assert orders_rows(db) == damaged_orders
    assert checkpoint_rows(db) == checkpoints_before

    rebuilt = ok(
        cli(
            app_dir,
            "rebuild",
            "orders",
            "--app",
            "myapp:PROJECTIONS",
            "--yes",
            "--batch-size",
            "7",
            url=url,
        )
    )
    assert orders_rows(db) == first_orders
    assert totals_rows(db) == damaged_totals
    assert rebuilt.stdout.startswith("rebuilt orders: 40 events handled, 40 read, in ")
    # Not a terminal: plain progress lines, no carriage-return bar.
    assert "\r" not in rebuilt.stderr
    progress = [PROGRESS_LINE.match(line) for line in rebuilt.stderr.splitlines()]
    done = [int(match.group(2)) for match in progress if match]
    assert done, rebuilt.stderr
    assert done == sorted(done)
    assert done[-1] == 40
    assert {match.group(3) for match in progress if match} == {"40"}
    assert rebuilt.stderr.splitlines()[-1].startswith("rebuild orders: 100% 40/40 events")
    rows = {row.projection: row for row in status(db)}
    assert (rows["orders"].checkpoint, rows["orders"].lag, rows["orders"].events_handled) == (
        40,
        0,
        40,
    )

    # An --atomic rebuild whose handler fails midway leaves everything as it was.
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE orders_rm SET amount = amount + 1000"))
    before_failure = orders_rows(db), totals_rows(db), checkpoint_rows(db)
    failed = cli(
        app_dir,
        "rebuild",
        "orders",
        "--app",
        "myapp:PROJECTIONS",
        "--yes",
        "--atomic",
        "--batch-size",
        "5",
        url=url,
        env={"MYAPP_FAIL_AT": "23"},
    )
    # Besides the error: progress so far, and the processor's log line of the failure.
    progress_or_log = re.compile(f"{PROGRESS_LINE.pattern}|ERROR eventsource.processor: ")
    assert_clean_error(
        failed, 1, "'orders'", "position 23", "refusing event 23", also=progress_or_log
    )
    assert (orders_rows(db), totals_rows(db), checkpoint_rows(db)) == before_failure
    assert not [line for line in failed.stdout.splitlines() if line.startswith("rebuilt")]

    # Online (the default), it keeps the batches it committed, their checkpoint with them.
    failed = cli(
        app_dir,
        *("rebuild", "orders", "--app", "myapp:PROJECTIONS", "--yes", "--batch-size", "5"),
        url=url,
        env={"MYAPP_FAIL_AT": "23"},
    )
    assert_clean_error(
        failed, 1, "'orders'", "position 23", "refusing event 23", also=progress_or_log
    )
    assert orders_rows(db) == first_orders[:20]
    assert totals_rows(db) == before_failure[1]
    rows = {row.projection: row for row in status(db)}
    assert (rows["orders"].checkpoint, rows["orders"].events_handled) == (20, 20)


def test_rebuild_progress_lines_off_a_terminal_have_a_sane_eta(
    sqlite_url: sa.URL, app_dir: Path
) -> None:
    """stderr not a terminal (CI, a log file): a plain line every --progress-every
    seconds, whose ETA points at when the rebuild actually ends; no bar, no \\r."""
    engine = with_read_models(sqlite_url)
    try:
        append_events(engine, 150)
        rebuilt = ok(
            cli(
                app_dir,
                "rebuild",
                "orders",
                "--app",
                "myapp:PROJECTIONS",
                "--yes",
                "--batch-size",
                "5",
                "--progress-every",
                "0.5",
                url=cli_url(engine),
                env={"MYAPP_DELAY": "0.03"},  # about 4.5 s of handling, steadily
            )
        )
        assert len(orders_rows(engine)) == 150
    finally:
        engine.dispose()
    summary = re.fullmatch(
        r"rebuilt orders: 150 events handled, 150 read, in ([\d.]+)s\n", rebuilt.stdout
    )
    assert summary, rebuilt.stdout
    took = float(summary.group(1))
    assert "\r" not in rebuilt.stderr
    lines = rebuilt.stderr.splitlines()
    matches = [PROGRESS_LINE.match(line) for line in lines]
    assert all(matches), rebuilt.stderr
    progress = [
        (int(m.group(1)), int(m.group(2)), int(m.group(3)), seconds(m.group(4)), m.group(5))
        for m in matches
        if m
    ]
    assert len(progress) >= 4, rebuilt.stderr  # every half second, and the last one
    assert {total for _, _, total, _, _ in progress} == {150}
    done = [count for _, count, _, _, _ in progress]
    assert done == sorted(done)
    assert progress[-1][:2] == (100, 150)
    assert progress[-1][4] == "00:00"
    assert all(abs(percent - 100 * count / 150) <= 1 for percent, count, *_ in progress)
    # Mid-way, elapsed + ETA is when it ends (tqdm truncates both to whole seconds).
    midway = [(elapsed, eta) for percent, _, _, elapsed, eta in progress if 15 <= percent <= 85]
    assert len(midway) >= 2, rebuilt.stderr
    for elapsed, eta in midway:
        assert took - 2.5 <= elapsed + seconds(eta) <= took + 1.0, (took, rebuilt.stderr)


def test_rebuild_draws_a_bar_on_a_terminal(sqlite_url: sa.URL, app_dir: Path) -> None:
    """stderr a terminal (a pseudo-terminal here): tqdm's bar, redrawn in place."""
    import fcntl
    import pty
    import struct
    import termios

    engine = with_read_models(sqlite_url)
    try:
        append_events(engine, 40)
        url = cli_url(engine)
    finally:
        engine.dispose()
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    args = ["rebuild", "orders", "--app", "myapp:PROJECTIONS", "--yes", "--batch-size", "5"]
    process = subprocess.Popen(
        [*ENTRY_POINT, *args],
        cwd=app_dir,
        env=command_env(url, {"MYAPP_DELAY": "0.01"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    drawn = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        stdout, _ = process.communicate(timeout=TIMEOUT)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.communicate()
    text = drawn.decode()
    assert process.returncode == 0, text
    assert stdout.decode().startswith("rebuilt orders: 40 events handled, 40 read, in ")
    assert "Traceback" not in text
    assert "\r" in text  # redrawn in place
    frames = [frame.strip() for frame in re.split(r"[\r\n]+", text) if frame.strip()]
    assert re.fullmatch(
        r"orders: 100%\|[^|]+\| 40/40 \[\d\d:\d\d<00:00, .* events/s\]", frames[-1]
    ), text
    assert "rebuild orders:" not in text  # no plain lines on a terminal


def test_reset_deletes_checkpoints_and_with_app_clears_the_read_model(
    db: sa.Engine, app_dir: Path
) -> None:
    url = cli_url(db)
    append_events(db, 10)
    app = load_app_module(app_dir)
    es.Runner(handle_signals=False).run_until_caught_up(
        [(projection, es.Processor(db)) for projection in app.projections()]
    )
    assert_read_models_complete(db)
    orders_before = orders_rows(db)

    # Without --app the read model cannot be cleared: refused, nothing changed.
    (refused,) = cli_many(app_dir, [Call(["reset", "orders", "--yes"], url)])
    assert_clean_error(refused, 2, "refusing to reset 'orders'", "--keep-read-model")
    assert len(checkpoint_rows(db)) == 2

    plain, with_app, unknown = cli_many(
        app_dir,
        [
            Call(["reset", "orders", "--keep-read-model", "--yes"], url),
            Call(["reset", "totals", "--app", "myapp:PROJECTIONS", "--yes"], url),
            Call(["reset", "nosuch", "--keep-read-model", "--yes"], url),
        ],
    )
    assert ok(plain).stdout.strip() == "reset orders: deleted 1 checkpoint row(s)"
    assert (
        ok(with_app).stdout.strip()
        == "reset totals: deleted 1 checkpoint row(s) and cleared its read model"
    )
    # (The known names depend on which concurrent reset finished first.)
    assert_clean_error(unknown, 1, "no checkpoints for projection 'nosuch' (known: ")

    assert status(db) == []
    assert checkpoint_rows(db) == []
    assert orders_rows(db) == orders_before  # without --app the read model stays
    assert totals_rows(db) == []  # its reset() hook ran

    # A reset projection replays from the start.
    rows = status(db, projections=app.projections())
    assert [(row.projection, row.checkpoint, row.lag) for row in rows] == [
        ("orders", 0, 10),
        ("totals", 0, 10),
    ]


# -- errors and help ---------------------------------------------------------------------


def test_unparseable_database_url_is_a_usage_error(app_dir: Path) -> None:
    from_env, from_option = cli_many(
        app_dir,
        [
            Call(["status"], "notaurl://"),
            Call(["--database-url", "notaurl://", "run", "myapp:PROJECTIONS"]),
        ],
    )
    assert_clean_error(from_env, 2, "invalid database URL 'notaurl://'")
    assert_clean_error(from_option, 2, "invalid database URL 'notaurl://'")


@pytest.mark.postgres
def test_unreachable_postgresql_gives_one_line(app_dir: Path, pg_url: sa.URL) -> None:
    missing_db = url_text(pg_url.set(drivername="postgresql", database="es_no_such_database"))
    closed_port = "postgresql://postgres@127.0.0.1:1/postgres"
    no_database, refused = cli_many(
        app_dir,
        [
            Call(["status"], missing_db),
            Call(["run", "myapp:PROJECTIONS", "--until-caught-up"], closed_port),
        ],
    )
    assert_clean_error(
        no_database, 1, "cannot use the database at", "es_no_such_database", "does not exist"
    )
    assert_clean_error(
        refused,
        1,
        "cannot use the database at postgresql+psycopg://postgres@127.0.0.1:1/postgres",
        "refused",
    )


def test_bad_app_and_projection_arguments(sqlite_url: sa.URL, app_dir: Path) -> None:
    url = url_text(sqlite_url)
    app = "myapp:PROJECTIONS"
    cases: list[tuple[list[str], int, list[str]]] = [
        (["run", "myapp"], 2, ["'myapp'", "expected MODULE:ATTRIBUTE"]),
        (["status", "--app", "nosuchmodule:X"], 2, ["cannot import 'nosuchmodule'"]),
        (
            ["rebuild", "orders", "--app", "myapp:MISSING", "--yes"],
            2,
            ["'myapp' has no attribute 'MISSING'"],
        ),
        (["run", "myapp:NOT_PROJECTIONS"], 2, ["expected projections", "got 42"]),
        (["reset", "orders", "--app", "myapp:NAMES", "--yes"], 2, ["is neither a Projection"]),
        (
            ["rebuild", "nosuch", "--app", app, "--yes"],
            1,
            ["unknown projection 'nosuch'", "orders, totals"],
        ),
        (
            ["run", app, "--partition-key", "2", "--total-partitions", "2"],
            2,
            ["--partition-key", "must be below --total-partitions (2)"],
        ),
    ]
    results = cli_many(app_dir, [Call(args, url) for args, _, _ in cases])
    for (_, exit_code, fragments), result in zip(cases, results, strict=True):
        assert_clean_error(result, exit_code, *fragments)
    engine = es.create_engine(sqlite_url)
    try:
        assert checkpoint_rows(engine) == []
    finally:
        engine.dispose()


HELP = [
    ([], ["Operate eventsource", "MODULE:ATTRIBUTE", "DATABASE_URL"]),
    (["db"], ["migrations", "upgrade", "current"]),
    (["db", "upgrade"], ["Create or update the library's tables"]),
    (["db", "current"], ["schema revision"]),
    (["status"], ["lag", "--json", "--max-lag", "--app"]),
    (
        ["run"],
        [
            "SIGTERM",
            "--partition-key",
            "PARTITION_KEY",
            "TOTAL_PARTITIONS",
            "--batch-size",
            "--until-caught-up",
        ],
    ),
    (["reset"], ["checkpoints", "--app", "--yes"]),
    (["rebuild"], ["reset()", "replay", "--app", "--yes", "--batch-size"]),
]


def test_help_of_every_command_explains_it(tmp_path: Path) -> None:
    results = cli_many(tmp_path, [Call([*args, "--help"]) for args, _ in HELP])
    for (args, fragments), result in zip(HELP, results, strict=True):
        ok(result)
        text = " ".join(result.stdout.split())  # undo click's line wrapping
        assert text.startswith(f"Usage: eventsource {' '.join(args)}".rstrip()), args
        for fragment in fragments:
            assert fragment in text, (args, fragment, result.stdout)
