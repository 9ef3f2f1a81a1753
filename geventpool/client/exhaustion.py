"""Telling callers and operators that every connection of a service is busy.

:class:`ExhaustionReporter` promises: every refused caller gets a
:class:`~geventpool.errors.PoolExhaustedError` with the service-wide numbers (connections,
in use, waiters, how long it waited), and operators get at most one ``pool_exhausted`` event
per ``interval`` seconds, which counts the refusals suppressed since the last one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from geventpool import events
from geventpool.client.pool import InstancePool
from geventpool.errors import PoolExhaustedError

EXHAUSTED_EVENT_INTERVAL = 1.0


class ExhaustionReporter:
    """Counts a service's refusals and emits the rate-limited ``pool_exhausted`` event."""

    def __init__(
        self,
        service_name: str,
        *,
        interval: float = EXHAUSTED_EVENT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service_name = service_name
        self._interval = interval
        self._clock = clock
        self.count = 0  # refusals since the client started
        self._suppressed = 0
        self._last_event = float("-inf")

    def report(self, pools: Sequence[InstancePool], waited: float) -> PoolExhaustedError:
        """The error for a caller refused after ``waited`` seconds; the event if it is due.
        Both count only the instances that can take calls (ejected ones are named apart):
        the capacity that ran out is theirs."""
        now = self._clock()
        able = [p for p in pools if p.available(now)]
        out = [p.name for p in pools if not p.available(now)]
        counted = able or list(pools)
        error = PoolExhaustedError(
            self._service_name,
            sum(p.max_connections for p in counted),
            sum(p.in_use for p in counted),
            sum(p.waiting for p in pools),
            waited,
            sum(p.capacity for p in counted),
        )
        self.count += 1
        if now - self._last_event < self._interval:
            self._suppressed += 1
            return error
        events.emit(
            events.POOL_EXHAUSTED,
            "error",
            service=self._service_name,
            max_connections=error.max_connections,
            capacity=error.capacity,
            in_use=error.in_use,
            waiters=error.waiters,
            waited=round(waited, 3),
            suppressed=self._suppressed,
            instances=[
                {
                    "instance": p.name,
                    "in_use": p.in_use,
                    "max": p.max_connections,
                    "capacity": p.capacity,
                    "waiters": p.waiting,
                }
                for p in counted
            ],
            out_of_rotation=out,
            advice="every connection is busy: add server instances or raise max_connections"
            + (f" ({len(out)} ejected instances take no calls: check them)" if out else ""),
        )
        self._last_event = now
        self._suppressed = 0
        return error
