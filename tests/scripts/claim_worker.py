"""One identical worker that claims a share of a projection's partitions (see test_claims).

Usage: python claim_worker.py DATABASE_URL TOTAL_PARTITIONS LEASE_SECONDS [BATCH_SIZE]

Runs the ``claimed_log`` projection with ``claim=True`` until SIGINT or SIGTERM. The
read-model table ``claimed_log`` must exist (the test creates it). Each handled event
adds a row naming this worker and the owner its partition's claim names at that moment
(read inside the batch's transaction): a batch committed by a worker that no longer
owns the partition shows up as a row whose two differ. Prints "worker ID" at start and
"stopped cleanly" when the run returns.
"""

from __future__ import annotations

import logging
import sys

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.claims import worker_id


class ClaimedLog(es.Projection):
    name = "claimed_log"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        owner = session.execute(
            sa.text(
                "SELECT c.owner FROM events_partition_claims c JOIN events e "
                "ON e.global_position = :pos WHERE c.projection_name = 'claimed_log' "
                "AND c.partition_key = e.partition_hash % c.total_partitions"
            ),
            {"pos": event.global_position},
        ).scalar()
        session.execute(
            sa.text(
                "INSERT INTO claimed_log (global_position, aggregate_id, aggregate_version, "
                "worker, claim_owner) VALUES (:pos, :agg, :version, :worker, :owner)"
            ),
            {
                "pos": event.global_position,
                "agg": event.aggregate_id,
                "version": event.aggregate_version,
                "worker": worker_id(),
                "owner": owner,
            },
        )


def main(argv: list[str]) -> int:
    url, total, lease = argv[1], int(argv[2]), float(argv[3])
    batch_size = int(argv[4]) if len(argv) > 4 else 20
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s: %(message)s"
    )
    logging.getLogger("eventsource.processor").setLevel(logging.WARNING)
    engine = es.create_engine(url, pool_size=total + 2)
    print(f"worker {worker_id()}", flush=True)
    try:
        config = es.ProcessorConfig(
            batch_size=batch_size,
            total_partitions=total,
            claim=True,
            lease=lease,
            poll_interval=0.05,
        )
        es.Runner().run([(ClaimedLog(), es.Processor(engine, es.EventStore(), config))])
    finally:
        engine.dispose()
    print("stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
