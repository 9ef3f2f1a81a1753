"""Balancers choose which instance's pool serves a call; they only choose.

Every balancer skips pools that are not available (ejected or retired) and pools already
tried by this call, and returns None when none is left.

* :class:`PeakEwma` (``peak_ewma``, the default) samples two pools and takes the one whose
  calls cost less now: its peak EWMA latency times its calls in progress plus one, divided by
  its weight (Finagle's default, P2C with peak EWMA): a slow or stalling instance gets fewer
  calls as soon as it slows, a fast one more.
* :class:`LeastInUse` (``least_in_use``) the same on calls in progress per weight only.
* :class:`RoundRobin` (``round_robin``) each available pool in turn.
* :class:`ConsistentHash` (``consistent_hash``) the pool a call's key maps to on a ring of
  160 virtual nodes per instance (Dubbo's), the next one along the ring when it is not
  available: the same key goes to the same instance, and an instance that leaves moves only
  its own keys.
* :class:`ZonePreferring` wraps any of them: pools in the client's zone while one of them has
  room, every pool when none has (spill-over).

Weights are the registry weights, ramped up over ``slow_start`` seconds for an instance that
joined while the client ran. When both samples of a two-choice balancer are full it draws a
few more pairs, then scans up to 32 pools for one with room before settling for the cheapest
one seen (so its cost stays bounded with thousands of instances).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Protocol, TypeVar

from geventpool.client.latency import PeakEwma as _Ewma
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
    @property
    def latency(self) -> _Ewma: ...
    def weight_at(self, now: float) -> float: ...
    def available(self, now: float) -> bool: ...
    def has_capacity(self) -> bool: ...


P = TypeVar("P", bound=Candidate)


class Balancer(Protocol):
    """Chooses one of ``pools`` for a call (whose affinity ``key`` is given to the hash
    balancer), or None."""

    def choose(
        self, pools: Sequence[P], now: float, tried: Collection[P], key: Hashable = None
    ) -> P | None: ...


SAMPLES = 4
"""Pairs drawn before the scan."""
SCAN_LIMIT = 32
"""Pools the scan looks at before it settles for the cheapest one it has seen."""
PENALTY = 1e3
"""The cost of a pool with calls in progress and no latency measured yet (a new instance):
Finagle's penalty, so that a herd does not rush to an instance nobody has timed."""
VIRTUAL_NODES = 160
"""Points per instance on the consistent-hash ring (Dubbo's)."""


def _load(pool: Candidate, now: float) -> float:
    return (pool.in_use + pool.waiting) / pool.weight_at(now)


def _peak_ewma_cost(pool: Candidate, now: float) -> float:
    outstanding = pool.in_use + pool.waiting
    latency = pool.latency.get(now)
    if latency == 0.0:
        return PENALTY * outstanding / pool.weight_at(now)
    return latency * (outstanding + 1) / pool.weight_at(now)


class RoundRobin:
    """Each available pool in turn, skipping those with no room while another has some."""

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self, pools: Sequence[P], now: float, tried: Collection[P], key: Hashable = None
    ) -> P | None:
        count = len(pools)
        full: P | None = None
        for _ in range(count):
            self._next = (self._next + 1) % count
            pool = pools[self._next]
            if pool.available(now) and pool not in tried:
                if pool.has_capacity():
                    return pool
                if full is None:
                    full = pool
        return full


class _Weights:
    """Cumulative weights of one pools list, for drawing in proportion (None: all equal)."""

    def __init__(self) -> None:
        self._pools: object = None
        self._stamp = float("-inf")
        self._cumulative: list[float] | None = None

    def of(self, pools: Sequence[Candidate], now: float) -> list[float] | None:
        if pools is not self._pools or now - self._stamp > 1.0:  # slow start moves weights
            weights = [pool.weight_at(now) for pool in pools]
            self._pools, self._stamp = pools, now
            if max(weights) == min(weights):
                self._cumulative = None
            else:
                total, cumulative = 0.0, []
                for weight in weights:
                    total += weight
                    cumulative.append(total)
                self._cumulative = cumulative
        return self._cumulative


class TwoChoices:
    """Power of two choices on ``cost(pool, now)``; prefers pools with room."""

    def __init__(
        self, cost: Callable[[Candidate, float], float], rng: random.Random | None = None
    ) -> None:
        self._cost = cost
        self._random = rng or random.Random()
        self._weights = _Weights()

    def _draw(self, pools: Sequence[P], now: float) -> P:
        """One pool, drawn in proportion to the weights (uniformly while they are equal)."""
        cumulative = self._weights.of(pools, now)
        if cumulative is None:
            return pools[int(self._random.random() * len(pools))]
        point = self._random.random() * cumulative[-1]
        return pools[min(bisect.bisect_right(cumulative, point), len(pools) - 1)]

    def choose(
        self, pools: Sequence[P], now: float, tried: Collection[P], key: Hashable = None
    ) -> P | None:
        count = len(pools)
        if count <= 1:
            only = pools[0] if count else None
            return only if only is not None and only.available(now) and only not in tried else None
        cost = self._cost
        for _ in range(SAMPLES if count > 2 else 1):
            first = self._draw(pools, now)
            second = self._draw(pools, now)
            for _ in range(3):  # two different pools (Finagle's), or the cheaper is no choice
                if second is not first:
                    break
                second = self._draw(pools, now)
            ok_first = first.available(now) and first not in tried
            ok_second = second.available(now) and second not in tried
            if ok_first and ok_second:
                best = first if cost(first, now) <= cost(second, now) else second
                if best.has_capacity():
                    return best
            elif ok_first and first.has_capacity():
                return first
            elif ok_second and second.has_capacity():
                return second
        return self._scan(pools, now, tried)

    def _scan(self, pools: Sequence[P], now: float, tried: Collection[P]) -> P | None:
        """Any pool with room among up to ``SCAN_LIMIT`` pools from a random start (so none is
        favoured, and the cost stays bounded with thousands of instances), else the cheapest
        available one seen; with none seen, every pool is looked at."""
        count = len(pools)
        start = self._random.randrange(count)
        best: P | None = None
        best_cost = 0.0
        for offset in range(count):
            if offset >= SCAN_LIMIT and best is not None:
                break
            pool = pools[(start + offset) % count]
            if not pool.available(now) or pool in tried:
                continue
            if pool.has_capacity():
                return pool
            pool_cost = self._cost(pool, now)
            if best is None or pool_cost < best_cost:
                best, best_cost = pool, pool_cost
        return best


class LeastInUse(TwoChoices):
    """Power of two choices on calls in progress per weight; the samples are drawn in
    proportion to the weights, so idle pools (all at zero) share in proportion too."""

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(_load, rng)


class PeakEwma(TwoChoices):
    """Power of two choices on peak EWMA latency times calls in progress, per weight; the
    samples are drawn in proportion to the weights too, so an instance ramping up (slow
    start) is seldom even compared, although it looks cheap before its first reply."""

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(_peak_ewma_cost, rng)


def _point(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode(), usedforsecurity=False).digest()[:8], "big")


class ConsistentHash:
    """The pool a call's key maps to on a ring of :data:`VIRTUAL_NODES` points per instance;
    the next available one along the ring when it is not; calls without a key go to a pool
    chosen by :class:`PeakEwma`. Affinity holds while the key's instance has room: a call that
    finds it full waits in the service's waiting room like any other and is served by the
    first instance with room (bounded-load hashing: a hot key spills over rather than queue
    behind its instance)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._fallback = PeakEwma(rng)
        # the rings of the last two pool lists (a zone preference alternates two lists)
        self._rings: list[tuple[Sequence[Candidate], list[int], list[int]]] = []

    def _ring(self, pools: Sequence[Candidate]) -> tuple[list[int], list[int]]:
        for known, points, owners in self._rings:
            if known is pools:
                return points, owners
        ring = sorted(
            (_point(f"{pool.instance}#{node}"), index)
            for index, pool in enumerate(pools)
            for node in range(VIRTUAL_NODES)
        )
        points, owners = [point for point, _ in ring], [owner for _, owner in ring]
        self._rings = [*self._rings[-1:], (pools, points, owners)]
        return points, owners

    def choose(
        self, pools: Sequence[P], now: float, tried: Collection[P], key: Hashable = None
    ) -> P | None:
        if key is None or not pools:
            return self._fallback.choose(pools, now, tried)
        points, owners = self._ring(pools)
        start = bisect.bisect_left(points, _point(repr(key)))
        seen: set[int] = set()
        for step in range(len(points)):
            owner = owners[(start + step) % len(points)]
            if owner in seen:
                continue
            seen.add(owner)
            pool = pools[owner]
            if pool.available(now) and pool not in tried:
                return pool
            if len(seen) == len(pools):
                break
        return None


class ZonePreferring:
    """``inner`` over the pools in ``zone`` while one of them has room, else over all."""

    def __init__(self, inner: Balancer, zone: str) -> None:
        self._inner = inner
        self._zone = zone
        self._pools: object = None
        self._local: list[Candidate] = []

    def choose(
        self, pools: Sequence[P], now: float, tried: Collection[P], key: Hashable = None
    ) -> P | None:
        if pools is not self._pools:
            self._local = [pool for pool in pools if pool.instance.zone == self._zone]
            self._pools = pools
        local: list[P] = self._local  # type: ignore[assignment]
        if any(p.available(now) and p.has_capacity() and p not in tried for p in local):
            return self._inner.choose(local, now, tried, key)
        return self._inner.choose(pools, now, tried, key)


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "peak_ewma": PeakEwma,
    "least_in_use": LeastInUse,
    "round_robin": RoundRobin,
    "consistent_hash": ConsistentHash,
}


def make_balancer(name: str, zone: str | None = None) -> Balancer:
    """The balancer called ``name`` (see the module), preferring ``zone`` if given."""
    factory = BALANCERS.get(name)
    if factory is None:
        raise ConfigurationError(f"balancer must be one of {sorted(BALANCERS)}, not {name!r}")
    balancer: Balancer = factory()
    if zone is not None:
        balancer = ZonePreferring(balancer, zone)
    return balancer
