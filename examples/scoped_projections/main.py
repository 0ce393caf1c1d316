"""Scoped read models next to a global projection (transactional outbox).

A projection can declare which events it wants:

* ``aggregate_types = ("Customer",)``  only that aggregate type;
* ``bounded_contexts = ("sales",)``    only that bounded context (module, service);
* neither                              every event in the store.

The filter runs in SQL, so a scoped projection never even reads the rest, and its
checkpoint still moves past it. Here two scoped read models (customers in the "crm"
context, orders in the "sales" context) run beside a global ``Outbox`` projection that
copies every event into an outbox table in the same transaction as its checkpoint; a
relay then publishes the outbox rows (to a broker, a webhook...) and marks them sent.
Nothing is published twice by the projection and nothing is missed.

    python examples/scoped_projections/main.py

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import sys
import threading
import uuid
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import eventsource
from eventsource import (
    Event,
    EventStore,
    ExpectedVersion,
    PersistedEvent,
    Processor,
    ProcessorConfig,
    Projection,
    ProjectionRunner,
    Runner,
)

_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print whole lines: the projections run in their own threads."""
    with _print_lock:
        print(line, flush=True)


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "sp_customers"

    customer_id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    tier: Mapped[str]


class OrderRow(Base):
    __tablename__ = "sp_orders"

    order_id: Mapped[str] = mapped_column(primary_key=True)
    customer_id: Mapped[str]
    status: Mapped[str]
    total_cents: Mapped[int] = mapped_column(sa.BigInteger)


class OutboxMessage(Base):
    __tablename__ = "sp_outbox"

    global_position: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, autoincrement=False
    )
    topic: Mapped[str]
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    published: Mapped[bool] = mapped_column(default=False)


class CustomerDirectory(Projection):
    """Scoped by bounded context and aggregate type: CRM customers only."""

    name = "sp_customer_directory"
    bounded_contexts = ("crm",)
    aggregate_types = ("Customer",)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        say(f"[CustomerDirectory] {event.bounded_context}/{event.event_type}")
        if event.event_type == "CustomerRegistered":
            session.add(
                Customer(customer_id=event.aggregate_id, name=event.payload["name"], tier="basic")
            )
        elif event.event_type == "CustomerUpgraded":
            customer = session.get(Customer, event.aggregate_id)
            if customer is not None:
                customer.tier = event.payload["tier"]


class OrderBook(Projection):
    """Scoped by bounded context: everything in "sales" (orders and whatever comes later)."""

    name = "sp_order_book"
    bounded_contexts = ("sales",)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        say(f"[OrderBook]         {event.bounded_context}/{event.event_type}")
        if event.event_type == "OrderPlaced":
            session.add(
                OrderRow(
                    order_id=event.aggregate_id,
                    customer_id=event.payload["customer_id"],
                    status="placed",
                    total_cents=event.payload["total_cents"],
                )
            )
        elif event.event_type == "OrderShipped":
            order = session.get(OrderRow, event.aggregate_id)
            if order is not None:
                order.status = "shipped"


class Outbox(Projection):
    """Global: every event of every bounded context becomes an outbox message."""

    name = "sp_outbox"

    def handle(self, event: PersistedEvent, session: Session) -> None:
        session.add(
            OutboxMessage(
                global_position=event.global_position,
                topic=f"{event.bounded_context}.{event.event_type}",
                payload={
                    "event_id": str(event.event_id),
                    "aggregate_id": event.aggregate_id,
                    "data": event.payload,
                },
            )
        )


def relay_outbox(engine: sa.Engine) -> int:
    """Publish unsent outbox messages in order, then mark them sent."""
    published: Counter[str] = Counter()
    with Session(engine) as session, session.begin():
        pending = session.scalars(
            sa.select(OutboxMessage)
            .where(OutboxMessage.published.is_(False))
            .order_by(OutboxMessage.global_position)
        ).all()
        for message in pending:
            # A real relay sends message.topic / message.payload to a broker here.
            published[message.topic] += 1
            message.published = True
    for topic, count in sorted(published.items()):
        print(f"  -> {topic} x{count}")
    return len(pending)


def append_sample(engine: sa.Engine, store: EventStore) -> None:
    def event(context: str, kind: str, aggregate_id: str, event_type: str, **data: Any) -> Event:
        return Event(
            bounded_context=context,
            aggregate_type=kind,
            aggregate_id=aggregate_id,
            event_type=event_type,
            payload=data,
        )

    with Session(engine) as session, session.begin():
        ann, ben = str(uuid.uuid4()), str(uuid.uuid4())
        store.append(
            session,
            [
                event("crm", "Customer", ann, "CustomerRegistered", name="Ann"),
                event("crm", "Customer", ann, "CustomerUpgraded", tier="gold"),
            ],
            ExpectedVersion.no_stream(),
        )
        store.append(
            session,
            [event("crm", "Customer", ben, "CustomerRegistered", name="Ben")],
            ExpectedVersion.no_stream(),
        )
        # A different aggregate type in the crm context: CustomerDirectory does not want it.
        store.append(
            session,
            [event("crm", "Campaign", str(uuid.uuid4()), "CampaignLaunched", title="Spring")],
            ExpectedVersion.no_stream(),
        )
        order = str(uuid.uuid4())
        store.append(
            session,
            [
                event("sales", "Order", order, "OrderPlaced", customer_id=ann, total_cents=4200),
                event("sales", "Order", order, "OrderShipped", carrier="DHL"),
            ],
            ExpectedVersion.no_stream(),
        )
        store.append(
            session,
            [event("sales", "Refund", str(uuid.uuid4()), "RefundIssued", total_cents=500)],
            ExpectedVersion.no_stream(),
        )
    print("Appended 7 events: 4 in crm (3 Customer, 1 Campaign), 3 in sales (2 Order, 1 Refund).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    args = parser.parse_args(argv)

    engine = eventsource.create_engine(args.database_url)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model tables
    store = EventStore()
    append_sample(engine, store)

    projections: list[Projection] = [CustomerDirectory(), OrderBook(), Outbox()]
    handled = Runner().run_until_caught_up(
        [ProjectionRunner(p, Processor(engine, store, ProcessorConfig())) for p in projections]
    )
    print("Handled in this run:")
    for projection in projections:
        scope = ", ".join(
            f"{label}={values}"
            for label, values in (
                ("bounded_contexts", projection.bounded_contexts),
                ("aggregate_types", projection.aggregate_types),
            )
            if values
        )
        print(
            f"  {projection.name:<22} {handled[(projection.name, 0)]:>3} events  "
            f"({scope or 'every event'})"
        )

    print("Relaying the outbox:")
    published = relay_outbox(engine)
    print(f"Published {published} messages.")
    with Session(engine) as session:
        customers = session.scalar(sa.select(sa.func.count()).select_from(Customer))
        gold = session.scalar(
            sa.select(sa.func.count()).select_from(Customer).where(Customer.tier == "gold")
        )
        shipped = session.scalar(
            sa.select(sa.func.count()).select_from(OrderRow).where(OrderRow.status == "shipped")
        )
        outbox = session.scalar(sa.select(sa.func.count()).select_from(OutboxMessage))
    print(
        f"Read models: {customers} customers ({gold} gold), {shipped} shipped orders, "
        f"{outbox} outbox messages"
    )
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
