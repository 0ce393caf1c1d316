"""Blue/green rebuild: a projection's new version builds beside the running one, then
readers switch to it in one transaction and the old version is retired.

``CustomerStats`` v1 counts orders per customer. v2 changes the read model (it also
sums what each customer spent), so it needs every past event again. Instead of
rebuilding v1 in place (readers would see a half-empty table meanwhile), v2 is deployed
*beside* v1: its own checkpoints (``bg_customer_stats@v2``) and its own table
(``bg_customer_stats_v2``). Readers keep reading v1 until v2 has caught up; then
``eventsource.versions.switch`` moves them over and retires v1.

    python examples/blue_green/main.py      # the whole flow, then exit
    python examples/blue_green/main.py      # again: v2 is active, it handles the new events

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import sys
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource
from eventsource import (
    Event,
    EventStore,
    ExpectedVersion,
    PersistedEvent,
    Processor,
    ProcessorConfig,
    Projection,
    Runner,
    versions,
)

NAME = "bg_customer_stats"
BASE_TABLE = "bg_customer_stats"
BOUNDED_CONTEXT = "bg_shop"
#: (customer, amounts of their orders in cents): 3 customers and 5 orders per run.
SAMPLE = (("Alice", (1250, 2000)), ("Bob", (899,)), ("Carol", (4500, 7525)))

metadata = sa.MetaData()
#: Each version's table, named as the projection names it (Projection.table_name).
TABLES = {
    versions.table_name(BASE_TABLE, 1): sa.Table(
        versions.table_name(BASE_TABLE, 1),
        metadata,
        sa.Column("customer", sa.Text, primary_key=True),
        sa.Column("orders", sa.Integer, nullable=False),
    ),
    versions.table_name(BASE_TABLE, 2): sa.Table(  # v2: a changed read model
        versions.table_name(BASE_TABLE, 2),
        metadata,
        sa.Column("customer", sa.Text, primary_key=True),
        sa.Column("orders", sa.Integer, nullable=False),
        sa.Column("spent_cents", sa.BigInteger, nullable=False),
    ),
}


class CustomerStatsV1(Projection):
    """Orders per customer."""

    name = NAME
    version = 1
    bounded_contexts = (BOUNDED_CONTEXT,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        table = TABLES[self.table_name(BASE_TABLE)]  # bg_customer_stats_v1
        customer = event.payload["customer"]
        if event.event_type == "CustomerRegistered":
            session.execute(table.insert().values(customer=customer, orders=0))
        elif event.event_type == "OrderPlaced":
            session.execute(
                table.update().where(table.c.customer == customer).values(orders=table.c.orders + 1)
            )

    def retire(self, session: Session) -> None:
        """Drop v1's table once readers have moved to v2 (called by the switch)."""
        TABLES[self.table_name(BASE_TABLE)].drop(session.connection())


class CustomerStatsV2(Projection):
    """Orders per customer and what each spent: needs every past event again."""

    name = NAME
    version = 2
    bounded_contexts = (BOUNDED_CONTEXT,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        table = TABLES[self.table_name(BASE_TABLE)]  # bg_customer_stats_v2
        customer = event.payload["customer"]
        if event.event_type == "CustomerRegistered":
            session.execute(table.insert().values(customer=customer, orders=0, spent_cents=0))
        elif event.event_type == "OrderPlaced":
            session.execute(
                table.update()
                .where(table.c.customer == customer)
                .values(
                    orders=table.c.orders + 1,
                    spent_cents=table.c.spent_cents + event.payload["amount_cents"],
                )
            )


def customer_report(engine: sa.Engine) -> str:
    """What a web request would do: ask which version is active, read that version's
    table, in one transaction."""
    with Session(engine) as session:
        version = versions.active_version(session, NAME)
        table = TABLES[versions.table_name(BASE_TABLE, version)]
        rows = session.execute(sa.select(table).order_by(table.c.customer)).mappings().all()
    if version == 2:
        listed = [
            f"{r['customer']} {r['orders']} orders ${r['spent_cents'] / 100:.2f}" for r in rows
        ]
    else:
        listed = [f"{r['customer']} {r['orders']} orders" for r in rows]
    return f"Readers use v{version}: " + ", ".join(listed)


def append_sample(engine: sa.Engine, store: EventStore) -> None:
    run = uuid.uuid4().hex[:4]
    with Session(engine) as session, session.begin():
        for customer, amounts in SAMPLE:
            name = f"{customer}-{run}"
            events = [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Customer",
                    aggregate_id=name,
                    event_type="CustomerRegistered",
                    payload={"customer": name},
                )
            ]
            events += [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Customer",
                    aggregate_id=name,
                    event_type="OrderPlaced",
                    payload={"customer": name, "amount_cents": amount},
                )
                for amount in amounts
            ]
            store.append(session, events, ExpectedVersion.no_stream())
    print("Appended 3 customers and 5 orders.")


def print_status(engine: sa.Engine) -> None:
    """The same rows as `eventsource versions status`."""
    for row in versions.status(engine, name=NAME):
        readers = "active" if row.active else ("caught up" if row.caught_up else "building")
        print(
            f"  {row.checkpoint_name:22} {readers:9}  checkpoint {row.checkpoint:4}  lag {row.lag}"
        )


def processor(engine: sa.Engine, batch_size: int = 100) -> Processor:
    return Processor(engine, config=ProcessorConfig(batch_size=batch_size, poll_interval=0.05))


def first_run(engine: sa.Engine) -> None:
    print("1. v1 is running and readers use it.")
    processor(engine).run_until_caught_up(CustomerStatsV1())
    if versions.active_version(engine, NAME) is None:
        versions.switch(engine, NAME, 1)  # the first deployment: make v1 the active one
    print(customer_report(engine))

    print("2. v2 is deployed beside v1: its own checkpoints, its own table.")
    partly = processor(engine, batch_size=4)

    def one_batch(result: eventsource.BatchResult) -> None:
        if result.handled:
            partly.stop()

    partly.run_until_caught_up(CustomerStatsV2(), on_batch=one_batch)
    print_status(engine)
    try:
        versions.switch(engine, NAME, 2)
    except eventsource.VersionNotCaughtUpError as exc:
        print(f"Switch refused, nothing changed: {type(exc).__name__} (lag {exc.lag})")
    print(customer_report(engine))

    print("3. Both run until caught up (one Runner, one checkpoint each).")
    Runner().run_until_caught_up(
        [(CustomerStatsV1(), processor(engine)), (CustomerStatsV2(), processor(engine))]
    )
    print_status(engine)

    print("4. Switch readers to v2 and retire v1.")
    result = versions.switch(engine, NAME, 2, retire=CustomerStatsV1())
    print(result.summary())
    print(customer_report(engine))
    print_status(engine)

    print("5. A v1 worker still deployed stops instead of replaying from scratch:")
    try:
        processor(engine).run_until_caught_up(CustomerStatsV1())
    except eventsource.ProjectionRetiredError as exc:
        print(f"  {type(exc).__name__}: readers use version 2")


def later_run(engine: sa.Engine) -> None:
    print("v2 is active since an earlier run; it handles the new events.")
    handled = processor(engine).run_until_caught_up(CustomerStatsV2())
    print(f"v2 handled {handled} new events.")
    print(customer_report(engine))
    print_status(engine)


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
    active = versions.active_version(engine, NAME)
    if active is None or active < 2:
        metadata.create_all(engine)  # both versions' tables
    else:
        metadata.create_all(engine, tables=[TABLES[versions.table_name(BASE_TABLE, 2)]])
    append_sample(engine, EventStore())
    if active is None or active < 2:
        first_run(engine)
    else:
        later_run(engine)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
