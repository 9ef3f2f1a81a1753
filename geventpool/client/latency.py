"""What a call to an instance costs now: Finagle's peak EWMA of its latency.

:class:`PeakEwma` keeps an exponentially weighted moving average of an instance's call
latency that jumps to any sample above it (a slowdown is seen at once) and decays towards the
samples with time constant ``decay`` (10 s, Finagle's default) otherwise; reading it decays it
as if a zero-latency sample came, so an instance that has not been called for a while looks
cheap again and is tried (that is how a recovered instance gets its traffic back).
"""

from __future__ import annotations

import math

DEFAULT_DECAY = 10.0
"""Seconds: Finagle's default time constant."""


class PeakEwma:
    """The peak EWMA of one instance's call latency, in seconds."""

    __slots__ = ("_decay", "_stamp", "value")

    def __init__(self, now: float, decay: float = DEFAULT_DECAY) -> None:
        self._decay = decay
        self._stamp = now
        self.value = 0.0  # no sample yet

    def observe(self, latency: float, now: float) -> None:
        """One call took ``latency`` seconds, ending at ``now``."""
        if latency > self.value:
            self.value = latency
        else:
            elapsed = now - self._stamp
            if elapsed < 0.01 * self._decay:  # exp(-x) is 1 - x to 0.005% here: no exp call
                weight = 1.0 - max(elapsed, 0.0) / self._decay
            else:
                weight = math.exp(-elapsed / self._decay)
            self.value = self.value * weight + latency * (1.0 - weight)
        self._stamp = now

    def get(self, now: float) -> float:
        """The estimate at ``now``, decayed since the last sample (not stored)."""
        elapsed = now - self._stamp
        if elapsed <= 0.0:
            return self.value
        return self.value * math.exp(-elapsed / self._decay)
