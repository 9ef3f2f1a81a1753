"""Backup ("hedged") requests for idempotent calls: when a call is slower than most, send it
again and take whichever reply comes first.

:class:`Hedge` is the policy: a call that has not answered after the ``percentile`` of the
latencies of the client's recent calls (at least ``min_delay``) is sent once more, to the
instance the balancer picks then (the slow one already carries the first); the first reply
wins and the other attempt is abandoned (its connection breaks, or, pipelined, its late reply
is dropped). At most ``max_extra`` of the calls get a backup (Finagle's 1%), so a slow fleet
is not sent twice the load. Only methods the client's :class:`~geventpool.client.retrying.Retry`
says are idempotent are hedged.

:class:`Hedger` keeps the recent latencies (a ring of ``samples``) and the share of backups
sent; the percentile is recomputed every ``samples // 10`` calls, not on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

from geventpool.errors import ConfigurationError
from geventpool.validation import check_seconds


@dataclass(frozen=True)
class Hedge:
    """When to send a backup request (see the module)."""

    percentile: float = 0.95
    min_delay: float = 0.005
    max_extra: float = 0.01
    samples: int = 1000

    def __post_init__(self) -> None:
        for name in ("percentile", "max_extra"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number, not {value!r}")
        if not 0 < self.percentile < 1:
            raise ConfigurationError(
                f"percentile must be a fraction between 0 and 1, not {self.percentile!r}"
            )
        if not 0 <= self.max_extra <= 1:
            raise ConfigurationError(f"max_extra must be from 0 to 1, not {self.max_extra!r}")
        if not isinstance(self.samples, int) or self.samples < 10:
            raise ConfigurationError(f"samples must be an integer >= 10, not {self.samples!r}")
        check_seconds("min_delay", self.min_delay, zero=True)


class Hedger:
    """A client's recent latencies and backups, for its :class:`Hedge`."""

    def __init__(self, hedge: Hedge) -> None:
        self.hedge = hedge
        self._ring: list[float] = []
        self._next = 0
        self._since = 0  # samples since the percentile was computed
        self._delay: float | None = None  # None until enough samples
        self.calls = 0  # hedgeable calls
        self.backups = 0  # backup requests sent

    def delay(self) -> float | None:
        """How long a call waits before its backup (None: not enough samples yet)."""
        self.calls += 1
        return self._delay

    def observe(self, seconds: float) -> None:
        """A hedgeable call took ``seconds``."""
        hedge = self.hedge
        ring = self._ring
        if len(ring) < hedge.samples:
            ring.append(seconds)
        else:
            ring[self._next] = seconds
            self._next = (self._next + 1) % hedge.samples
        self._since += 1
        if self._since >= max(hedge.samples // 10, 1) and len(ring) >= 10:
            self._since = 0
            ordered = sorted(ring)
            at = ordered[min(int(len(ordered) * hedge.percentile), len(ordered) - 1)]
            self._delay = max(at, hedge.min_delay)

    def allow(self) -> bool:
        """Whether one more backup stays within ``max_extra`` of the calls."""
        if self.backups + 1 > self.hedge.max_extra * self.calls:
            return False
        self.backups += 1
        return True
