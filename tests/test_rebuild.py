"""``eventsource.rebuild``: reset() and rebuild() through the Python API, on both databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.rebuild import RebuildProgress, rebuild, reset
from eventsource.status import status
from tests.projection_support import (
    AppliedLog,
    Boom,
    append_spread,
    applied_triples,
    checkpoint,
    create_applied_table,
    processor,
)


class Rebuildable(AppliedLog):
    """Writes ``applied`` rows under its name; ``reset`` deletes exactly those."""

    name = "rebuildable"
    resets = 0

    def reset(self, session: Session) -> None:
        type(self).resets += 1
        session.execute(sa.text("DELETE FROM applied WHERE projection = :p"), {"p": self.name})


class OrdersOnly(Rebuildable):
    name = "orders_only"
    aggregate_types = ("Order",)


def applied_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every read-model row, every column (seq included: it tells whether a row was rewritten)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM applied ORDER BY projection, global_position")
        ).all()
    return [tuple(row) for row in rows]


def checkpoint_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM projection_checkpoints ORDER BY projection_name, partition_key")
        ).all()
    return [tuple(row) for row in rows]


def distinct_progress(seen: list[RebuildProgress]) -> list[int]:
    """The successive ``done`` values (on PostgreSQL a batch can read nothing while a
    transaction elsewhere on the server is open, repeating a value)."""
    return [done for done in dict.fromkeys(p.done for p in seen) if done]


@pytest.fixture
def read_model(engine: sa.Engine) -> sa.Engine:
    create_applied_table(engine)
    return engine


def test_rebuild_replays_into_a_cleared_read_model_and_reports_progress(
    read_model: sa.Engine, store: es.EventStore
) -> None:
    engine = read_model
    append_spread(engine, store, 15, aggregate_type="Order")
    append_spread(engine, store, 10, prefix="inv", aggregate_type="Invoice")
    append_spread(engine, store, 8, prefix="late", aggregate_type="Order")
    processor(engine, store).run_until_caught_up(OrdersOnly())
    first_run = applied_triples(engine, "orders_only")
    assert len(first_run) == 23
    with engine.begin() as conn:  # damage the read model
        conn.execute(sa.text("DELETE FROM applied WHERE global_position > 12"))
        conn.execute(sa.text("UPDATE applied SET aggregate_version = 0"))

    seen: list[RebuildProgress] = []
    final = rebuild(engine, OrdersOnly(), batch_size=5, on_progress=seen.append)

    assert applied_triples(engine, "orders_only") == first_run
    # Progress counts the events in the projection's scope (23 Orders, not 33 events).
    assert distinct_progress(seen) == [5, 10, 15, 20, 23]
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert {p.total for p in seen} == {23}
    assert {p.projection for p in seen} == {"orders_only"}
    assert [p.elapsed for p in seen] == sorted(p.elapsed for p in seen)
    assert seen[-1].done == seen[-1].total == 23
    assert (final.projection, final.done, final.total, final.handled) == ("orders_only", 23, 23, 23)
    assert final.elapsed >= seen[-1].elapsed
    assert final.rate > 0
    assert final.eta_seconds == 0.0
    found = checkpoint(engine, "orders_only")
    assert found is not None
    assert (found.global_position, found.events_handled, found.total_partitions) == (33, 23, 1)


def test_rebuild_keeps_the_partition_count(read_model: sa.Engine, store: es.EventStore) -> None:
    engine = read_model
    append_spread(engine, store, 30, aggregates=9)
    for key in (0, 1, 2):
        processor(engine, store, partition_key=key, total_partitions=3).run_until_caught_up(
            Rebuildable()
        )
    first_run = applied_triples(engine, "rebuildable")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM applied"))

    final = rebuild(engine, Rebuildable(), batch_size=4)

    assert applied_triples(engine, "rebuildable") == first_run
    assert (final.done, final.total, final.handled) == (30, 30, 30)
    rows = status(engine)
    assert [(r.partition_key, r.total_partitions, r.checkpoint, r.lag) for r in rows] == [
        (0, 3, 30, 0),
        (1, 3, 30, 0),
        (2, 3, 30, 0),
    ]
    assert sum(r.events_handled for r in rows) == 30


def test_failed_atomic_rebuild_leaves_read_model_and_checkpoint_as_before(
    read_model: sa.Engine, store: es.EventStore
) -> None:
    """atomic=True: one transaction (an online rebuild that fails keeps what it committed,
    see test_online_rebuild)."""
    engine = read_model
    append_spread(engine, store, 20)
    processor(engine, store).run_until_caught_up(Rebuildable())
    with engine.begin() as conn:  # a read model that differs from a replay
        conn.execute(sa.text("UPDATE applied SET event_type = 'Before'"))
    read_model_before = applied_rows(engine)
    checkpoints_before = checkpoint_rows(engine)
    resets_before = Rebuildable.resets

    seen: list[RebuildProgress] = []
    failing = Rebuildable(fail_when=lambda e: e.global_position == 13)
    with pytest.raises(es.ProjectionError, match="position 13") as raised:
        rebuild(engine, failing, batch_size=5, on_progress=seen.append, atomic=True)

    assert isinstance(raised.value.__cause__, Boom)
    assert Rebuildable.resets == resets_before + 1  # it did clear the read model...
    assert distinct_progress(seen) == [5, 10]  # ...and replayed two batches
    assert applied_rows(engine) == read_model_before  # ...then rolled all of it back
    assert checkpoint_rows(engine) == checkpoints_before


def test_rebuild_of_a_projection_that_never_ran(
    read_model: sa.Engine, store: es.EventStore
) -> None:
    engine = read_model
    append_spread(engine, store, 7)
    final = rebuild(engine, Rebuildable())
    assert (final.done, final.total, final.handled) == (7, 7, 7)
    assert len(applied_triples(engine, "rebuildable")) == 7
    (row,) = status(engine)
    assert (row.projection, row.checkpoint, row.lag, row.events_handled) == ("rebuildable", 7, 0, 7)


def test_rebuild_of_an_empty_store(read_model: sa.Engine) -> None:
    seen: list[RebuildProgress] = []
    final = rebuild(read_model, Rebuildable(), on_progress=seen.append)
    assert (final.done, final.total, final.handled) == (0, 0, 0)
    assert all((p.done, p.total) == (0, 0) for p in seen)


def test_reset_deletes_checkpoints_and_calls_the_hook(
    read_model: sa.Engine, store: es.EventStore
) -> None:
    engine = read_model
    append_spread(engine, store, 10, aggregates=4)
    for key in (0, 1):
        processor(engine, store, partition_key=key, total_partitions=2).run_until_caught_up(
            Rebuildable()
        )
    processor(engine, store).run_until_caught_up(OrdersOnly())

    # Without the projection its read model would survive and be applied again: refused.
    with pytest.raises(es.ConfigurationError, match="keep_read_model=True"):
        reset(engine, "rebuildable")
    assert len(status(engine)) == 3
    assert reset(engine, "rebuildable", keep_read_model=True) == 2
    assert [(r.projection, r.partition_key) for r in status(engine)] == [("orders_only", 0)]
    assert len(applied_triples(engine, "rebuildable")) == 10  # no projection: no hook

    assert reset(engine, "orders_only", projection=OrdersOnly()) == 1
    assert status(engine) == []
    assert applied_triples(engine, "orders_only") == []
    assert len(applied_triples(engine, "rebuildable")) == 10  # only its own rows

    assert reset(engine, "never_ran", keep_read_model=True) == 0


def test_reset_in_a_callers_session_commits_with_it(
    read_model: sa.Engine, store: es.EventStore
) -> None:
    engine = read_model
    append_spread(engine, store, 3)
    processor(engine, store).run_until_caught_up(Rebuildable())
    with Session(engine) as session:
        session.begin()
        assert reset(session, "rebuildable", projection=Rebuildable()) == 1
        session.rollback()
    assert len(applied_triples(engine, "rebuildable")) == 3
    assert [r.checkpoint for r in status(engine)] == [3]


def test_reset_refuses_another_projections_hook(read_model: sa.Engine) -> None:
    with pytest.raises(es.ConfigurationError, match="was given projection 'orders_only'"):
        reset(read_model, "rebuildable", projection=OrdersOnly())


def test_unmigrated_database_raises_schema_missing(tmp_path: Path) -> None:
    engine = es.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(es.SchemaMissingError, match="eventsource db upgrade"):
            rebuild(engine, Rebuildable())
        with pytest.raises(es.SchemaMissingError, match="eventsource db upgrade"):
            reset(engine, "rebuildable", keep_read_model=True)
    finally:
        engine.dispose()
