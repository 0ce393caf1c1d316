"""Appends events on command, from a process of its own (see tests/test_wakeups.py).

Usage: python wakeup_writer.py DATABASE_URL [--no-notify]

Prints "ready", then reads commands from stdin, one a line, and answers each with one
line on stdout:

- ``append AGGREGATE_TYPE AGGREGATE_ID``: appends one event (bounded context "sales")
  and commits; answers "appended POSITION".
- ``rollback AGGREGATE_TYPE AGGREGATE_ID``: appends one event and rolls back; answers
  "rolled back".

Exits 0 at the end of its input. It stays alive between commands, as an application's
writer does (its hints leave from a notifier thread once the commit has returned).
"""

from __future__ import annotations

import sys

from sqlalchemy.orm import Session

import eventsource as es


def main(argv: list[str]) -> int:
    url = argv[1]
    store = es.EventStore(notify="--no-notify" not in argv[2:])
    engine = es.create_engine(url)
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            command, aggregate_type, aggregate_id = line.split()
            event = es.Event(
                bounded_context="sales",
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                event_type="Happened",
                payload={},
            )
            with Session(engine) as session:
                result = store.append(session, [event])
                if command == "append":
                    session.commit()
                    answer = f"appended {result.events[-1].global_position}"
                elif command == "rollback":
                    session.rollback()
                    answer = "rolled back"
                else:
                    raise SystemExit(f"unknown command {command!r}")
            print(answer, flush=True)  # the session is closed: its hint is published
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
