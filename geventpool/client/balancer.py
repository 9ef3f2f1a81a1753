"""Balancers choose which instance's pool serves a call; they only choose.

Both skip pools that are not available (ejected or retired) and pools already tried by this
call, and return None when none is left. :class:`LeastInUse` (the default) samples two pools at
random and takes the one with fewer calls in progress per unit of weight (power of two choices:
near the best choice at O(1) cost, and no herd on a single "least loaded" instance); when both
samples are full it draws a few more pairs, then scans up to 32 pools for one with room before
settling for the least loaded one it saw (so its cost stays bounded with thousands of
instances).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar

from geventpool.discovery.instance import Instance
from geventpool.errors import ConfigurationError


class Candidate(Protocol):
    """What a balancer reads of a pool (an :class:`~geventpool.client.pool.InstancePool`)."""

    @property
    def instance(self) -> Instance: ...
    @property
    def in_use(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    def available(self, now: float) -> bool: ...
    def has_capacity(self) -> bool: ...


P = TypeVar("P", bound=Candidate)


class Balancer(Protocol):
    """Chooses one of ``pools`` for a call, or None."""

    def choose(self, pools: Sequence[P], now: float, tried: Collection[P]) -> P | None: ...


SAMPLES = 4
"""Pairs drawn before the scan."""
SCAN_LIMIT = 32
"""Pools the scan looks at before it settles for the least loaded one it has seen."""


def _load(pool: Candidate) -> float:
    return (pool.in_use + pool.waiting) / pool.instance.weight


class RoundRobin:
    """Each available pool in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, pools: Sequence[P], now: float, tried: Collection[P]) -> P | None:
        count = len(pools)
        for _ in range(count):
            self._next = (self._next + 1) % count
            pool = pools[self._next]
            if pool.available(now) and pool not in tried:
                return pool
        return None


class LeastInUse:
    """Power of two choices on calls in progress per weight; prefers pools with room."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def choose(self, pools: Sequence[P], now: float, tried: Collection[P]) -> P | None:
        count = len(pools)
        if count <= 1:
            only = pools[0] if count else None
            return only if only is not None and only.available(now) and only not in tried else None
        draw = self._random.random
        for _ in range(SAMPLES if count > 2 else 1):
            first, second = pools[int(draw() * count)], pools[int(draw() * count)]
            ok_first = first.available(now) and first not in tried
            ok_second = second.available(now) and second not in tried
            if ok_first and ok_second:
                best = first if _load(first) <= _load(second) else second
                if best.has_capacity():
                    return best
            elif ok_first and first.has_capacity():
                return first
            elif ok_second and second.has_capacity():
                return second
        return self._scan(pools, now, tried)

    def _scan(self, pools: Sequence[P], now: float, tried: Collection[P]) -> P | None:
        """Any pool with room among up to ``SCAN_LIMIT`` pools from a random start (so none is
        favoured, and the cost stays bounded with thousands of instances), else the least
        loaded available one seen; with none seen, every pool is looked at."""
        count = len(pools)
        start = self._random.randrange(count)
        best: P | None = None
        for offset in range(count):
            if offset >= SCAN_LIMIT and best is not None:
                break
            pool = pools[(start + offset) % count]
            if not pool.available(now) or pool in tried:
                continue
            if pool.has_capacity():
                return pool
            if best is None or _load(pool) < _load(best):
                best = pool
        return best


BALANCERS = {"least_in_use": LeastInUse, "round_robin": RoundRobin}


def make_balancer(name: str) -> Balancer:
    """The balancer called ``name`` (``least_in_use`` or ``round_robin``)."""
    factory = BALANCERS.get(name)
    if factory is None:
        raise ConfigurationError(f"balancer must be one of {sorted(BALANCERS)}, not {name!r}")
    balancer: Balancer = factory()
    return balancer
