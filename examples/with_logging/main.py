"""Plugging the library's logs into your logging set-up, as JSON lines.

eventsource logs through the standard ``logging`` module, under the loggers
``eventsource.processor`` and ``eventsource.runner``; it never configures handlers
itself. Each record carries structured fields as attributes (passed with ``extra=``):

    projection, partition, total_partitions   on every processor record
    batch_size                                when a processor starts
    handled, skipped, checkpoint,
    checkpoint_transaction_id, duration_ms    after each batch that moved the checkpoint

so any formatter can pick them up. Here a 20-line JSON formatter writes one JSON object
per record to stdout; ship those lines to Loki, Elasticsearch, CloudWatch...

    python examples/with_logging/main.py
    python examples/with_logging/main.py --level DEBUG      # idle polls too
    python examples/with_logging/main.py --follow           # Ctrl+C: eventsource.runner logs

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import sys
import uuid
from datetime import UTC, datetime
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

BOUNDED_CONTEXT = "payments"

#: Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and every extra field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """What an application does once at start-up; the library just uses its loggers."""
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonLinesFormatter}},
            "handlers": {
                "stdout": {
                    "class": "logging.StreamHandler",
                    "formatter": "json",
                    "stream": "ext://sys.stdout",
                }
            },
            "loggers": {
                # "eventsource" covers eventsource.processor and eventsource.runner.
                "eventsource": {"level": level, "handlers": ["stdout"], "propagate": False},
                "payments": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
            },
            "root": {"level": "WARNING", "handlers": ["stdout"]},
        }
    )


log = logging.getLogger("payments")


class Base(DeclarativeBase):
    pass


class Balance(Base):
    __tablename__ = "wl_balances"

    wallet_id: Mapped[str] = mapped_column(primary_key=True)
    cents: Mapped[int] = mapped_column(sa.BigInteger)


class WalletBalances(Projection):
    name = "wl_wallet_balances"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        row = session.get(Balance, event.aggregate_id)
        if row is None:
            row = Balance(wallet_id=event.aggregate_id, cents=0)
            session.add(row)
        row.cents += event.payload["cents"]


class LargeTopUpAlerts(Projection):
    name = "wl_large_top_up_alerts"
    bounded_contexts = (BOUNDED_CONTEXT,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        if event.payload["cents"] >= 5_000:
            # Your own records carry fields the same way.
            log.warning(
                "large top-up",
                extra={"wallet_id": event.aggregate_id, "cents": event.payload["cents"]},
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    parser.add_argument("--level", default="INFO", help="level of the eventsource loggers")
    parser.add_argument("--follow", action="store_true", help="keep running until Ctrl+C / SIGTERM")
    args = parser.parse_args(argv)
    configure_logging(args.level)

    engine = eventsource.create_engine(args.database_url)
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model table
    store = EventStore()

    with Session(engine) as session, session.begin():
        for n in range(5):
            wallet = f"wallet-{uuid.uuid4().hex[:8]}"
            top_ups = [
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type="Wallet",
                    aggregate_id=wallet,
                    event_type="WalletToppedUp",
                    payload={"cents": 1_000 * (i + 1) + n},
                )
                for i in range(5)
            ]
            store.append(session, top_ups, ExpectedVersion.no_stream())
    log.info("appended sample events", extra={"events": 25, "wallets": 5})

    pairs = [
        ProjectionRunner(
            WalletBalances(), Processor(engine, store, ProcessorConfig(batch_size=10))
        ),
        ProjectionRunner(
            LargeTopUpAlerts(), Processor(engine, store, ProcessorConfig(batch_size=25))
        ),
    ]
    runner = Runner()  # logs to "eventsource.runner" when a signal stops it or a projection fails
    if args.follow:
        log.info("following new events; Ctrl+C or SIGTERM stops")
        runner.run(pairs)
    else:
        runner.run_until_caught_up(pairs)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
