"""A greenlet that brings some state in line with ZooKeeper whenever it is poked.

Watch callbacks and kazoo state listeners run on kazoo's single callback greenlet and must not
block; they only :meth:`ReconcileLoop.poke`. The loop runs the step in its own greenlet, folds
pokes that arrive while a step runs into one more run, and never dies of an error: a
connection error waits for the next poke (the state listener pokes on reconnect) or retries at
once if the client is already connected again; any other error is reported and retried with a
capped exponential back-off.
"""

from __future__ import annotations

from collections.abc import Callable

import gevent
import gevent.event
from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    OperationTimeoutError,
    SessionExpiredError,
)

CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    ConnectionClosedError,
    ConnectionLoss,
    OperationTimeoutError,
    SessionExpiredError,
)


class ReconcileLoop:
    """Runs ``step`` after every :meth:`poke`, one run at a time, until :meth:`stop`.

    ``is_connected`` tells whether a failed step can be retried now; ``on_error`` receives
    every error that is not a connection error (it must not raise).
    """

    def __init__(
        self,
        step: Callable[[], object],
        *,
        is_connected: Callable[[], bool],
        on_error: Callable[[Exception], None],
        retry_delay: float = 0.1,
        max_retry_delay: float = 5.0,
    ) -> None:
        self._step = step
        self._is_connected = is_connected
        self._on_error = on_error
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start the loop's greenlet (idempotent)."""
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def poke(self) -> None:
        """Ask for one more run of the step; never blocks."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, interrupting a running step; waits at most ``timeout`` seconds."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None and greenlet is not gevent.getcurrent():
            greenlet.kill(block=True, timeout=timeout)

    def _run(self) -> None:
        delay = self._retry_delay
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self._step()
            except CONNECTION_ERRORS:
                if self._is_connected():
                    gevent.sleep(delay)
                    self._wake.set()
                continue
            except Exception as error:  # noqa: BLE001 - the loop must outlive any bad step
                self._on_error(error)
                gevent.sleep(delay)
                delay = min(delay * 2, self._max_retry_delay)
                self._wake.set()
                continue
            delay = self._retry_delay
