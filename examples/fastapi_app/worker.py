"""The projection worker, beside the web app: a synchronous engine and a processor.

``python worker.py`` catches up and exits; ``--follow`` keeps running (Ctrl+C stops it
after the batch in hand). The same as ``eventsource run shop:PROJECTIONS``, which is
how a deployment runs it: one more process (a container, a systemd unit) next to the
web server, on the same database.
"""

from __future__ import annotations

import argparse

import shop

import eventsource as es


def catch_up(url: str | None = None) -> int:
    """Handle everything committed so far; return how many events were handled."""
    engine = es.create_engine(url or shop.database_url())
    try:
        processor = es.Processor(engine, es.EventStore())
        return processor.run_until_caught_up(shop.CartTotals())
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--follow", action="store_true", help="keep running until Ctrl+C")
    args = parser.parse_args()
    if not args.follow:
        print(f"worker: handled {catch_up()} events")
        return
    engine = es.create_engine(shop.database_url())
    try:
        es.Processor(engine, es.EventStore()).run(shop.CartTotals())
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
