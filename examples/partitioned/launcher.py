"""Start 4 worker processes on one projection and check they split the work exactly.

1. ``main.py --append N`` adds N events (to N/4 accounts);
2. four ``main.py`` processes start at once, partition keys 0..3 of 4, given through the
   ``PARTITION_KEY`` / ``TOTAL_PARTITIONS`` environment variables as a process manager
   (systemd, Kubernetes, supervisord) would;
3. each catches up and exits; ``main.py --check`` then compares the read model with the
   event store: every event handled exactly once, none missed, none repeated.

    python examples/partitioned/launcher.py
    python examples/partitioned/launcher.py --processes 8 --events 400

Run it again: new events are appended and each process picks up where its partition
left off. The database is ``$DATABASE_URL`` (default: ``eventsource.db`` here).
Use the same ``--processes`` every time (changing the partition count of a projection
means rebuilding it; the workers refuse to start otherwise).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

MAIN = Path(__file__).resolve().parent / "main.py"


def run_main(*args: str) -> None:
    subprocess.run([sys.executable, str(MAIN), *args], check=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--events", type=int, default=200, help="events to append (default 200)")
    args = parser.parse_args(argv)

    run_main("--append", str(args.events))

    print(f"Starting {args.processes} worker processes...")
    started = time.perf_counter()
    workers = []
    for key in range(args.processes):
        env = {**os.environ, "PARTITION_KEY": str(key), "TOTAL_PARTITIONS": str(args.processes)}
        workers.append(subprocess.Popen([sys.executable, str(MAIN)], env=env))
    codes = [worker.wait(timeout=300) for worker in workers]
    print(f"All workers exited ({time.perf_counter() - started:.1f} s), exit codes {codes}")
    if any(codes):
        return 1

    result = subprocess.run([sys.executable, str(MAIN), "--check"], timeout=300)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
