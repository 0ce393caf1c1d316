"""Blue/green rebuilds (eventsource.versions): a projection's new version builds beside
the running one, readers switch in one transaction, the old version is retired.

Everything runs on real SQLite files and real PostgreSQL databases; where order matters
the tests hold a batch open with a gate (a threading.Event in its handler).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import models, versions
from eventsource.projection import Projection
from tests.projection_support import append_spread, reader

NAME = "vt_stats"
#: v1 (unversioned, as existing applications are): events per aggregate.
V1_DDL = "CREATE TABLE vt_stats (aggregate_id TEXT PRIMARY KEY, events BIGINT NOT NULL)"
#: v2, a changed read model: also the last position seen.
V2_DDL = (
    "CREATE TABLE vt_stats_v2 (aggregate_id TEXT PRIMARY KEY, events BIGINT NOT NULL, "
    "last_position BIGINT NOT NULL)"
)


class StatsV1(Projection):
    name = NAME
    table = "vt_stats"
    #: Set by a test to hold a batch open (the handler waits for it).
    gate: ClassVar[threading.Event | None] = None
    entered: ClassVar[threading.Event] = threading.Event()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        if self.gate is not None:
            type(self).entered.set()
            assert self.gate.wait(30)
        updated = session.execute(
            sa.text(
                f"UPDATE {self.table_name(self.table)} SET events = events + 1 "
                "WHERE aggregate_id = :a"
            ),
            {"a": event.aggregate_id},
        )
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            session.execute(
                sa.text(f"INSERT INTO {self.table_name(self.table)} VALUES (:a, 1)"),
                {"a": event.aggregate_id},
            )


class StatsV2(Projection):
    name = NAME
    version = 2
    gate: ClassVar[threading.Event | None] = None
    entered: ClassVar[threading.Event] = threading.Event()
    retired: ClassVar[list[str]] = []

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        if self.gate is not None:
            type(self).entered.set()
            assert self.gate.wait(30)
        table = self.table_name("vt_stats")
        updated = session.execute(
            sa.text(
                f"UPDATE {table} SET events = events + 1, last_position = :p "
                "WHERE aggregate_id = :a"
            ),
            {"a": event.aggregate_id, "p": event.global_position},
        )
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            session.execute(
                sa.text(f"INSERT INTO {table} VALUES (:a, 1, :p)"),
                {"a": event.aggregate_id, "p": event.global_position},
            )


class RetiringStatsV1(StatsV1):
    """v1 with a retire() hook that drops its read model."""

    def retire(self, session: Session) -> None:
        session.execute(sa.text(f"DROP TABLE {self.table_name(self.table)}"))


@pytest.fixture(autouse=True)
def _no_gates() -> Iterator[None]:
    yield
    StatsV1.gate = StatsV2.gate = None
    StatsV1.entered.clear()
    StatsV2.entered.clear()


@pytest.fixture
def tables(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.exec_driver_sql(V1_DDL)
        conn.exec_driver_sql(V2_DDL)
    return engine


def catch_up(engine: sa.Engine, projection: Projection, batch_size: int = 100) -> int:
    config = es.ProcessorConfig(batch_size=batch_size, poll_interval=0.01)
    return es.Processor(engine, config=config).run_until_caught_up(projection)


def build_partly(engine: sa.Engine, projection: Projection, batch_size: int) -> int:
    """One batch with events in it (on PostgreSQL events can be held back a moment by
    transactions open elsewhere on the server: a lone process_batch may find none)."""
    processor = es.Processor(
        engine, config=es.ProcessorConfig(batch_size=batch_size, poll_interval=0.01)
    )

    def stop_after_one(result: es.BatchResult) -> None:
        if result.handled:
            processor.stop()

    return processor.run_until_caught_up(projection, on_batch=stop_after_one)


def total(engine: sa.Engine, table: str) -> int:
    with reader(engine).connect() as conn:
        return int(
            conn.execute(sa.text(f"SELECT coalesce(sum(events), 0) FROM {table}")).scalar_one()
        )


def checkpoint_names(engine: sa.Engine) -> set[str]:
    with reader(engine).connect() as conn:
        return set(
            conn.execute(sa.text("SELECT projection_name FROM projection_checkpoints")).scalars()
        )


def versions_rows(engine: sa.Engine) -> list[Any]:
    with reader(engine).connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT projection_name, active_version, previous_version "
                    "FROM events_projection_versions"
                )
            ).all()
        )


# -- naming ---------------------------------------------------------------------------


def test_a_version_names_its_checkpoints_and_tables() -> None:
    assert StatsV1().checkpoint_name == NAME
    assert StatsV1().table_name("vt_stats") == "vt_stats"
    assert StatsV2().checkpoint_name == "vt_stats@v2"
    assert StatsV2().table_name("vt_stats") == "vt_stats_v2"
    assert versions.table_name("vt_stats", 2) == "vt_stats_v2"
    assert versions.table_name("vt_stats", None) == "vt_stats"
    assert versions.parse_checkpoint_name("vt_stats@v2") == (NAME, 2)
    assert versions.parse_checkpoint_name("vt_stats") == (NAME, None)
    assert versions.parse_checkpoint_name("a@v0") == ("a@v0", None)
    assert "version=2" in repr(StatsV2())


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5])
def test_a_version_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(es.ConfigurationError, match="version must be None"):
        type("Bad", (Projection,), {"name": "x", "version": bad, "handle": StatsV1.handle})


def test_a_name_may_not_contain_the_version_separator() -> None:
    with pytest.raises(es.ConfigurationError, match="must not contain '@v'"):
        type("Bad", (Projection,), {"name": "x@v2", "handle": StatsV1.handle})


def test_the_versions_table_is_named_after_the_events_table() -> None:
    assert models.TableNames().projection_versions == "events_projection_versions"
    custom = models.TableNames(events="app_events")
    assert custom.projection_versions == "app_events_projection_versions"
    assert models.TableNames(events="a", projection_versions="mine").projection_versions == "mine"
    with pytest.raises(es.ConfigurationError, match="8 different tables"):
        models.TableNames(projection_versions="events")


# -- building beside, status -------------------------------------------------------------


def test_two_versions_build_side_by_side_with_their_own_checkpoints(tables: sa.Engine) -> None:
    engine = tables
    store = es.EventStore()
    append_spread(engine, store, 30, aggregates=3)
    runner = es.Runner(handle_signals=False)
    processors = [es.Processor(engine, config=es.ProcessorConfig(batch_size=7)) for _ in "ab"]
    handled = runner.run_until_caught_up([(StatsV1(), processors[0]), (StatsV2(), processors[1])])
    assert handled == {(NAME, 0): 30, ("vt_stats@v2", 0): 30}
    assert checkpoint_names(engine) == {NAME, "vt_stats@v2"}
    assert total(engine, "vt_stats") == total(engine, "vt_stats_v2") == 30

    rows = versions.status(engine)
    assert [(r.projection, r.version, r.active, r.lag, r.caught_up) for r in rows] == [
        (NAME, None, True, 0, True),
        (NAME, 2, False, 0, True),
    ]
    assert versions.active_version(engine, NAME) is None
    with Session(engine) as session:
        assert versions.active_version(session, NAME, default=1) == 1


def test_status_lists_a_declared_version_that_never_ran(tables: sa.Engine) -> None:
    engine = tables
    append_spread(engine, es.EventStore(), 5)
    catch_up(engine, StatsV1())
    assert versions.status(engine) == []  # nothing versioned yet: the plain status covers it
    [v1, v2] = versions.status(engine, projections=[StatsV1(), StatsV2()])
    assert (v1.version, v1.active, v1.lag, v1.partitions) == (None, True, 0, 1)
    assert (v2.version, v2.active, v2.lag, v2.partitions, v2.caught_up) == (2, False, 5, 0, False)
    assert v2.to_dict()["caught_up"] is False
    listed = {row.projection for row in es_status(engine, [StatsV2()])}
    assert "vt_stats@v2" in listed


def es_status(engine: sa.Engine, projections: list[Projection]) -> list[Any]:
    from eventsource.status import status

    return status(engine, projections=projections)


# -- switching ------------------------------------------------------------------------------


def test_a_switch_is_refused_until_the_new_version_caught_up(tables: sa.Engine) -> None:
    engine = tables
    append_spread(engine, es.EventStore(), 40)
    catch_up(engine, StatsV1())
    with pytest.raises(es.VersionNotCaughtUpError, match="has not run yet") as never:
        versions.switch(engine, NAME, 2)
    assert never.value.lag == 40

    assert build_partly(engine, StatsV2(), 15) == 15  # 15 of 40: half built
    with pytest.raises(es.VersionNotCaughtUpError, match="lags 25 event") as lagging:
        versions.switch(engine, NAME, 2)
    assert (lagging.value.projection, lagging.value.version, lagging.value.lag) == (NAME, 2, 25)
    # Nothing changed: no switch recorded, v1 keeps its checkpoints and readers.
    assert versions_rows(engine) == []
    assert checkpoint_names(engine) == {NAME, "vt_stats@v2"}
    assert versions.active_version(engine, NAME) is None

    catch_up(engine, StatsV2())
    result = versions.switch(engine, NAME, 2)
    assert result.switched
    assert (result.previous_version, result.retired, result.checkpoints_deleted) == (
        None,
        (NAME,),
        1,
    )
    assert "from unversioned to v2" in result.summary()
    assert versions.active_version(engine, NAME) == 2
    assert [tuple(row) for row in versions_rows(engine)] == [(NAME, 2, None)]
    assert checkpoint_names(engine) == {"vt_stats@v2"}
    # Again: nothing to do.
    again = versions.switch(engine, NAME, 2)
    assert not again.switched
    assert "already is the active one" in again.summary()


def test_a_switch_needs_every_partition_of_the_new_version(tables: sa.Engine) -> None:
    engine = tables
    append_spread(engine, es.EventStore(), 20)
    config = es.ProcessorConfig(total_partitions=2, partition_key=0)
    es.Processor(engine, config=config).run_until_caught_up(StatsV2())
    with pytest.raises(es.VersionNotCaughtUpError, match=r"partitions \[1\] of 2"):
        versions.switch(engine, NAME, 2)
    config = es.ProcessorConfig(total_partitions=2, partition_key=1)
    es.Processor(engine, config=config).run_until_caught_up(StatsV2())
    assert versions.switch(engine, NAME, 2).switched


def test_a_forced_switch_shows_readers_a_half_built_version(tables: sa.Engine) -> None:
    """Why the lag check exists (and that the reader invariant below can fail)."""
    engine = tables
    append_spread(engine, es.EventStore(), 30)
    catch_up(engine, StatsV1())
    assert build_partly(engine, StatsV2(), 10) == 10
    versions.switch(engine, NAME, 2, force=True)
    with reader(engine).connect() as conn:
        table = versions.table_name("vt_stats", versions.active_version(conn, NAME))
    assert table == "vt_stats_v2"
    assert total(engine, table) == 10 < 30


def test_the_switch_retires_the_old_version(tables: sa.Engine) -> None:
    engine = tables
    store = es.EventStore()
    append_spread(engine, store, 12)
    catch_up(engine, StatsV1())
    catch_up(engine, StatsV2())
    with engine.begin() as conn:  # a dead letter of each version
        for name in (NAME, "vt_stats@v2"):
            conn.execute(
                models.DEFAULT_TABLES.dead_letters.insert().values(
                    projection_name=name,
                    partition_key=0,
                    total_partitions=1,
                    global_position=1,
                    event_id=uuid.uuid4(),
                    bounded_context="sales",
                    aggregate_type="Order",
                    aggregate_id="agg-0",
                    aggregate_version=1,
                    event_type="Happened",
                    attempts=1,
                    created_at=datetime.now(UTC),
                )
            )
    result = versions.switch(engine, NAME, 2, retire=RetiringStatsV1())
    assert (result.checkpoints_deleted, result.dead_letters_deleted) == (1, 1)
    assert not sa.inspect(engine).has_table("vt_stats")  # the hook dropped v1's read model
    with reader(engine).connect() as conn:
        letters = (
            conn.execute(sa.text("SELECT projection_name FROM events_dead_letters")).scalars().all()
        )
    assert letters == ["vt_stats@v2"]

    # A v1 worker still deployed stops instead of replaying from scratch.
    with pytest.raises(es.ProjectionRetiredError, match="unversioned was retired"):
        catch_up(engine, StatsV1())
    assert checkpoint_names(engine) == {"vt_stats@v2"}
    # Versions only move forward.
    with pytest.raises(es.ProjectionRetiredError, match="only move forward"):
        versions.switch(engine, NAME, 1)
    # v2 carries on.
    append_spread(engine, store, 3)
    assert catch_up(engine, StatsV2()) == 3
    [row] = versions.status(engine)
    assert (row.version, row.active, row.lag, row.switched_at is not None) == (2, True, 0, True)


def test_retire_must_be_an_older_version_of_the_projection(tables: sa.Engine) -> None:
    with pytest.raises(es.ConfigurationError, match="retire= must be"):
        versions.switch(tables, NAME, 2, retire=StatsV2())
    with pytest.raises(es.ConfigurationError, match="an int >= 1"):
        versions.switch(tables, NAME, 0)


def test_the_switch_waits_for_the_old_versions_batch_in_hand(tables: sa.Engine) -> None:
    """Retiring never races a batch: the switch takes the old version's lock, so the
    batch in hand commits first (without it, its checkpoint would vanish under it)."""
    engine = tables
    append_spread(engine, es.EventStore(), 10)
    catch_up(engine, StatsV1())
    catch_up(engine, StatsV2())
    append_spread(engine, es.EventStore(), 1)
    catch_up(engine, StatsV2())  # v2 is at the head, v1 one event behind

    StatsV1.gate = threading.Event()
    batch_error: list[BaseException] = []

    def v1_batch() -> None:
        try:
            catch_up(engine, StatsV1())
        except BaseException as exc:
            batch_error.append(exc)

    batch = threading.Thread(target=v1_batch)
    batch.start()
    assert StatsV1.entered.wait(10)
    switched: list[versions.SwitchResult] = []
    switching = threading.Thread(target=lambda: switched.append(versions.switch(engine, NAME, 2)))
    switching.start()
    time.sleep(0.5)
    assert not switched  # it waits for the batch in hand
    assert versions.active_version(reader(engine), NAME) is None
    StatsV1.gate.set()
    batch.join(30)
    switching.join(30)
    assert batch_error == []  # the batch committed before the switch deleted its checkpoint
    assert switched
    assert switched[0].checkpoints_deleted == 1
    assert total(engine, "vt_stats") == 11


@pytest.mark.postgres
def test_a_switch_gives_up_after_wait_and_changes_nothing(pg_url: sa.URL) -> None:
    engine = es.create_engine(pg_url, pool_size=5)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(V1_DDL)
            conn.exec_driver_sql(V2_DDL)
        append_spread(engine, es.EventStore(), 5)
        catch_up(engine, StatsV2())
        append_spread(engine, es.EventStore(), 1)
        StatsV2.gate = threading.Event()
        batch_error: list[BaseException] = []

        def v2_batch() -> None:
            try:
                catch_up(engine, StatsV2())
            except BaseException as exc:
                batch_error.append(exc)

        batch = threading.Thread(target=v2_batch)
        batch.start()
        assert StatsV2.entered.wait(10), batch_error
        with pytest.raises(es.ProjectionBusyError):
            versions.switch(engine, NAME, 2, wait=0.3)
        assert versions_rows(engine) == []
        StatsV2.gate.set()
        batch.join(30)
        assert batch_error == []
        assert versions.switch(engine, NAME, 2).switched  # it caught up meanwhile
    finally:
        StatsV2.gate = None
        engine.dispose()


# -- readers never see a half-built version ---------------------------------------------------


def test_readers_never_see_a_half_built_version(tables: sa.Engine) -> None:
    """A reader resolves the active version and reads its table, over and over, while
    events are appended, v1 follows them, v2 builds in small batches, a premature switch
    is refused and the real one happens.

    Invariant: the total a reader sees never goes down, and never falls below the
    events v1 had applied before the reader started. A half-built v2 made active (the
    forced switch above) breaks both at once.
    """
    engine = tables
    store = es.EventStore()
    initial = 150
    append_spread(engine, store, initial)
    catch_up(engine, StatsV1())

    stop_reading = threading.Event()
    reads: list[tuple[int | None, int]] = []
    failures: list[BaseException] = []

    def read_forever() -> None:
        try:
            while not stop_reading.is_set():
                with reader(engine).connect() as conn, conn.begin():
                    version = versions.active_version(conn, NAME)
                    table = versions.table_name("vt_stats", version)
                    seen = conn.execute(
                        sa.text(f"SELECT coalesce(sum(events), 0) FROM {table}")
                    ).scalar_one()
                reads.append((version, int(seen)))
        except BaseException as exc:
            failures.append(exc)

    stop_writing = threading.Event()
    appended = [0]

    def write() -> None:
        try:
            while not stop_writing.is_set():
                append_spread(engine, store, 1, prefix="late")
                appended[0] += 1
                time.sleep(0.005)
        except BaseException as exc:
            failures.append(exc)

    v1_runner = es.Runner(handle_signals=False)
    v1_errors: list[BaseException] = []

    def follow_v1() -> None:
        try:
            config = es.ProcessorConfig(batch_size=10, poll_interval=0.01)
            v1_runner.run([(StatsV1(), es.Processor(engine, config=config))])
        except BaseException as exc:
            v1_errors.append(exc)

    threads = [
        threading.Thread(target=read_forever),
        threading.Thread(target=write),
        threading.Thread(target=follow_v1),
    ]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            build_partly(engine, StatsV2(), 20)  # 60 of at least 150: half built
        with pytest.raises(es.VersionNotCaughtUpError):
            versions.switch(engine, NAME, 2)
        time.sleep(0.2)
        stop_writing.set()
        threads[1].join(30)
        catch_up(engine, StatsV2(), batch_size=20)
        result = versions.switch(engine, NAME, 2)
        assert result.switched
        deadline = time.monotonic() + 30
        while sum(1 for version, _ in reads if version == 2) < 20:
            assert time.monotonic() < deadline, "the reader never saw version 2"
            time.sleep(0.01)
        # The v1 worker still running finds its checkpoint retired and stops.
        threads[2].join(30)
        assert not threads[2].is_alive()
        assert [type(exc) for exc in v1_errors] == [es.ProjectionRetiredError]
    finally:
        stop_writing.set()
        stop_reading.set()
        v1_runner.stop()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert appended[0] > 0
    final = initial + appended[0]
    versions_seen = [version for version, _ in reads]
    assert None in versions_seen
    assert 2 in versions_seen
    # Readers moved once, from v1 to v2, and never back.
    first_v2 = versions_seen.index(2)
    assert set(versions_seen[:first_v2]) == {None}
    assert set(versions_seen[first_v2:]) == {2}
    totals = [seen for _, seen in reads]
    assert min(totals) >= initial
    assert all(a <= b for a, b in itertools.pairwise(totals)), "a read went back"
    assert all(seen == final for version, seen in reads if version == 2)
    assert total(engine, "vt_stats_v2") == final


# -- the command line ---------------------------------------------------------------------


def test_the_cli_shows_versions_and_switches(tables: sa.Engine, tmp_path: Path) -> None:
    engine = tables
    append_spread(engine, es.EventStore(), 6)
    catch_up(engine, StatsV1())
    assert build_partly(engine, StatsV2(), 4) == 4
    url = engine.url.render_as_string(hide_password=False)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eventsource", "--database-url", url, *args],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    shown = run("versions", "status")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == [
        "PROJECTION",
        "VERSION",
        "READERS",
        "CHECKPOINT",
        "HEAD",
        "LAG",
        "PARTITIONS",
    ]
    assert lines[1].split()[:3] == [NAME, "-", "active"]
    assert lines[2].split() == [NAME, "v2", "building", "4", "6", "2", "1/1"]
    status = run("status")
    assert status.returncode == 0, status.stderr
    assert lines[2] in status.stdout  # below the partitions' table

    refused = run("versions", "switch", NAME, "2", "--yes")
    assert refused.returncode == 1
    assert "lags 2 event(s)" in refused.stderr
    assert versions.active_version(reader(engine), NAME) is None

    catch_up(engine, StatsV2())
    done = run("versions", "switch", NAME, "2", "--yes")
    assert done.returncode == 0, done.stderr
    assert "readers switched from unversioned to v2" in done.stdout
    assert versions.active_version(reader(engine), NAME) == 2


def test_the_cli_names_a_version_by_its_checkpoint_name(tables: sa.Engine, tmp_path: Path) -> None:
    """reset/rebuild --app take a version as NAME@vN; a bare NAME is the unversioned
    projection, or the only version the app defines, and is refused when ambiguous."""
    engine = tables
    append_spread(engine, es.EventStore(), 3)
    catch_up(engine, StatsV1())
    catch_up(engine, StatsV2())
    (tmp_path / "versioned_app.py").write_text(
        "from tests.test_versions import StatsV1, StatsV2\n\n\n"
        "class StatsV3(StatsV2):\n    version = 3\n\n\n"
        "ALL = [StatsV1(), StatsV2()]\nNEWER = [StatsV2(), StatsV3()]\n",
        encoding="utf-8",
    )
    url = engine.url.render_as_string(hide_password=False)
    root = str(Path(__file__).resolve().parent.parent)

    def reset(name: str, app: str = "versioned_app:ALL") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(sys.executable, "-m", "eventsource", "--database-url", url, "reset", name),
                *("--app", app, "--keep-read-model", "--yes"),
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": root},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    ambiguous = reset(NAME, "versioned_app:NEWER")
    assert ambiguous.returncode == 1, ambiguous.stderr
    assert f"several versions of {NAME!r} ({NAME}@v2, {NAME}@v3)" in ambiguous.stderr
    assert checkpoint_names(engine) == {NAME, f"{NAME}@v2"}

    done = reset(f"{NAME}@v2")
    assert done.returncode == 0, done.stderr
    assert checkpoint_names(engine) == {NAME}  # v1 untouched
    done = reset(NAME)
    assert done.returncode == 0, done.stderr
    assert checkpoint_names(engine) == set()
