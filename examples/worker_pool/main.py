"""One projection spread over N partitions inside one process (a worker pool).

Each partition is a Processor with the same projection name, ``total_partitions=N``
and its own ``partition_key``; a Runner runs them in N threads over one connection
pool. Events are assigned to partitions by a hash of their aggregate id, so all the
events of one order land in the same partition, in version order, and no two
partitions ever write the same read-model row.

    python examples/worker_pool/main.py                 # 4 workers
    python examples/worker_pool/main.py --workers 8 --reset   # another count: rebuild

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import sys
import threading
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import eventsource
import eventsource.rebuild
from eventsource import (
    Event,
    EventStore,
    ExpectedVersion,
    PartitionCountChangedError,
    PersistedEvent,
    Processor,
    ProcessorConfig,
    Projection,
    ProjectionRunner,
    Runner,
)

BOUNDED_CONTEXT = "warehouse"
ORDERS_PER_RUN = 12
ITEMS_PER_ORDER = 3

_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


class Base(DeclarativeBase):
    pass


class PickList(Base):
    """One row per order: written by exactly one partition (the order's)."""

    __tablename__ = "wp_pick_lists"

    order_id: Mapped[str] = mapped_column(primary_key=True)
    partition_key: Mapped[int]
    items: Mapped[int]
    version: Mapped[int]


class PickListProjection(Projection):
    name = "wp_pick_lists"
    bounded_contexts = (BOUNDED_CONTEXT,)
    aggregate_types = ("Order",)

    def __init__(self, partition_key: int) -> None:
        self.partition_key = partition_key  # for the printout; the processor does the filtering

    def handle(self, event: PersistedEvent, session: Session) -> None:
        row = session.get(PickList, event.aggregate_id)
        if row is None:
            row = PickList(
                order_id=event.aggregate_id, partition_key=self.partition_key, items=0, version=0
            )
            session.add(row)
        # One aggregate, one partition: its events arrive in version order.
        if event.aggregate_version != row.version + 1:
            raise RuntimeError(
                f"order {event.aggregate_id}: got v{event.aggregate_version} after v{row.version}"
            )
        row.version = event.aggregate_version
        if event.event_type == "ItemAdded":
            row.items += 1
        say(
            f"[worker {self.partition_key}] {event.event_type:<10} order "
            f"{event.aggregate_id[:8]} v{event.aggregate_version}"
        )

    def reset(self, session: Session) -> None:
        """Clear the read model: called by eventsource.rebuild.reset() (and rebuild())."""
        session.execute(sa.delete(PickList))


def append_sample(engine: sa.Engine, store: EventStore) -> None:
    with Session(engine) as session, session.begin():
        for _ in range(ORDERS_PER_RUN):
            order_id = str(uuid.uuid4())
            events = [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Order",
                    aggregate_id=order_id,
                    event_type="ItemAdded",
                    payload={"sku": f"SKU-{n}"},
                )
                for n in range(ITEMS_PER_ORDER)
            ]
            store.append(session, events, ExpectedVersion.no_stream())
    say(f"Appended {ORDERS_PER_RUN} orders x {ITEMS_PER_ORDER} ItemAdded events.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    parser.add_argument("--workers", type=int, default=4, help="number of partitions (default 4)")
    parser.add_argument(
        "--reset",
        action="store_true",
        help="first clear the read model and forget the checkpoints, so the projection is "
        "rebuilt from the first event (needed to change --workers)",
    )
    args = parser.parse_args(argv)

    # One connection per worker: give the pool room for all of them.
    engine = eventsource.create_engine(args.database_url, pool_size=args.workers)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model table
    store = EventStore()
    if args.reset:
        # One transaction: the read model is emptied and the checkpoints deleted together.
        deleted = eventsource.rebuild.reset(
            engine, PickListProjection.name, projection=PickListProjection(0)
        )
        say(f"Reset: read model cleared, {deleted} checkpoint rows deleted.")
    append_sample(engine, store)

    runners = [
        ProjectionRunner(
            PickListProjection(key),
            Processor(
                engine,
                store,
                ProcessorConfig(batch_size=5, partition_key=key, total_partitions=args.workers),
            ),
        )
        for key in range(args.workers)
    ]
    say(f"Running projection wp_pick_lists as {args.workers} partitions in one process...")
    try:
        handled = Runner().run_until_caught_up(runners)
    except PartitionCountChangedError as exc:
        # Changing N would reshuffle which partition owns which order: rebuild instead.
        print(f"Refusing to start: {exc}", file=sys.stderr)
        print(
            "Run again with --reset to rebuild the projection with the new count.", file=sys.stderr
        )
        return 2

    print("Handled in this run, per worker:")
    for (_, key), count in sorted(handled.items()):
        print(f"  worker {key}: {count} events")
    with Session(engine) as session:
        rows = session.execute(
            sa.select(PickList.partition_key, sa.func.count(), sa.func.sum(PickList.items))
            .group_by(PickList.partition_key)
            .order_by(PickList.partition_key)
        ).all()
    print("Read model (all runs), per worker:")
    for key, orders, items in rows:
        print(f"  worker {key}: {orders} orders, {items} items")
    print(f"Total: {sum(r[1] for r in rows)} orders, {sum(int(r[2]) for r in rows)} items")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
