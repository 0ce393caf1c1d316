"""Transaction ids from another cluster (DESIGN invariant 7): detection, refusal, rebase.

A restore into a cluster whose counter is behind is simulated on the shared server by
moving stored ids far above its counter in one UPDATE (whose transaction then marks
every row, as a restore's COPY does), and done for real: ``pg_dump`` from the shared
server, ``pg_restore`` into a throwaway cluster (tests/pg_cluster.py), and
``eventsource db rebase`` through the installed command. The server's counter passing
the restored ids later (before anyone rebases) is done by burning transaction ids; a
worker that kept running through the restore, by writing its batches by hand. Every
projection writes an insert-only read model keyed by (projection, event id), so an
event handled twice fails the batch, and one never handled is missing from it.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import cluster, horizon
from eventsource.status import status
from tests.conftest import PostgresServer
from tests.pg_cluster import (
    ClusterUnavailableError,
    find_bindir,
    server_major_version,
    throwaway_cluster,
)

#: Seconds any command may take.
TIMEOUT = 120
#: How far a simulated restore moves ids above the server's counter.
AHEAD = 10**9
#: How far behind the cluster of a restore that its counter later overtakes is (other
#: tests may use ids meanwhile: with a margin, the appends after it still get ids below).
MARGIN = 20_000

HANDLED_DDL = """
CREATE TABLE handled (
    projection TEXT NOT NULL,
    event_id UUID NOT NULL,
    global_position BIGINT NOT NULL,
    PRIMARY KEY (projection, event_id)
)
"""


class Recorder(es.Projection, abstract=True):
    """Writes one row per event it handles: a second time fails on the primary key."""

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(
            sa.text(
                "INSERT INTO handled (projection, event_id, global_position) "
                "VALUES (:projection, :event_id, :position)"
            ),
            {
                "projection": self.name,
                "event_id": event.event_id,
                "position": event.global_position,
            },
        )


class Everything(Recorder):
    name = "everything"


class AtAnId(Recorder):
    """Stopped inside one transaction's events (checkpoint exactly at its id)."""

    name = "at_an_id"


class Between(Recorder):
    """Stopped after an older transaction whose last event sits past a newer one's."""

    name = "between"


class Orders(Recorder):
    """Scoped: its checkpoint also moves past the events it does not want."""

    name = "orders"
    aggregate_types = ("Order",)


class Split(Recorder):
    """Two partitions: one caught up, the other one event in."""

    name = "split"


class Zero(Recorder):
    """Started before any event: a checkpoint at transaction id 0."""

    name = "zero"


class Late(Recorder):
    """Never started before the move."""

    name = "late"


class Running(Recorder):
    """A worker that kept running through the restore (its batches written by hand)."""

    name = "running"


ALL = (Everything(), AtAnId(), Between(), Orders(), Split(), Zero(), Late())


# -- helpers ------------------------------------------------------------------------


def event(aggregate_id: str, aggregate_type: str = "Order") -> es.Event:
    return es.Event(
        bounded_context="shop",
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type="Happened",
        payload={"n": aggregate_id},
    )


def published_horizon(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT last_value FROM events_horizon").scalar_one())


def set_published_horizon(engine: sa.Engine, value: int) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT setval('events_horizon', {value})")


def append(
    engine: sa.Engine,
    aggregate_id: str,
    n: int = 1,
    *,
    aggregate_type: str = "Order",
    expected: es.ExpectedVersion | None = None,
) -> es.AppendResult:
    with Session(engine) as session, session.begin():
        return es.EventStore().append(
            session, [event(aggregate_id, aggregate_type) for _ in range(n)], expected
        )


def processor(
    engine: sa.Engine, batch_size: int = 100, partition_key: int = 0, total_partitions: int = 1
) -> es.Processor:
    config = es.ProcessorConfig(
        batch_size=batch_size, partition_key=partition_key, total_partitions=total_partitions
    )
    return es.Processor(engine, es.EventStore(), config)


def build_history(engine: sa.Engine) -> None:
    """Events from out-of-order transactions, and projections stopped at telling places.

    Read order (transaction id, position): T1 o1 o1 | T2 o2 o4 | T3 o3 | T4 i1 | T5 o1,
    where T2 took its id before T3 but appended o4 after T3 committed o3.
    """
    with engine.begin() as conn:
        conn.exec_driver_sql(HANDLED_DDL)
    processor(engine).run_until_caught_up(Zero())  # checkpoint (0, 0)
    append(engine, "o1", 2)
    with Session(engine) as older, older.begin():
        es.EventStore().append(older, [event("o2")])
        append(engine, "o3")  # a newer transaction commits first
        es.EventStore().append(older, [event("o4")])
    append(engine, "i1", aggregate_type="Invoice")
    append(engine, "o1")
    processor(engine).run_until_caught_up(Everything())
    processor(engine, batch_size=3).process_batch(AtAnId())  # o1 o1 o2: mid-T2
    processor(engine, batch_size=4).process_batch(Between())  # all of T2, not T3's o3
    processor(engine).run_until_caught_up(Orders())
    processor(engine, partition_key=0, total_partitions=2).run_until_caught_up(Split())
    processor(engine, batch_size=1, partition_key=1, total_partitions=2).process_batch(Split())


def catch_up(engine: sa.Engine, projections: tuple[Recorder, ...] = ALL) -> None:
    for projection in projections:
        if isinstance(projection, Split):
            for key in (0, 1):
                processor(engine, partition_key=key, total_partitions=2).run_until_caught_up(
                    projection
                )
        else:
            processor(engine).run_until_caught_up(projection)


def assert_each_event_handled_once(
    engine: sa.Engine, projections: tuple[Recorder, ...] = ALL
) -> None:
    """Every projection has handled every event in its scope, once (the key forbids twice)."""
    with engine.connect() as conn:
        events = conn.exec_driver_sql("SELECT event_id, aggregate_type FROM events").all()
        handled = conn.exec_driver_sql("SELECT projection, event_id FROM handled").all()
    for projection in projections:
        wanted = {
            row.event_id
            for row in events
            if not projection.aggregate_types or row.aggregate_type in projection.aggregate_types
        }
        got = [row.event_id for row in handled if row.projection == projection.name]
        assert len(got) == len(set(got))
        assert set(got) == wanted, projection.name


def covered(engine: sa.Engine) -> dict[tuple[str, int], set[int]]:
    """Positions of the events each checkpoint covers, by the processors' rule."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            """SELECT c.projection_name, c.partition_key, e.global_position
               FROM projection_checkpoints c LEFT JOIN events e
               ON (e.transaction_id, e.global_position)
                  <= (CAST(CAST(c.transaction_id AS text) AS xid8), c.global_position)"""
        ).all()
    result: dict[tuple[str, int], set[int]] = {}
    for name, key, position in rows:
        result.setdefault((name, key), set())
        if position is not None:
            result[(name, key)].add(position)
    return result


def assert_versions_in_read_order(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT aggregate_id, aggregate_version FROM events "
            "ORDER BY transaction_id, global_position"
        ).all()
    last: dict[str, int] = {}
    for aggregate_id, version in rows:
        assert version == last.get(aggregate_id, 0) + 1, (aggregate_id, version)
        last[aggregate_id] = version


def stored_ids(engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    """Every stored transaction id, with the row's xmin (which changes on any write)."""
    with engine.connect() as conn:
        return {
            table: [
                tuple(row)
                for row in conn.exec_driver_sql(
                    f"SELECT *, xmin::text AS row_xmin FROM {table} ORDER BY 1, 2"
                )
            ]
            for table in ("events", "aggregate_heads", "projection_checkpoints", "events_cluster")
        }


def transaction_ids(engine: sa.Engine) -> dict[int, int]:
    """Each event position's stored transaction id."""
    with engine.connect() as conn:
        return {
            int(position): int(tx)
            for position, tx in conn.exec_driver_sql(
                "SELECT global_position, transaction_id::text FROM events"
            )
        }


def next_transaction_id(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"
            ).scalar_one()
        )


def restore_behind(engine: sa.Engine, *, cluster_id: int | None = 12345) -> int:
    """A restore into a cluster :data:`MARGIN` transactions behind: every stored id moves
    to at least this server's next one plus MARGIN. Returns the highest restored id."""
    lowest = min(transaction_ids(engine).values())
    simulate_restore(
        engine, cluster_id=cluster_id, ahead=next_transaction_id(engine) + MARGIN - lowest
    )
    return max(transaction_ids(engine).values())


def overtake(server: PostgresServer, engine: sa.Engine, restored_max: int) -> None:
    """This server's counter passes every restored id: none is ahead any more."""
    burn_transaction_ids(server, restored_max)
    assert next_transaction_id(engine) > restored_max


def batch_by_hand(engine: sa.Engine, projection: str, positions: list[int]) -> None:
    """Commit what one batch of a worker that kept running through the restore would:
    its read-model rows for ``positions`` (in its read order) and its checkpoint on the
    last one. Written directly, as a worker without today's checks did."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO handled (projection, event_id, global_position) "
                "SELECT :name, event_id, global_position FROM events "
                "WHERE global_position = ANY(:positions)"
            ),
            {"name": projection, "positions": positions},
        )
        conn.execute(
            sa.text(
                "UPDATE projection_checkpoints AS c "
                "SET transaction_id = e.transaction_id::text::bigint, "
                "global_position = e.global_position "
                "FROM events AS e WHERE e.global_position = :last "
                "AND c.projection_name = :name AND c.partition_key = 0"
            ),
            {"name": projection, "last": positions[-1]},
        )


def simulate_restore(
    engine: sa.Engine, *, from_id: int = 0, cluster_id: int | None = None, ahead: int = AHEAD
) -> None:
    """Ids at or above ``from_id`` jump ``ahead``, as if restored into a cluster that far behind.

    One transaction rewrites every row (moved or not), so all share its xmin, like the
    rows of a restore's COPY.
    """
    moved = (
        "CASE WHEN transaction_id::text::bigint >= :from_id "
        "THEN transaction_id::text::bigint + :ahead ELSE transaction_id::text::bigint END"
    )
    params = {"from_id": from_id, "ahead": ahead}
    with engine.begin() as conn:
        for table in ("events", "aggregate_heads"):
            conn.execute(
                sa.text(f"UPDATE {table} SET transaction_id = CAST(CAST({moved} AS text) AS xid8)"),
                params,
            )
        conn.execute(
            sa.text(
                "UPDATE projection_checkpoints SET transaction_id = CASE WHEN transaction_id "
                "<> 0 AND transaction_id >= :from_id THEN transaction_id + :ahead "
                "ELSE transaction_id END"
            ),
            params,
        )
        if cluster_id is not None:
            conn.execute(
                sa.text("UPDATE events_cluster SET system_identifier = :id"), {"id": cluster_id}
            )


def this_cluster(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql("SELECT system_identifier FROM pg_control_system()").scalar_one()
        )


def recorded_cluster(engine: sa.Engine) -> int | None:
    with engine.connect() as conn:
        value = conn.exec_driver_sql("SELECT system_identifier FROM events_cluster").scalar()
    return None if value is None else int(value)


def check(engine: sa.Engine, *, record: bool = True) -> None:
    with engine.begin() as conn:
        cluster.check(conn, es.EventStore().tables, record=record)


def entry_point() -> list[str]:
    """The installed ``eventsource`` console script (the one beside this interpreter)."""
    candidate = Path(sysconfig.get_path("scripts")) / "eventsource"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("eventsource")
    if found:
        return [found]
    pytest.fail("the `eventsource` console script is not installed (pip install -e .)")


def cli(url: sa.URL, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*entry_point(), "--database-url", url.render_as_string(hide_password=False), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# -- the mapping ----------------------------------------------------------------------


def test_mapped_ids_keep_every_comparison_with_a_checkpoint() -> None:
    rng = random.Random(7)
    for _ in range(200):
        checkpoints = sorted(set(rng.sample(range(1, 60), rng.randint(0, 8))))
        ids = range(1, 64)
        mapped = [cluster.mapped_id(t, checkpoints) for t in ids]
        assert mapped == sorted(mapped)  # order kept (ties only between checkpoint ids)
        assert min(mapped) >= cluster.BASE_ID
        assert max(mapped) <= cluster.BASE_ID + 2 * len(checkpoints)
        for t in ids:
            for c in checkpoints:
                new_t, new_c = cluster.mapped_id(t, checkpoints), cluster.mapped_id(c, checkpoints)
                assert (t < c, t == c, t > c) == (new_t < new_c, new_t == new_c, new_t > new_c)


# -- SQLite ---------------------------------------------------------------------------


def test_sqlite_has_nothing_to_check_or_rebase(sqlite_url: sa.URL) -> None:
    engine = es.create_engine(sqlite_url)
    try:
        append(engine, "o1")
        check(engine)
        result = cluster.rebase(engine)
        assert not result.rebased
        assert result.next_transaction_id is None
        assert "SQLite" in result.summary()
    finally:
        engine.dispose()
    done = cli(sqlite_url, "db", "rebase", "--yes")
    assert done.returncode == 0, done.stderr
    assert "nothing to rebase" in done.stdout


# -- detection ------------------------------------------------------------------------


@pytest.mark.postgres
def test_check_records_the_cluster_once(pg_engine: sa.Engine) -> None:
    check(pg_engine, record=False)
    assert recorded_cluster(pg_engine) is None  # record=False only reads
    check(pg_engine)
    assert recorded_cluster(pg_engine) == this_cluster(pg_engine)
    before = stored_ids(pg_engine)["events_cluster"]
    check(pg_engine)
    assert stored_ids(pg_engine)["events_cluster"] == before  # not rewritten


@pytest.mark.postgres
def test_a_move_with_consistent_ids_is_logged_and_recorded(
    pg_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    append(pg_engine, "o1")
    check(pg_engine)
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("UPDATE events_cluster SET system_identifier = 12345")
    with caplog.at_level(logging.WARNING, logger="eventsource.cluster"):
        check(pg_engine, record=False)
        assert not caplog.records  # a read-only check does not report it
        check(pg_engine)
    here = this_cluster(pg_engine)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"from PostgreSQL cluster 12345 to {here}" in record.getMessage()
    assert "consistent" in record.getMessage()
    assert recorded_cluster(pg_engine) == here
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eventsource.cluster"):
        check(pg_engine)
    assert not caplog.records
    append(pg_engine, "o1")  # nothing else changed


@pytest.mark.postgres
def test_ids_ahead_are_refused_everywhere(pg_engine: sa.Engine, pg_url: sa.URL) -> None:
    append(pg_engine, "o1", 2)
    append(pg_engine, "o2")
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(HANDLED_DDL)
    processor(pg_engine).run_until_caught_up(Everything())
    check(pg_engine)
    simulate_restore(pg_engine, cluster_id=12345)

    for record in (True, False):
        with pytest.raises(es.TransactionIdsAheadError, match="`eventsource db rebase`") as info:
            check(pg_engine, record=record)
        assert "recorded cluster 12345" in str(info.value)
    assert recorded_cluster(pg_engine) == 12345  # not re-recorded while ids are ahead
    with pytest.raises(es.TransactionIdsAheadError, match="eventsource db rebase"):
        status(pg_engine)
    # Appends to existing aggregates: the typed error, not an endless retryable conflict.
    for expected in (None, es.ExpectedVersion.any(), es.ExpectedVersion.exact(2)):
        with pytest.raises(es.TransactionIdsAheadError, match=r"o1.*eventsource db rebase"):
            append(pg_engine, "o1", expected=expected)
        with pytest.raises(es.TransactionIdsAheadError):
            append(pg_engine, "o1", 3, expected=expected)
    with pytest.raises(es.OptimisticConcurrencyError):  # a real conflict stays one
        append(pg_engine, "o1", expected=es.ExpectedVersion.exact(1))
    with pytest.raises(es.OptimisticConcurrencyError):
        append(pg_engine, "o2", expected=es.ExpectedVersion.no_stream())
    append(pg_engine, "n1")  # a new aggregate has no head to be ahead of
    # The command prints the one-line error and fails.
    done = cli(pg_url, "status")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "eventsource db rebase" in line
    assert "Traceback" not in done.stderr


# -- rebasing -------------------------------------------------------------------------


@pytest.mark.postgres
def test_rebase_keeps_every_projection_in_place(pg_engine: sa.Engine) -> None:
    build_history(pg_engine)
    check(pg_engine)
    before = covered(pg_engine)
    ids = transaction_ids(pg_engine)
    # T3's id and newer jump ahead; T1's and T2's stay below the counter (as rows of
    # the old cluster can), so the mapping has to place both kinds.
    simulate_restore(pg_engine, from_id=ids[4], cluster_id=12345)
    appended_since = append(pg_engine, "n1").events[0].global_position
    assert appended_since == 8
    kept_id = transaction_ids(pg_engine)[8]
    with pytest.raises(es.TransactionIdsAheadError):
        check(pg_engine)

    result = cluster.rebase(pg_engine)

    with pg_engine.connect() as conn:
        checkpoints = conn.exec_driver_sql(
            "SELECT count(*) FROM projection_checkpoints WHERE transaction_id <> 0"
        ).scalar_one()
    assert result.rebased
    assert (result.events, result.kept_events) == (7, 1)
    assert result.projection_checkpoints == checkpoints
    assert result.aggregate_heads == 3  # o1, o3, i1 (o2 and o4 were T2's)
    assert result.highest_before is not None
    assert result.highest_before > AHEAD
    assert "every projection keeps its place" in result.summary()
    check(pg_engine)
    assert recorded_cluster(pg_engine) == this_cluster(pg_engine)
    assert covered(pg_engine) == before  # the event appended since is after every one
    after = transaction_ids(pg_engine)
    assert after[8] == kept_id
    assert kept_id > max(after[p] for p in range(1, 8))
    assert max(after[p] for p in range(1, 8)) <= cluster.BASE_ID + 2 * checkpoints
    assert_versions_in_read_order(pg_engine)
    with pg_engine.connect() as conn:
        # The heads that were ahead carry their aggregate's last event's id again.
        assert not conn.exec_driver_sql(
            """SELECT 1 FROM aggregate_heads h
               WHERE h.aggregate_id IN ('o1', 'o3', 'i1') AND h.transaction_id <> (
                   SELECT e.transaction_id FROM events e
                   WHERE (e.bounded_context, e.aggregate_type, e.aggregate_id)
                       = (h.bounded_context, h.aggregate_type, h.aggregate_id)
                   ORDER BY e.aggregate_version DESC LIMIT 1)"""
        ).all()

    written = stored_ids(pg_engine)
    again = cluster.rebase(pg_engine)
    assert not again.rebased
    assert "nothing to rebase" in again.summary()
    assert stored_ids(pg_engine) == written  # idempotent: nothing rewritten

    append(pg_engine, "o1")  # the aggregate whose head was ahead takes appends again
    append(pg_engine, "o4", expected=es.ExpectedVersion.exact(1))
    catch_up(pg_engine)
    assert_each_event_handled_once(pg_engine)
    assert all(row.lag == 0 for row in status(pg_engine))


@pytest.mark.postgres
def test_restored_rows_after_the_last_ahead_one_stay_covered(pg_engine: sa.Engine) -> None:
    """The restore's xmin marks rows whose ids are not ahead but whose positions are last."""
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(HANDLED_DDL)
    with Session(pg_engine) as older, older.begin():
        es.EventStore().append(older, [event("o2")])
        append(pg_engine, "o3")
        es.EventStore().append(older, [event("o4")])  # the last position, the older id
    processor(pg_engine).run_until_caught_up(Everything())
    before = covered(pg_engine)
    ids = transaction_ids(pg_engine)
    assert ids[3] < ids[2]
    simulate_restore(pg_engine, from_id=ids[2])  # only o3 is ahead
    append(pg_engine, "n1")

    with pg_engine.begin() as conn:  # the caller's transaction
        result = cluster.rebase(conn)
        assert conn.in_transaction()
    assert (result.events, result.kept_events) == (3, 1)
    assert covered(pg_engine) == before
    assert processor(pg_engine).run_until_caught_up(Everything()) == 1  # only n1


# -- a counter that overtook the restored ids; workers that kept running ---------------


def nonzero_checkpoints(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM projection_checkpoints WHERE transaction_id <> 0"
            ).scalar_one()
        )


def checkpoint_of(engine: sa.Engine, name: str) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT transaction_id, global_position FROM projection_checkpoints "
                "WHERE projection_name = :name AND partition_key = 0"
            ),
            {"name": name},
        ).one()
    return int(row[0]), int(row[1])


@pytest.mark.postgres
def test_restored_ids_the_counter_overtook_are_still_refused_then_rebased(
    pg_server: PostgresServer, pg_engine: sa.Engine, pg_url: sa.URL
) -> None:
    """Appends to new aggregates go on while workers are refused; once the counter passes
    the restored ids, those events still sort before the restored checkpoints."""
    build_history(pg_engine)
    check(pg_engine)
    before = covered(pg_engine)
    restored_max = restore_behind(pg_engine)
    with pytest.raises(es.TransactionIdsAheadError):
        check(pg_engine)
    appended = [append(pg_engine, f"n{i}").events[0].global_position for i in range(5)]
    ids = transaction_ids(pg_engine)
    assert max(ids[p] for p in appended) < min(ids[p] for p in range(1, 8))
    overtake(pg_server, pg_engine, restored_max)  # a crash-looping supervisor, much later

    for record in (True, False):
        with pytest.raises(es.TransactionIdsAheadError, match="`eventsource db rebase`") as info:
            check(pg_engine, record=record)
        assert "recorded cluster 12345" in str(info.value)
        assert "'everything'" in str(info.value)
    assert recorded_cluster(pg_engine) == 12345  # not re-recorded as consistent
    with pytest.raises(es.TransactionIdsAheadError, match="eventsource db rebase"):
        status(pg_engine)  # instead of showing no lag
    with pytest.raises(es.TransactionIdsAheadError, match="eventsource db rebase"):
        processor(pg_engine).run_until_caught_up(Everything())
    done = cli(pg_url, "status")
    assert done.returncode == 1
    assert "eventsource db rebase" in done.stderr

    result = cluster.rebase(pg_engine)

    assert (result.events, result.kept_events, result.kept_checkpoints) == (7, 5, 0)
    assert result.projection_checkpoints == nonzero_checkpoints(pg_engine)
    check(pg_engine)
    assert recorded_cluster(pg_engine) == this_cluster(pg_engine)
    assert covered(pg_engine) == before  # none covers an event appended since
    after = transaction_ids(pg_engine)
    assert all(after[p] == ids[p] for p in appended)  # kept, after every restored one
    assert max(after[p] for p in range(1, 8)) < min(after[p] for p in appended)
    assert_versions_in_read_order(pg_engine)
    catch_up(pg_engine)
    assert_each_event_handled_once(pg_engine)
    assert all(row.lag == 0 for row in status(pg_engine))
    assert not cluster.rebase(pg_engine).rebased


@pytest.mark.postgres
def test_a_checkpoint_on_events_appended_since_the_restore_keeps_its_place(
    pg_server: PostgresServer, pg_engine: sa.Engine
) -> None:
    """A worker that kept running read past every restored event onto ones appended
    since: its checkpoint already means the same after the rebase, so it is not moved."""
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(HANDLED_DDL)
    projections = (Everything(), Running())
    processor(pg_engine).run_until_caught_up(Running())  # (0, 0): kept running since
    append(pg_engine, "o1", 2)
    append(pg_engine, "o2")
    processor(pg_engine).run_until_caught_up(Everything())
    check(pg_engine)
    restored_max = restore_behind(pg_engine)
    below = append(pg_engine, "n0").events[0].global_position  # an id below the restored
    overtake(pg_server, pg_engine, restored_max)
    above = append(pg_engine, "n1").events[0].global_position
    # Its reads once nothing was ahead, in (id, position) order: n0, o1, o1, o2, n1.
    batch_by_hand(pg_engine, "running", [below, 1, 2, 3, above])
    running = checkpoint_of(pg_engine, "running")
    assert running[1] == above
    # By (id, position), Everything's restored checkpoint is past n0, which it never read.
    assert covered(pg_engine)[("everything", 0)] == {1, 2, 3, below}
    with pytest.raises(es.TransactionIdsAheadError, match="'everything'"):
        check(pg_engine)

    result = cluster.rebase(pg_engine)

    assert (result.events, result.kept_events) == (3, 2)
    assert (result.projection_checkpoints, result.kept_checkpoints) == (1, 1)
    assert "kept 1 checkpoint(s)" in result.summary()
    assert checkpoint_of(pg_engine, "running") == running  # exactly where it was
    assert covered(pg_engine) == {
        ("everything", 0): {1, 2, 3},  # what it handled
        ("running", 0): {1, 2, 3, below, above},
    }
    check(pg_engine)
    catch_up(pg_engine, projections)
    assert_each_event_handled_once(pg_engine, projections)


@pytest.mark.postgres
def test_a_worker_that_read_events_appended_during_the_restore_is_refused_cleanly(
    pg_engine: sa.Engine, pg_url: sa.URL
) -> None:
    """The review's case: with restored ids still ahead, a running worker handled events
    appended since. Its checkpoint covers those but not the restored events ahead of it,
    while another projection's covers those restored ones but not the new: no order of
    the events keeps both places, so the rebase refuses, writing nothing."""
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(HANDLED_DDL)
    projections = (Everything(), Running())
    first = append(pg_engine, "o1").events[0]
    processor(pg_engine).run_until_caught_up(Running())
    append(pg_engine, "o2")
    processor(pg_engine).run_until_caught_up(Everything())
    check(pg_engine)
    # o2's id and the checkpoint on it jump ahead; o1's and Running's stay below.
    simulate_restore(pg_engine, from_id=transaction_ids(pg_engine)[2])
    assert checkpoint_of(pg_engine, "running")[0] == transaction_ids(pg_engine)[1]
    appended = [append(pg_engine, f"n{i}").events[0].global_position for i in (1, 2, 3)]
    batch_by_hand(pg_engine, "running", appended)  # handled 3, 4, 5; its checkpoint on 5
    written = stored_ids(pg_engine)

    with pytest.raises(
        es.TransactionIdsAheadError,
        match=r"cannot rebase.*'running' partition 0.*eventsource reset running.*nothing was",
    ):
        cluster.rebase(pg_engine)
    assert stored_ids(pg_engine) == written
    done = cli(pg_url, "db", "rebase", "--yes")
    assert done.returncode == 1
    assert "'running' partition 0" in done.stderr
    assert stored_ids(pg_engine) == written

    # What the message says: reset it (checkpoint and read model), rebase, replay.
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM projection_checkpoints WHERE projection_name = 'running'")
        conn.exec_driver_sql("DELETE FROM handled WHERE projection = 'running'")
    result = cluster.rebase(pg_engine)
    assert (result.events, result.kept_events, result.kept_checkpoints) == (2, 3, 0)
    check(pg_engine)
    assert first.global_position == 1
    catch_up(pg_engine, projections)
    assert_each_event_handled_once(pg_engine, projections)


@pytest.mark.postgres
def test_a_worker_stopped_on_a_restored_event_after_new_ones_is_refused_cleanly(
    pg_server: PostgresServer, pg_engine: sa.Engine
) -> None:
    """Running once the counter had overtaken the restored ids, a worker read an event
    appended since (its id is lower) and stopped on a restored one: rebasing the restored
    ids below every new one would make it read that event again."""
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(HANDLED_DDL)
    processor(pg_engine).run_until_caught_up(Running())
    append(pg_engine, "o1")
    append(pg_engine, "o2")
    processor(pg_engine).run_until_caught_up(Everything())
    check(pg_engine)
    restored_max = restore_behind(pg_engine)
    below = append(pg_engine, "n0").events[0].global_position
    overtake(pg_server, pg_engine, restored_max)
    batch_by_hand(pg_engine, "running", [below, 1])  # n0, then o1: stopped on o1
    written = stored_ids(pg_engine)
    with pytest.raises(
        es.TransactionIdsAheadError, match=r"cannot rebase.*'running' partition 0.*nothing was"
    ):
        cluster.rebase(pg_engine)
    assert stored_ids(pg_engine) == written


def simulate_restore_row_by_row(engine: sa.Engine, *, from_id: int) -> None:
    """As ``pg_dump --inserts`` restored without ``--single-transaction``: each event
    row inserted by a transaction of its own (ids at or above ``from_id`` moved ahead)."""
    moved = (
        "CAST(CAST(CASE WHEN transaction_id::text::bigint >= :from_id "
        "THEN transaction_id::text::bigint + :ahead ELSE transaction_id::text::bigint END "
        "AS text) AS xid8)"
    )
    params = {"from_id": from_id, "ahead": AHEAD}
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE dumped AS SELECT * FROM events")
        conn.execute(sa.text(f"UPDATE dumped SET transaction_id = {moved}"), params)
        conn.execute(sa.text(f"UPDATE aggregate_heads SET transaction_id = {moved}"), params)
        conn.execute(
            sa.text(
                "UPDATE projection_checkpoints SET transaction_id = transaction_id + :ahead "
                "WHERE transaction_id <> 0 AND transaction_id >= :from_id"
            ),
            params,
        )
        conn.exec_driver_sql("DELETE FROM events")
        positions = conn.exec_driver_sql("SELECT global_position FROM dumped").scalars().all()
    for position in positions:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO events SELECT * FROM dumped WHERE global_position = :p"),
                {"p": position},
            )
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE dumped")


def out_of_order_history(engine: sa.Engine) -> None:
    """o2 o3 o4, where o4 (the last position) has the older id, o2's; all handled."""
    with engine.begin() as conn:
        conn.exec_driver_sql(HANDLED_DDL)
    with Session(engine) as older, older.begin():
        es.EventStore().append(older, [event("o2")])
        append(engine, "o3")
        es.EventStore().append(older, [event("o4")])
    processor(engine).run_until_caught_up(Everything())
    ids = transaction_ids(engine)
    assert ids[3] == ids[1] < ids[2]


@pytest.mark.postgres
def test_events_restored_one_transaction_per_row_are_refused(pg_engine: sa.Engine) -> None:
    """Restored rows are told from later ones by the restore's xmin: with a transaction
    per row o4 (restored, its id not ahead) looks like n1 (appended since), so the
    rebase says so instead of misplacing it."""
    out_of_order_history(pg_engine)
    simulate_restore_row_by_row(pg_engine, from_id=transaction_ids(pg_engine)[2])  # o3
    append(pg_engine, "n1")
    written = stored_ids(pg_engine)
    with pytest.raises(
        es.TransactionIdsAheadError, match=r"more than one transaction.*--single-transaction"
    ):
        cluster.rebase(pg_engine)
    assert stored_ids(pg_engine) == written


@pytest.mark.postgres
def test_events_restored_row_by_row_with_none_appended_since_are_rebased(
    pg_engine: sa.Engine,
) -> None:
    """When the last event's id is ahead too, no event follows the restored ones to be
    told apart: every event came with the restore (into a cluster far behind, the usual
    case), and the rebase goes ahead."""
    out_of_order_history(pg_engine)
    before = covered(pg_engine)
    simulate_restore_row_by_row(pg_engine, from_id=0)  # every id ahead
    result = cluster.rebase(pg_engine)
    assert (result.events, result.kept_events, result.projection_checkpoints) == (3, 0, 1)
    assert covered(pg_engine) == before
    check(pg_engine)
    append(pg_engine, "n1")
    assert processor(pg_engine).run_until_caught_up(Everything()) == 1


@pytest.mark.postgres
def test_rebase_with_nothing_ahead_writes_nothing(pg_engine: sa.Engine) -> None:
    build_history(pg_engine)
    check(pg_engine)
    written = stored_ids(pg_engine)
    result = cluster.rebase(pg_engine)
    assert not result.rebased
    assert result.kept_events == 0
    assert result.next_transaction_id is not None
    assert stored_ids(pg_engine) == written


@pytest.mark.postgres
def test_only_heads_ahead_are_given_their_last_events_id(pg_engine: sa.Engine) -> None:
    append(pg_engine, "o1", 2)
    append(pg_engine, "o2")
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE aggregate_heads SET transaction_id = CAST(CAST("
            f"transaction_id::text::bigint + {AHEAD} AS text) AS xid8) WHERE aggregate_id = 'o1'"
        )
    events = stored_ids(pg_engine)["events"]
    result = cluster.rebase(pg_engine)
    assert (result.events, result.aggregate_heads, result.projection_checkpoints) == (0, 1, 0)
    assert stored_ids(pg_engine)["events"] == events
    append(pg_engine, "o1", expected=es.ExpectedVersion.exact(2))


@pytest.mark.postgres
def test_rebase_refuses_when_the_new_ids_do_not_fit(pg_engine: sa.Engine, pg_url: sa.URL) -> None:
    build_history(pg_engine)
    simulate_restore(pg_engine)
    append(pg_engine, "n1")
    with pg_engine.begin() as conn:
        # As if this cluster had handed out only a few ids before that append, fewer
        # than the distinct checkpoint ids need below it (each needs two).
        conn.exec_driver_sql("UPDATE events SET transaction_id = '5' WHERE aggregate_id = 'n1'")
    written = stored_ids(pg_engine)
    with pytest.raises(es.TransactionIdsAheadError, match=r"cannot rebase.*nothing was written"):
        cluster.rebase(pg_engine)
    assert stored_ids(pg_engine) == written
    done = cli(pg_url, "db", "rebase", "--yes")
    assert done.returncode == 1
    assert "cannot rebase" in done.stderr
    assert "events appended since the restore already use ids from 5" in done.stderr
    assert stored_ids(pg_engine) == written


@pytest.mark.postgres
def test_checkpoints_ahead_without_any_event_ahead_are_refused(pg_engine: sa.Engine) -> None:
    append(pg_engine, "o1")
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO projection_checkpoints (projection_name, partition_key, "
            f"total_partitions, transaction_id, global_position, updated_at) "
            f"VALUES ('p', 0, 1, {AHEAD} + pg_snapshot_xmax(pg_current_snapshot())::text::bigint,"
            " 1, now())"
        )
    written = stored_ids(pg_engine)
    with pytest.raises(es.TransactionIdsAheadError, match=r"'p' partition 0.*no stored event"):
        cluster.rebase(pg_engine)
    assert stored_ids(pg_engine) == written


@pytest.mark.postgres
def test_rebase_command_needs_confirmation(pg_url: sa.URL, pg_engine: sa.Engine) -> None:
    done = cli(pg_url, "db", "rebase")
    assert done.returncode == 2
    assert "--yes" in done.stderr
    done = cli(pg_url, "db", "rebase", "--yes")
    assert done.returncode == 0, done.stderr
    assert "nothing to rebase" in done.stdout


# -- a real dump and restore into another cluster -------------------------------------


@pytest.fixture(scope="module")
def other_cluster(pg_server: PostgresServer) -> Iterator[tuple[Path, sa.Engine]]:
    """A throwaway cluster (its binaries can dump the shared server) and an admin engine."""
    bindir = find_bindir()
    if bindir is None or not (bindir / "pg_dump").is_file():
        reason = "no PostgreSQL server binaries (initdb, pg_ctl, pg_dump) to start a cluster"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with pg_server.admin.connect() as conn:
        shared_major = int(conn.exec_driver_sql("SHOW server_version_num").scalar_one()) // 10000
    if server_major_version(bindir) < shared_major:
        pytest.skip(f"pg_dump in {bindir} is older than the shared server ({shared_major})")
    try:
        with throwaway_cluster(bindir) as other:
            admin = sa.create_engine(other.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
            try:
                yield bindir, admin
            finally:
                admin.dispose()
    except ClusterUnavailableError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def burn_transaction_ids(server: PostgresServer | sa.Engine, until: int) -> None:
    """Advance a server's counter past ``until`` (one id per committed loop); an Engine
    must be in autocommit mode."""
    admin = server.admin if isinstance(server, PostgresServer) else server
    with admin.connect() as conn:  # autocommit: the DO block may COMMIT
        conn.exec_driver_sql("SET synchronous_commit = off")
        while True:
            next_id = int(
                conn.exec_driver_sql(
                    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"
                ).scalar_one()
            )
            if next_id > until:
                return
            count = min(until - next_id + 1, 20_000)
            conn.exec_driver_sql(
                f"DO $$ BEGIN FOR i IN 1..{count} LOOP "
                "PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
            )


def libpq_url(url: sa.URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def dump_and_restore(
    bindir: Path, source: sa.URL, other_admin: sa.Engine, tmp_path: Path
) -> sa.URL:
    """``pg_dump -Fc`` the source database, ``pg_restore`` it into a new database of the
    other cluster (one COPY per table, as by default); returns that database's URL."""
    dump = tmp_path / "store.dump"
    subprocess.run(
        [str(bindir / "pg_dump"), "-Fc", "-f", str(dump), "--dbname", libpq_url(source)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    name = f"es_restored_{uuid.uuid4().hex[:8]}"
    with other_admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    restored_url = other_admin.url.set(database=name)
    subprocess.run(
        [
            str(bindir / "pg_restore"),
            "--no-owner",
            "--exit-on-error",
            "--dbname",
            libpq_url(restored_url),
            str(dump),
        ],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    return restored_url


@pytest.mark.postgres
def test_dump_restore_into_a_cluster_behind_then_rebase(
    pg_server: PostgresServer,
    pg_url: sa.URL,
    pg_engine: sa.Engine,
    other_cluster: tuple[Path, sa.Engine],
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    bindir, other_admin = other_cluster
    # The shared server's ids must be ahead of everything the other cluster will hand
    # out during the test (a restore takes a few dozen).
    burn_transaction_ids(pg_server, next_transaction_id(other_admin) + 5_000)
    build_history(pg_engine)
    # A reader publishes its reading horizon (the dump carries it; see eventsource.horizon).
    horizon.for_store(pg_engine, es.EventStore().tables.names).compute(pg_engine)
    check(pg_engine)
    shared_cluster = this_cluster(pg_engine)
    assert recorded_cluster(pg_engine) == shared_cluster
    expected_covered = covered(pg_engine)
    pg_engine.dispose()
    restored_url = dump_and_restore(bindir, pg_url, other_admin, tmp_path)
    engine = es.create_engine(restored_url)
    try:
        assert this_cluster(engine) != shared_cluster
        assert recorded_cluster(engine) == shared_cluster
        # Before the rebase: refused, loudly, with the fix.
        with pytest.raises(es.TransactionIdsAheadError, match="`eventsource db rebase`"):
            check(engine)
        with pytest.raises(es.TransactionIdsAheadError, match="eventsource db rebase"):
            status(engine)
        with pytest.raises(es.TransactionIdsAheadError):
            append(engine, "o1")
        with pytest.raises(es.TransactionIdsAheadError):
            append(engine, "o3", expected=es.ExpectedVersion.exact(1))
        # The reading horizon the old cluster's readers published came with the dump,
        # ahead of this server's ids: new aggregates are refused too (eventsource.horizon).
        restored_horizon = published_horizon(engine)
        with pytest.raises(es.TransactionIdsAheadError, match="published reading horizon"):
            append(engine, "n1", 2)
        # Without one (a store whose readers never published one), new aggregates still
        # take appends, which the rebase keeps as they are.
        set_published_horizon(engine, 0)
        append(engine, "n1", 2)
        set_published_horizon(engine, restored_horizon)

        done = cli(restored_url, "db", "rebase", "--yes")
        assert done.returncode == 0, done.stderr
        assert "rebased the transaction ids of 7 event(s)" in done.stdout
        assert "kept 2 event(s)" in done.stdout

        check(engine)
        assert recorded_cluster(engine) == this_cluster(engine)
        # Brought down to this server's next id, no lower (see cluster.rebase).
        assert published_horizon(engine) < restored_horizon
        assert published_horizon(engine) <= next_transaction_id(engine)
        assert covered(engine) == expected_covered
        assert_versions_in_read_order(engine)
        append(engine, "o1")
        append(engine, "o3", expected=es.ExpectedVersion.exact(1))
        append(engine, "n2")
        catch_up(engine)
        assert_each_event_handled_once(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM events").scalar_one() == 12
        assert all(row.lag == 0 for row in status(engine))
        again = cli(restored_url, "db", "rebase", "--yes")
        assert again.returncode == 0, again.stderr
        assert "nothing to rebase" in again.stdout
    finally:
        engine.dispose()
    assert time.monotonic() - started < 60


@pytest.mark.postgres
def test_dump_restore_into_a_cluster_behind_overtaken_before_the_rebase(
    pg_server: PostgresServer,
    pg_url: sa.URL,
    pg_engine: sa.Engine,
    other_cluster: tuple[Path, sa.Engine],
    tmp_path: Path,
) -> None:
    """For real: events appended while the restored ids were ahead, then the counter
    passed them all before anyone ran the rebase."""
    bindir, other_admin = other_cluster
    burn_transaction_ids(pg_server, next_transaction_id(other_admin) + 5_000)
    build_history(pg_engine)
    check(pg_engine)
    expected_covered = covered(pg_engine)
    pg_engine.dispose()
    restored_url = dump_and_restore(bindir, pg_url, other_admin, tmp_path)
    engine = es.create_engine(restored_url)
    try:
        restored_max = max(transaction_ids(engine).values())
        with pytest.raises(es.TransactionIdsAheadError):
            check(engine)
        set_published_horizon(engine, 0)  # as test_dump_restore_into_a_cluster_behind_then_rebase
        append(engine, "n1", 2)
        burn_transaction_ids(other_admin, restored_max)
        assert next_transaction_id(engine) > restored_max

        with pytest.raises(es.TransactionIdsAheadError, match="`eventsource db rebase`"):
            check(engine)
        with pytest.raises(es.TransactionIdsAheadError, match="eventsource db rebase"):
            status(engine)
        done = cli(restored_url, "db", "rebase", "--yes")
        assert done.returncode == 0, done.stderr
        assert "rebased the transaction ids of 7 event(s)" in done.stdout
        assert "kept 2 event(s)" in done.stdout

        check(engine)
        assert recorded_cluster(engine) == this_cluster(engine)
        assert covered(engine) == expected_covered
        assert_versions_in_read_order(engine)
        append(engine, "o1")
        catch_up(engine)
        assert_each_event_handled_once(engine)
        assert all(row.lag == 0 for row in status(engine))
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_without_pg_control_system_only_ids_are_checked(
    other_cluster: tuple[Path, sa.Engine],
) -> None:
    """Where EXECUTE on pg_control_system() is revoked, the record is not kept; ids still are."""
    _, other_admin = other_cluster
    name = f"es_no_control_{uuid.uuid4().hex[:8]}"
    with other_admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
        conn.exec_driver_sql(
            "DO $$ BEGIN CREATE ROLE es_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; "
            "END $$"
        )
    owner_url = other_admin.url.set(database=name)
    owner = es.create_engine(owner_url, poolclass=sa.NullPool)
    app = es.create_engine(owner_url.set(username="es_app"), poolclass=sa.NullPool)
    try:
        es.upgrade(owner)
        with owner.begin() as conn:
            conn.exec_driver_sql("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
            conn.exec_driver_sql("GRANT ALL ON ALL TABLES IN SCHEMA public TO es_app")
            conn.exec_driver_sql("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO es_app")
        append(app, "o1")
        check(app)
        assert recorded_cluster(owner) is None
        simulate_restore(owner)
        with pytest.raises(es.TransactionIdsAheadError, match="eventsource db rebase"):
            check(app)
        assert cluster.rebase(app).events == 1
        check(app)
        append(app, "o1")
        assert recorded_cluster(owner) is None
    finally:
        app.dispose()
        owner.dispose()
