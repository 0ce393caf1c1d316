"""Prometheus metrics for processors (the ``metrics`` extra: ``prometheus-client``).

Processors feed counters, a batch-duration histogram and ``checkpoint_position``;
:meth:`PrometheusMetrics.track_lag` adds gauges read from the database on scrape:
``lag_events``, ``lag_seconds``, ``last_handled_timestamp_seconds`` and ``held_back``
(labels ``projection``, ``partition``; names prefixed with the namespace, by default
``eventsource_``). Nothing here is imported unless you ask for it, and a processor
without ``metrics=`` does no metrics work at all::

    metrics = PrometheusMetrics()                      # default registry
    metrics.track_lag(engine)                          # lag gauges, computed on scrape
    Processor(engine, store, config, metrics=metrics)
    prometheus_client.start_http_server(9100)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from eventsource import errors
from eventsource.processor import BatchResult
from eventsource.status import DEFAULT_LAG_CAP, status
from eventsource.store import EventStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - exercised only without the extra
    prometheus_client = None  # type: ignore[assignment]
    Collector = object  # type: ignore[assignment,misc]

LABELS = ("projection", "partition")


def _require_client() -> None:
    if prometheus_client is None:
        raise errors.ConfigurationError(
            "Prometheus metrics need prometheus-client: pip install 'eventsource[metrics]'"
        )


class PrometheusMetrics:
    """Counters and a histogram per projection and partition, fed by processors."""

    def __init__(
        self, *, registry: CollectorRegistry | None = None, namespace: str = "eventsource"
    ) -> None:
        _require_client()
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        self.namespace = namespace
        kw: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        self.events_handled = prometheus_client.Counter(
            "events_handled", "Events passed to the projection's handler.", LABELS, **kw
        )
        self.events_skipped = prometheus_client.Counter(
            "events_skipped",
            "Events read but left to another partition by a Python-side strategy.",
            LABELS,
            **kw,
        )
        self.batch_duration = prometheus_client.Histogram(
            "batch_duration_seconds", "Duration of committed batches.", LABELS, **kw
        )
        self.batch_errors = prometheus_client.Counter(
            "batch_errors", "Batches rolled back by an error.", LABELS, **kw
        )
        self.batch_retries = prometheus_client.Counter(
            "batch_retries",
            "Batches retried after a transient failure (label cause: the error's condition).",
            (*LABELS, "cause"),
            **kw,
        )
        self.checkpoint = prometheus_client.Gauge(
            "checkpoint_position", "Global position of the partition's checkpoint.", LABELS, **kw
        )
        self.quarantined = prometheus_client.Counter(
            "events_quarantined",
            "Events stored as dead letters instead of applied: failed, or parked behind one "
            "(projections with on_error=OnError.QUARANTINE*).",
            LABELS,
            **kw,
        )

    def batch_retried(self, projection: str, partition: int, cause: str) -> None:
        self.batch_retries.labels(projection, str(partition), cause).inc()

    def batch_completed(self, projection: str, partition: int, result: BatchResult) -> None:
        labels = (projection, str(partition))
        if result.handled:
            self.events_handled.labels(*labels).inc(result.handled)
        if result.skipped:
            self.events_skipped.labels(*labels).inc(result.skipped)
        self.batch_duration.labels(*labels).observe(result.duration)
        self.checkpoint.labels(*labels).set(result.global_position)

    def batch_failed(self, projection: str, partition: int) -> None:
        self.batch_errors.labels(projection, str(partition)).inc()

    def events_quarantined(self, projection: str, partition: int, count: int) -> None:
        """``count`` events of a committed batch went to the dead letters (optional hook:
        processors call it only on metrics objects that have it)."""
        self.quarantined.labels(projection, str(partition)).inc(count)

    def track_lag(
        self,
        engine: sa.Engine,
        *,
        store: EventStore | None = None,
        lag_cap: int | None = DEFAULT_LAG_CAP,
    ) -> None:
        """Register ``lag_events``, ``lag_seconds``, ``last_handled_timestamp_seconds``
        and ``held_back`` gauges read on scrape by :func:`eventsource.status.status`: a
        few index lookups, plus counting at most ``lag_cap`` events per partition (the
        lag gauge then shows ``lag_cap``; the times stay exact). A partition at
        checkpoint 0 has no timestamp sample."""
        collector = _LagCollector(engine, store or EventStore(), self.namespace, lag_cap)
        self.registry.register(collector)


class _LagCollector(Collector):
    def __init__(
        self, engine: sa.Engine, store: EventStore, namespace: str, lag_cap: int | None
    ) -> None:
        self.engine = engine
        self.store = store
        self.namespace = namespace
        self.lag_cap = lag_cap

    def describe(self) -> list[Any]:
        return []  # values come from the database at scrape time

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            f"{self.namespace}_lag_events",
            "Events in the store after the partition's checkpoint (counted up to a cap).",
            labels=list(LABELS),
        )
        lag_seconds = GaugeMetricFamily(
            f"{self.namespace}_lag_seconds",
            "How long the first event after the partition's checkpoint has waited since it "
            "was appended (0 when caught up).",
            labels=list(LABELS),
        )
        last_handled = GaugeMetricFamily(
            f"{self.namespace}_last_handled_timestamp_seconds",
            "Unix time the event at the partition's checkpoint was appended (its created_at).",
            labels=list(LABELS),
        )
        held_back = GaugeMetricFamily(
            f"{self.namespace}_held_back",
            "1 while committed events after the partition's checkpoint wait for an open "
            "transaction older than them (PostgreSQL; eventsource status names it).",
            labels=list(LABELS),
        )
        for row in status(self.engine, store=self.store, lag_cap=self.lag_cap):
            labels = [row.projection, str(row.partition_key)]
            family.add_metric(labels, row.lag)
            if row.lag_seconds is not None:
                lag_seconds.add_metric(labels, row.lag_seconds)
            if row.last_handled_at is not None:
                last_handled.add_metric(labels, row.last_handled_at.timestamp())
            held_back.add_metric(labels, 1 if row.held_back else 0)
        yield family
        yield lag_seconds
        yield last_handled
        yield held_back
