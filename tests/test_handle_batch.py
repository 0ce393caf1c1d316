"""Projections that apply a whole batch at once, and the own-transaction warning."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource as es
from tests.projection_support import append_spread, checkpoint, event, processor, wait_readable

UPSERT = sa.text("INSERT INTO seen (position, aggregate_id) VALUES (:position, :aggregate_id)")


class BulkSeen(es.Projection):
    name = "bulk_seen"

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.batch_sizes: list[int] = []

    def handle_batch(self, events: Sequence[es.PersistedEvent], session: Session) -> None:
        self.batch_sizes.append(len(events))
        session.execute(
            UPSERT,
            [{"position": e.global_position, "aggregate_id": e.aggregate_id} for e in events],
        )
        if self.fail_at is not None and any(e.global_position == self.fail_at for e in events):
            raise RuntimeError(f"refusing position {self.fail_at}")


@pytest.fixture
def seen_table(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE seen (position BIGINT PRIMARY KEY, aggregate_id TEXT)")


def seen(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT position FROM seen ORDER BY position").scalars())


def test_a_projection_may_define_only_handle_batch() -> None:
    assert BulkSeen().name == "bulk_seen"
    with pytest.raises(es.ConfigurationError, match="handle_batch"):

        class Neither(es.Projection):
            name = "neither"


@pytest.mark.usefixtures("seen_table")
def test_handle_batch_gets_whole_batches_exactly_once(
    engine: sa.Engine, store: es.EventStore
) -> None:
    stored = append_spread(engine, store, 250)
    wait_readable(engine)  # batches of exactly 100, not cut short by a foreign transaction
    projection = BulkSeen()
    handled = processor(engine, store, batch_size=100).run_until_caught_up(projection)
    assert handled == 250
    assert projection.batch_sizes == [100, 100, 50]
    assert seen(engine) == [e.global_position for e in stored]
    stored_ck = checkpoint(engine, "bulk_seen")
    assert stored_ck is not None
    assert stored_ck.global_position == stored[-1].global_position


@pytest.mark.usefixtures("seen_table")
def test_a_failing_handle_batch_rolls_back_its_batch_and_names_the_range(
    engine: sa.Engine, store: es.EventStore
) -> None:
    stored = append_spread(engine, store, 250)
    positions = [e.global_position for e in stored]
    wait_readable(engine)  # batches of exactly 100, not cut short by a foreign transaction
    failing = BulkSeen(fail_at=positions[157])
    with pytest.raises(es.ProjectionError) as caught:
        processor(engine, store, batch_size=100).run_until_caught_up(failing)
    error = caught.value
    assert error.projection == "bulk_seen"
    assert error.global_position == positions[100]
    assert f"{positions[100]}..{positions[199]}" in str(error)
    assert isinstance(error.__cause__, RuntimeError)
    # The first batch committed; nothing of the failing one did.
    assert seen(engine) == positions[:100]
    ck = checkpoint(engine, "bulk_seen")
    assert ck is not None
    assert ck.global_position == positions[99]
    # Fixed, a restart applies the rest exactly once.
    assert processor(engine, store, batch_size=100).run_until_caught_up(BulkSeen()) == 150
    assert seen(engine) == positions


@pytest.mark.postgres
def test_projecting_inside_the_appending_transaction_warns_when_older_ones_are_open(
    pg_engine: sa.Engine, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    class Count(es.Projection):
        name = "count"

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            pass

    with pg_engine.connect() as older, pg_engine.connect() as mine:
        older_tx = older.begin()
        store.append(older, [event("older")])  # an open transaction with an older id
        my_tx = mine.begin()
        store.append(mine, [event("mine")])
        sessions = sessionmaker(bind=mine, join_transaction_mode="create_savepoint")
        with caplog.at_level(logging.WARNING, logger="eventsource.processor"):
            handled = es.Processor(sessions, store).run_until_caught_up(Count())
        assert handled == 1  # its own event, not the older transaction's
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "would sort before its checkpoint and be skipped" in warnings[0].getMessage()
        my_tx.rollback()
        older_tx.rollback()
