"""Projection behaviour tested the way users test theirs: the shipped plugin and factories.

These run on SQLite and PostgreSQL (tests/conftest.py parametrizes the plugin's
database), each test inside one rolled-back transaction.
"""

from __future__ import annotations

import factory
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.testing import RunProjections
from eventsource.testing.factories import EventFactory


class OrderPlacedFactory(EventFactory):
    bounded_context = "sales"
    aggregate_type = "Order"
    event_type = "OrderPlaced"
    payload = factory.Dict({"amount": factory.Sequence(lambda n: n + 1)})


class UserCreatedFactory(EventFactory):
    bounded_context = "identity"
    aggregate_type = "User"
    event_type = "UserCreated"


class Recorder(es.Projection, abstract=True):
    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(
            sa.text("INSERT INTO recorded (projection, position) VALUES (:p, :pos)"),
            {"p": self.name, "pos": event.global_position},
        )


class Orders(Recorder):
    name = "orders_only"
    aggregate_types = ("Order",)


class Sales(Recorder):
    name = "sales_only"
    bounded_contexts = ("sales",)


class SalesOrders(Recorder):
    name = "sales_orders"
    aggregate_types = ("Order",)
    bounded_contexts = ("sales",)


class Everything(Recorder):
    name = "everything"


@pytest.fixture
def recorded(eventsource_session: Session) -> Session:
    eventsource_session.execute(sa.text("CREATE TABLE recorded (projection TEXT, position BIGINT)"))
    return eventsource_session


def positions(session: Session, projection: str) -> list[int]:
    rows = session.execute(
        sa.text("SELECT position FROM recorded WHERE projection = :p ORDER BY position"),
        {"p": projection},
    )
    return list(rows.scalars())


def test_scoping_by_type_context_and_both(
    recorded: Session, run_projections: RunProjections
) -> None:
    sales_order = OrderPlacedFactory.create()
    other_order = OrderPlacedFactory.create(bounded_context="returns")
    sales_user = UserCreatedFactory.create(bounded_context="sales")
    user = UserCreatedFactory.create()

    handled = run_projections(Orders(), Sales(), SalesOrders(), Everything())

    expected = {
        "orders_only": [sales_order, other_order],
        "sales_only": [sales_order, sales_user],
        "sales_orders": [sales_order],
        "everything": [sales_order, other_order, sales_user, user],
    }
    for name, events in expected.items():
        wanted = [e.global_position for e in events]
        assert [e.global_position for e in handled[name]] == wanted, name
        assert positions(recorded, name) == wanted, name


def test_a_whole_history_in_one_append_reaches_a_projection_in_version_order(
    recorded: Session, run_projections: RunProjections
) -> None:
    history = OrderPlacedFactory.create_batch(5, aggregate_id="order-7")
    assert [e.aggregate_version for e in history] == [1, 2, 3, 4, 5]
    handled = run_projections(Orders(), batch_size=2)
    assert [e.aggregate_version for e in handled["orders_only"]] == [1, 2, 3, 4, 5]
    assert [e.payload["amount"] for e in handled["orders_only"]] == [
        e.payload["amount"] for e in history
    ]


def test_expected_version_through_the_factory(recorded: Session) -> None:
    first = OrderPlacedFactory.create(aggregate_id="order-9")
    OrderPlacedFactory.create(
        aggregate_id="order-9", expected_version=es.ExpectedVersion.exact(first.aggregate_version)
    )
    with pytest.raises(es.OptimisticConcurrencyError):
        OrderPlacedFactory.create(
            aggregate_id="order-9", expected_version=es.ExpectedVersion.exact(1)
        )
