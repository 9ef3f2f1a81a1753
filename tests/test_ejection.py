"""Ejection that is never wrong and deadlines that are the caller's, over real sockets: a
failure counts against an instance only when the instance caused it, a call begun before an
ejection cannot end it, no request is written with almost no time left, and a client starts
once however many greenlets make its first calls."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import gevent
import pytest

from geventpool import events
from geventpool.client.pool import InstancePool, PoolSettings
from geventpool.client.retrying import Retry
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import CallTimeoutError, GeventPoolError, TransportError
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import echo_thrift
from geventpool.testing.faults import TcpProxy
from geventpool.testing.processes import ServerProcess
from helpers import events_named


@pytest.fixture
def make_client() -> Iterator[Callable[..., ServiceClient]]:
    """``make_client(port, **pool)``: an unstarted client of the echo server at ``port``."""
    made: list[ServiceClient] = []

    def make(port: int, **pool: Any) -> ServiceClient:
        client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            instances=[Instance(host="127.0.0.1", port=port)],
            pool=PoolSettings(**{"eject_after": 2, "eject_backoff": 30.0, **pool}),
            call_timeout=5.0,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listener's backlog is full: a connect to it hangs (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        held.append(filler)
    time.sleep(0.1)
    yield port
    for filler in held:
        filler.close()
    listener.close()


@pytest.mark.parametrize("max_inflight", [1, 8])
def test_a_fresh_clients_calls_with_no_time_left_do_not_eject_a_healthy_instance(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    max_inflight: int,
) -> None:
    """No connection is idle yet, so each call would connect: the deadline is gone first."""
    server = serve()
    client = make_client(server.port, max_inflight=max_inflight)
    for _ in range(3):
        with pytest.raises(CallTimeoutError) as caught:
            client.echo("late", timeout=1e-9)
        assert not caught.value.sent
    [status] = client.status().instances
    assert (status.failures, status.ejected) == (0, False), status
    assert client.echo("still in rotation") == "still in rotation"


def test_a_connect_cut_short_by_the_calls_deadline_is_a_timeout_not_the_instances_failure(
    unanswered_port: int, make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(unanswered_port, connect_timeout=1.0, eject_after=1)
    started = time.monotonic()
    with pytest.raises(CallTimeoutError) as caught:
        client.echo("anyone?", timeout=0.2)
    assert not caught.value.sent and time.monotonic() - started < 0.5
    [status] = client.status().instances
    assert (status.failures, status.ejected) == (0, False), status


@pytest.mark.parametrize("max_inflight", [1, 8])
def test_a_call_begun_before_an_ejection_does_not_end_it(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    captured: list[MutableMapping[str, Any]],
    max_inflight: int,
) -> None:
    server = serve()
    client = make_client(server.port, max_inflight=max_inflight, max_connections=4)
    in_flight = gevent.spawn(client.slow_echo, "begun before", 0.4)
    gevent.sleep(0.05)
    for _ in range(2):  # two timeouts in a row: ejected
        with pytest.raises(CallTimeoutError):
            client.slow_echo("too slow", 1.0, timeout=0.1)
    [status] = client.status().instances
    assert status.ejected, status
    assert in_flight.get(timeout=5) == "begun before"
    [status] = client.status().instances
    assert status.ejected and status.ejections == 1, status
    assert not events_named(captured, events.INSTANCE_RESTORED)


@pytest.mark.parametrize("max_inflight", [1, 8])
def test_no_request_is_written_with_less_than_min_time_left(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    max_inflight: int,
) -> None:
    server = serve()
    client = make_client(server.port, max_inflight=max_inflight, min_time_left=0.05)
    assert client.echo("warm") == "warm"
    calls = server.stats.calls
    with pytest.raises(CallTimeoutError) as caught:
        client.echo("too late to be worth it", timeout=0.04)
    assert not caught.value.sent
    assert client.echo("in time", timeout=1.0) == "in time"
    assert server.stats.calls == calls + 1  # only the call in time reached the server
    [status] = client.status().instances
    assert (status.opened, status.closed, status.failures) == (1, 0, 0), status


@pytest.mark.gevent_timeout(30)
def test_concurrent_first_calls_start_the_client_once(
    zk_hosts: str,
    servers: Callable[..., ServerProcess],
    captured: list[MutableMapping[str, Any]],
) -> None:
    server = servers("--zookeeper", zk_hosts)
    client = ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts)
    try:
        callers = [gevent.spawn(client.whoami) for _ in range(5)]
        gevent.joinall(callers, timeout=10, raise_error=True)
        assert {caller.value for caller in callers} == {server.address}
        assert len(events_named(captured, events.CLIENT_STARTED)) == 1
    finally:
        client.stop()


@pytest.fixture
def hostile() -> Iterator[ServerProcess]:
    """A hostile echo server: ``echo("close")`` closes the connection, ``ok:X`` answers X."""
    server = ServerProcess([], module="geventpool.testing.hostile_server").start()
    yield server
    server.kill()


def test_an_instance_failing_a_third_of_its_calls_never_three_in_a_row_is_ejected(
    hostile: ServerProcess, captured: list[MutableMapping[str, Any]]
) -> None:
    """Consecutive failures never reach eject_after, but the success rate over the window
    falls under min_success_rate (Finagle's failure accrual)."""
    assert hostile.port is not None
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=hostile.port)],
        pool=PoolSettings(eject_after=3, success_min_calls=20, max_inflight=1),
    )
    try:
        client.start()
        for index in range(60):
            if client.status().instances[0].ejected:
                break
            message = "close" if index % 3 == 0 else f"ok:{index}"
            with contextlib.suppress(TransportError):
                client.echo(message)
        [status] = client.status().instances
        assert status.ejected and status.ejections == 1, status
        assert 20 <= index < 40, index  # ejected once the window had its 20 calls
    finally:
        client.stop()


def test_at_most_the_configured_share_of_a_service_is_ejected_at_once(
    serve: Callable[..., ThriftServer],
) -> None:
    """Three of four instances cut every call after it was sent: only two (half) are
    ejected; the third keeps its calls. (An instance that refuses connections is down for
    certain: ejecting it is never capped.)"""
    live = serve()
    hostile = [
        ServerProcess([], module="geventpool.testing.hostile_server").start() for _ in range(3)
    ]
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[
            *(Instance(host="127.0.0.1", port=h.port or 0) for h in hostile),
            Instance(host="127.0.0.1", port=live.port),
        ],
        pool=PoolSettings(eject_after=1, eject_backoff=30.0, max_ejected_share=0.5),
        balancer="round_robin",
    )
    try:
        for _ in range(20):
            with contextlib.suppress(TransportError):
                client.echo("close")
        statuses = client.status().instances
        assert sum(s.ejected for s in statuses) == 2, statuses
        assert sum(pool.ejections_capped for pool in client._pools.values()) >= 1
    finally:
        client.stop()
        for server in hostile:
            server.kill()


@pytest.mark.parametrize("panic_threshold", [0.5, 0.0])
def test_when_most_of_a_service_is_ejected_it_panics_and_routes_to_the_ejected_too(
    serve: Callable[..., ThriftServer], panic_threshold: float
) -> None:
    """Two of three healthy instances were ejected (by a burst of timeouts, say): fewer than
    half are in rotation, so the ejected ones are chosen again (and, answering, restored)
    instead of one instance taking every call; with panic_threshold 0 it never panics."""
    servers = [serve() for _ in range(3)]
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=s.port) for s in servers],
        pool=PoolSettings(
            eject_after=1,
            eject_backoff=30.0,
            max_ejected_share=1.0,
            panic_threshold=panic_threshold,
        ),
        balancer="round_robin",
    )
    try:
        client.start()
        pools = list(client._pools.values())
        for pool in pools[:2]:
            pool.record_failure(TransportError(pool.name, "timed out (by the test)"))
        assert [s.ejected for s in client.status().instances] == [True, True, False]
        answers = {client.whoami() for _ in range(12)}
        ejected = {pools[0].name, pools[1].name}
        if panic_threshold:
            assert answers & ejected, answers
            assert sum(s.ejected for s in client.status().instances) <= 1
        else:
            assert answers == {pools[2].name}
    finally:
        client.stop()


@pytest.mark.gevent_timeout(30)
def test_a_flapping_instance_is_ejected_for_longer_each_time_and_its_connects_stay_few(
    serve: Callable[..., ThriftServer], captured: list[MutableMapping[str, Any]]
) -> None:
    """Its connections are cut every 100 ms: the connects it costs per second stay few (it is
    ejected, and then probed one call at a time), and the idempotent calls lose nothing."""
    flapping, steady = serve(), serve()
    proxy = TcpProxy(("127.0.0.1", flapping.port))
    proxy.start()
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[
            Instance(host="127.0.0.1", port=proxy.port),
            Instance(host="127.0.0.1", port=steady.port),
        ],
        pool=PoolSettings(max_connections=4, max_inflight=1, eject_after=2, eject_backoff=0.2),
        retry=Retry(idempotent=True),
        balancer="round_robin",  # probes it as soon as each back-off ends
    )
    failures: list[Exception] = []

    def caller() -> None:
        for _ in range(100_000):
            try:
                client.slow_echo("x", 0.005)
            except Exception as error:  # noqa: BLE001 - every failure is a finding here
                failures.append(error)
                gevent.sleep(0.01)

    def flap() -> None:
        while True:
            gevent.sleep(0.1)
            proxy.drop()

    try:
        client.start()
        flapper = gevent.spawn(flap)
        callers = [gevent.spawn(caller) for _ in range(6)]  # fewer than the connections
        gevent.sleep(4.0)
        gevent.killall([*callers, flapper])
        connects_per_second = proxy.accepted / 4.0
        backoffs = [e["seconds"] for e in events_named(captured, events.INSTANCE_EJECTED)]
        print(f"{connects_per_second:.1f} connects/s to the flapping instance; {backoffs=}")
        assert failures == []
        assert connects_per_second < 15, connects_per_second
    finally:
        client.stop()
        proxy.stop()


def test_the_back_off_doubles_for_an_instance_that_fails_again_soon_after_its_restore() -> None:
    """A probe's success ends the ejection but not its count: only max_eject_backoff of
    health does, so an instance that flaps is ejected for longer each time."""
    now = 0.0
    pool = InstancePool(
        "svc",
        Instance(host="127.0.0.1", port=1),
        None,
        PoolSettings(eject_after=1, eject_backoff=1.0, max_eject_backoff=8.0),
        clock=lambda: now,
    )
    pool._guard.pools = [pool]
    seconds = []
    for _ in range(5):
        pool.record_failure(TransportError(pool.name, "cut (by the test)"))
        seconds.append(pool._ejected_until - now)  # type: ignore[operator]
        now = pool._ejected_until  # type: ignore[assignment]
        pool.record_success()  # the probe answers: restored
        now += 0.5  # and fails again soon
    assert seconds == [1.0, 2.0, 4.0, 8.0, 8.0]
    now += 9.0  # healthy for longer than max_eject_backoff: the count starts again
    pool.record_failure(TransportError(pool.name, "cut (by the test)"))
    assert pool._ejected_until == now + 1.0


def test_a_retired_pool_counts_no_ejection_for_the_calls_it_still_carries() -> None:
    pools = [
        InstancePool(
            "svc",
            Instance(host="127.0.0.1", port=port),
            None,
            PoolSettings(eject_after=1, max_ejected_share=0.5),
        )
        for port in (1, 2, 3)
    ]
    guard = pools[0]._guard
    for pool in pools:
        pool._guard = guard
    guard.pools = pools
    pools[0].shut()  # it left; its calls in flight then fail
    pools[0].record_failure(TransportError(pools[0].name, "reset (by the test)"))
    assert (guard.ejected, guard.suspected, pools[0].ejections) == (0, 0, 0)
    assert guard.may_eject()  # the share is still there for a live instance


def test_calls_that_time_out_on_their_callers_own_tiny_deadline_do_not_eject(
    servers: Callable[..., ServerProcess],
) -> None:
    slowish = servers("--latency", "0.01")  # answers in 10 ms
    assert slowish.port is not None
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=slowish.port)],
        pool=PoolSettings(eject_after=3),
    )
    try:
        assert client.echo("warm") == "warm"
        sent = []
        for _ in range(6):
            with pytest.raises(CallTimeoutError) as caught:
                client.echo("x", timeout=0.005)
            sent.append(caught.value.sent)
        assert any(sent), sent  # (a loaded machine may spend a deadline before sending)
        [status] = client.status().instances
        assert (status.failures, status.ejections) == (0, 0), status
    finally:
        client.stop()


@pytest.mark.gevent_timeout(60)
def test_an_overloaded_client_whose_callers_waited_out_their_deadline_ejects_no_instance(
    servers: Callable[..., ServerProcess], captured: list[MutableMapping[str, Any]]
) -> None:
    """60 callers, 6 connections to three healthy instances that answer in 80 ms: calls wait
    in the client's own queue and are sent with less time left than the instances need. Those
    timeouts are the client's overload, not the instances' failure (one was ejected and
    reported unresponsive, 58 more ejections held back only by the cap)."""
    fleet = [servers("--latency", "0.08") for _ in range(3)]
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=s.port or 0) for s in fleet],
        pool=PoolSettings(max_connections=2, pool_timeout=1.0),
        call_timeout=0.5,
    )
    timeouts = 0

    def caller() -> None:
        nonlocal timeouts
        ends = time.monotonic() + 3.0
        while time.monotonic() < ends:
            try:
                client.echo("x")
            except CallTimeoutError as error:
                timeouts += error.sent
            except GeventPoolError:  # (a wait cut by the deadline, say): the overload too
                pass

    try:
        gevent.joinall([gevent.spawn(caller) for _ in range(60)], timeout=30, raise_error=True)
        assert timeouts > 20, timeouts  # sent, then out of time: the case at hand
        assert not events_named(captured, events.INSTANCE_EJECTED)
        assert not events_named(captured, events.INSTANCE_UNRESPONSIVE)
        assert all(pool.ejections_capped == 0 for pool in client._pools.values())
    finally:
        client.stop()
