"""Projection classes: configuration mistakes fail at class creation; scoping filters in SQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from tests.projection_support import (
    AppliedLog,
    append,
    applied,
    checkpoint,
    create_applied_table,
    event,
    head,
    processor,
)

# -- class creation ----------------------------------------------------------------


def _handle(self: es.Projection, event: es.PersistedEvent, session: Session) -> None:
    pass


def test_projection_without_name_is_refused() -> None:
    with pytest.raises(es.ConfigurationError, match="NoName needs a non-empty `name`"):

        class NoName(es.Projection):
            def handle(self, event: es.PersistedEvent, session: Session) -> None:
                pass


@pytest.mark.parametrize("name", ["", "   ", None, 42])
def test_projection_with_empty_or_non_text_name_is_refused(name: object) -> None:
    with pytest.raises(es.ConfigurationError, match="BadName needs a non-empty `name`"):
        type("BadName", (es.Projection,), {"name": name, "handle": _handle})


def test_projection_without_handle_is_refused() -> None:
    with pytest.raises(es.ConfigurationError, match="must override handle"):

        class NoHandle(es.Projection):
            name = "no_handle"


@pytest.mark.parametrize("attribute", ["aggregate_types", "bounded_contexts"])
def test_scope_given_as_a_string_is_refused(attribute: str) -> None:
    # ("User") is a str, not a tuple: iterating it would scope to "U", "s", "e", "r".
    with pytest.raises(es.ConfigurationError, match=f"{attribute} must be a tuple of names"):
        type(
            "StrScope",
            (es.Projection,),
            {"name": "str_scope", attribute: "User", "handle": _handle},
        )


@pytest.mark.parametrize("value", [("User", ""), ("User", 3), 5])
def test_scope_with_bad_items_is_refused(value: object) -> None:
    with pytest.raises(es.ConfigurationError, match="aggregate_types"):

        class BadItems(es.Projection):
            name = "bad_items"
            aggregate_types = value  # type: ignore[assignment]

            def handle(self, event: es.PersistedEvent, session: Session) -> None:
                pass


def test_abstract_base_class_is_allowed_and_its_subclasses_are_checked() -> None:
    class Base(es.Projection, abstract=True):
        aggregate_types = ["User", "Admin"]  # type: ignore[assignment]

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            pass

    class Concrete(Base):
        name = "concrete"

    normalised: object = Concrete.aggregate_types
    assert normalised == ("User", "Admin")  # a list becomes a tuple
    assert Concrete().name == "concrete"
    with pytest.raises(es.ConfigurationError, match="non-empty `name`"):

        class Unnamed(Base):
            pass

    class StillAbstract(es.Projection, abstract=True):
        """No name and no handle: fine, because it is abstract."""

    with pytest.raises(es.ConfigurationError, match="must override handle"):

        class FromAbstract(StillAbstract):
            name = "from_abstract"


def test_processor_refuses_something_that_is_not_a_projection_instance(tmp_path: Path) -> None:
    engine = es.create_engine(f"sqlite:///{tmp_path / 'never.db'}")

    class Real(AppliedLog):
        name = "real"

    with pytest.raises(es.ConfigurationError, match="Projection instance"):
        processor(engine).run_until_caught_up(Real)  # type: ignore[arg-type]


# -- scoping -------------------------------------------------------------------------


class OrdersEverywhere(AppliedLog):
    name = "orders_everywhere"
    aggregate_types = ("Order",)


class SalesContext(AppliedLog):
    name = "sales_context"
    bounded_contexts = ("sales",)


class SalesOrders(AppliedLog):
    name = "sales_orders"
    aggregate_types = ("Order",)
    bounded_contexts = ("sales",)


class ManyScopes(AppliedLog):
    name = "many_scopes"
    aggregate_types = ("Order", "User")
    bounded_contexts = ("billing", "identity")


KINDS = [("sales", "Order"), ("sales", "Customer"), ("billing", "Order"), ("identity", "User")]


@pytest.fixture
def scoped_events(engine: sa.Engine, store: es.EventStore) -> list[es.PersistedEvent]:
    create_applied_table(engine)
    batches = []
    for i in range(120):
        bc, at = KINDS[(i * 7 + i // 5) % len(KINDS)]
        batches.append([event(f"{at}-{i % 9}", bounded_context=bc, aggregate_type=at)])
    # The newest events are out of every scope below: the checkpoint must still reach them.
    for _ in range(3):
        batches.append([event("late-user", bounded_context="identity", aggregate_type="User")])
    for _ in range(4):
        batches.append([event("late-other", bounded_context="hr", aggregate_type="Person")])
    return append(engine, store, batches, per_transaction=7)


SCOPES: list[tuple[type[AppliedLog], Callable[[es.PersistedEvent], bool]]] = [
    (OrdersEverywhere, lambda e: e.aggregate_type == "Order"),
    (SalesContext, lambda e: e.bounded_context == "sales"),
    (SalesOrders, lambda e: e.bounded_context == "sales" and e.aggregate_type == "Order"),
    (
        ManyScopes,
        lambda e: (
            e.aggregate_type in ("Order", "User") and e.bounded_context in ("billing", "identity")
        ),
    ),
]


def test_scoped_projections_see_only_their_events_and_checkpoints_reach_the_head(
    engine: sa.Engine, store: es.EventStore, scoped_events: list[es.PersistedEvent]
) -> None:
    top = scoped_events[-1].global_position
    assert head(engine) == top
    cases = []
    for projection_class, wanted in SCOPES:
        expected = [e.global_position for e in scoped_events if wanted(e)]
        assert 0 < len(expected) < len(scoped_events)
        # One batch for everything, and many small batches (each with filtered tails).
        small = type(
            f"{projection_class.__name__}Small",
            (projection_class,),
            {"name": f"{projection_class.name}_small"},
        )
        for projection, batch_size in ((projection_class(), 1000), (small(), 6)):
            handled = processor(engine, store, batch_size=batch_size).run_until_caught_up(
                projection
            )
            rows = applied(engine, projection.name)
            assert [r.global_position for r in rows] == expected, projection.name
            assert handled == len(expected) == projection.calls
            found = checkpoint(engine, projection.name)
            assert found is not None
            # Past the filtered-out tail: a scoped projection does not rescan it each poll.
            assert found.global_position == top, projection.name
            assert found.events_handled == len(expected)
            cases.append((projection, batch_size, len(expected)))

    # New events out of every scope still move the checkpoints; nothing runs twice.
    more = append(engine, store, [[event("x", bounded_context="hr", aggregate_type="Person")]])
    for projection, batch_size, count in cases:
        proc = processor(engine, store, batch_size=batch_size)
        assert proc.run_until_caught_up(projection) == 0
        found = checkpoint(engine, projection.name)
        assert found is not None
        assert found.global_position == more[-1].global_position
        assert len(applied(engine, projection.name)) == count
