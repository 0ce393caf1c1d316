"""Prometheus metrics from processors, checked by value after known runs on real databases."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.metrics import PrometheusMetrics
from eventsource.processor import BatchResult
from tests.projection_support import (
    LogA,
    LogB,
    append,
    append_spread,
    applied,
    create_applied_table,
    event,
    wait_until,
)


class EvenOddStrategy:
    """A Python-only strategy (no ``sql_filter``): aggregate ``agg-N`` goes to N % total."""

    def should_process(self, aggregate_id: str, partition_key: int, total_partitions: int) -> bool:
        return int(aggregate_id.rsplit("-", 1)[1]) % total_partitions == partition_key


class Scrape:
    """Reads one registry's samples by projection and partition."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def __call__(self, name: str, projection: str, partition: int = 0) -> float | None:
        labels = {"projection": projection, "partition": str(partition)}
        return self.registry.get_sample_value(f"eventsource_{name}", labels)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> PrometheusMetrics:
    return PrometheusMetrics(registry=registry)


@pytest.fixture
def scrape(registry: CollectorRegistry) -> Scrape:
    return Scrape(registry)


def make_processor(
    engine: sa.Engine, store: es.EventStore, metrics: PrometheusMetrics, **config: Any
) -> es.Processor:
    config.setdefault("poll_interval", 0.01)
    return es.Processor(engine, store, es.ProcessorConfig(**config), metrics=metrics)


def run(proc: es.Processor, projection: es.Projection) -> list[BatchResult]:
    """Catch up and return every batch the processor ran (committed ones)."""
    batches: list[BatchResult] = []
    proc.run_until_caught_up(projection, on_batch=batches.append)
    return batches


def test_counters_after_a_known_run(
    engine: sa.Engine, store: es.EventStore, metrics: PrometheusMetrics, scrape: Scrape
) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 25)
    batches_a = run(make_processor(engine, store, metrics, batch_size=10), LogA())
    batches_b = run(make_processor(engine, store, metrics, batch_size=100), LogB())
    assert sum(b.handled for b in batches_a) == 25
    assert len([b for b in batches_a if b.read]) == 3  # 10 + 10 + 5

    assert scrape("events_handled_total", "log_a") == 25
    assert scrape("events_handled_total", "log_b") == 25
    assert scrape("batch_duration_seconds_count", "log_a") == len(batches_a)
    assert scrape("batch_duration_seconds_count", "log_b") == len(batches_b)
    duration = scrape("batch_duration_seconds_sum", "log_a")
    assert duration is not None
    assert 0 < duration < 60
    assert scrape("checkpoint_position", "log_a") == 25
    assert scrape("checkpoint_position", "log_b") == 25
    # Nothing skipped (the hash strategy filters in SQL) and nothing failed.
    assert scrape("events_skipped_total", "log_a") is None
    assert scrape("batch_errors_total", "log_a") is None
    assert scrape("events_handled_total", "log_a", partition=1) is None

    append_spread(engine, store, 4, prefix="more")
    more = run(make_processor(engine, store, metrics, batch_size=10), LogA())
    assert scrape("events_handled_total", "log_a") == 29
    assert scrape("batch_duration_seconds_count", "log_a") == len(batches_a) + len(more)
    assert scrape("checkpoint_position", "log_a") == 29


def test_python_side_partitions_count_skipped_events(
    engine: sa.Engine, store: es.EventStore, metrics: PrometheusMetrics, scrape: Scrape
) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 30, aggregates=10)  # agg-0..agg-9, 3 events each
    for key in (0, 1):
        proc = make_processor(
            engine,
            store,
            metrics,
            batch_size=8,
            partition_key=key,
            total_partitions=2,
            partition_strategy=EvenOddStrategy(),
        )
        run(proc, LogA(partition=key))

    for key in (0, 1):
        assert scrape("events_handled_total", "log_a", key) == 15
        assert scrape("events_skipped_total", "log_a", key) == 15
        assert scrape("checkpoint_position", "log_a", key) == 30
    rows = applied(engine, "log_a")
    assert len(rows) == 30
    assert all(int(r.aggregate_id.split("-")[1]) % 2 == r.partition_key for r in rows)


def test_a_failing_batch_counts_an_error_and_nothing_handled(
    engine: sa.Engine, store: es.EventStore, metrics: PrometheusMetrics, scrape: Scrape
) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 12)
    projection = LogA(fail_when=lambda e: e.global_position == 7)
    proc = make_processor(engine, store, metrics, batch_size=5)
    batches: list[BatchResult] = []
    with pytest.raises(es.ProjectionError, match="position 7"):
        proc.run_until_caught_up(projection, on_batch=batches.append)

    assert sum(b.handled for b in batches) == 5
    assert scrape("batch_errors_total", "log_a") == 1
    assert scrape("events_handled_total", "log_a") == 5  # the failed batch's 1 is not counted
    assert scrape("batch_duration_seconds_count", "log_a") == len(batches)
    assert scrape("checkpoint_position", "log_a") == 5

    with pytest.raises(es.ProjectionError):
        proc.process_batch(projection)
    assert scrape("batch_errors_total", "log_a") == 2

    projection.failing = False
    run(proc, projection)
    assert scrape("batch_errors_total", "log_a") == 2
    assert scrape("events_handled_total", "log_a") == 12
    assert scrape("checkpoint_position", "log_a") == 12


def test_lag_gauge_is_computed_on_scrape(
    engine: sa.Engine, store: es.EventStore, metrics: PrometheusMetrics, scrape: Scrape
) -> None:
    create_applied_table(engine)
    metrics.track_lag(engine, store=store)
    append_spread(engine, store, 20)
    assert scrape("lag_events", "log_a") is None  # no checkpoint yet

    proc = make_processor(engine, store, metrics, batch_size=6)
    run(proc, LogA())
    assert scrape("lag_events", "log_a") == 0

    append_spread(engine, store, 9, prefix="late")
    assert scrape("lag_events", "log_a") == 9  # no processing in between: read on scrape
    run(make_processor(engine, store, metrics), LogB())
    assert scrape("lag_events", "log_b") == 0
    assert scrape("lag_events", "log_a") == 9

    run(proc, LogA())
    assert scrape("lag_events", "log_a") == 0
    assert scrape("checkpoint_position", "log_a") == 29


def test_lag_gauge_is_capped_and_says_when_nothing_is_held_back(
    engine: sa.Engine, store: es.EventStore, metrics: PrometheusMetrics, scrape: Scrape
) -> None:
    create_applied_table(engine)
    metrics.track_lag(engine, store=store, lag_cap=5)
    append_spread(engine, store, 4)
    run(make_processor(engine, store, metrics), LogA())
    assert scrape("lag_events", "log_a") == 0
    append_spread(engine, store, 5, prefix="five")
    assert scrape("lag_events", "log_a") == 5  # exactly the cap: still exact
    append_spread(engine, store, 1, prefix="six")
    assert scrape("lag_events", "log_a") == 5  # 6 behind: counting stopped at the cap
    if engine.dialect.name == "sqlite":  # on PostgreSQL another test's transaction may hold
        assert scrape("held_back", "log_a") == 0
    run(make_processor(engine, store, metrics), LogA())
    assert scrape("lag_events", "log_a") == 0


def test_lag_in_seconds_and_last_handled_time_are_read_on_scrape(
    engine: sa.Engine, store: es.EventStore, metrics: PrometheusMetrics, scrape: Scrape
) -> None:
    create_applied_table(engine)
    metrics.track_lag(engine, store=store)
    now = datetime.now(UTC)
    ages = (timedelta(minutes=10), timedelta(minutes=5))
    append(
        engine,
        store,
        [
            [dataclasses.replace(event(f"agg-{i}"), created_at=now - age)]
            for i, age in enumerate(ages)
        ],
    )
    with Session(engine) as session:
        times = {e.global_position: e.created_at for e in store.read_all(session)}
    assert scrape("lag_seconds", "log_a") is None  # no checkpoint yet
    assert scrape("last_handled_timestamp_seconds", "log_a") is None

    proc = make_processor(engine, store, metrics, batch_size=1)
    wait_until(lambda: proc.process_batch(LogA()).handled == 1, timeout=60)
    assert scrape("lag_events", "log_a") == 1
    assert scrape("last_handled_timestamp_seconds", "log_a") == times[1].timestamp()
    before = datetime.now(UTC)
    waited = scrape("lag_seconds", "log_a")
    after = datetime.now(UTC)
    assert waited is not None
    assert (before - times[2]).total_seconds() <= waited <= (after - times[2]).total_seconds()
    assert 300 <= waited < 400

    run(proc, LogA())
    assert scrape("lag_events", "log_a") == 0
    assert scrape("lag_seconds", "log_a") == 0.0
    assert scrape("last_handled_timestamp_seconds", "log_a") == times[2].timestamp()


def test_two_metrics_objects_do_not_share_a_registry(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 3)
    first, second = CollectorRegistry(), CollectorRegistry()
    run(make_processor(engine, store, PrometheusMetrics(registry=first)), LogA())
    assert Scrape(first)("events_handled_total", "log_a") == 3
    assert Scrape(second)("events_handled_total", "log_a") is None


def test_metrics_are_not_imported_unless_asked_for() -> None:
    code = (
        "import sys, eventsource, eventsource.cli; "
        "loaded = [m for m in ('prometheus_client', 'eventsource.metrics') if m in sys.modules]; "
        "print(loaded)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
