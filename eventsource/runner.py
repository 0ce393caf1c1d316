"""The runner: many projections at once in one process, over one connection pool.

Each (projection, processor) pair runs in its own thread; database I/O releases the
GIL. The first failure stops the others (each finishes or rolls back its batch in
hand) and is raised. SIGINT/SIGTERM, when the runner runs in the main thread, ask
every processor to finish its batch, commit and stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

import sqlalchemy as sa

from eventsource import errors, retry, signals
from eventsource.processor import Processor
from eventsource.projection import Projection

logger = logging.getLogger("eventsource.runner")

#: How often the waiting main thread wakes up (signals are delivered between waits).
_JOIN_INTERVAL = 0.05


@dataclass(frozen=True, slots=True)
class ProjectionRunner:
    """One projection and the processor (with its own config) that feeds it."""

    projection: Projection
    processor: Processor


Pair = ProjectionRunner | tuple[Projection, Processor]


class Runner:
    """Runs several projections concurrently until stopped (or until caught up)."""

    def __init__(self, *, handle_signals: bool = True) -> None:
        self.handle_signals = handle_signals
        self._lock = threading.Lock()
        self._active: list[ProjectionRunner] = []
        self._stopping = threading.Event()
        #: Whether the last run was ended by SIGINT/SIGTERM (not by stop() or catching up).
        self.interrupted = False

    def run(self, pairs: Iterable[Pair]) -> None:
        """Run every pair until :meth:`stop` or a signal; raise the first failure."""
        self._run(pairs, lambda pair: pair.processor.run(pair.projection))

    def run_until_caught_up(self, pairs: Iterable[Pair]) -> dict[tuple[str, int], int]:
        """Handle everything committed so far with every pair, then return.

        Returns the number of events each (projection name, partition key) handled;
        a versioned projection is named by its ``checkpoint_name`` (``"name@v2"``).
        """
        handled: dict[tuple[str, int], int] = {}

        def catch_up(pair: ProjectionRunner) -> None:
            count = pair.processor.run_until_caught_up(pair.projection)
            key = (pair.projection.checkpoint_name, pair.processor.config.partition_key)
            handled[key] = count

        self._run(pairs, catch_up)
        return handled

    def stop(self) -> None:
        """Ask every processor to finish its batch in hand and return (thread-safe).

        A stop that arrives while :meth:`run` is still starting (e.g. right after
        starting its thread) counts for that run: it returns as soon as it has begun.
        """
        self._stopping.set()
        with self._lock:
            for pair in self._active:
                pair.processor.stop()

    # -- internals --------------------------------------------------------------

    def _run(self, pairs: Iterable[Pair], work: Callable[[ProjectionRunner], None]) -> None:
        runners = validate_pairs(pairs)
        # Refuse a changed partition count once, before any thread starts, rather than
        # once per partition thread.
        checked: set[str] = set()
        for pair in runners:
            if pair.projection.checkpoint_name not in checked:
                checked.add(pair.projection.checkpoint_name)
                try:
                    pair.processor.check_partitions(pair.projection)
                except Exception as error:
                    if retry.is_transient(error):
                        continue  # each processor checks again, retrying, when it starts
                    _raise_named(pair, error)
        self.interrupted = False
        failures: list[tuple[ProjectionRunner, BaseException]] = []

        def target(pair: ProjectionRunner) -> None:
            try:
                work(pair)
            except BaseException as exc:
                with self._lock:
                    failures.append((pair, exc))
                self.stop()

        with self._lock:
            self._active = runners
            if self._stopping.is_set():  # stop() came before there was anything to stop
                for pair in runners:
                    pair.processor.stop()
        threads = [
            threading.Thread(
                target=target,
                args=(pair,),
                name=_thread_name(pair),
                daemon=True,
            )
            for pair in runners
        ]
        try:
            with signals.graceful_stop(self._interrupt, enabled=self.handle_signals, log=logger):
                for thread in threads:
                    thread.start()
                for thread in threads:
                    while thread.is_alive():
                        thread.join(_JOIN_INTERVAL)
        finally:  # also after a second signal's KeyboardInterrupt
            with self._lock:
                self._active = []
                self._stopping.clear()
                # stop() also reached processors that had already returned (the one that
                # failed, in fail-fast): clear that, or their next run would return at once.
                for pair in runners:
                    pair.processor._stop.clear()
        if failures:
            first_pair, first_error = failures[0]
            for other_pair, other in failures[1:]:
                logger.error(
                    "projection %s also failed while stopping: %r",
                    other_pair.projection.name,
                    other,
                )
            _raise_named(first_pair, first_error)

    def _interrupt(self) -> None:
        """The first SIGINT/SIGTERM: finish the batches in hand, then stop."""
        self.interrupted = True
        self.stop()


def _raise_named(pair: ProjectionRunner, exc: BaseException) -> NoReturn:
    """Raise ``exc`` so that it names the projection (library errors already do)."""
    if isinstance(exc, errors.EventSourceError):
        raise exc
    raise errors.ProjectionError(
        f"projection {pair.projection.name!r} (partition "
        f"{pair.processor.config.partition_key}) failed: {exc!r}",
        projection=pair.projection.name,
        partition_key=pair.processor.config.partition_key,
        global_position=None,
    ) from exc


def validate_pairs(pairs: Iterable[Pair]) -> list[ProjectionRunner]:
    """Normalise pairs and refuse set-ups that would corrupt checkpoints or deadlock."""
    runners: list[ProjectionRunner] = []
    for item in pairs:
        if isinstance(item, ProjectionRunner):
            pair = item
        elif isinstance(item, tuple) and len(item) == 2:
            pair = ProjectionRunner(*item)
        else:
            raise errors.ConfigurationError(
                f"expected (projection, processor) pairs or ProjectionRunner, got {item!r}"
            )
        if not isinstance(pair.projection, Projection):
            raise errors.ConfigurationError(f"{pair.projection!r} is not a Projection instance")
        if not isinstance(pair.processor, Processor):
            raise errors.ConfigurationError(f"{pair.processor!r} is not a Processor")
        runners.append(pair)
    if not runners:
        raise errors.ConfigurationError("Runner needs at least one (projection, processor) pair")

    classes: dict[str, type[Projection]] = {}
    seen: set[tuple[str, int]] = set()
    processors: set[int] = set()
    totals: dict[str, int] = {}
    for pair in runners:
        # Two versions of one projection are two projections here (blue/green rebuilds).
        name, config = pair.projection.checkpoint_name, pair.processor.config
        known = classes.setdefault(name, type(pair.projection))
        if known is not type(pair.projection):
            raise errors.ConfigurationError(
                f"two different projection classes share the name {name!r} "
                f"({known.__qualname__} and {type(pair.projection).__qualname__}); "
                "they would share one checkpoint: give each its own name"
            )
        if totals.setdefault(name, config.total_partitions) != config.total_partitions:
            raise errors.ConfigurationError(
                f"projection {name!r} is given different total_partitions in one runner"
            )
        if (name, config.partition_key) in seen:
            raise errors.ConfigurationError(
                f"projection {name!r} is given partition {config.partition_key} twice"
            )
        seen.add((name, config.partition_key))
        if id(pair.processor) in processors:
            raise errors.ConfigurationError(
                "one Processor instance appears in two pairs: give each pair its own"
            )
        processors.add(id(pair.processor))
    _check_pool_sizes(runners)
    return runners


def _thread_name(pair: ProjectionRunner) -> str:
    config = pair.processor.config
    which = "claims" if config.claim else str(config.partition_key)
    return f"eventsource:{pair.projection.name}:{which}"


def _check_pool_sizes(runners: list[ProjectionRunner]) -> None:
    """Each processor holds one connection per batch, a claiming one up to one per
    partition plus its coordinator's: the pool must have room for all."""
    per_engine: dict[int, tuple[sa.Engine, int]] = {}
    for pair in runners:
        engine = pair.processor.engine
        if engine is None:
            continue
        config = pair.processor.config
        needs = config.total_partitions + 1 if config.claim else 1
        _, count = per_engine.get(id(engine), (engine, 0))
        per_engine[id(engine)] = (engine, count + needs)
    for engine, count in per_engine.values():
        pool = engine.pool
        if not isinstance(pool, sa.pool.QueuePool):
            continue
        overflow = pool._max_overflow  # no public accessor; -1 means unlimited
        if overflow < 0:
            continue
        capacity = pool.size() + overflow
        if count > capacity:
            raise errors.ConfigurationError(
                f"processors that may hold {count} connections at once (a claiming one "
                "counts each of its partitions and its coordinator) share an engine whose "
                f"pool holds at most {capacity} (pool_size={pool.size()}, "
                f"max_overflow={overflow}); they would wait on each other. Create the "
                f"engine with pool_size >= {count}."
            )
