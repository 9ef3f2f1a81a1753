"""Registrar: the instance's ephemeral node exists exactly while the registrar runs, across
lost connections, session expiry, foreign owners and deletion by others."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import gevent
import pytest
from kazoo.client import KazooClient
from kazoo.security import make_acl

from geventpool import events
from geventpool.discovery.instance import Instance
from geventpool.discovery.payloads import decode_instance
from geventpool.discovery.registrar import Registrar
from geventpool.discovery.zk import ZooKeeperConfig, connect
from geventpool.errors import RegistrationError, ZooKeeperUnavailableError
from geventpool.testing.faults import TcpProxy, expire_session
from geventpool.testing.zookeeper import ZooKeeperServer, free_port
from helpers import events_named, wait_until

INSTANCE = Instance(host="127.0.0.1", port=9090, zone="z1", version="1.0")


def owner(client: KazooClient, path: str) -> int | None:
    stat = client.exists(path)
    return stat.ephemeralOwner if stat else None


def test_registers_an_ephemeral_node_with_the_native_payload(
    zk: KazooClient, captured: list[MutableMapping[str, Any]]
) -> None:
    registrar = Registrar(zk, "echo", INSTANCE)
    before = time.time()
    registrar.start()

    assert registrar.path == "/geventpool/echo/127.0.0.1:9090"
    data, stat = zk.get(registrar.path)
    assert stat.ephemeralOwner == zk.client_id[0]
    instance = decode_instance(data)
    assert (instance.host, instance.port, instance.zone, instance.version) == (
        "127.0.0.1",
        9090,
        "z1",
        "1.0",
    )
    assert instance.registered_at is not None and instance.registered_at >= before
    [event] = events_named(captured, events.INSTANCE_REGISTERED)
    assert event["service"] == "echo" and event["instance"] == "127.0.0.1:9090"
    registrar.stop()


def test_stop_deletes_the_node(zk: KazooClient) -> None:
    registrar = Registrar(zk, "echo", INSTANCE)
    registrar.start()
    registrar.stop()
    assert zk.exists(registrar.path) is None


def test_node_survives_a_dropped_connection_untouched(
    zk_proxy: TcpProxy, chroot: str, clients: Callable[..., KazooClient]
) -> None:
    client = clients(zk_proxy.address + chroot)
    registrar = Registrar(client, "echo", INSTANCE)
    registrar.start()
    created = client.exists(registrar.path).czxid
    zk_proxy.drop()
    wait_until(lambda: not client.connected, 5)
    wait_until(lambda: client.connected, 10)
    gevent.sleep(0.2)  # let the registrar's check after reconnect run
    stat = client.exists(registrar.path)
    assert stat.czxid == created and stat.ephemeralOwner == client.client_id[0]
    registrar.stop()


def test_node_survives_a_reconnect_that_zookeeper_accepts_and_never_answers(
    zk_proxy: TcpProxy,
    chroot: str,
    clients: Callable[..., KazooClient],
    captured: list[MutableMapping[str, Any]],
) -> None:
    # A ZooKeeper starting up may accept a connection and never answer its connect request.
    # kazoo waits the whole session for that answer with one host, so the session expired
    # before the next attempt and every instance left the view (seen in the
    # zookeeper_restart load scenario). The answer is now awaited a third of the session.
    client = clients(zk_proxy.address + chroot, session_timeout=6.0)
    session = client.client_id[0]
    registrar = Registrar(client, "echo", INSTANCE)
    registrar.start()
    created = client.exists(registrar.path).czxid
    zk_proxy.swallow(1)
    zk_proxy.drop()
    wait_until(lambda: not client.connected, 5)
    wait_until(lambda: client.connected, 15)
    gevent.sleep(0.2)  # let the registrar's check after reconnect run

    assert client.client_id[0] == session, "the session expired"
    stat = client.exists(registrar.path)
    assert stat.czxid == created and stat.ephemeralOwner == session
    assert not events_named(captured, events.INSTANCE_REREGISTERED)
    registrar.stop()


def test_node_is_recreated_by_the_new_session_after_a_real_session_expiry(
    zookeeper: ZooKeeperServer,
    chroot: str,
    clients: Callable[..., KazooClient],
    captured: list[MutableMapping[str, Any]],
) -> None:
    client = clients(zookeeper.hosts + chroot)
    observer = clients(zookeeper.hosts + chroot)
    registrar = Registrar(client, "echo", INSTANCE)
    registrar.start()
    old_session = client.client_id[0]

    started = time.monotonic()
    expire_session(client, zookeeper.hosts)
    wait_until(lambda: owner(observer, registrar.path) not in (None, old_session))
    recovered = time.monotonic() - started

    assert owner(observer, registrar.path) == client.client_id[0] != old_session
    assert events_named(captured, events.INSTANCE_REREGISTERED)
    print(f"re-registered {recovered * 1000:.0f} ms after the session expired")
    registrar.stop()


def test_a_node_left_by_another_session_is_replaced(
    zk_hosts: str, clients: Callable[..., KazooClient], captured: list[MutableMapping[str, Any]]
) -> None:
    stale = clients(zk_hosts)
    stale.create("/geventpool/echo/127.0.0.1:9090", b"{}", ephemeral=True, makepath=True)
    client = clients(zk_hosts)
    registrar = Registrar(client, "echo", INSTANCE)
    registrar.start()

    assert owner(client, registrar.path) == client.client_id[0]
    [event] = events_named(captured, events.REGISTRATION_NODE_REPLACED)
    assert event["previous_owner"] == hex(stale.client_id[0])
    registrar.stop()


def test_a_node_deleted_by_someone_else_is_put_back(
    zk: KazooClient, zk_hosts: str, clients: Callable[..., KazooClient]
) -> None:
    registrar = Registrar(zk, "echo", INSTANCE)
    registrar.start()
    operator = clients(zk_hosts)
    operator.delete(registrar.path)
    wait_until(lambda: owner(operator, registrar.path) == zk.client_id[0], 5)
    registrar.stop()


def test_stop_leaves_a_node_owned_by_another_session_alone(
    zk: KazooClient, zk_hosts: str, clients: Callable[..., KazooClient]
) -> None:
    registrar = Registrar(zk, "echo", INSTANCE)
    registrar.start()
    registrar._loop.stop()  # freeze maintenance, then let a twin take the name
    zk.delete(registrar.path)
    twin = clients(zk_hosts)
    twin.create(registrar.path, b"{}", ephemeral=True)
    registrar.stop()
    assert owner(twin, registrar.path) == twin.client_id[0]


def test_unwritable_path_raises_registration_error(zk: KazooClient) -> None:
    zk.create("/geventpool", acl=[make_acl("world", "anyone", read=True)])
    with pytest.raises(RegistrationError, match="no permission") as caught:
        Registrar(zk, "echo", INSTANCE).start(timeout=2)
    assert caught.value.path == "/geventpool/echo/127.0.0.1:9090"


def test_unreachable_zookeeper_raises_within_the_bound() -> None:
    hosts = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ZooKeeperUnavailableError) as caught:
        connect(ZooKeeperConfig(hosts, connect_timeout=0.5))
    assert caught.value.hosts == hosts and caught.value.timeout == 0.5
    assert time.monotonic() - started < 5


def test_a_zookeeper_host_that_drops_connects_costs_a_third_of_the_session() -> None:
    # A listener whose accept queue is full drops SYNs: a TCP connect to it hangs, as to a
    # black-holed host. kazoo gave that connect the whole session (6 s here, so connect()
    # returned after 6.1 s); an attempt now takes a third of it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.socket()
    filler.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        filler.connect(listener.getsockname())
    hosts = f"127.0.0.1:{listener.getsockname()[1]}"
    started = time.monotonic()
    try:
        with pytest.raises(ZooKeeperUnavailableError):
            connect(ZooKeeperConfig(hosts, session_timeout=6.0, connect_timeout=1.0))
        took = time.monotonic() - started
    finally:
        filler.close()
        listener.close()
    assert took < 4.0, f"{took:.2f}s: the connect attempt was not cut to a third of the session"


def test_registering_while_zookeeper_is_silent_raises_within_the_bound(
    zk_proxy: TcpProxy, chroot: str, clients: Callable[..., KazooClient]
) -> None:
    client = clients(zk_proxy.address + chroot, session_timeout=4.0)
    zk_proxy.blackhole()
    with pytest.raises(ZooKeeperUnavailableError, match="registering"):
        Registrar(client, "echo", INSTANCE).start(timeout=1.0)


def test_invalid_node_name_is_refused() -> None:
    with pytest.raises(RegistrationError):
        Registrar(None, "echo", INSTANCE, node_name="a/b")


@pytest.mark.gevent_timeout(30)
def test_stop_returns_within_its_bound_while_zookeeper_is_silent(
    zk_proxy: TcpProxy, chroot: str, clients: Callable[..., KazooClient]
) -> None:
    client = clients(zk_proxy.address + chroot, session_timeout=3.0)
    registrar = Registrar(client, "echo", INSTANCE, stop_timeout=1.0)
    registrar.start()
    zk_proxy.blackhole()
    wait_until(lambda: not client.connected, 10)  # SUSPENDED: requests would queue forever
    started = time.monotonic()
    registrar.stop()
    assert time.monotonic() - started < 5.0
