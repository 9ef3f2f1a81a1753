"""ThriftServer: bounded, idle-aware, never leaves a caller hanging, and stops in the right
order (deregister, stop accepting, drain in-flight calls, close)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import gevent
import pytest
from kazoo.client import KazooClient
from thriftpy2.protocol import TCompactProtocolFactory
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TCyFramedTransportFactory, TTransportException

from geventpool import events
from geventpool.discovery.zk import ZooKeeperConfig
from geventpool.errors import ConfigurationError
from geventpool.server.thrift_server import Registration, ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift
from geventpool.testing.faults import TcpProxy
from geventpool.testing.processes import ServerProcess
from helpers import events_named, wait_until


def client(server: ThriftServer, **options: Any) -> Any:
    return make_client(echo_thrift.Echo, "127.0.0.1", server.port, timeout=5000, **options)


def test_serves_calls(serve: Callable[..., ThriftServer]) -> None:
    server = serve()
    echo = client(server)
    assert echo.echo("hello") == "hello"
    assert echo.add(2, 40) == 42
    assert server.stats.calls == 2


def test_framed_transport_and_compact_protocol_work_when_both_sides_agree(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve(transport="framed", protocol="compact")
    echo = client(
        server,
        trans_factory=TCyFramedTransportFactory(),
        proto_factory=TCompactProtocolFactory(),
    )
    assert echo.add(1, 2) == 3


def test_declared_exception_reaches_the_caller(serve: Callable[..., ThriftServer]) -> None:
    echo = client(serve())
    with pytest.raises(echo_thrift.Refused) as caught:
        echo.refuse("busy")
    assert caught.value.reason == "busy"
    assert echo.echo("still usable") == "still usable"


def test_undeclared_exception_is_answered_as_internal_error_and_logged(
    serve: Callable[..., ThriftServer], captured: list[MutableMapping[str, Any]]
) -> None:
    server = serve()
    echo = client(server)
    with pytest.raises(TApplicationException) as caught:
        echo.crash("boom")
    assert caught.value.type == TApplicationException.INTERNAL_ERROR
    assert "RuntimeError in crash" in str(caught.value.message)
    assert echo.echo("still usable") == "still usable"
    [event] = events_named(captured, events.SERVER_HANDLER_FAILED)
    assert event["method"] == "crash" and "boom" in event["error"]
    assert server.stats.handler_errors == 1


def test_a_result_that_does_not_fit_the_idl_is_answered_as_internal_error_and_logged(
    captured: list[MutableMapping[str, Any]],
) -> None:
    class WrongResult(EchoHandler):
        def echo(self, msg: str) -> Any:
            return 12345 if msg == "wrong" else msg  # the IDL says string

    server = ThriftServer(echo_thrift.Echo, WrongResult("x"), deregister_grace=0.0)
    server.start()
    try:
        echo = client(server)
        with pytest.raises(TApplicationException) as caught:
            echo.echo("wrong")
        assert caught.value.type == TApplicationException.INTERNAL_ERROR
        assert echo.echo("still usable") == "still usable"
        [event] = events_named(captured, events.SERVER_HANDLER_FAILED)
        assert event["method"] == "echo"
    finally:
        server.stop(drain_timeout=1.0)


def test_connections_beyond_the_maximum_wait_until_one_closes(
    serve: Callable[..., ThriftServer], captured: list[MutableMapping[str, Any]]
) -> None:
    server = serve(max_connections=2)
    first, second = client(server), client(server)
    assert first.echo("1") == "1" and second.echo("2") == "2"
    third = client(server)  # the kernel accepts it into the backlog; the server does not serve it
    reply = gevent.spawn(third.echo, "3")
    gevent.sleep(0.3)
    assert not reply.ready() and server.stats.connections == 2
    first.close()
    assert reply.get(timeout=5) == "3"
    assert events_named(captured, events.SERVER_CONNECTION_LIMIT_REACHED)


def test_idle_connections_are_closed_after_the_idle_timeout(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve(idle_timeout=0.3)
    echo = client(server)
    assert echo.echo("a") == "a"
    wait_until(lambda: server.stats.connections == 0, 5)
    with pytest.raises((TTransportException, OSError)):
        echo.echo("b")


def test_stop_deregisters_before_it_stops_accepting_and_lets_calls_in_flight_finish(
    zk: KazooClient, zk_hosts: str, serve: Callable[..., ThriftServer]
) -> None:
    server = serve(
        deregister_grace=0.5,
        registration=Registration(zookeeper=zk_hosts, service="echo"),
    )
    path = server.registrar.path if server.registrar else ""
    assert zk.exists(path) is not None
    in_flight = gevent.spawn(client(server).slow_echo, "late", 1.0)
    gevent.sleep(0.1)

    stopping = gevent.spawn(server.stop)
    wait_until(lambda: zk.exists(path) is None, 2)
    with socket.create_connection(("127.0.0.1", server.port), timeout=1):
        pass  # deregistered, still accepting during the grace period
    stopping.get(timeout=10)

    assert in_flight.get(timeout=1) == "late"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)


def test_idle_connections_do_not_hold_up_the_drain(serve: Callable[..., ThriftServer]) -> None:
    server = serve()
    idle = [client(server) for _ in range(5)]
    for echo in idle:
        echo.echo("x")
    started = time.monotonic()
    server.stop(drain_timeout=10.0)
    assert time.monotonic() - started < 5.0
    assert server.stats.killed == 0


def test_calls_still_running_at_the_drain_timeout_are_cut(
    serve: Callable[..., ThriftServer], captured: list[MutableMapping[str, Any]]
) -> None:
    server = serve()
    stuck = gevent.spawn(client(server).slow_echo, "never", 30.0)
    gevent.sleep(0.1)
    server.stop(drain_timeout=0.3)
    assert server.stats.killed == 1
    with pytest.raises((TTransportException, OSError)):
        stuck.get(timeout=5)
    [event] = events_named(captured, events.SERVER_DRAIN_TIMEOUT)
    assert event["killed"] == 1


@pytest.mark.gevent_timeout(60)
def test_sigterm_deregisters_drains_and_exits_cleanly(
    zk: KazooClient, zk_hosts: str, servers: Callable[..., ServerProcess]
) -> None:
    process = servers("--zookeeper", zk_hosts, "--deregister-grace", "0.2")
    path = f"/geventpool/echo/{process.address}"
    assert zk.exists(path) is not None
    assert process.port is not None
    echo = make_client(echo_thrift.Echo, "127.0.0.1", process.port, timeout=10000)
    in_flight = gevent.spawn(echo.slow_echo, "finished", 1.0)
    gevent.sleep(0.2)

    assert process.terminate(timeout=20) == 0
    assert in_flight.get(timeout=1) == "finished"
    assert zk.exists(path) is None


def test_binding_all_interfaces_with_registration_needs_an_advertised_host() -> None:
    with pytest.raises(ConfigurationError, match="advertise_host"):
        ThriftServer(
            echo_thrift.Echo,
            EchoHandler(""),
            host="0.0.0.0",
            registration=Registration(zookeeper="127.0.0.1:2181", service="echo"),
        )


@pytest.mark.parametrize(
    "options",
    [{"max_connections": 0}, {"transport": "http"}, {"protocol": "json"}, {"idle_timeout": 0}],
)
def test_invalid_options_raise_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ThriftServer(echo_thrift.Echo, EchoHandler(""), **options)


@pytest.mark.gevent_timeout(40)
def test_stop_finishes_while_zookeeper_is_silent(
    zk_proxy: TcpProxy, chroot: str, serve: Callable[..., ThriftServer]
) -> None:
    config = ZooKeeperConfig(zk_proxy.address + chroot, session_timeout=3.0)
    server = serve(registration=Registration(zookeeper=config, service="echo"))
    zk_proxy.blackhole()
    gevent.sleep(2.5)  # the server's client is SUSPENDED now
    started = time.monotonic()
    server.stop(drain_timeout=1.0)
    assert time.monotonic() - started < 15.0


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x80\x01\x00\x01\x7f\xff\xff\xffe",  # a 2 GiB method name
    ],
    ids=["http", "huge-length"],
)
def test_garbage_on_the_wire_closes_that_connection_only(
    garbage: bytes, serve: Callable[..., ThriftServer], captured: list[MutableMapping[str, Any]]
) -> None:
    server = serve()
    neighbour = client(server)
    assert neighbour.echo("before") == "before"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as peer:
        peer.sendall(garbage)
        assert peer.recv(100) == b""  # closed by the server
    assert neighbour.echo("after") == "after"
    assert client(server).echo("new") == "new"
    [event] = events_named(captured, events.SERVER_CONNECTION_ERROR)
    assert event["port"] == server.port and event["error"]
