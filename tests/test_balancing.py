"""Balancing on real server processes of different speeds, weights, zones and keys: how the
calls are spread, printed and checked."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import gevent
import pytest

from geventpool import events
from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.testing.echo import echo_thrift
from geventpool.testing.processes import ServerProcess
from helpers import events_named, wait_until


@pytest.fixture
def make_client() -> Iterator[Callable[..., ServiceClient]]:
    made: list[ServiceClient] = []

    def make(instances: list[Instance], **options: Any) -> ServiceClient:
        pool = PoolSettings(**{"max_connections": 4, **options.pop("pool", {})})
        client = ServiceClient(echo_thrift.Echo, "echo", instances=instances, pool=pool, **options)
        client.start()
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


def at(server: ServerProcess, **fields: Any) -> Instance:
    assert server.port is not None
    return Instance(host="127.0.0.1", port=server.port, **fields)


def spread(client: ServiceClient, callers: int, calls: int) -> tuple[Counter[str], float]:
    """Who answered ``whoami`` how often, and the p99 latency in ms."""
    answered: Counter[str] = Counter()
    took: list[float] = []

    def caller() -> None:
        for _ in range(calls):
            began = time.perf_counter()
            answered[client.whoami()] += 1
            took.append(time.perf_counter() - began)

    gevent.joinall([gevent.spawn(caller) for _ in range(callers)], timeout=60, raise_error=True)
    took.sort()
    return answered, took[int(len(took) * 0.99)] * 1000


@pytest.mark.gevent_timeout(90)
def test_peak_ewma_sends_a_ten_times_slower_instance_few_calls_round_robin_half(
    servers: Callable[..., ServerProcess], make_client: Callable[..., ServiceClient]
) -> None:
    fast, slow = servers("--latency", "0.002"), servers("--latency", "0.02")
    shares = {}
    for balancer in ("peak_ewma", "round_robin"):
        client = make_client([at(fast), at(slow)], balancer=balancer)
        answered, p99 = spread(client, callers=4, calls=60)  # fewer callers than connections
        shares[balancer] = answered[slow.address] / sum(answered.values())
        print(f"{balancer}: slow instance's share {shares[balancer]:.0%}, p99 {p99:.1f} ms")
    assert shares["peak_ewma"] < 0.25 and shares["round_robin"] > 0.4, shares


def test_registry_weights_share_the_calls(
    servers: Callable[..., ServerProcess], make_client: Callable[..., ServiceClient]
) -> None:
    light, heavy = servers(), servers()
    """least_in_use draws its two samples in proportion to the weights and compares calls in
    progress per weight: shares follow the weights. (peak_ewma divides its latency cost by
    the weight, so a heavier instance takes calls until its cost catches up.)"""
    client = make_client([at(light, weight=1.0), at(heavy, weight=3.0)], balancer="least_in_use")
    answered, _ = spread(client, callers=1, calls=400)  # idle pools: the weighted draw decides
    share = answered[heavy.address] / sum(answered.values())
    print(f"weight 3 of 4: share {share:.0%}")
    assert 0.65 < share < 0.85, answered


@pytest.mark.gevent_timeout(60)
def test_a_joining_instance_ramps_up_over_slow_start(
    zk_hosts: str, servers: Callable[..., ServerProcess]
) -> None:
    for _ in range(2):
        servers("--zookeeper", zk_hosts, "--latency", "0.002")
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        zookeeper=zk_hosts,
        pool=PoolSettings(max_connections=4, slow_start=4.0),
    )
    client.start()
    answered: Counter[str] = Counter()
    windows: list[Counter[str]] = []

    def caller() -> None:
        for _ in range(5_000):
            answered[client.whoami()] += 1

    try:
        assert client._membership is not None
        assert client._membership.wait_for(lambda view: len(view) == 2, 5)
        load = [gevent.spawn(caller) for _ in range(6)]
        newcomer = servers("--zookeeper", zk_hosts, "--latency", "0.002")
        assert client._membership.wait_for(lambda view: len(view) == 3, 5)
        for _ in range(5):
            answered.clear()
            gevent.sleep(1.0)
            windows.append(Counter(answered))

        gevent.killall(load)
        shares = [w[newcomer.address] / max(sum(w.values()), 1) for w in windows]
        print("newcomer's share per second:", [f"{share:.0%}" for share in shares])
        assert shares[0] < 0.6 * shares[-1], shares
        assert shares[-1] > 0.2, shares
    finally:
        client.stop()


def test_zone_preference_keeps_calls_in_zone_and_spills_over_when_it_is_down(
    servers: Callable[..., ServerProcess], make_client: Callable[..., ServiceClient]
) -> None:
    near = [servers(), servers()]
    far = servers()
    client = make_client(
        [at(near[0], zone="a"), at(near[1], zone="a"), at(far, zone="b")],
        zone="a",
        pool={"eject_after": 1},
        retries=3,
    )
    answered, _ = spread(client, callers=4, calls=50)
    assert set(answered) == {near[0].address, near[1].address}, answered
    for server in near:
        server.kill()
    answered, _ = spread(client, callers=4, calls=50)
    assert set(answered) == {far.address}, answered


def test_consistent_hash_sends_a_key_to_one_instance_and_spreads_the_keys(
    servers: Callable[..., ServerProcess], make_client: Callable[..., ServiceClient]
) -> None:
    fleet = [servers() for _ in range(3)]
    key = {"value": "user-1"}
    client = make_client(
        [at(server) for server in fleet],
        balancer="consistent_hash",
        hash_key=lambda method, args: key["value"],
    )
    assert len({client.whoami() for _ in range(30)}) == 1
    owners = set()
    for number in range(60):
        key["value"] = f"user-{number}"
        owners.add(client.whoami())
    assert owners == {server.address for server in fleet}


@pytest.mark.gevent_timeout(30)
@pytest.mark.parametrize("balancer", ["round_robin", "consistent_hash"])
def test_a_caller_whose_instance_is_frozen_and_full_is_served_by_the_idle_one(
    servers: Callable[..., ServerProcess],
    make_client: Callable[..., ServiceClient],
    balancer: str,
    captured: list[MutableMapping[str, Any]],
) -> None:
    """One connection per instance; one instance frozen (SIGSTOP) with its connection held by
    a call. A caller the balancer sends there (round robin's turn, or a key that hashes
    there) is served by the other instance's idle connection at once; it waited out its
    pool_timeout and got PoolExhaustedError ("add server instances") while that connection sat
    idle. A consistent hash keeps a key on its instance while that has room: beyond, the call
    spills over (bounded-load hashing) rather than wait."""
    healthy, frozen = servers(), servers()
    owner = {"value": ""}
    client = make_client(
        [at(healthy), at(frozen)],
        balancer=balancer,
        hash_key=lambda method, args: owner["value"],
        pool={"max_connections": 1, "pool_timeout": 1.0},
        call_timeout=5.0,
    )
    if balancer == "consistent_hash":  # a key whose instance is the one to be frozen
        for number in range(1000):
            owner["value"] = f"user-{number}"
            if client.whoami() == frozen.address:
                break
        assert {client.whoami() for _ in range(4)} == {frozen.address}
    frozen.signal(signal.SIGSTOP)
    try:
        holder = gevent.spawn(client.slow_echo, "held", 0.0)
        wait_until(lambda: _in_use(client, frozen) == 1, 5)
        for _ in range(3):  # each would be sent to (or hashed onto) the frozen instance
            began = time.monotonic()
            assert client.whoami() == healthy.address
            assert time.monotonic() - began < 0.5
    finally:
        frozen.signal(signal.SIGCONT)
    assert holder.get(timeout=10) == "held"
    assert not events_named(captured, events.POOL_EXHAUSTED)


def _in_use(client: ServiceClient, server: ServerProcess) -> int:
    return next(s.in_use for s in client.status().instances if s.instance == server.address)
