"""Balancers: round robin cycles; least-in-use (power of two choices) prefers the less loaded
per weight and a pool with room; both skip unavailable and already tried pools."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from geventpool.client import balancer as balancer_module
from geventpool.client.balancer import LeastInUse, RoundRobin, make_balancer
from geventpool.client.latency import PeakEwma
from geventpool.discovery.instance import Instance
from geventpool.errors import ConfigurationError


@dataclass(eq=False)
class StubPool:
    """What a balancer reads of a pool."""

    port: int
    in_use: int = 0
    waiting: int = 0
    up: bool = True
    room: bool = True
    weight: float = 1.0
    zone: str | None = None
    instance: Instance = field(init=False)
    latency: PeakEwma = field(init=False)

    def __post_init__(self) -> None:
        self.instance = Instance(
            host="127.0.0.1", port=self.port, weight=self.weight, zone=self.zone
        )
        self.latency = PeakEwma(0.0)

    def available(self, now: float) -> bool:
        return self.up

    def weight_at(self, now: float) -> float:
        return self.instance.weight

    def has_capacity(self) -> bool:
        return self.room


def pools(*stubs: StubPool) -> list[StubPool]:
    return list(stubs)


def test_round_robin_cycles_and_skips_unavailable_and_tried() -> None:
    a, b, c = StubPool(1), StubPool(2, up=False), StubPool(3)
    balancer = RoundRobin()
    chosen = [balancer.choose(pools(a, b, c), 0.0, []) for _ in range(4)]
    assert chosen == [c, a, c, a]
    assert balancer.choose(pools(a, b, c), 0.0, [a]) is c
    assert balancer.choose(pools(b), 0.0, []) is None


def test_least_in_use_spreads_evenly_when_loads_are_equal() -> None:
    stubs = [StubPool(port) for port in (1, 2, 3)]
    balancer = LeastInUse(random.Random(7))
    counts = Counter(balancer.choose(pools(*stubs), 0.0, []) for _ in range(3000))
    assert all(900 < counts[stub] < 1100 for stub in stubs), counts


def test_least_in_use_prefers_the_less_loaded_per_weight() -> None:
    busy, idle, heavy = (
        StubPool(1, in_use=8),
        StubPool(2, in_use=1),
        StubPool(3, in_use=6, weight=10),
    )
    balancer = LeastInUse(random.Random(3))
    counts = Counter(balancer.choose(pools(busy, idle, heavy), 0.0, []) for _ in range(1000))
    assert counts[busy] < counts[idle] and counts[busy] < counts[heavy]


def test_least_in_use_finds_a_pool_with_room_when_the_samples_are_full() -> None:
    full = [StubPool(port, in_use=5, room=False) for port in range(1, 10)]
    roomy = StubPool(10, in_use=9)
    balancer = LeastInUse(random.Random(1))
    assert all(balancer.choose(pools(*full, roomy), 0.0, []) is roomy for _ in range(50))


def test_least_in_use_settles_for_the_least_loaded_when_all_are_full() -> None:
    a, b = StubPool(1, in_use=9, room=False), StubPool(2, in_use=4, room=False)
    assert LeastInUse(random.Random(2)).choose(pools(a, b), 0.0, []) is b


def test_least_in_use_skips_unavailable_and_tried_and_may_find_none() -> None:
    down, tried, fine = StubPool(1, up=False), StubPool(2), StubPool(3, in_use=3)
    balancer = LeastInUse(random.Random(5))
    assert all(balancer.choose(pools(down, tried, fine), 0.0, [tried]) is fine for _ in range(50))
    assert balancer.choose(pools(down), 0.0, []) is None
    assert balancer.choose([], 0.0, []) is None


def test_unknown_balancer_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="round_robin"):
        make_balancer("fastest")


def test_peak_ewma_prefers_the_instance_whose_calls_cost_less_now() -> None:
    fast, slow = StubPool(1), StubPool(2)
    fast.latency.observe(0.001, 0.0)
    slow.latency.observe(0.010, 0.0)
    balancer = make_balancer("peak_ewma")
    counts = Counter(balancer.choose(pools(fast, slow), 0.0, []) for _ in range(2000))
    assert counts[fast] > 1400, counts  # P2C: both drawn, the cheaper taken (3/4 of draws)
    slow.in_use = 0
    fast.in_use = 20  # 21 x 1 ms > 1 x 10 ms: the fast one is now the dearer
    counts = Counter(balancer.choose(pools(fast, slow), 0.0, []) for _ in range(2000))
    assert counts[slow] > 1400, counts


def test_two_choices_draw_in_proportion_to_the_weights() -> None:
    light, heavy = StubPool(1, weight=1.0), StubPool(2, weight=3.0)
    balancer = LeastInUse(random.Random(3))
    counts = Counter(balancer.choose(pools(light, heavy), 0.0, []) for _ in range(4000))
    assert 0.15 < counts[light] / 4000 < 0.35, counts


def test_consistent_hash_keeps_a_key_on_its_instance_and_moves_only_the_leavers_keys() -> None:
    stubs = [StubPool(port) for port in (1, 2, 3, 4)]
    balancer = make_balancer("consistent_hash")
    keys = [f"user-{n}" for n in range(2000)]
    before = {key: balancer.choose(stubs, 0.0, [], key) for key in keys}
    assert before == {key: balancer.choose(stubs, 0.0, [], key) for key in keys}
    shares = Counter(before.values())
    assert all(350 < shares[stub] < 650 for stub in stubs), shares  # 160 points each
    leaver = stubs[1]
    after = {
        key: balancer.choose([s for s in stubs if s is not leaver], 0.0, [], key) for key in keys
    }
    moved = {key for key in keys if after[key] is not before[key]}
    assert moved == {key for key in keys if before[key] is leaver}
    leaver.up = False  # unavailable (ejected): its keys go to the next along the ring
    assert all(balancer.choose(stubs, 0.0, [], key) is after[key] for key in keys)


def test_zone_preference_stays_in_zone_while_it_has_room_then_spills_over() -> None:
    near = [StubPool(1, zone="a"), StubPool(2, zone="a")]
    far = [StubPool(3, zone="b"), StubPool(4, zone="b")]
    balancer = make_balancer("peak_ewma", zone="a")
    everyone = pools(*near, *far)
    assert {balancer.choose(everyone, 0.0, []) for _ in range(200)} <= set(near)
    for stub in near:
        stub.room = False
    assert {balancer.choose(everyone, 0.0, []) for _ in range(200)} <= set(far)


def test_a_zone_preference_over_consistent_hash_builds_each_ring_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The preference alternates between the zone's pools and all of them as the zone's
    room comes and goes: each list's ring is built once, not at every switch."""
    points = []
    real = balancer_module._point

    def counting(text: str) -> int:
        points.append(text)
        return real(text)

    monkeypatch.setattr(balancer_module, "_point", counting)
    near = StubPool(1, zone="a")
    everyone = [near, *(StubPool(port, zone="b") for port in range(2, 12))]
    balancer = make_balancer("consistent_hash", zone="a")
    for round_ in range(20):
        near.room = round_ % 2 == 0
        assert balancer.choose(everyone, 0.0, [], f"key {round_}") is not None
    rings = 160 * (1 + len(everyone))  # the zone's ring and the whole ring
    assert len(points) == rings + 20, len(points)  # and one point per key
