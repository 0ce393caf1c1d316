"""Poison events (``Projection.on_error``): quarantine, parked aggregates, retry, discard.

Every test runs on SQLite and PostgreSQL with a real read model whose primary key is
(projection, global_position), so an event applied twice fails loudly, and checks the
read model afterwards against the checkpoint and the dead letters: each event either
applied exactly once or waiting in the dead-letter table, never both, none lost, and
each aggregate's events applied in version order.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.deadletters import DeadLetter, discard, list_dead_letters, retry
from eventsource.metrics import PrometheusMetrics
from eventsource.processor import BatchResult, ProcessorMetrics
from eventsource.rebuild import rebuild, reset
from eventsource.testing import RunProjections
from tests.projection_support import (
    Background,
    checkpoint,
    reader,
    wait_readable,
    wait_until,
)
from tests.test_cli import assert_clean_error, cli, cli_url, ok

READ_MODEL_DDL = (
    "CREATE TABLE dl_applied (projection TEXT NOT NULL, global_position BIGINT NOT NULL, "
    "aggregate_id TEXT NOT NULL, aggregate_version BIGINT NOT NULL, seq BIGINT NOT NULL, "
    "PRIMARY KEY (projection, global_position))"
)
INSERT = sa.text(
    "INSERT INTO dl_applied (projection, global_position, aggregate_id, aggregate_version, seq) "
    "VALUES (:projection, :global_position, :aggregate_id, :aggregate_version, :seq)"
)
#: Handle order across projections and threads.
_sequence = itertools.count(1)


class Poison(RuntimeError):
    """What a poisoned handler raises."""


class Poisoned(es.Projection, abstract=True):
    """Writes a row per event, then raises :class:`Poison` on the positions in
    ``poison`` (clear it to "fix the handler") and an OptimisticConcurrencyError once
    on those in ``transient_once``: a failed event's row must never survive. Holds
    its batch open at ``hold_at`` until released."""

    def __init__(
        self,
        poison: Iterable[int] = (),
        *,
        transient_once: Iterable[int] = (),
        hold_at: int | None = None,
    ) -> None:
        self.poison = set(poison)
        self.transient_once = set(transient_once)
        self.hold_at = hold_at
        self.inside = threading.Event()
        self.release = threading.Event()
        self.calls: Counter[int] = Counter()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        self.calls[event.global_position] += 1
        session.execute(INSERT, self.row(event))
        self.check(event)
        if event.global_position == self.hold_at:
            self.inside.set()
            assert self.release.wait(30), "the test never released the gate"

    def check(self, event: es.PersistedEvent) -> None:
        position = event.global_position
        if position in self.transient_once:
            self.transient_once.discard(position)
            raise es.OptimisticConcurrencyError(
                "lost a race (on purpose)",
                bounded_context=event.bounded_context,
                aggregate_type=event.aggregate_type,
                aggregate_id=event.aggregate_id,
                expected=None,
                actual=None,
            )
        if position in self.poison:
            raise Poison(f"cannot project event {position}")

    def row(self, event: es.PersistedEvent) -> dict[str, object]:
        return {
            "projection": self.name,
            "global_position": event.global_position,
            "aggregate_id": event.aggregate_id,
            "aggregate_version": event.aggregate_version,
            "seq": next(_sequence),
        }

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM dl_applied WHERE projection = :p"), {"p": self.name})


class Stopping(Poisoned):
    name = "stopping"


class Quarantining(Poisoned):
    name = "quarantining"
    on_error = es.OnError.QUARANTINE


class Sequenced(Poisoned):
    name = "sequenced"
    on_error = es.OnError.QUARANTINE_AGGREGATE


class BatchQuarantining(Poisoned):
    """handle_batch with one executemany: a poisoned event fails the whole call."""

    name = "batch_quarantining"
    on_error = es.OnError.QUARANTINE

    def __init__(self, poison: Iterable[int] = ()) -> None:
        super().__init__(poison)
        self.batches: list[list[int]] = []

    def handle_batch(self, events: Sequence[es.PersistedEvent], session: Session) -> None:
        self.batches.append([event.global_position for event in events])
        session.execute(INSERT, [self.row(event) for event in events])
        for event in events:
            self.calls[event.global_position] += 1
            self.check(event)


class BatchSequenced(BatchQuarantining):
    name = "batch_sequenced"
    on_error = es.OnError.QUARANTINE_AGGREGATE


@pytest.fixture
def db(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    return engine


def append(engine: sa.Engine, *aggregate_ids: str) -> list[es.PersistedEvent]:
    """One event per id, in this order (so positions follow it); readable on return."""
    store = es.EventStore()
    stored: list[es.PersistedEvent] = []
    with Session(engine) as session, session.begin():
        for aggregate_id in aggregate_ids:
            event = es.Event(
                bounded_context="shop",
                aggregate_type="Order",
                aggregate_id=aggregate_id,
                event_type="OrderChanged",
                payload={},
            )
            stored.extend(store.append(session, [event]).events)
    wait_readable(engine)
    return stored


def processor(
    engine: sa.Engine, batch_size: int = 100, metrics: ProcessorMetrics | None = None
) -> es.Processor:
    config = es.ProcessorConfig(batch_size=batch_size, poll_interval=0.01)
    return es.Processor(engine, es.EventStore(), config, metrics=metrics)


def applied(engine: sa.Engine, name: str) -> list[tuple[int, str, int, int]]:
    """(position, aggregate, version, seq) the projection wrote, by position."""
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT global_position, aggregate_id, aggregate_version, seq FROM dl_applied "
                "WHERE projection = :p ORDER BY global_position"
            ),
            {"p": name},
        ).all()
    return [(int(p), str(a), int(v), int(s)) for p, a, v, s in rows]


def positions(engine: sa.Engine, name: str) -> list[int]:
    return [row[0] for row in applied(engine, name)]


def letters(engine: sa.Engine, name: str) -> list[DeadLetter]:
    return list_dead_letters(engine, projection=name)


def head_position(engine: sa.Engine) -> int:
    with reader(engine).connect() as conn:
        return int(conn.execute(sa.text("SELECT MAX(global_position) FROM events")).scalar() or 0)


def assert_exactly_once(engine: sa.Engine, name: str) -> None:
    """Every event up to the checkpoint is applied once or waits as a dead letter (not
    both); the checkpoint counts what was applied; each aggregate in version order."""
    rows = applied(engine, name)
    done = [row[0] for row in rows]
    waiting = [letter.global_position for letter in letters(engine, name)]
    found = checkpoint(engine, name)
    assert found is not None
    assert sorted(done + waiting) == list(range(1, found.global_position + 1))
    assert not set(done) & set(waiting)
    assert found.events_handled == len(rows)
    by_aggregate: dict[str, list[int]] = {}
    for _, aggregate_id, version, _ in sorted(rows, key=lambda row: row[3]):
        by_aggregate.setdefault(aggregate_id, []).append(version)
    for aggregate_id, versions in by_aggregate.items():
        assert versions == sorted(versions), f"{aggregate_id} applied out of order: {versions}"


def dead_letter_rows(engine: sa.Engine) -> int:
    """Rows in the table, read with plain SQL (not through the module under test)."""
    with reader(engine).connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM events_dead_letters")).scalar_one())


# -- the three policies -------------------------------------------------------------------


def test_stop_is_the_default_and_commits_nothing(db: sa.Engine) -> None:
    assert es.Projection.on_error is es.OnError.STOP
    append(db, "a", "b", "a", "b")
    projection = Stopping(poison={3})

    with pytest.raises(es.ProjectionError, match="position 3") as info:
        processor(db).process_batch(projection)

    assert isinstance(info.value.__cause__, Poison)
    assert positions(db, "stopping") == []
    found = checkpoint(db, "stopping")
    assert found is not None
    assert (found.global_position, found.events_handled) == (0, 0)
    assert dead_letter_rows(db) == 0


def test_quarantine_stores_the_event_and_commits_the_rest_of_the_batch_once(
    db: sa.Engine,
) -> None:
    stored = append(db, "a", "b", "a", "b", "a", "b")
    projection = Quarantining(poison={3})

    result = processor(db).process_batch(projection)

    assert (result.handled, result.global_position) == (5, 6)
    assert positions(db, "quarantining") == [1, 2, 4, 5, 6]
    assert projection.calls == Counter({1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1})
    [letter] = letters(db, "quarantining")
    poisoned = stored[2]
    assert (letter.global_position, letter.event_id, letter.aggregate_id) == (
        3,
        poisoned.event_id,
        "a",
    )
    assert (letter.bounded_context, letter.aggregate_type, letter.aggregate_version) == (
        "shop",
        "Order",
        2,
    )
    assert (letter.event_type, letter.partition_key, letter.total_partitions) == (
        "OrderChanged",
        0,
        1,
    )
    assert letter.error_type == "tests.test_dead_letters.Poison"
    assert letter.error_message == "cannot project event 3"
    assert letter.traceback is not None
    assert "in check" in letter.traceback
    assert letter.traceback.rstrip().endswith("Poison: cannot project event 3")
    assert (letter.attempts, letter.parked_behind, letter.parked) == (1, None, False)
    assert letter.last_failed_at is not None
    assert_exactly_once(db, "quarantining")

    # Nothing is read twice: a later batch sees only new events, and b's v4 flows.
    append(db, "a", "b")
    assert processor(db).run_until_caught_up(projection) == 2
    assert positions(db, "quarantining") == [1, 2, 4, 5, 6, 7, 8]
    assert len(letters(db, "quarantining")) == 1
    assert_exactly_once(db, "quarantining")


def test_quarantine_aggregate_parks_the_aggregate_and_lets_others_flow(db: sa.Engine) -> None:
    # Batches of 3: [a1, a2 (poison), a3] parks a3 behind a2 within the batch;
    # [b1, a4, b2] parks a4 from the table, across batches.
    append(db, "a", "a", "a", "b", "a", "b")
    projection = Sequenced(poison={2})

    assert processor(db, batch_size=3).run_until_caught_up(projection) == 3

    assert positions(db, "sequenced") == [1, 4, 6]
    head, *parked = letters(db, "sequenced")
    assert (head.global_position, head.parked_behind, head.attempts) == (2, None, 1)
    assert [(p.global_position, p.parked_behind, p.attempts) for p in parked] == [
        (3, head.id, 0),
        (5, head.id, 0),
    ]
    assert all(p.error_type is None and p.traceback is None for p in parked)
    assert projection.calls[3] == projection.calls[5] == 0  # parked: never handled
    assert_exactly_once(db, "sequenced")

    # Events arriving later for the parked aggregate are parked too; others flow.
    append(db, "a", "b", "c")
    assert processor(db).run_until_caught_up(projection) == 2
    assert positions(db, "sequenced") == [1, 4, 6, 8, 9]
    assert [(p.global_position, p.parked_behind) for p in letters(db, "sequenced")[1:]] == [
        (3, head.id),
        (5, head.id),
        (7, head.id),
    ]
    assert_exactly_once(db, "sequenced")


def test_handle_batch_projections_fall_back_to_one_event_at_a_time(db: sa.Engine) -> None:
    append(db, "a", "b", "a", "b", "c")
    plain = BatchQuarantining(poison={3})
    sequenced = BatchSequenced(poison={1})

    assert processor(db).run_until_caught_up(plain) == 4
    assert processor(db).run_until_caught_up(sequenced) == 3

    # The whole batch first, then each event alone to find the poisoned one.
    assert plain.batches == [[1, 2, 3, 4, 5], [1], [2], [3], [4], [5]]
    assert positions(db, "batch_quarantining") == [1, 2, 4, 5]
    assert [letter.global_position for letter in letters(db, "batch_quarantining")] == [3]
    assert_exactly_once(db, "batch_quarantining")
    assert positions(db, "batch_sequenced") == [2, 4, 5]
    head, follower = letters(db, "batch_sequenced")
    assert (head.global_position, follower.global_position) == (1, 3)
    assert follower.parked_behind == head.id
    assert_exactly_once(db, "batch_sequenced")

    # A parked aggregate's events are left out of the whole-batch call.
    append(db, "a", "b")
    assert processor(db).run_until_caught_up(sequenced) == 1
    assert sequenced.batches[-1] == [7]
    assert [letter.global_position for letter in letters(db, "batch_sequenced")] == [1, 3, 6]
    assert_exactly_once(db, "batch_sequenced")


def test_a_transient_error_in_a_handler_is_retried_never_quarantined(db: sa.Engine) -> None:
    append(db, "a", "b", "a", "b")
    for projection in (Quarantining(transient_once={3}), Sequenced(transient_once={3})):
        # One batch: the whole batch rolls back (nothing quarantined, nothing applied).
        with pytest.raises(es.ProjectionError) as info:
            processor(db).process_batch(projection)
        assert isinstance(info.value.__cause__, es.OptimisticConcurrencyError)
        assert positions(db, projection.name) == []
        assert letters(db, projection.name) == []
        assert checkpoint(db, projection.name) is not None

    # A worker retries the batch: everything applied once, nothing quarantined.
    projection = Quarantining(transient_once={2})
    reset(db, projection.name, projection=projection)
    assert processor(db).run_until_caught_up(projection) == 4
    assert positions(db, "quarantining") == [1, 2, 3, 4]
    assert projection.calls[2] == 2
    assert dead_letter_rows(db) == 0
    assert_exactly_once(db, "quarantining")


# -- operators: retry and discard -----------------------------------------------------------


def test_retry_after_the_fix_applies_the_event_and_its_parked_followers_once_in_order(
    db: sa.Engine,
) -> None:
    append(db, "a", "a", "b", "a", "b")
    projection = Sequenced(poison={2})
    processor(db).run_until_caught_up(projection)
    head, *parked = letters(db, "sequenced")
    assert [p.global_position for p in parked] == [4]

    # A parked event alone is refused: it would overtake the one it waits for.
    with pytest.raises(es.DeadLetterError, match=f"parked behind dead letter {head.id}"):
        retry(db, [parked[0].id], [projection])
    assert len(letters(db, "sequenced")) == 2

    projection.poison.clear()  # the fix
    [result] = retry(db, [head.id], [projection])

    assert (result.status, result.ok, result.applied) == ("applied", True, (2, 4))
    assert letters(db, "sequenced") == []
    assert positions(db, "sequenced") == [1, 2, 3, 4, 5]
    assert projection.calls == Counter({1: 1, 2: 2, 3: 1, 4: 1, 5: 1})
    assert_exactly_once(db, "sequenced")  # events_handled counts the retried ones too

    # Retrying again finds nothing; the aggregate is released for new events.
    with pytest.raises(es.DeadLetterError, match=f"no dead letter with id {head.id}"):
        retry(db, [head.id], [projection])
    append(db, "a")
    assert processor(db).run_until_caught_up(projection) == 1
    assert positions(db, "sequenced") == [1, 2, 3, 4, 5, 6]
    assert_exactly_once(db, "sequenced")


def test_a_retry_that_fails_again_changes_only_attempts_and_error(db: sa.Engine) -> None:
    append(db, "a", "a", "a", "b")
    projection = Sequenced(poison={2})
    processor(db).run_until_caught_up(projection)
    before = letters(db, "sequenced")
    read_model = applied(db, "sequenced")
    found = checkpoint(db, "sequenced")

    projection.poison = {2}
    [result] = retry(db, [before[0].id], [projection])

    assert (result.status, result.ok, result.applied) == ("failed", False, ())
    assert (result.blocked_by, result.attempts) == (before[0].id, 2)
    assert result.error == "tests.test_dead_letters.Poison: cannot project event 2"
    after = letters(db, "sequenced")
    assert after[0].attempts == 2
    assert after[0].last_failed_at is not None
    assert before[0].last_failed_at is not None
    assert after[0].last_failed_at >= before[0].last_failed_at
    assert after[0].traceback is not None
    assert "in _retry_one" in after[0].traceback  # the retry's own failure
    last_error = ("attempts", "last_failed_at", "traceback")  # the rest stays as it was
    for old, new in zip(before, after, strict=True):
        for field in DeadLetter.__dataclass_fields__:
            if old is before[0] and field in last_error:
                continue
            assert getattr(old, field) == getattr(new, field), field
    assert applied(db, "sequenced") == read_model
    assert checkpoint(db, "sequenced") == found
    assert_exactly_once(db, "sequenced")


def test_a_retry_stops_at_a_parked_event_that_fails_which_then_heads_the_aggregate(
    db: sa.Engine,
) -> None:
    append(db, "a", "a", "a", "a")
    projection = Sequenced(poison={1})
    processor(db).run_until_caught_up(projection)
    head = letters(db, "sequenced")[0]

    projection.poison = {3}  # the fix for 1 reveals a bug on 3
    [result] = retry(db, [head.id], [projection])

    assert (result.status, result.ok, result.applied) == ("stopped", False, (1, 2))
    new_head, last = letters(db, "sequenced")
    assert (result.blocked_by, result.attempts) == (new_head.id, 1)
    assert (new_head.global_position, new_head.parked_behind, new_head.attempts) == (3, None, 1)
    assert new_head.error_message == "cannot project event 3"
    assert (last.global_position, last.parked_behind) == (4, new_head.id)
    assert positions(db, "sequenced") == [1, 2]
    assert_exactly_once(db, "sequenced")


def test_discard_the_head_promotes_the_next_parked_event_and_applies_nothing(
    db: sa.Engine,
) -> None:
    append(db, "a", "a", "a", "b")
    projection = Sequenced(poison={1})
    processor(db).run_until_caught_up(projection)
    head, second, third = letters(db, "sequenced")

    with pytest.raises(es.DeadLetterError, match="no dead letter with id 999"):
        discard(db, [head.id, 999])
    assert len(letters(db, "sequenced")) == 3  # nothing was discarded

    result = discard(db, [head.id])

    assert [letter.id for letter in result.discarded] == [head.id]
    assert result.new_heads == (second.id,)
    promoted, rest = letters(db, "sequenced")
    assert (promoted.id, promoted.parked_behind, promoted.attempts) == (second.id, None, 0)
    assert (rest.id, rest.parked_behind) == (third.id, second.id)
    assert positions(db, "sequenced") == [4]
    # The aggregate stays parked until the promoted event is resolved.
    append(db, "a")
    processor(db).run_until_caught_up(projection)
    assert positions(db, "sequenced") == [4]
    assert letters(db, "sequenced")[-1].parked_behind == second.id

    [done] = retry(db, [second.id], [projection])
    assert done.applied == (2, 3, 5)
    assert positions(db, "sequenced") == [2, 3, 4, 5]  # event 1 never applied
    assert letters(db, "sequenced") == []
    rows = applied(db, "sequenced")
    found = checkpoint(db, "sequenced")
    assert found is not None
    assert found.events_handled == len(rows)


def test_discard_every_entry_of_an_aggregate(db: sa.Engine) -> None:
    append(db, "a", "a", "b")
    projection = Sequenced(poison={1})
    processor(db).run_until_caught_up(projection)
    ids = [letter.id for letter in letters(db, "sequenced")]

    result = discard(db, ids)

    assert [letter.id for letter in result.discarded] == ids
    assert result.new_heads == ()
    assert dead_letter_rows(db) == 0
    append(db, "a")  # released: the aggregate's next event is applied
    assert processor(db).run_until_caught_up(projection) == 1
    assert positions(db, "sequenced") == [3, 4]


def test_reset_clears_dead_letters_and_a_rebuild_quarantines_again(db: sa.Engine) -> None:
    append(db, "a", "b", "a")
    projection = Quarantining(poison={2})
    processor(db).run_until_caught_up(projection)
    assert len(letters(db, "quarantining")) == 1

    final = rebuild(db, projection)

    assert final.handled == 2
    [letter] = letters(db, "quarantining")
    assert (letter.global_position, letter.attempts) == (2, 1)
    assert_exactly_once(db, "quarantining")
    reset(db, "quarantining", projection=projection)
    assert dead_letter_rows(db) == 0
    assert positions(db, "quarantining") == []


# -- concurrency: a retry never runs beside a batch ------------------------------------------


def waiting_on_advisory_lock(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                )
            ).scalar_one()
        )


def test_a_retry_waits_for_the_projections_batch_in_hand(db: sa.Engine) -> None:
    append(db, "a", "b", "a")
    projection = Sequenced(poison={1})
    processor(db).run_until_caught_up(projection)  # 1 failed, 3 parked behind it
    head = letters(db, "sequenced")[0]
    append(db, "b", "a", "b")  # 4, 5 (parked by the next batch), 6
    projection.poison.clear()
    projection.hold_at = 6
    batch = Background(lambda: processor(db).process_batch(projection)).start()
    try:
        assert projection.inside.wait(30), f"the batch never reached the gate: {batch.error!r}"
        retrying = Background(lambda: retry(db, [head.id], [projection])).start()
        if db.dialect.name == "postgresql":
            wait_until(lambda: waiting_on_advisory_lock(db) >= 1, timeout=30)
        else:  # BEGIN IMMEDIATE waits without a trace to look at
            retrying.thread.join(0.3)
        waited = retrying.alive
    finally:
        projection.release.set()
    batch.join(30)
    retrying.join(30)

    assert waited, f"the retry did not wait for the batch in hand: {retrying.error!r}"
    assert batch.error is None, batch.error
    assert retrying.error is None, retrying.error
    # The retry saw the batch's parked event 5 and applied it after 1 and 3.
    assert retrying.result[0].applied == (1, 3, 5)
    assert positions(db, "sequenced") == [1, 2, 3, 4, 5, 6]
    assert letters(db, "sequenced") == []
    assert_exactly_once(db, "sequenced")


def test_the_pytest_plugin_quarantines_as_in_production(
    eventsource_session: Session, run_projections: RunProjections
) -> None:
    eventsource_session.execute(sa.text(READ_MODEL_DDL))
    store = es.EventStore()
    for aggregate_id in ("a", "a", "b"):
        store.append(
            eventsource_session,
            [
                es.Event(
                    bounded_context="shop",
                    aggregate_type="Order",
                    aggregate_id=aggregate_id,
                    event_type="OrderChanged",
                )
            ],
        )
    first = eventsource_session.execute(sa.text("SELECT MIN(global_position) FROM events"))
    base = int(first.scalar_one()) - 1

    handled = run_projections(Sequenced(poison={base + 1}))

    assert [event.global_position - base for event in handled["sequenced"]] == [3]
    parked = list_dead_letters(eventsource_session, projection="sequenced")
    assert [(d.global_position - base, d.parked) for d in parked] == [(1, False), (2, True)]


# -- configuration, schema, logging, metrics ------------------------------------------------


def test_on_error_must_be_an_on_error() -> None:
    with pytest.raises(es.ConfigurationError, match=r"Bad\.on_error must be one of OnError\.STOP"):

        class Bad(es.Projection):
            name = "bad"
            on_error = "quarantine"  # type: ignore[assignment]

            def handle(self, event: es.PersistedEvent, session: Session) -> None: ...


def test_on_error_set_per_instance_is_checked_by_the_processor(db: sa.Engine) -> None:
    append(db, "a")
    projection = Stopping()
    projection.on_error = "quarantine"  # type: ignore[assignment]
    with pytest.raises(es.ConfigurationError, match=r"must be an eventsource\.OnError"):
        processor(db).process_batch(projection)
    projection.on_error = es.OnError.QUARANTINE
    projection.poison = {1}
    assert processor(db).run_until_caught_up(projection) == 0
    assert [letter.global_position for letter in letters(db, "stopping")] == [1]


def test_quarantine_needs_the_dead_letter_table_stop_does_not(empty_url: sa.URL) -> None:
    engine = es.create_engine(empty_url, poolclass=sa.NullPool)
    try:
        es.upgrade(engine, "es0002")
        with engine.begin() as conn:
            conn.exec_driver_sql(READ_MODEL_DDL)
        append(engine, "a", "b")
        assert processor(engine).run_until_caught_up(Stopping()) == 2
        with pytest.raises(es.SchemaMissingError, match="eventsource db upgrade"):
            processor(engine).run_until_caught_up(Sequenced())
        with pytest.raises(es.SchemaMissingError, match="events_dead_letters"):
            processor(engine).run_until_caught_up(Quarantining(poison={1}))
        assert positions(engine, "quarantining") == []
        reset(engine, "stopping", projection=Stopping())  # no table: nothing to clear
        es.upgrade(engine)
        assert processor(engine).run_until_caught_up(Quarantining(poison={1})) == 1
    finally:
        engine.dispose()


def test_each_quarantined_event_logs_a_warning_after_the_commit(
    db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    append(db, "a", "a", "b")
    caplog.set_level(logging.WARNING, logger="eventsource.deadletters")
    processor(db).run_until_caught_up(Sequenced(poison={1}))
    head, parked = letters(db, "sequenced")

    records = [r for r in caplog.records if r.name == "eventsource.deadletters"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    failed, waiting = records
    assert "quarantined event 1" in failed.getMessage()
    assert "cannot project event 1" in failed.getMessage()
    assert failed.__dict__["dead_letter_id"] == head.id
    assert failed.__dict__["projection"] == "sequenced"
    assert failed.__dict__["partition"] == 0
    assert failed.__dict__["global_position"] == 1
    assert failed.__dict__["aggregate_id"] == "a"
    assert failed.__dict__["event_type"] == "OrderChanged"
    assert failed.__dict__["error_type"] == "tests.test_dead_letters.Poison"
    assert "parked event 2" in waiting.getMessage()
    assert waiting.__dict__["dead_letter_id"] == parked.id
    assert waiting.__dict__["parked_behind"] == head.id

    # A batch that rolls back afterwards logs nothing: its quarantine did not happen.
    caplog.clear()
    append(db, "c")
    projection = Quarantining(poison={1})
    projection.transient_once = {4}
    with pytest.raises(es.ProjectionError):
        processor(db).process_batch(projection)
    assert [r for r in caplog.records if r.name == "eventsource.deadletters"] == []
    assert letters(db, "quarantining") == []


class NoQuarantineHook:
    """A user's metrics object written before dead letters existed."""

    def __init__(self) -> None:
        self.handled = 0

    def batch_completed(self, projection: str, partition: int, result: BatchResult) -> None:
        self.handled += result.handled

    def batch_failed(self, projection: str, partition: int) -> None: ...


def test_quarantined_events_are_counted_when_the_metrics_object_can(db: sa.Engine) -> None:
    append(db, "a", "a", "b")
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    processor(db, metrics=metrics).run_until_caught_up(Sequenced(poison={1}))
    labels = {"projection": "sequenced", "partition": "0"}
    assert registry.get_sample_value("eventsource_events_quarantined_total", labels) == 2
    assert registry.get_sample_value("eventsource_events_handled_total", labels) == 1

    older = NoQuarantineHook()
    processor(db, metrics=older).run_until_caught_up(Quarantining(poison={1}))
    assert older.handled == 2
    assert len(letters(db, "quarantining")) == 1


# -- the command line -----------------------------------------------------------------------

APP_SOURCE = '''\
"""Dead-letter CLI tests: a projection that quarantines aggregates, poisoned by $DLAPP_POISON."""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es


class Orders(es.Projection):
    name = "orders"
    on_error = es.OnError.QUARANTINE_AGGREGATE

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        poison = os.environ.get("DLAPP_POISON", "").split(",")
        if str(event.global_position) in poison:
            raise ValueError(f"bad amount in event {event.global_position}")
        session.execute(
            sa.text(
                "INSERT INTO dl_applied (projection, global_position, aggregate_id, "
                "aggregate_version, seq) VALUES ('orders', :p, :a, :v, :p)"
            ),
            {"p": event.global_position, "a": event.aggregate_id, "v": event.aggregate_version},
        )


PROJECTIONS = [Orders()]
'''


def test_the_command_line_lists_retries_and_discards(db: sa.Engine, tmp_path: Path) -> None:
    (tmp_path / "dlapp.py").write_text(APP_SOURCE)
    url = cli_url(db)
    append(db, "a", "a", "b", "c", "c", "a")
    poisoned = {"DLAPP_POISON": "1,4"}
    ok(cli(tmp_path, "run", "dlapp:PROJECTIONS", "--until-caught-up", url=url, env=poisoned))
    assert positions(db, "orders") == [3]

    table = ok(cli(tmp_path, "dead-letters", "list", url=url)).stdout.splitlines()
    assert table[0].split()[:10] == [
        "ID",
        "PROJECTION",
        "PARTITION",
        "POSITION",
        "AGGREGATE",
        "VERSION",
        "EVENT",
        "STATE",
        "BEHIND",
        "ATTEMPTS",
    ]
    rows = [line.split() for line in table[1:]]
    assert [(r[3], r[4], r[7], r[9]) for r in rows] == [
        ("1", "shop/Order/a", "failed", "1"),
        ("2", "shop/Order/a", "parked", "0"),
        ("4", "shop/Order/c", "failed", "1"),
        ("5", "shop/Order/c", "parked", "0"),
        ("6", "shop/Order/a", "parked", "0"),
    ]
    assert "builtins" not in table[1]
    assert "ValueError: bad amount in event 1" in table[1]

    listed = json.loads(ok(cli(tmp_path, "dead-letters", "list", "--json", url=url)).stdout)
    ids = {entry["global_position"]: entry["id"] for entry in listed}
    assert listed[0]["error_type"] == "ValueError"
    assert "ValueError: bad amount in event 1" in listed[0]["traceback"]
    assert listed[1]["parked_behind"] == ids[1]
    assert set(listed[0]) == set(DeadLetter.__dataclass_fields__)
    only = ok(cli(tmp_path, "dead-letters", "list", "--projection", "nope", url=url))
    assert only.stdout.strip() == "no dead letters"

    # A parked event alone is refused, with the head to retry instead.
    refused = cli(
        tmp_path, "dead-letters", "retry", str(ids[2]), "--app", "dlapp:PROJECTIONS", url=url
    )
    assert_clean_error(refused, 1, f"parked behind dead letter {ids[1]}", "nothing was retried")

    # Still broken: exit code 4, one more attempt, nothing else changes.
    still = cli(
        tmp_path,
        "dead-letters",
        "retry",
        str(ids[1]),
        "--app",
        "dlapp:PROJECTIONS",
        url=url,
        env=poisoned,
    )
    assert still.returncode == 4, still.stderr
    assert f"dead letter {ids[1]} (orders, event 1): failed again (attempt 2)" in still.stdout
    assert "still failing" in still.stderr
    assert [e.attempts for e in letters(db, "orders")] == [2, 0, 1, 0, 0]
    assert positions(db, "orders") == [3]

    # Fixed: the head, then its parked events in version order, each once.
    fixed = ok(
        cli(tmp_path, "dead-letters", "retry", str(ids[1]), "--app", "dlapp:PROJECTIONS", url=url)
    )
    assert f"dead letter {ids[1]} (orders, event 1): applied, then 2 event(s) parked" in (
        fixed.stdout
    )
    assert positions(db, "orders") == [1, 2, 3, 6]

    # Discard needs --yes without a terminal, then drops c's events for good.
    assert_clean_error(
        cli(tmp_path, "dead-letters", "discard", "--projection", "orders", "--all", url=url),
        2,
        "pass --yes",
    )
    dropped = ok(
        cli(
            tmp_path,
            "dead-letters",
            "discard",
            "--projection",
            "orders",
            "--all",
            "--yes",
            url=url,
        )
    )
    assert f"discarded 2 dead letter(s): {ids[4]} {ids[5]}" in dropped.stdout
    assert ok(cli(tmp_path, "dead-letters", "list", url=url)).stdout.strip() == "no dead letters"
    assert positions(db, "orders") == [1, 2, 3, 6]  # 4 and 5 never applied
    found = checkpoint(db, "orders")
    assert found is not None
    assert (found.global_position, found.events_handled) == (6, 4)
    assert_clean_error(
        cli(tmp_path, "dead-letters", "retry", "--app", "dlapp:PROJECTIONS", url=url),
        2,
        "give the dead-letter IDs",
    )


def test_the_command_line_retries_every_dead_letter_of_a_projection(
    db: sa.Engine, tmp_path: Path
) -> None:
    (tmp_path / "dlapp.py").write_text(APP_SOURCE)
    url = cli_url(db)
    append(db, "a", "b", "a", "c")
    ok(
        cli(
            tmp_path,
            "run",
            "dlapp:PROJECTIONS",
            "--until-caught-up",
            url=url,
            env={"DLAPP_POISON": "1,2"},
        )
    )
    assert positions(db, "orders") == [4]

    done = ok(
        cli(
            tmp_path,
            "dead-letters",
            "retry",
            "--projection",
            "orders",
            "--all",
            "--app",
            "dlapp:PROJECTIONS",
            url=url,
        )
    )
    assert done.stdout.count(": applied") == 2
    assert positions(db, "orders") == [1, 2, 3, 4]
    assert dead_letter_rows(db) == 0
    assert_exactly_once(db, "orders")
