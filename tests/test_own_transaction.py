"""Processors whose transaction has written (handlers that append, tests, rebuilds)."""

from __future__ import annotations

from types import MappingProxyType

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource as es
from tests.projection_support import Background, event, wait_readable

pytestmark = pytest.mark.postgres


class ShipOrders(es.Projection):
    """A process manager: scoped to orders, it appends a Shipment for each."""

    name = "ship_orders"
    aggregate_types = ("Order",)

    def __init__(self, store: es.EventStore) -> None:
        self.store = store
        self.seen: list[str] = []

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        self.seen.append(event.aggregate_id)
        shipment = es.Event(
            bounded_context="sales",
            aggregate_type="Shipment",
            aggregate_id=f"ship-{event.aggregate_id}",
            event_type="ShipmentRequested",
        )
        self.store.append(session, [shipment])


def test_a_handler_that_appends_never_makes_a_scoped_projection_skip_events(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    with Session(pg_engine) as session, session.begin():
        store.append(session, [event("o1", aggregate_type="Order")])
    # The batch below must read o1 while the writer is open: a write transaction of
    # another test or database could otherwise hold o1 back past that step.
    wait_readable(pg_engine)
    projection = ShipOrders(store)
    processor = es.Processor(pg_engine, store, es.ProcessorConfig(batch_size=10))
    with pg_engine.connect() as writer:
        late = writer.begin()
        # A writer that takes its id now and appends later: marked first, so that the
        # store's horizon waits for it (unmarked, it could be refused: test_horizon.py).
        store.mark_writer(writer)
        writer.exec_driver_sql("SELECT pg_current_xact_id()")  # takes its id now
        # Handles o1 and appends a shipment (an id newer than the writer's).
        assert processor.process_batch(projection).handled == 1
        store.append(writer, [event("o2", aggregate_type="Order")])
        late.commit()
    processor.run_until_caught_up(projection)
    assert projection.seen == ["o1", "o2"]


def test_catch_up_inside_a_written_transaction_returns_and_leaves_newer_rows_for_later(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    class Seen(es.Projection):
        name = "seen"

        def __init__(self) -> None:
            self.ids: list[str] = []

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            self.ids.append(event.aggregate_id)

    with pg_engine.connect() as mine:
        outer = mine.begin()
        store.append(mine, [event("mine")])  # this transaction now has an id
        with Session(pg_engine) as other, other.begin():  # a newer one commits
            store.append(other, [event("newer")])
        sessions = sessionmaker(bind=mine, join_transaction_mode="create_savepoint")
        processor = es.Processor(sessions, store)
        processor.warn_on_own_transaction = False
        inside = Seen()
        catching_up = Background(lambda: processor.run_until_caught_up(inside)).start()
        # Whether it returned by itself, recorded before the clean-up: stop() would make a
        # hung catch-up return too.
        returned = catching_up.finished_within(15)
        if not returned:
            processor.stop()
            catching_up.join(5)
        assert returned, "run_until_caught_up waited for a transaction newer than its own"
        assert catching_up.error is None, catching_up.error
        assert catching_up.result == 1
        assert inside.ids == ["mine"]
        outer.rollback()
    later = Seen()
    es.Processor(pg_engine, store).run_until_caught_up(later)
    assert later.ids == ["newer"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event_version": 2**31}, "event_version"),
        ({"event_type": "bad\ud800"}, "not valid Unicode"),
        ({"payload": {"k": "\udfff"}}, "not valid Unicode"),
        ({"trace_id": "\ud800"}, "not valid Unicode"),
    ],
)
def test_more_bad_input_is_refused_before_writing(
    pg_engine: sa.Engine, store: es.EventStore, change: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {
        "bounded_context": "b",
        "aggregate_type": "A",
        "aggregate_id": "1",
        "event_type": "E",
        **change,
    }
    with Session(pg_engine) as session, session.begin():
        with pytest.raises(es.ValidationError, match=message):
            store.append(session, [es.Event(**fields)])  # type: ignore[arg-type]
        # Refused before the database saw it: the transaction is still usable.
        assert store.stream_version(session, "b", "A", "1") == 0


def test_metadata_may_be_any_mapping(pg_engine: sa.Engine, store: es.EventStore) -> None:
    with Session(pg_engine) as session, session.begin():
        stored = store.append(
            session,
            [
                es.Event(
                    bounded_context="b",
                    aggregate_type="A",
                    aggregate_id="1",
                    event_type="E",
                    metadata=MappingProxyType({"user": "u-1"}),
                )
            ],
        )
        assert stored.to_version == 1
        assert store.read_stream(session, "b", "A", "1").events[0].metadata == {"user": "u-1"}
