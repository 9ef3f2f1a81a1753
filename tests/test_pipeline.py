"""Pipelined connections (``max_inflight`` above 1) over real sockets: many calls share one
connection, every caller gets its own reply, a deadline costs the caller and not the
connection, and anything that is not the reply to a waiting call breaks the connection with a
typed error for every call on it."""

from __future__ import annotations

import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import gevent
import pytest

from geventpool import events
from geventpool.client.pipeline import PipelinedConnection
from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import (
    CallTimeoutError,
    ConnectionClosedError,
    GeventPoolError,
    PoolExhaustedError,
    ProtocolViolationError,
    TransportError,
)
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.apache_peer import generate
from geventpool.testing.echo import EchoHandler, echo_thrift
from geventpool.testing.processes import ServerProcess
from helpers import events_named, wait_until

CODECS = [
    ("buffered", "binary"),
    ("framed", "binary"),
    ("buffered", "compact"),
    ("framed", "compact"),
]


@pytest.fixture
def pipelined() -> Iterator[Callable[..., ServiceClient]]:
    """``pipelined(port, transport, protocol, **pool)``: a client of the echo server at
    ``port`` with pipelined connections; stopped after the test."""
    made: list[ServiceClient] = []

    def make(
        port: int, transport: str = "buffered", protocol: str = "binary", **pool: Any
    ) -> ServiceClient:
        instance = Instance(host="127.0.0.1", port=port, transport=transport, protocol=protocol)
        options = {"max_connections": 2, "max_inflight": 16, "eject_after": 10_000, **pool}
        client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            instances=[instance],
            pool=PoolSettings(**options),
            call_timeout=5.0,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


def call_concurrently(client: ServiceClient, callers: int, calls: int) -> dict[str, str]:
    """Every caller makes ``calls`` echo calls with messages of its own; what came back."""
    got: dict[str, str] = {}

    def caller(index: int) -> None:
        for call in range(calls):
            message = f"caller {index} call {call}"
            got[message] = client.echo(message)

    gevent.joinall([gevent.spawn(caller, i) for i in range(callers)], timeout=30, raise_error=True)
    return got


@pytest.mark.parametrize(("transport", "protocol"), CODECS)
def test_concurrent_callers_share_the_connections_and_each_gets_its_own_reply(
    serve: Callable[..., ThriftServer],
    pipelined: Callable[..., ServiceClient],
    transport: str,
    protocol: str,
) -> None:
    server = serve(transport=transport, protocol=protocol)
    client = pipelined(server.port, transport, protocol)
    got = call_concurrently(client, callers=100, calls=20)
    assert len(got) == 2000 and all(reply == message for message, reply in got.items())
    [status] = client.status().instances
    assert (status.opened, status.closed, status.in_use, status.held) == (2, 0, 0, 0), status
    assert server.stats.calls == 2000


def test_pipelined_calls_to_an_apache_thrift_server_each_get_their_own_reply(
    tmp_path: Path, pipelined: Callable[..., ServiceClient]
) -> None:
    """Apache Thrift's threaded server reads a connection's next request once it answered
    the previous one: pipelining works with it too (in order)."""
    generated = generate(tmp_path / "gen-py")
    server = ServerProcess(
        ["serve", "--gen", str(generated)], module="geventpool.testing.apache_peer"
    ).start()
    try:
        assert server.port is not None
        client = pipelined(server.port)
        got = call_concurrently(client, callers=50, calls=20)
        assert len(got) == 1000 and all(reply == message for message, reply in got.items())
        [status] = client.status().instances
        assert (status.opened, status.closed) == (2, 0), status
    finally:
        server.kill()


def test_a_timed_out_call_leaves_its_connection_in_service(
    serve: Callable[..., ThriftServer], pipelined: Callable[..., ServiceClient]
) -> None:
    server = serve()
    client = pipelined(server.port, max_connections=1, max_inflight=8)
    assert client.echo("first") == "first"
    with pytest.raises(CallTimeoutError) as caught:
        client.slow_echo("late reply", 0.3, timeout=0.05)
    assert caught.value.sent
    # Queued behind the slow call on the same connection (the server answers in order).
    got = call_concurrently(client, callers=5, calls=4)
    assert all(reply == message for message, reply in got.items()) and len(got) == 20
    gevent.sleep(0.35)  # the late reply arrived meanwhile, and was dropped
    assert client.echo("after") == "after"
    [status] = client.status().instances
    assert (status.opened, status.closed) == (1, 0), status


@pytest.mark.parametrize("mode", ["wrong-seqid", "stale", "wrong-name", "trailing"])
def test_a_reply_to_no_waiting_call_breaks_the_connection_for_every_call_on_it(
    pipelined: Callable[..., ServiceClient], mode: str
) -> None:
    """The hostile server answers in order: the calls queued with the bad one fail typed,
    none receives another call's reply, and the next calls get a new connection."""
    server = ServerProcess([], module="geventpool.testing.hostile_server").start()
    try:
        assert server.port is not None
        client = pipelined(server.port, max_connections=1, max_inflight=32)
        assert client.echo("ok:warm") == "warm"
        outcomes: dict[int, Any] = {}

        def caller(index: int) -> None:
            message = mode if index == 5 else f"ok:{index}"
            try:
                outcomes[index] = client.echo(message)
            except (TransportError, ConnectionClosedError) as error:
                outcomes[index] = error

        gevent.joinall([gevent.spawn(caller, i) for i in range(20)], timeout=10)
        assert len(outcomes) == 20
        for index, outcome in outcomes.items():
            if isinstance(outcome, str):
                assert outcome == str(index) or (mode == "trailing" and index == 5), outcomes
        errors = [o for o in outcomes.values() if not isinstance(o, str)]
        assert errors and any(isinstance(e, ProtocolViolationError) for e in errors), outcomes
        assert client.echo("ok:next") == "next"
        [status] = client.status().instances
        assert status.closed >= 1 and status.in_use == 0, status
    finally:
        server.kill()


@pytest.mark.gevent_timeout(30)
def test_a_connection_whose_late_replies_never_come_is_broken_as_stuck(
    servers: Callable[..., ServerProcess], pipelined: Callable[..., ServiceClient]
) -> None:
    server = servers()
    assert server.port is not None
    client = pipelined(
        server.port, max_connections=1, stuck_after=0.3, reap_interval=0.05, pool_timeout=2.0
    )
    assert client.echo("before") == "before"
    server.signal(signal.SIGSTOP)
    try:
        for _ in range(3):
            with pytest.raises(CallTimeoutError) as caught:
                client.echo("into the void", timeout=0.1)
            assert caught.value.sent
        wait_until(lambda: client.status().instances[0].closed == 1, timeout=5)
    finally:
        server.signal(signal.SIGCONT)
    assert client.echo("after") == "after"
    [status] = client.status().instances
    assert (status.opened, status.closed) == (2, 1), status


def test_capacity_is_counted_in_call_slots_and_waiters_are_served_in_order(
    serve: Callable[..., ThriftServer], pipelined: Callable[..., ServiceClient]
) -> None:
    server = serve()
    client = pipelined(server.port, max_connections=1, max_inflight=2, pool_timeout=0.1)
    slow = [gevent.spawn(client.slow_echo, f"slow {i}", 0.6) for i in range(2)]
    gevent.sleep(0.1)
    with pytest.raises(PoolExhaustedError) as caught:
        client.echo("no slot")
    assert caught.value.capacity == 2 and caught.value.in_use == 2
    assert "2 of 2 call slots in use (1 pipelined connections)" in str(caught.value)
    order: list[int] = []

    def waiter(index: int) -> None:
        patient.echo(f"waiter {index}", timeout=3.0)
        order.append(index)

    patient = pipelined(server.port, max_connections=1, max_inflight=2, pool_timeout=2.0)
    held = [gevent.spawn(patient.slow_echo, f"held {i}", 0.3) for i in range(2)]
    gevent.sleep(0.05)
    waiters = []
    for index in range(6):
        waiters.append(gevent.spawn(waiter, index))
        gevent.sleep(0.01)
    gevent.joinall([*slow, *held, *waiters], timeout=5, raise_error=True)
    assert [g.value for g in slow] == ["slow 0", "slow 1"]
    assert sorted(order) == list(range(6)) and order[:2] == [0, 1], order
    [status] = patient.status().instances
    assert (status.opened, status.in_use, status.held) == (1, 0, 0), status


def test_status_shows_the_calls_in_flight_on_each_connection(
    serve: Callable[..., ThriftServer], pipelined: Callable[..., ServiceClient]
) -> None:
    """A connection with room takes the next call before another is opened, so four calls
    with room for three on each connection are three on one and one on the other."""
    server = serve()
    client = pipelined(server.port, max_connections=2, max_inflight=3)
    slow = [gevent.spawn(client.slow_echo, f"slow {i}", 0.4) for i in range(4)]
    gevent.sleep(0.15)
    [status] = client.status().instances
    assert (status.inflight, status.in_use, status.held) == ((3, 1), 4, 2), status
    gevent.joinall(slow, timeout=5, raise_error=True)
    [status] = client.status().instances
    assert (status.inflight, status.in_use, status.idle) == ((0, 0), 0, 2), status


@pytest.mark.parametrize("concurrency", [32, 1])
def test_a_slow_call_holds_back_the_calls_behind_it_only_on_an_in_order_server(
    serve: Callable[..., ThriftServer], pipelined: Callable[..., ServiceClient], concurrency: int
) -> None:
    server = serve(concurrency=concurrency)
    client = pipelined(server.port, max_connections=1, max_inflight=16)
    slow = gevent.spawn(client.slow_echo, "slow", 0.5)
    gevent.sleep(0.05)  # written first
    fast = [gevent.spawn(client.echo, f"fast {i}") for i in range(10)]
    finished_while_slow_ran: list[bool] = []

    def note(greenlet: gevent.Greenlet) -> None:
        finished_while_slow_ran.append(not slow.ready())

    for greenlet in fast:
        greenlet.link(note)
    gevent.joinall([slow, *fast], timeout=5, raise_error=True)
    assert slow.value == "slow" and [g.value for g in fast] == [f"fast {i}" for i in range(10)]
    [status] = client.status().instances
    assert status.opened == 1, status  # all on the one connection
    expected = concurrency > 1  # out of order: the fast replies overtake the slow one
    assert finished_while_slow_ran == [expected] * 10


def test_clients_pipeline_by_default_with_servers_that_advertise_it(
    zk_hosts: str, servers: Callable[..., ServerProcess]
) -> None:
    servers("--zookeeper", zk_hosts)
    client = ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts)
    try:
        assert client.echo("hello") == "hello"
        [status] = client.status().instances
        assert status.max_inflight == 32
    finally:
        client.stop()
    defaults = PoolSettings()
    assert defaults.inflight_for(Instance(host="127.0.0.1", port=9)) == 1  # nothing advertised
    assert PoolSettings(max_inflight=4).inflight_for(Instance(host="127.0.0.1", port=9)) == 4


@pytest.mark.parametrize("max_inflight", [1, 2])
def test_oneway_calls_return_once_written_and_take_no_reply_slot(
    pipelined: Callable[..., ServiceClient], max_inflight: int
) -> None:
    handler = EchoHandler("x")
    server = ThriftServer(echo_thrift.Echo, handler, deregister_grace=0.0)
    server.start()
    try:
        client = pipelined(server.port, max_connections=1, max_inflight=max_inflight)
        notes = [gevent.spawn(client.notify, f"note {i}") for i in range(50)]
        gevent.joinall(notes, timeout=5, raise_error=True)
        assert [g.value for g in notes] == [None] * 50
        assert client.echo("after the notes") == "after the notes"  # the stream is in step
        assert sorted(handler.notified) == sorted(f"note {i}" for i in range(50))
        [status] = client.status().instances
        assert (status.opened, status.closed, status.in_use) == (1, 0, 0), status
    finally:
        server.stop(drain_timeout=1.0)


def test_a_request_held_up_in_the_queue_until_too_late_is_not_written(
    pipelined: Callable[..., ServiceClient],
) -> None:
    """A peer that reads nothing for 0.35 s holds the writer in the first call's large
    request; the call queued behind it has less than ``min_time_left`` when the writer comes
    to it, so it fails at once, not sent, and its bytes never reach the peer."""
    connection, peer = pipelined_pair(min_time_left=0.2)
    received = bytearray()

    def read_later() -> None:
        gevent.sleep(0.35)
        while chunk := peer.recv(1 << 20):
            received.extend(chunk)

    reader = gevent.spawn(read_later)
    try:
        now = time.monotonic()
        big = gevent.spawn(connection.call, "echo", ("x" * 8_000_000,), {}, now + 5.0)
        gevent.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(CallTimeoutError) as caught:
            connection.call("echo", ("queued behind",), {}, started + 0.5)
        assert not caught.value.sent and time.monotonic() - started < 0.45
        gevent.sleep(0.1)
        assert b"queued behind" not in received and len(received) > 8_000_000
        assert not connection.broken
    finally:
        connection.close()
        peer.close()
        gevent.killall([big, reader])


@pytest.mark.parametrize("min_idle", [0, 1])
def test_a_connection_with_room_is_shared_by_every_waiter_it_has_room_for(
    serve: Callable[..., ThriftServer], pipelined: Callable[..., ServiceClient], min_idle: int
) -> None:
    """However a connection comes (opened by a caller, by min_idle's fill, released by its
    last holder), its room goes to as many waiters as it has room for: a queue never forms
    behind a connection that has room."""
    server = serve()
    client = pipelined(
        server.port, max_connections=1, max_inflight=16, min_idle=min_idle, pool_timeout=0.5
    )
    client.start()  # with min_idle the callers queue while fill() opens the connection
    [pool] = client._pools.values()
    peak = 0

    def caller(index: int) -> None:
        nonlocal peak
        for call in range(5):
            assert client.slow_echo(f"{index}-{call}", 0.01) == f"{index}-{call}"
            peak = max(peak, pool.in_use)

    gevent.joinall([gevent.spawn(caller, i) for i in range(64)], timeout=20, raise_error=True)
    assert peak == 16, peak
    [status] = client.status().instances
    assert (status.opened, status.in_use, status.waiters) == (1, 0, 0), status


def pipelined_pair(**options: Any) -> tuple[PipelinedConnection, socket.socket]:
    """A pipelined connection over a socket pair, and the peer's end."""
    mine, peer = socket.socketpair()
    connection = PipelinedConnection(
        Instance(host="127.0.0.1", port=1),
        mine,
        echo_thrift.Echo,
        clock=time.monotonic,
        expires_at=float("inf"),
        **options,
    )
    return connection, peer


def test_a_oneway_call_being_written_when_the_connection_breaks_fails_at_once() -> None:
    connection, peer = pipelined_pair()
    try:
        started = time.monotonic()
        oneway = gevent.spawn(connection.call, "notify", ("x" * 16_000_000,), {}, started + 3.0)
        gevent.sleep(0.1)  # the peer reads nothing: the writer is stuck in this request
        peer.sendall(b"\xff" * 64)  # not a reply: the reader breaks the connection
        with pytest.raises(TransportError):
            oneway.get(timeout=2.0)
        assert time.monotonic() - started < 1.0  # not at its deadline
    finally:
        connection.close()
        peer.close()


def test_late_calls_keep_no_request_bytes_and_too_many_retire_the_connection_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One late call too many: the connection takes no new call (it is not broken: the calls
    in flight on it go on; it closes when the last leaves)."""
    monkeypatch.setattr("geventpool.client.pipeline.MAX_LATE", 4)
    connection, peer = pipelined_pair()
    drain = gevent.spawn(lambda: [None for _ in iter(lambda: peer.recv(1 << 20), b"")])
    try:
        for count in range(4):  # read, never answered: each caller leaves, its reply late
            with pytest.raises(CallTimeoutError):
                connection.call("echo", ("y" * 100_000,), {}, time.monotonic() + 0.05)
            assert len(connection._late) == count + 1
        assert all(call.request == b"" for call in connection._late.values())
        assert connection.usable(time.monotonic())
        with pytest.raises(CallTimeoutError):
            connection.call("echo", ("one too many",), {}, time.monotonic() + 0.05)
        assert not connection.broken and not connection.usable(time.monotonic())
        assert not connection.overdue(time.monotonic())  # nothing is overdue: not stuck
    finally:
        connection.close()
        peer.close()
        drain.kill()


@pytest.mark.gevent_timeout(60)
def test_callers_giving_up_by_their_own_timeouts_fail_no_other_call_nor_eject_the_instance(
    serve: Callable[..., ThriftServer],
    pipelined: Callable[..., ServiceClient],
    captured: list[MutableMapping[str, Any]],
) -> None:
    """64 callers each leave their call after 5 ms (their own gevent.Timeout): far more than
    MAX_LATE late replies on the one connection. That connection retires; no call fails
    with anything but the caller's own timeout and the instance is not ejected (the
    connection was broken as "stuck", 384 calls in flight failed and the instance was
    ejected)."""
    server = serve()
    client = pipelined(server.port, max_connections=1, max_inflight=32)
    outcomes: Counter[str] = Counter()

    def caller() -> None:
        ends = time.monotonic() + 1.5
        while time.monotonic() < ends:
            try:
                with gevent.Timeout(0.005):
                    client.slow_echo("x", 0.3)
            except gevent.Timeout:
                outcomes["own timeout"] += 1
            except GeventPoolError as error:
                outcomes[type(error).__name__] += 1

    gevent.joinall([gevent.spawn(caller) for _ in range(64)], timeout=30, raise_error=True)
    assert set(outcomes) == {"own timeout"} and outcomes["own timeout"] > 2 * 1024, outcomes
    assert not events_named(captured, events.INSTANCE_EJECTED)
    wait_until(lambda: client.status().instances[0].in_use == 0, 5)
    [status] = client.status().instances
    assert status.state == "active" and status.opened >= 2, status  # the retired one replaced


def test_a_call_running_past_the_servers_idle_timeout_keeps_its_connection_open(
    serve: Callable[..., ThriftServer], pipelined: Callable[..., ServiceClient]
) -> None:
    """The connection is idle only once none of its calls runs: a request sent while a long
    call runs is read and answered, on the same connection."""
    server = serve(idle_timeout=0.3)
    client = pipelined(server.port, max_connections=1, max_inflight=8)
    slow = gevent.spawn(client.slow_echo, "slow", 0.8)
    gevent.sleep(0.5)
    assert client.echo("fast") == "fast"
    assert slow.get(timeout=5) == "slow"
    [status] = client.status().instances
    assert (status.opened, status.closed) == (1, 0), status
    wait_until(lambda: server.stats.connections == 0, 5)  # idle now: closed by the server


def test_a_slot_freed_on_a_shared_connection_goes_to_a_waiter_at_once(
    serve: Callable[..., ThriftServer], pipelined: Callable[..., ServiceClient]
) -> None:
    """Both slots of the only connection are held, by a short and a long call; the waiter
    gets the short call's slot when it ends, not the connection when the long one does."""
    server = serve()
    client = pipelined(server.port, max_connections=1, max_inflight=2, pool_timeout=3.0)
    short = gevent.spawn(client.slow_echo, "short", 0.2)
    long = gevent.spawn(client.slow_echo, "long", 1.2)
    gevent.sleep(0.05)
    started = time.monotonic()
    assert client.echo("waiter") == "waiter"
    assert time.monotonic() - started < 0.8  # at the short call's end (0.15 s), not 1.15 s
    gevent.joinall([short, long], timeout=5, raise_error=True)
