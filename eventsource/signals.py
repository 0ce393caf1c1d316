"""SIGINT/SIGTERM: finish the batches in hand, commit, stop; a second signal stops at once.

:meth:`Runner.run <eventsource.runner.Runner.run>` and :meth:`Processor.run
<eventsource.processor.Processor.run>` install these handlers for as long as they run,
when they run in the main thread (the only one Python delivers signals to), and put
back the previous handlers when they return. Elsewhere signals are left alone: the
application that owns the main thread decides.

The first signal asks for a stop: the batch in hand commits, so the checkpoint and the
read model still agree (exactly once). The second raises ``KeyboardInterrupt`` where
the main thread is: a batch it interrupts rolls back, nothing half-done is committed.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

logger = logging.getLogger("eventsource.signals")

#: The signals that ask for a graceful stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def graceful_stop(
    stop: Callable[[], None], *, enabled: bool = True, log: logging.Logger = logger
) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM calls ``stop()``, the second raises
    ``KeyboardInterrupt``. Does nothing when not ``enabled`` or off the main thread.
    What happens is logged on ``log`` (the runner's or the processor's logger).

    ``stop`` runs in a short-lived thread, not in the handler: a handler runs between
    two bytecodes of the main thread, which may hold the very lock ``stop`` needs (a
    ``threading.Event`` it is waiting on), and that would deadlock. The block does not
    end before ``stop`` has returned.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    stoppers: list[threading.Thread] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stoppers:
            # The batches in hand are taking too long: give up on them (their
            # transactions roll back as the exception unwinds or the process exits).
            log.warning("received %s again: stopping now", name)
            raise KeyboardInterrupt
        log.info(
            "received %s: finishing the batches in hand, then stopping "
            "(send it again to stop at once)",
            name,
        )
        stopper = threading.Thread(target=stop, name="eventsource:stop", daemon=True)
        stoppers.append(stopper)
        stopper.start()

    previous: dict[signal.Signals, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for stopper in stoppers:
            stopper.join()
