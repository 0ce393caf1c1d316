"""Run one slow projection under a Runner until SIGINT or SIGTERM (see test_graceful_stop).

Usage: python graceful_runner.py DATABASE_URL [SECONDS_PER_EVENT]

The read-model table ``graceful_log`` must exist already (the test creates it). Prints
"stopped cleanly" and exits 0 once the runner has returned.
"""

from __future__ import annotations

import sys
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es


class GracefulLog(es.Projection):
    name = "graceful_log"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        print(f"handling {event.global_position}", flush=True)
        time.sleep(self.delay)  # slow enough to be stopped mid-stream
        session.execute(
            sa.text("INSERT INTO graceful_log (global_position) VALUES (:p)"),
            {"p": event.global_position},
        )


def main(argv: list[str]) -> int:
    url = argv[1]
    delay = float(argv[2]) if len(argv) > 2 else 0.02
    engine = es.create_engine(url)
    try:
        config = es.ProcessorConfig(batch_size=10, poll_interval=0.05)
        processor = es.Processor(engine, es.EventStore(), config)
        es.Runner().run([(GracefulLog(delay), processor)])  # until SIGINT/SIGTERM
    finally:
        engine.dispose()
    print("stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
