"""The worker process of ``bench/latency.py``: one ``Runner`` running P recording projections.

Not meant to be run by hand: ``bench/latency.py`` starts it as
``python bench/_latency_worker.py SPEC`` (``SPEC``: a JSON object, see :class:`Spec`)
and talks to it over its standard streams, one JSON object per line:

- it says ``{"event": "ready", ...}`` on stdout once its engine reaches the database
  (with a reading of ``time.monotonic()`` and ``time.time()`` taken together, so the
  parent can check that both processes share one monotonic clock), then runs
  ``Runner().run(pairs)`` in its main thread until stopped;
- it reads commands on stdin: ``reset`` (zero the counters and take a reading of this
  process's CPU time and the clock), ``report`` (answer with what was counted since
  the last ``reset``) and ``stop`` (``runner.stop()``: the batches in hand commit, then
  it exits). End of input (the parent went away) stops it too.

Each projection's ``handle`` takes ``time.monotonic()`` and ``time.time()`` first, then
inserts (projection, global_position, both times) into the read-model table, in the
processor's batch transaction. Every statement the engine executes is counted by a
``before_cursor_execute`` listener, every commit and rollback by the engine's
``commit`` and ``rollback`` events.

Everything else on stdout would corrupt the protocol: the protocol gets its own copy of
the stdout descriptor and descriptor 1 is pointed at stderr, where the logs go.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource
from eventsource import EventStore, PersistedEvent, Processor, ProcessorConfig, Projection, Runner


def read_model_table(name: str) -> sa.Table:
    """Where the projections record when they handled each event (shared with the parent)."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("projection", sa.Text, primary_key=True),
        sa.Column("global_position", sa.BigInteger, primary_key=True),
        sa.Column("handled_monotonic", sa.Float(precision=53), nullable=False),
        sa.Column("handled_wall", sa.Float(precision=53), nullable=False),
    )


@dataclass(frozen=True)
class Spec:
    """What the parent asks for (``SPEC``, as JSON)."""

    url: str
    read_model: str
    projections: list[str]
    application_name: str
    wake_ups: bool | None
    """``ProcessorConfig(wake_ups=...)``; None: leave the field out (it may not exist)."""
    notify: bool | None
    """``EventStore(notify=...)``; None: leave the argument out (it may not exist)."""
    verbose: bool = False


class Recorder(Projection):
    """Records the moment its handler starts, per event."""

    name = "latency"

    def __init__(self, name: str, table: sa.Table) -> None:
        self.name = name
        self.insert = table.insert()

    def handle(self, event: PersistedEvent, session: Session) -> None:
        monotonic = time.monotonic()
        wall = time.time()
        session.execute(
            self.insert,
            {
                "projection": self.name,
                "global_position": event.global_position,
                "handled_monotonic": monotonic,
                "handled_wall": wall,
            },
        )


class Counters:
    """Statements, commits and rollbacks of one engine since the last ``reset``."""

    def __init__(self, engine: sa.Engine) -> None:
        self._lock = threading.Lock()
        self.statements = self.commits = self.rollbacks = 0
        self.since = time.monotonic()
        self.cpu_since = time.process_time()
        sa.event.listen(engine, "before_cursor_execute", self._statement)
        sa.event.listen(engine, "commit", self._commit)
        sa.event.listen(engine, "rollback", self._rollback)

    def _statement(self, *args: Any) -> None:
        with self._lock:
            self.statements += 1

    def _commit(self, *args: Any) -> None:
        with self._lock:
            self.commits += 1

    def _rollback(self, *args: Any) -> None:
        with self._lock:
            self.rollbacks += 1

    def reset(self) -> None:
        with self._lock:
            self.statements = self.commits = self.rollbacks = 0
            self.since = time.monotonic()
            self.cpu_since = time.process_time()  # this process, every thread

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "statements": self.statements,
                "commits": self.commits,
                "rollbacks": self.rollbacks,
                "seconds": time.monotonic() - self.since,
                "cpu_seconds": time.process_time() - self.cpu_since,
            }


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    protocol: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, not into the protocol
    sys.stdout = sys.stderr
    logging.basicConfig(
        level=logging.INFO if spec.verbose else logging.WARNING,
        format=f"%(asctime)s latency worker {os.getpid()} %(threadName)s %(name)s: %(message)s",
    )
    send_lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        with send_lock:
            protocol.write(json.dumps(message) + "\n")

    # The pool the CLI's `eventsource run` gives one processor per projection.
    engine = eventsource.create_engine(
        spec.url,
        application_name=spec.application_name,
        pool_size=max(5, 2 * len(spec.projections) + 1),
    )
    counters = Counters(engine)
    table = read_model_table(spec.read_model)
    # Keyword arguments only where given: an eventsource without them must still run.
    config_args: dict[str, Any] = {} if spec.wake_ups is None else {"wake_ups": spec.wake_ups}
    store_args: dict[str, Any] = {} if spec.notify is None else {"notify": spec.notify}
    config = ProcessorConfig(**config_args)  # every other setting: the default
    store = EventStore(**store_args)
    pairs = [(Recorder(name, table), Processor(engine, store, config)) for name in spec.projections]
    runner = Runner()

    def control() -> None:
        """Serve the parent's commands; stop the runner on ``stop`` or end of input."""
        try:
            for line in sys.stdin:
                command = line.strip()
                if command == "reset":
                    counters.reset()
                    send({"event": "reset"})
                elif command == "report":
                    send({"event": "report", **counters.report()})
                elif command == "stop":
                    break
                elif command:
                    send({"event": "error", "message": f"unknown command {command!r}"})
        finally:
            runner.stop()

    try:
        with engine.connect() as conn:  # fail here, before "ready", if unreachable
            conn.execute(sa.text("SELECT 1"))
        threading.Thread(target=control, name="control", daemon=True).start()
        counters.reset()
        send(
            {
                "event": "ready",
                "pid": os.getpid(),
                "monotonic": time.monotonic(),
                "wall": time.time(),
                "config": repr(config),
            }
        )
        runner.run(pairs)
    finally:
        engine.dispose()
    send({"event": "stopped"})


if __name__ == "__main__":
    main()
