"""Smoke tests for examples/: each example runs for real, in a subprocess, on SQLite and PostgreSQL.

Every test starts the example with ``sys.executable`` the way its README says, bounded
by timeouts, then checks what it printed *and* what it left in the database. On SQLite
no ``DATABASE_URL`` is set: the example runs in a temporary directory and creates its
default ``eventsource.db`` there, as on a fresh clone. On PostgreSQL ``DATABASE_URL`` is
a plain ``postgresql://`` URL of an empty throwaway database; the examples create the
library's schema (through its migrations) and their read models themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import eventsource
from eventsource.partition import fnv1a_32
from tests.conftest import PostgresServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: Generous: the slowest example takes a few seconds, but CI machines can be busy.
RUN_TIMEOUT = 120.0
WAIT_TIMEOUT = 60.0


@dataclass
class Target:
    """Where the examples run: their working directory, environment and database."""

    url: sa.URL
    cwd: Path
    env: dict[str, str]
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        if self.url.get_backend_name() == "sqlite":
            # A plain engine: its SELECTs read a WAL snapshot without taking the write lock,
            # so polling never waits behind (or starves against) a busy example.
            self.engine = sa.create_engine(self.url, poolclass=sa.NullPool)
        else:
            self.engine = eventsource.create_engine(self.url, poolclass=sa.NullPool)

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        """Result rows (typed Any: they are unpacked and read by column name)."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).all())

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def scalar_or_none(self, sql: str, **params: Any) -> Any:
        """For polling while an example is still creating its tables."""
        try:
            return self.scalar(sql, **params)
        except sa.exc.DBAPIError:
            return None

    def checkpoints(self, projection: str) -> list[Any]:
        return list(
            self.rows(
                "SELECT partition_key, total_partitions, global_position, events_handled "
                "FROM projection_checkpoints WHERE projection_name = :name "
                "ORDER BY partition_key",
                name=projection,
            )
        )

    def command(self, script: str, *args: str) -> list[str]:
        return [sys.executable, str(EXAMPLES / script), *args]

    def run(self, script: str, *args: str, expect_code: int = 0) -> str:
        """Run an example to completion and return its stdout."""
        result = subprocess.run(
            self.command(script, *args),
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        assert result.returncode == expect_code, (
            f"{script} {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
        return result.stdout

    @contextmanager
    def start(self, script: str, *args: str) -> Iterator[Background]:
        """Start an example in the background; it is killed if the test leaves it running."""
        name = script.replace("/", "_")
        stdout = (self.cwd / f"{name}.out").open("w")
        stderr = (self.cwd / f"{name}.err").open("w")
        process = subprocess.Popen(
            self.command(script, *args), cwd=self.cwd, env=self.env, stdout=stdout, stderr=stderr
        )
        background = Background(process, self.cwd / f"{name}.out", self.cwd / f"{name}.err")
        try:
            yield background
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=RUN_TIMEOUT)
            stdout.close()
            stderr.close()


@dataclass
class Background:
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def output(self) -> str:
        return self.stdout_path.read_text()

    def describe(self) -> str:
        return f"--- stdout\n{self.output()}\n--- stderr\n{self.stderr_path.read_text()}"

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_TIMEOUT
        while not condition():
            code = self.process.poll()
            if code is not None and not condition():
                pytest.fail(f"the example exited ({code}) before {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting until {what}\n{self.describe()}")
            time.sleep(0.1)

    def stop(self, signum: signal.Signals) -> str:
        """Send a signal, expect a clean exit (status 0) and return the output."""
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the example did not stop after {signum.name}\n{self.describe()}")
        assert code == 0, f"exit status {code} after {signum.name}\n{self.describe()}"
        return self.output()


def example_env(database_url: str | None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "PARTITION_KEY", "TOTAL_PARTITIONS")
    }
    env["PYTHONUNBUFFERED"] = "1"
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A fresh, empty database for the examples: SQLite by default, or PostgreSQL."""
    if request.param == "sqlite":
        # No DATABASE_URL: the examples' default, eventsource.db in the working directory.
        result = Target(
            sa.make_url(f"sqlite:///{tmp_path / 'eventsource.db'}"), tmp_path, example_env(None)
        )
    else:
        url: sa.URL = request.getfixturevalue("empty_pg_url")
        # The spelling a user would type; the library maps it to psycopg 3.
        plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
        result = Target(url, tmp_path, example_env(plain))
    yield result
    result.engine.dispose()


# -- multiple_projections: the main example -------------------------------------------

USERS_PER_RUN = 5
ORDERS_PER_RUN = 8
REVENUE_CENTS_PER_RUN = 19_523
EVENTS_PER_RUN = USERS_PER_RUN + ORDERS_PER_RUN
MAIN = "multiple_projections/main.py"


def assert_main_totals(target: Target, runs: int) -> None:
    """The read-model tables hold exactly what the events say, once each."""
    users = target.scalar("SELECT total FROM mp_user_count WHERE id = 1")
    created = target.scalar("SELECT count(*) FROM events WHERE event_type = 'UserCreated'")
    assert users == created == USERS_PER_RUN * runs
    orders, revenue = target.rows("SELECT orders, total_cents FROM mp_revenue WHERE id = 1")[0]
    payloads = target.rows("SELECT payload FROM events WHERE event_type = 'OrderPlaced'")
    amounts = [(json.loads(p) if isinstance(p, str) else p)["amount_cents"] for (p,) in payloads]
    assert orders == len(amounts) == ORDERS_PER_RUN * runs
    assert revenue == sum(amounts) == REVENUE_CENTS_PER_RUN * runs
    logged = [p for (p,) in target.rows("SELECT global_position FROM mp_activity_log")]
    stored = [p for (p,) in target.rows("SELECT global_position FROM events")]
    assert sorted(logged) == sorted(stored)
    assert len(stored) == EVENTS_PER_RUN * runs
    head = max(stored)
    for name in ("mp_user_counter", "mp_revenue", "mp_activity_log"):
        (checkpoint,) = target.checkpoints(name)
        assert checkpoint.global_position == head, name


def test_multiple_projections_totals_are_exact_across_runs(target: Target) -> None:
    first = target.run(MAIN)
    assert "[UserCounter] User created: Alice - Total: 1" in first
    assert "[UserCounter] User created: Eve - Total: 5" in first
    assert "[Revenue] Order placed: $12.50 - Total: $12.50" in first
    assert "[Revenue] Order placed: $10.00 - Total: $195.23" in first
    assert first.count("[ActivityLog]") == EVENTS_PER_RUN
    assert "All projections have caught up." in first
    if target.dialect == "sqlite":
        assert (target.cwd / "eventsource.db").exists()  # the default, with no DATABASE_URL
    assert_main_totals(target, runs=1)

    # The second run appends new users and orders; only those are handled.
    second = target.run(MAIN)
    assert "[UserCounter] User created: Alice - Total: 6" in second
    assert second.count("[UserCounter]") == USERS_PER_RUN
    assert second.count("[Revenue]") == ORDERS_PER_RUN
    assert second.count("[ActivityLog]") == EVENTS_PER_RUN
    assert "Users created:        10" in second
    assert "Orders placed:        16" in second
    assert "Revenue:              $390.46" in second
    assert "Activity log entries: 26" in second
    assert_main_totals(target, runs=2)


def test_multiple_projections_follow_stops_gracefully(target: Target) -> None:
    def all_caught_up(events: int) -> Callable[[], bool]:
        def check() -> bool:
            at_head = target.scalar_or_none(
                "SELECT count(*) FROM projection_checkpoints WHERE global_position = :head "
                "AND projection_name IN ('mp_user_counter', 'mp_revenue', 'mp_activity_log')",
                head=events,
            )
            return bool(at_head == 3)

        return check

    with target.start(MAIN, "--follow") as follower:
        follower.wait_for(all_caught_up(EVENTS_PER_RUN), "it handled its own sample")
        # A second process appends while the first keeps following.
        appended = target.run(MAIN, "--append-only")
        assert "[ActivityLog]" not in appended
        follower.wait_for(all_caught_up(2 * EVENTS_PER_RUN), "it handled the new events")
        output = follower.stop(signal.SIGTERM)
    assert "Following new events" in output
    assert "Stopped gracefully" in output
    assert "Users created:        10" in output
    assert output.count("[UserCounter]") == 2 * USERS_PER_RUN
    assert_main_totals(target, runs=2)


def test_multiple_projections_configuration_patterns(target: Target) -> None:
    fast_slow = target.run(MAIN, "--pattern", "fast-slow", "--slow-delay", "0.01")
    assert fast_slow.count("[Fast]") == fast_slow.count("[Slow]") == EVENTS_PER_RUN
    counts = dict(target.rows("SELECT projection, events FROM mp_pattern_counts"))
    assert counts == {"mp_fast": EVENTS_PER_RUN, "mp_slow": EVENTS_PER_RUN}
    assert [c.global_position for c in target.checkpoints("mp_fast")] == [EVENTS_PER_RUN]
    assert [c.global_position for c in target.checkpoints("mp_slow")] == [EVENTS_PER_RUN]

    # New projections next to old ones start from the beginning: 2 runs' worth of events.
    mixed = target.run(MAIN, "--pattern", "mixed-partitions")
    assert mixed.count("[Unpartitioned]") == 2 * EVENTS_PER_RUN
    assert mixed.count("[Partitioned p") == 2 * EVENTS_PER_RUN
    unpartitioned = target.scalar(
        "SELECT events FROM mp_pattern_counts WHERE projection = 'mp_unpartitioned'"
    )
    assert unpartitioned == 2 * EVENTS_PER_RUN
    per_aggregate = target.rows(
        "SELECT aggregate_id, partition_key, events FROM mp_aggregate_counts"
    )
    assert sum(events for _, _, events in per_aggregate) == 2 * EVENTS_PER_RUN
    for aggregate_id, partition_key, _ in per_aggregate:
        assert fnv1a_32(aggregate_id) % 4 == partition_key
    checkpoints = target.checkpoints("mp_partitioned")
    assert [(c.partition_key, c.total_partitions) for c in checkpoints] == [
        (key, 4) for key in range(4)
    ]
    assert sum(c.events_handled for c in checkpoints) == 2 * EVENTS_PER_RUN


# -- the event store on its own ----------------------------------------------------------


def test_basic(target: Target) -> None:
    output = target.run("basic/main.py")
    assert "2. Opening it twice fails: OptimisticConcurrencyError" in output
    assert "Carol withdraws $50.00: OptimisticConcurrencyError" in output
    assert "attempt 1: conflict" in output
    assert "attempt 2: appended at version 5" in output
    assert "Balance: $25.00" in output
    account = next(line.split()[1] for line in output.splitlines() if line.startswith("Account "))
    rows = target.rows(
        "SELECT aggregate_version, event_type FROM events WHERE aggregate_id = :id "
        "ORDER BY aggregate_version",
        id=account,
    )
    assert [tuple(r) for r in rows] == [
        (1, "AccountOpened"),
        (2, "MoneyDeposited"),
        (3, "MoneyWithdrawn"),
        (4, "MoneyDeposited"),
        (5, "MoneyWithdrawn"),
    ]


def test_sqlite_basic(target: Target) -> None:
    output = target.run("sqlite_basic/main.py")
    assert "15 reservations, 5 refusals" in output
    assert "Units left: 0" in output
    if target.dialect == "sqlite":
        assert "journal_mode=wal" in output
    (product,) = target.rows(
        "SELECT aggregate_id, version FROM aggregate_heads WHERE aggregate_type = 'Product'"
    )
    assert product.version == 16
    reserved = target.scalar(
        "SELECT count(*) FROM events WHERE event_type = 'UnitReserved' AND aggregate_id = :id",
        id=product.aggregate_id,
    )
    assert reserved == 15


# -- projections --------------------------------------------------------------------------


def test_single_worker_catches_up_then_follows_and_stops_on_sigint(target: Target) -> None:
    first = target.run("single_worker/main.py")
    assert "Caught up: handled 4 events in this run." in first
    assert "Subscribers: 2 active of 3" in first

    def handled() -> int:
        return int(
            target.scalar_or_none(
                "SELECT events_handled FROM projection_checkpoints "
                "WHERE projection_name = 'sw_subscriber_list'"
            )
            or 0
        )

    with target.start("single_worker/main.py", "--follow") as worker:
        worker.wait_for(lambda: handled() == 8, "it handled the second sample")
        worker.wait_for(lambda: "Following" in worker.output(), "it printed that it follows")
        output = worker.stop(signal.SIGINT)
    assert "Stopped." in output  # run() returned: the processor handled the signal
    assert "Traceback" not in output
    assert "Subscribers: 4 active of 6" in output
    assert target.scalar("SELECT count(*) FROM sw_subscribers") == 6
    assert target.scalar("SELECT count(*) FROM events WHERE bounded_context = 'newsletter'") == 8


def test_worker_pool(target: Target) -> None:
    output = target.run("worker_pool/main.py", "--workers", "4")
    assert "Total: 12 orders, 36 items" in output
    assert sum(output.count(f"[worker {key}]") for key in range(4)) == 36
    rows = target.rows("SELECT order_id, partition_key, items, version FROM wp_pick_lists")
    assert len(rows) == 12
    for order_id, partition_key, items, version in rows:
        assert fnv1a_32(order_id) % 4 == partition_key
        assert items == version == 3  # every event once, in version order
    checkpoints = target.checkpoints("wp_pick_lists")
    assert [c.total_partitions for c in checkpoints] == [4, 4, 4, 4]
    assert sum(c.events_handled for c in checkpoints) == 36
    if target.dialect == "sqlite":  # the library's check, the same on both databases
        refused = target.run("worker_pool/main.py", "--workers", "2", expect_code=2)
        assert "Total:" not in refused
        assert target.scalar("SELECT sum(items) FROM wp_pick_lists") == 36
        # Another partition count means a rebuild: every event again, exactly once.
        rebuilt = target.run("worker_pool/main.py", "--workers", "2", "--reset")
        assert "Total: 36 orders, 108 items" in rebuilt
        checkpoints = target.checkpoints("wp_pick_lists")
        assert [c.total_partitions for c in checkpoints] == [2, 2]
        assert sum(c.events_handled for c in checkpoints) == 108


def test_partitioned_launcher_handles_every_event_exactly_once(target: Target) -> None:
    output = target.run("partitioned/launcher.py")
    assert "CHECK OK: all 200 events handled exactly once by 4 partitions" in output
    events = {
        p
        for (p,) in target.rows(
            "SELECT global_position FROM events WHERE bounded_context = 'ledger'"
        )
    }
    handled = target.rows(
        "SELECT global_position, aggregate_id, partition_key, process_id FROM pt_handled_events"
    )
    assert len(events) == 200
    assert len(handled) == len(events)
    assert {row.global_position for row in handled} == events
    for row in handled:
        assert fnv1a_32(row.aggregate_id) % 4 == row.partition_key
    # Four processes, one per partition, did the work.
    owners = {(row.partition_key, row.process_id) for row in handled}
    assert sorted(key for key, _ in owners) == [0, 1, 2, 3]
    assert len({pid for _, pid in owners}) == 4
    assert [c.total_partitions for c in target.checkpoints("pt_ledger")] == [4, 4, 4, 4]


def test_scaling_workers_added_one_at_a_time_each_see_everything(target: Target) -> None:
    output = target.run(
        "scaling/main.py", "--workers", "3", "--step", "0.6", "--rate", "30", "--backlog", "40"
    )
    assert output.count("+ worker") == 3
    assert "OK: each of the 3 workers saw all" in output
    in_store = target.scalar("SELECT count(*) FROM events WHERE bounded_context = 'telemetry'")
    assert in_store >= 40
    counts = target.rows("SELECT projection, events FROM sc_worker_counts")
    assert len(counts) == 3
    assert all(events == in_store for _, events in counts)


def claimed_shares(output: str) -> list[tuple[int, dict[str, list[int]]]]:
    """The ownership lines of claimed_workers: (partition count, {worker: partitions})."""
    shares = []
    for line in output.splitlines():
        if not line.startswith("  t+"):
            continue
        count, owned = line.split(" partitions  ", 1)
        owners = {}
        for part in owned.split("  (")[0].split(" | "):
            label, keys = part.split(": ")
            owners[label] = [int(key) for key in keys.split()]
        shares.append((int(count.split()[-1]), owners))
    return shares


def check_claimed_run(target: Target, output: str, workers: int) -> None:
    """One run of claimed_workers: its narrative, and the database it leaves behind."""
    from eventsource.claims import partition_claims

    lines = output.splitlines()
    projection = next(line.split()[1] for line in lines if line.startswith("Projection "))
    projection = projection.rstrip(":")
    context = "metering_" + projection.removeprefix("cw_meter_readings_")
    pids = {}
    for line in lines:
        if line.startswith("+ started "):
            for started in line.removeprefix("+ started ").split(", "):
                label, pid = started.split(" (pid ")
                pids[label] = int(pid.rstrip(")"))
    first = [f"w{n}" for n in range(1, workers + 1)]
    joined, victim = f"w{workers + 1}", "w2"
    assert sorted(pids) == sorted([*first, joined])
    survivors = sorted(set(first) - {victim})

    # Who owned which partitions: every partition owned, fair shares, as workers came,
    # died (its leases held until they expired) and joined, then after the reshard.
    shares = claimed_shares(output)
    assert [count for count, _ in shares] == [12, 12, 12, 12, 6]
    expected = [first, first, survivors, [*survivors, joined], [*survivors, joined]]
    for (count, owners), labels in zip(shares, expected, strict=True):
        assert sorted(owners) == sorted(labels), shares
        assert sorted(k for keys in owners.values() for k in keys) == list(range(count))
        sizes = [len(keys) for keys in owners.values()]
        assert max(sizes) - min(sizes) <= 1, shares
    assert f"killed {victim} with SIGKILL" in output
    assert "resharded 12 -> 6 in " in output
    codes = ", ".join(f"{label} 0" for label in sorted([*survivors, joined]))
    assert f"(exit codes: {codes}); 6 of 6 partitions released" in output
    assert "exactly once: OK" in output
    assert "in order per meter: OK (24 meters)" in output

    # The read model: every event of the run once, in order per meter, by these workers.
    stored = {
        p
        for (p,) in target.rows(
            "SELECT global_position FROM events WHERE bounded_context = :context",
            context=context,
        )
    }
    produced = next(line for line in lines if line.startswith("- producer stopped after "))
    assert len(stored) == int(produced.split()[4]) > 0
    handled = target.rows(
        "SELECT global_position, times, worker_pid FROM cw_handled_events WHERE projection = :name",
        name=projection,
    )
    assert {row.global_position for row in handled} == stored
    assert len(handled) == len(stored)
    assert all(row.times == 1 for row in handled)
    by = {row.worker_pid for row in handled}
    assert by <= set(pids.values())
    assert pids[joined] in by  # the worker that joined got a share and used it
    meters = target.rows(
        "SELECT readings, last_version, out_of_order FROM cw_meters WHERE projection = :name",
        name=projection,
    )
    assert len(meters) == 24
    assert sum(m.readings for m in meters) == len(stored)
    assert all(m.out_of_order == 0 and m.last_version == m.readings for m in meters)

    # Resharded: 6 checkpoints and 6 claims, all released; no worker left registered.
    checkpoints = target.checkpoints(projection)
    assert [(c.partition_key, c.total_partitions) for c in checkpoints] == [
        (key, 6) for key in range(6)
    ]
    with target.engine.connect() as conn:
        claims = partition_claims(conn, projection=projection)
    assert [(c.partition_key, c.total_partitions, c.owner) for c in claims] == [
        (key, 6, None) for key in range(6)
    ]
    members = target.scalar(
        "SELECT count(*) FROM events_partition_workers WHERE projection_name = :name",
        name=projection,
    )
    assert members == 0


def test_claimed_workers_share_take_over_reshard_and_count_each_event_once(
    target: Target,
) -> None:
    output = target.run("claimed_workers/main.py")
    check_claimed_run(target, output, workers=3)
    if target.dialect == "sqlite":
        # A rerun on the same database: a new projection, 12 partitions again; options.
        again = target.run("claimed_workers/main.py", "--workers", "2", "--lease", "1.5")
        assert "(lease 1.5 s)" in again
        check_claimed_run(target, again, workers=2)
        assert target.scalar("SELECT count(DISTINCT projection) FROM cw_handled_events") == 2


def test_stop_resume_resumes_where_sigint_stopped_it(target: Target) -> None:
    script = "stop_resume/main.py"
    total = 300
    assert f"Appended {total} ParcelScanned events." in target.run(
        script, "--mode", "append", "--count", str(total)
    )

    def handled() -> int:
        return int(
            target.scalar_or_none(
                "SELECT events_handled FROM projection_checkpoints "
                "WHERE projection_name = 'sr_parcel_tracker'"
            )
            or 0
        )

    with target.start(script, "--mode", "process", "--delay", "0.02", "--batch-size", "10") as run:
        run.wait_for(lambda: handled() >= 20, "the checkpoint moved")
        output = run.stop(signal.SIGINT)
    assert "Stopped before the end" in output

    # The checkpoint says exactly what the read model holds: nothing half-done.
    (checkpoint,) = target.checkpoints("sr_parcel_tracker")
    scans = [p for (p,) in target.rows("SELECT global_position FROM sr_parcel_scans")]
    assert 20 <= checkpoint.events_handled < total
    assert checkpoint.events_handled == len(scans)
    assert checkpoint.global_position == max(scans)
    stored = sorted(p for (p,) in target.rows("SELECT global_position FROM events"))
    assert sorted(scans) == stored[: len(scans)]  # a prefix of the log, in order

    status = target.run(script, "--mode", "status")
    assert f"{checkpoint.events_handled} events handled" in status
    assert f"Still to process:            {total - len(scans)}" in status

    resumed = target.run(script, "--mode", "process", "--delay", "0")
    assert f"Handled {total - len(scans)} events in this run" in resumed
    assert "Caught up." in resumed
    scans = [p for (p,) in target.rows("SELECT global_position FROM sr_parcel_scans")]
    assert sorted(scans) == stored
    (checkpoint,) = target.checkpoints("sr_parcel_tracker")
    assert checkpoint.events_handled == total


def test_scoped_projections(target: Target) -> None:
    output = target.run("scoped_projections/main.py")
    assert output.count("[CustomerDirectory]") == 3
    assert output.count("[OrderBook]") == 3
    assert "  -> crm.CustomerRegistered x2" in output
    assert "Published 7 messages." in output
    assert "2 customers (1 gold), 1 shipped orders, 7 outbox messages" in output
    outbox = target.rows("SELECT global_position, topic, published FROM sp_outbox")
    events = target.rows("SELECT global_position, bounded_context, event_type FROM events")
    assert {(p, f"{bc}.{t}") for p, bc, t in events} == {(p, t) for p, t, _ in outbox}
    assert all(published for _, _, published in outbox)
    head = max(p for p, _, _ in events)
    for name in ("sp_customer_directory", "sp_order_book", "sp_outbox"):
        # Scoped projections' checkpoints move past the events they do not want.
        assert [c.global_position for c in target.checkpoints(name)] == [head]


def test_with_logging_emits_json_lines_with_structured_fields(target: Target) -> None:
    def caught_up() -> bool:
        rows = target.scalar_or_none(
            "SELECT count(*) FROM projection_checkpoints WHERE global_position = 25"
        )
        return bool(rows == 2)

    with target.start("with_logging/main.py", "--follow") as run:
        run.wait_for(caught_up, "both projections caught up")
        output = run.stop(signal.SIGTERM)
    records = [json.loads(line) for line in output.splitlines()]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    processor = [r for r in records if r["logger"] == "eventsource.processor"]
    started = [r for r in processor if "batch_size" in r]
    assert {(r["projection"], r["partition"], r["batch_size"]) for r in started} == {
        ("wl_wallet_balances", 0, 10),
        ("wl_large_top_up_alerts", 0, 25),
    }
    batches = [r for r in processor if "handled" in r]
    for record in batches:
        assert {"projection", "partition", "handled", "skipped", "checkpoint", "duration_ms"} <= (
            record.keys()
        )
    handled: dict[str, int] = {}
    for record in batches:
        handled[record["projection"]] = handled.get(record["projection"], 0) + record["handled"]
    assert handled == {"wl_wallet_balances": 25, "wl_large_top_up_alerts": 25}
    assert max(r["checkpoint"] for r in batches) == 25
    runner = [r for r in records if r["logger"] == "eventsource.runner"]
    assert any("SIGTERM" in r["message"] for r in runner)
    alerts = [r for r in records if r["logger"] == "payments" and r["message"] == "large top-up"]
    assert len(alerts) == 5
    assert all(r["cents"] >= 5_000 and r["wallet_id"].startswith("wallet-") for r in alerts)


def test_blue_green_switches_readers_to_a_caught_up_version(target: Target) -> None:
    output = target.run("blue_green/main.py")
    lines = output.splitlines()
    v1_reads = [line for line in lines if line.startswith("Readers use v1: ")]
    assert len(v1_reads) == 2
    assert "Bob-" in v1_reads[0]
    assert "$" not in v1_reads[0]
    assert "Switch refused, nothing changed: VersionNotCaughtUpError (lag 4)" in output
    assert "readers switched from v1 to v2; retired bg_customer_stats@v1" in output
    [v2_read] = [line for line in lines if line.startswith("Readers use v2: ")]
    assert "orders $120.25" in v2_read
    assert "ProjectionRetiredError: readers use version 2" in output
    # Readers read v2; v1's checkpoints and table are gone, v2's are at the head.
    assert target.rows(
        "SELECT projection_name, active_version, previous_version FROM events_projection_versions"
    ) == [("bg_customer_stats", 2, 1)]
    assert [c.global_position for c in target.checkpoints("bg_customer_stats@v1")] == []
    assert [c.global_position for c in target.checkpoints("bg_customer_stats@v2")] == [8]
    tables = set(sa.inspect(target.engine).get_table_names())
    assert "bg_customer_stats_v1" not in tables
    rows = target.rows("SELECT orders, spent_cents FROM bg_customer_stats_v2")
    assert sorted(tuple(row) for row in rows) == [(1, 899), (2, 3250), (2, 12025)]

    again = target.run("blue_green/main.py")
    assert "v2 is active since an earlier run" in again
    assert "v2 handled 8 new events." in again
    assert target.scalar("SELECT sum(spent_cents) FROM bg_customer_stats_v2") == 2 * 16174


# -- an application with its own Alembic ------------------------------------------------


def test_app_with_alembic(target: Target) -> None:
    if target.dialect == "sqlite":
        # This example's default is its own file, app_with_alembic.db.
        target = Target(
            sa.make_url(f"sqlite:///{target.cwd / 'app_with_alembic.db'}"), target.cwd, target.env
        )
    output = target.run("app_with_alembic/main.py")
    assert (
        "applied revisions: app0001 (app), es0001 (eventsource), es0002 (eventsource), "
        "es0003 (eventsource), es0004 (eventsource), es0005 (eventsource), es0006 (eventsource)"
    ) in output
    assert "Tickets: 2 open, 1 closed" in output
    output = target.run("app_with_alembic/main.py")
    assert "Tickets: 4 open, 2 closed" in output

    # One version table, the application's, holding its head and the library's (which its
    # first revision depends on; the library's later revisions are heads of their own).
    versions = sorted(v for (v,) in target.rows("SELECT version_num FROM alembic_version"))
    assert versions == ["app0001", "es0006"]
    tables = set(sa.inspect(target.engine).get_table_names())
    assert {"events", "aggregate_heads", "projection_checkpoints"} <= tables
    assert {"app_tickets", "app_agent_workload"} <= tables
    assert "eventsource_alembic_version" not in tables
    workload = dict(
        ((agent, (o, c)) for agent, o, c in target.rows("SELECT * FROM app_agent_workload"))
    )
    assert workload == {"sam": (2, 2), "kim": (2, 0)}
    target.engine.dispose()

    # The Alembic command line sees the same thing, and autogenerate finds nothing to do:
    # the migrations (the app's and the library's) match the models.
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-c",
            str(EXAMPLES / "app_with_alembic/alembic.ini"),
            "check",
        ],
        cwd=target.cwd,
        env={**target.env, "DATABASE_URL": target.url.render_as_string(hide_password=False)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_app_with_alembic_refuses_a_database_migrated_by_eventsource_upgrade(
    sqlite_url: sa.URL, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "app_with_alembic/main.py")],
        cwd=tmp_path,
        env=example_env(sqlite_url.render_as_string(hide_password=False)),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 1
    assert "Point DATABASE_URL at a database of its own" in result.stderr


def test_fastapi_app_demo_and_its_own_tests(target: Target, request: pytest.FixtureRequest) -> None:
    if target.dialect == "sqlite":
        # This example's default is its own file, fastapi_app.db.
        target = Target(
            sa.make_url(f"sqlite:///{target.cwd / 'fastapi_app.db'}"), target.cwd, target.env
        )
    output = target.run("fastapi_app/demo.py")
    assert "add tea: 200 {'version': 1, 'position': 1}" in output
    assert "add pot at a stale version: 409 {'error': 'version conflict', 'expected': 1" in output
    assert "read before the worker ran: 404" in output
    assert "worker handled 2 events" in output
    assert "read: 200 {'items': 2, 'total_cents': 1650}" in output
    assert target.scalar("SELECT item_count FROM cart_totals") == 2
    target.engine.dispose()

    # The example's own tests, with the async fixtures, on the same kind of database.
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if target.dialect == "postgresql":
        server: PostgresServer = request.getfixturevalue("pg_server")
        args += ["--eventsource-db-url", server.admin_url.render_as_string(hide_password=False)]
    env = {
        key: value
        for key, value in target.env.items()
        if not key.startswith(("PYTEST_", "EVENTSOURCE_TEST_")) and key != "DATABASE_URL"
    }
    tests = subprocess.run(
        args,
        cwd=EXAMPLES / "fastapi_app",
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout
