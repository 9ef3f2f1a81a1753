"""ServiceClient and its pools against real servers: replies never cross callers, slots never
leak, waiters are served in order, dead instances are ejected, idle connections are reaped."""

from __future__ import annotations

import random
import resource
import socket
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import gevent
import pytest
from thriftpy2.thrift import TApplicationException

from geventpool import events
from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import (
    CallTimeoutError,
    ConfigurationError,
    ConnectionBusyError,
    ConnectionClosedError,
    InvalidArgumentsError,
    NoInstancesError,
    PoolClosedError,
    PoolExhaustedError,
    RetriesExhaustedError,
    TransportError,
)
from geventpool.server.thrift_server import Registration, ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift
from geventpool.testing.faults import TcpProxy
from geventpool.testing.processes import ServerProcess
from geventpool.testing.zookeeper import free_port
from helpers import events_named, wait_until


def at(*servers: ThriftServer) -> list[Instance]:
    return [Instance(host="127.0.0.1", port=server.port) for server in servers]


@pytest.fixture
def make_client() -> Iterator[Callable[..., ServiceClient]]:
    """``make_client(**options)`` builds a started ServiceClient of Echo, stopped afterwards."""
    made: list[ServiceClient] = []

    def make(**options: Any) -> ServiceClient:
        client = ServiceClient(echo_thrift.Echo, "echo", **options)
        client.start()
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


def settings(**options: Any) -> PoolSettings:
    return PoolSettings(**{"reap_interval": 0.05, **options})


def test_calls_go_through_the_proxy_and_the_explicit_connection(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    server = serve()
    client = make_client(instances=at(server))
    assert client.add(40, 2) == 42
    assert client.call("echo", "hi") == "hi"
    with client.connection() as pinned:
        assert pinned.whoami() == pinned.whoami() == f"127.0.0.1:{server.port}"
    with pytest.raises(AttributeError):
        client.no_such_method()


def test_declared_and_application_exceptions_pass_through_and_keep_the_connection(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(instances=at(serve()), pool=settings(max_connections=1))
    with pytest.raises(echo_thrift.Refused):
        client.refuse("no")
    with pytest.raises(TApplicationException):
        client.crash("boom")
    assert client.echo("fine") == "fine"
    [instance] = client.status().instances
    assert (instance.opened, instance.closed) == (1, 0)


def test_a_reply_delayed_past_the_deadline_never_reaches_the_next_caller(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(instances=at(serve()), pool=settings(max_connections=1))
    with pytest.raises(CallTimeoutError) as caught:
        client.slow_echo("late reply of A", 0.3, timeout=0.1)
    assert caught.value.method == "slow_echo"
    for index in range(5):  # the same single slot, so the same instance, every time
        assert client.echo(f"reply of B{index}") == f"reply of B{index}"
    gevent.sleep(0.4)  # the late reply has surely been written by now
    assert client.echo("reply of C") == "reply of C"
    [instance] = client.status().instances
    assert instance.closed == 1 and instance.in_use == 0


def test_bad_arguments_raise_send_nothing_and_keep_the_connection(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    server = serve()
    client = make_client(instances=at(server), pool=settings(max_connections=1))
    assert client.add(1, 2) == 3
    bad_calls: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
        (("one", 2), {}, "argument 'a': expected i64 \\(an int\\), got str 'one'"),
        ((1.7, 2), {}, "argument 'a': expected i64 \\(an int\\), got float 1.7"),
        ((2**70, 1), {}, "argument 'a': 1180591620717411303424 is out of range for i64"),
        ((1,), {}, "missing required arguments \\['b'\\]"),
        ((1, 2, 3), {}, "takes 2 arguments"),
        ((1,), {"c": 2}, "unexpected argument 'c'"),
        ((1,), {"a": 2}, "given twice"),
    ]
    for args, kwargs, message in bad_calls:  # found before anything is encoded or written
        with pytest.raises(InvalidArgumentsError, match=message):
            client.call("add", *args, **kwargs)
    with pytest.raises(TypeError):  # InvalidArgumentsError is a TypeError too
        client.echo(["a" * 1_000_000])
    assert client.add(1, 2) == 3
    assert server.stats.calls == 2  # not one bad call reached the server
    [instance] = client.status().instances
    assert instance.in_use == 0 and instance.closed == 0 and instance.opened == 1


def test_bytes_that_are_not_utf8_for_a_string_are_refused_before_sending(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    """Sent, they made the server drop the connection (its decoder refuses them), and three
    such calls ejected a healthy instance."""
    server = serve()
    client = make_client(instances=at(server), pool=settings(max_connections=1))
    for _ in range(5):
        with pytest.raises(InvalidArgumentsError, match="bytes that are not UTF-8"):
            client.echo(b"\xff\xfe")
    assert client.echo("ü".encode()) == "ü"  # UTF-8 bytes are a string
    assert server.stats.calls == 1
    [instance] = client.status().instances
    assert (instance.opened, instance.closed, instance.ejected) == (1, 0, False)


@pytest.mark.parametrize("max_inflight", [1, 8])
def test_greenlets_sharing_a_borrowed_connection_get_a_typed_error_and_nothing_mixes(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient], max_inflight: int
) -> None:
    client = make_client(
        instances=at(serve()), pool=settings(max_connections=1, max_inflight=max_inflight)
    )
    with client.connection() as pinned:
        first = gevent.spawn(pinned.slow_echo, "first", 0.2)
        gevent.sleep(0.05)  # the first call is on the wire
        with pytest.raises(ConnectionBusyError, match="another call is in progress"):
            pinned.echo("second")
        assert first.get(timeout=5) == "first"
        assert pinned.echo("third") == "third"
    [instance] = client.status().instances
    assert (instance.opened, instance.closed) == (1, 0)


def test_a_handler_result_the_idl_does_not_allow_is_an_internal_error_not_a_truncation(
    make_client: Callable[..., ServiceClient], captured: list[MutableMapping[str, Any]]
) -> None:
    """``add`` returning 3.7 for an i64: thriftpy2 would send 3."""

    class Sloppy(EchoHandler):
        def add(self, a: int, b: int) -> Any:
            return a + b + 0.7

    server = ThriftServer(echo_thrift.Echo, Sloppy(""), deregister_grace=0.0)
    server.start()
    try:
        client = make_client(instances=at(server))
        with pytest.raises(TApplicationException) as caught:
            client.add(1, 2)
        assert caught.value.type == TApplicationException.INTERNAL_ERROR
        assert client.echo("next") == "next"
    finally:
        server.stop(drain_timeout=1.0)
    [event] = events_named(captured, "server_handler_failed")
    assert "add() returned: expected i64 (an int), got float 3.7" in event["error"]


def test_an_argument_error_message_never_embeds_a_large_value(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(instances=at(serve()))
    with pytest.raises(InvalidArgumentsError) as caught:
        client.echo(["x" * 10_000] * 1_000)
    assert len(str(caught.value)) < 200


def test_ten_thousand_callers_over_ten_connections_are_served_in_arrival_order(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    """Arrivals are spread out so that they interleave with check-ins: a caller that comes
    while others wait must queue behind them, even when a connection was just checked in (a
    pool that lets a newcomer take it, or serves the queue out of order, fails here)."""
    client = make_client(
        instances=at(serve()),
        pool=settings(max_connections=10, min_idle=10, pool_timeout=60.0),
    )
    wait_until(lambda: client.status().idle == 10, 5)  # callers wait or take idle ones
    arrived: list[int] = []
    served: list[int] = []
    came_while_others_waited = came_after_a_check_in = 0

    def caller(number: int) -> None:
        nonlocal came_while_others_waited, came_after_a_check_in
        status = client.status()
        came_while_others_waited += status.waiters > 0
        came_after_a_check_in += len(served) > 10 and status.waiters > 0
        arrived.append(number)
        with client.connection(timeout=60.0) as pinned:
            served.append(number)
            pinned.echo("x")

    started = time.monotonic()
    callers = []
    for number in range(10_000):
        callers.append(gevent.spawn(caller, number))
        if number % 20 == 19:
            gevent.sleep(0)  # let calls finish and connections come back between arrivals
    gevent.joinall(callers, raise_error=True)
    elapsed = time.monotonic() - started

    assert len(served) == 10_000
    assert came_after_a_check_in > 1_000  # arrivals really did interleave with check-ins
    assert served == arrived  # first come, first served: nobody overtook anybody
    status = client.status()
    assert (status.in_use, status.waiters, status.idle) == (0, 0, 10)
    print(
        f"10,000 callers in {elapsed:.2f}s; {came_while_others_waited} came while others"
        f" waited, {came_after_a_check_in} of them after check-ins had begun"
    )


def test_exhaustion_raises_with_the_numbers_and_logs_one_event_per_second(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    captured: list[MutableMapping[str, Any]],
) -> None:
    client = make_client(
        instances=at(serve(), serve()), pool=settings(max_connections=1, pool_timeout=0.1)
    )
    busy = [gevent.spawn(client.slow_echo, "busy", 0.5) for _ in range(2)]
    gevent.sleep(0.05)
    failures = []
    for _ in range(3):
        with pytest.raises(PoolExhaustedError) as caught:
            client.echo("no room")
        failures.append(caught.value)
    gevent.joinall(busy, raise_error=True)

    error = failures[0]
    assert (error.service, error.max_connections, error.in_use) == ("echo", 2, 2)
    assert 0 < error.timeout <= 0.1 + 1e-6
    assert "add server instances" in str(error)
    [event] = events_named(captured, events.POOL_EXHAUSTED)
    assert event["max_connections"] == 2 and len(event["instances"]) == 2
    assert client.status().exhausted == 3
    assert client.echo("room again") == "room again"


def test_a_failed_connect_is_retried_on_another_instance_and_the_dead_one_is_ejected(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    captured: list[MutableMapping[str, Any]],
) -> None:
    live = serve()
    dead = Instance(host="127.0.0.1", port=free_port())
    client = make_client(
        instances=[dead, *at(live)], pool=settings(eject_after=2), balancer="round_robin"
    )
    answers = {client.whoami() for _ in range(10)}
    assert answers == {f"127.0.0.1:{live.port}"}
    dead_status = next(s for s in client.status().instances if s.instance == str(dead))
    assert dead_status.ejected and dead_status.ejections == 1
    assert events_named(captured, events.INSTANCE_EJECTED)[0]["instance"] == str(dead)


def test_when_every_instance_refuses_the_attempts_are_reported(
    make_client: Callable[..., ServiceClient],
) -> None:
    dead = [Instance(host="127.0.0.1", port=free_port()) for _ in range(3)]
    client = make_client(instances=dead, retries=2)
    with pytest.raises(RetriesExhaustedError) as caught:
        client.echo("anyone?")
    assert len(caught.value.attempts) == 3
    assert all(isinstance(a, TransportError) for a in caught.value.attempts)


def test_an_ejected_instance_is_tried_again_after_its_backoff_and_restored(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    captured: list[MutableMapping[str, Any]],
) -> None:
    port = free_port()
    other = serve()
    client = make_client(
        instances=[Instance(host="127.0.0.1", port=port), *at(other)],
        pool=settings(eject_after=1, eject_backoff=0.2),
        balancer="round_robin",
    )
    for _ in range(4):
        client.echo("x")  # the closed port fails once and is ejected
    assert events_named(captured, events.INSTANCE_EJECTED)
    serve(port=port)  # the instance comes back
    gevent.sleep(0.3)
    wait_until(
        lambda: (
            {client.whoami() for _ in range(4)} == {f"127.0.0.1:{port}", f"127.0.0.1:{other.port}"}
        ),
        5,
    )
    assert events_named(captured, events.INSTANCE_RESTORED)


def test_idle_connections_are_reaped_down_to_min_idle_after_load_stops(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(
        instances=at(serve()),
        pool=settings(max_connections=8, min_idle=2, idle_timeout=0.2),
    )
    wait_until(lambda: client.status().idle == 2, 5)  # opened at start
    gevent.joinall([gevent.spawn(client.slow_echo, "x", 0.1) for _ in range(8)], raise_error=True)
    assert client.status().idle == 8
    wait_until(lambda: client.status().idle == 2, 5)
    [instance] = client.status().instances
    assert instance.reaped == 6


def test_a_server_restarted_while_connections_were_idle_causes_no_failed_call(
    servers: Callable[..., ServerProcess], make_client: Callable[..., ServiceClient]
) -> None:
    port = free_port()
    first = servers("--port", str(port))
    client = make_client(
        instances=[Instance(host="127.0.0.1", port=port)], pool=settings(max_connections=5)
    )
    gevent.joinall([gevent.spawn(client.echo, "warm") for _ in range(5)], raise_error=True)
    assert client.status().idle == 5
    assert first.terminate() == 0
    servers("--port", str(port))

    results = [gevent.spawn(client.echo, f"after restart {n}") for n in range(20)]
    gevent.joinall(results)
    assert [r.value for r in results] == [f"after restart {n}" for n in range(20)]
    [instance] = client.status().instances
    assert instance.failures == 0 and instance.closed >= 5


def test_with_pre_ping_and_one_connection_never_more_than_one_socket_is_opened(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    """A connection being pinged counts against the cap: nobody opens a second one meanwhile."""
    server = serve()
    client = make_client(
        instances=at(server), pool=settings(max_connections=1, pre_ping="ping", pool_timeout=10)
    )

    def caller(number: int) -> None:
        pause = random.Random(number)
        for call in range(20):  # spread out, so that callers also arrive while one pings
            assert client.echo(f"{number}-{call}") == f"{number}-{call}"
            gevent.sleep(pause.random() * 0.002)

    gevent.joinall([gevent.spawn(caller, n) for n in range(20)], raise_error=True, timeout=30)
    assert server.stats.accepted == 1
    [instance] = client.status().instances
    assert (instance.opened, instance.in_use) == (1, 0)


def test_a_stopped_client_refuses_calls(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(instances=at(serve()))
    client.stop()
    with pytest.raises(PoolClosedError):
        client.echo("late")


def test_no_call_is_served_once_stop_has_begun(
    serve: Callable[..., ThriftServer], zk_hosts: str
) -> None:
    """stop() closes the pools before it stops watching ZooKeeper (which yields): a call
    made while it finishes is refused, never served."""
    serve(registration=Registration(zookeeper=zk_hosts, service="echo"))
    client = ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts)
    assert client.echo("before") == "before"
    stopping = gevent.spawn(client.stop)
    gevent.sleep(0)  # stop() runs up to its first yield
    outcomes = []
    for _ in range(200):  # bounded; stop() is over long before
        try:
            outcomes.append(client.echo("late"))
        except PoolClosedError:
            outcomes.append("refused")
        if stopping.dead and len(outcomes) >= 20:
            break
        gevent.sleep(0.001)
    stopping.get(timeout=10)
    assert len(outcomes) >= 20 and set(outcomes) == {"refused"}, outcomes


def test_a_bad_service_name_fails_at_construction_before_anything_connects(
    zk_hosts: str,
) -> None:
    with pytest.raises(ConfigurationError, match="service name"):
        ServiceClient(echo_thrift.Echo, "bad name", zookeeper=zk_hosts)


def test_a_client_with_no_instances_says_so(make_client: Callable[..., ServiceClient]) -> None:
    with pytest.raises(NoInstancesError):
        make_client(instances=[]).echo("anyone?")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"instances": [], "zookeeper": "127.0.0.1:1"},
        {"instances": [], "call_timeout": 0},
        {"instances": [], "retries": -1},
        {"instances": [], "balancer": "random"},
    ],
)
def test_invalid_client_options_raise_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ServiceClient(echo_thrift.Echo, "echo", **options)


@pytest.mark.parametrize(
    "options",
    [
        {"max_connections": 0},
        {"min_idle": 11},
        {"pool_timeout": 0},
        {"idle_timeout": -1},
        {"lifetime_jitter": 1.0},
        {"eject_after": 0},
    ],
)
def test_invalid_pool_settings_raise_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        PoolSettings(**options)


def test_connections_are_retired_after_their_lifetime_and_replaced(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(
        instances=at(serve()),
        pool=settings(max_connections=2, min_idle=2, max_lifetime=0.3, lifetime_jitter=0.5),
    )
    wait_until(lambda: client.status().idle == 2, 5)
    first = {c.fileno() for pool in client._pools.values() for c in pool._idle}
    wait_until(lambda: client.status().instances[0].closed >= 2, 5)  # retired by the reaper
    wait_until(lambda: client.status().idle == 2, 5)  # and min_idle restored
    assert client.echo("still fine") == "still fine"
    assert client.status().instances[0].opened >= 4 and first


def test_pre_ping_checks_an_idle_connection_before_handing_it_out(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    server = serve()
    client = make_client(instances=at(server), pool=settings(max_connections=1, pre_ping="whoami"))
    for _ in range(5):
        client.echo("x")
    assert server.stats.calls == 5 + 4  # a fresh connection is not pinged, a reused one is


def test_a_probe_through_a_borrowed_connection_restores_an_ejected_instance(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    captured: list[MutableMapping[str, Any]],
) -> None:
    port = free_port()
    client = make_client(
        instances=[Instance(host="127.0.0.1", port=port)],
        pool=settings(eject_after=1, eject_backoff=0.1),
        retries=0,
    )
    with pytest.raises(RetriesExhaustedError):
        client.echo("nobody there")  # ejected
    serve(port=port)
    gevent.sleep(0.15)
    with client.connection() as pinned:
        assert pinned.echo("probe") == "probe"
    assert events_named(captured, events.INSTANCE_RESTORED)
    assert not client.status().instances[0].ejected


def test_pooled_connections_are_reused_when_their_descriptors_are_above_1024(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip("cannot open over 1024 descriptors here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    filler = [socket.socket() for _ in range(1100)]  # push new descriptors past FD_SETSIZE
    try:
        client = make_client(instances=at(serve()), pool=settings(max_connections=1))
        for _ in range(20):
            assert client.echo("x") == "x"
        [instance] = client.status().instances
        assert instance.opened == 1  # reused every time, not found "dead" by select()
        assert client._pools[next(iter(client._pools))]._open_connections.pop().fileno() > 1024
    finally:
        for sock in filler:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_borrowed_connection_refuses_calls_once_it_is_returned(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(instances=at(serve()), pool=settings(max_connections=1))
    with client.connection() as pinned:
        assert pinned.echo("inside") == "inside"
    with pytest.raises(ConnectionClosedError, match="went back to its pool"):
        pinned.echo("after")  # the connection may belong to another caller by now
    assert client.echo("others are fine") == "others are fine"


def test_a_borrowed_connection_refuses_calls_once_a_call_on_it_timed_out(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    """The late reply of the timed-out call must never reach the next call in the block."""
    client = make_client(instances=at(serve()), pool=settings(max_connections=1))
    with client.connection(timeout=0.2) as pinned:
        with pytest.raises(CallTimeoutError):
            pinned.slow_echo("reply of A", 0.4)
        gevent.sleep(0.4)  # the reply of A arrives meanwhile
        with pytest.raises(ConnectionClosedError, match="closed by an earlier failure"):
            pinned.echo("B")
    assert client.echo("C") == "C"


def test_a_peer_trickling_one_byte_at_a_time_is_cut_by_the_total_deadline(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    server = serve()
    proxy = TcpProxy(("127.0.0.1", server.port))
    proxy.start()
    try:
        client = make_client(
            instances=[Instance(host="127.0.0.1", port=proxy.port)],
            pool=settings(max_connections=1),
        )
        assert client.echo("warm") == "warm"
        proxy.trickle(0.05)  # every single read succeeds; the whole reply takes seconds
        started = time.monotonic()
        with pytest.raises(CallTimeoutError):
            client.echo("x" * 200, timeout=0.5)
        took = time.monotonic() - started
        assert took < 2.0  # the deadline, not the sum of per-read timeouts, ended it
        [instance] = client.status().instances
        assert instance.closed == 1  # that connection is never reused
        print(f"trickling call cut after {took:.2f}s (deadline 0.5s)")
    finally:
        proxy.stop()


def test_a_deadline_spent_before_sending_does_not_count_against_the_instance(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client(instances=at(serve()), pool=settings(eject_after=2))
    assert client.echo("warm") == "warm"
    for _ in range(5):  # the deadline is gone before anything can be sent
        with pytest.raises(CallTimeoutError) as caught:
            client.echo("late", timeout=1e-9)
        assert not caught.value.sent and "before" in str(caught.value)
    [instance] = client.status().instances
    assert instance.failures == 0 and not instance.ejected
    assert client.echo("still in rotation") == "still in rotation"
