"""Membership: a validated view of the live instances that follows ZooKeeper promptly, never
loses its cache to an outage, and never lets one bad child or one bad subscriber stop it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import gevent
import pytest
from kazoo.client import KazooClient

from geventpool import events
from geventpool.discovery.instance import Instance
from geventpool.discovery.membership import Instances, Membership, MembershipChange
from geventpool.discovery.registrar import Registrar
from geventpool.testing.faults import TcpProxy, expire_session
from geventpool.testing.processes import ServerProcess
from geventpool.testing.zookeeper import ZooKeeperEnsemble, ZooKeeperServer
from helpers import curator, events_named, finagle, native, wait_until

PATH = "/geventpool/echo"


def instance(port: int) -> Instance:
    return Instance(host="127.0.0.1", port=port)


def ports(instances: Instances) -> set[int]:
    return {inst.port for inst in instances.values()}


@pytest.fixture
def register(zk: KazooClient) -> Iterator[Callable[[int], Registrar]]:
    """``register(port)`` registers 127.0.0.1:port for the service ``echo``."""
    started: list[Registrar] = []

    def make(port: int) -> Registrar:
        registrar = Registrar(zk, "echo", instance(port))
        registrar.start()
        started.append(registrar)
        return registrar

    yield make
    for registrar in started:
        registrar.stop()


@pytest.fixture
def watch(clients: Callable[..., KazooClient]) -> Iterator[Callable[..., Membership]]:
    """``watch(hosts, **options)`` starts a Membership of ``echo``; stopped after the test."""
    started: list[Membership] = []

    def make(hosts: str, **options: Any) -> Membership:
        client = clients(hosts)
        membership = Membership(client, options.pop("service", "echo"), **options)
        membership.start()
        started.append(membership)
        return membership

    yield make
    for membership in started:
        membership.stop()


def test_loads_the_instances_registered_before_it_started(
    zk_hosts: str, register: Callable[[int], Registrar], watch: Callable[..., Membership]
) -> None:
    register(9001)
    register(9002)
    membership = watch(zk_hosts)
    assert ports(membership.instances) == {9001, 9002}
    assert membership.instances["127.0.0.1:9001"] == Instance(
        host="127.0.0.1",
        port=9001,
        registered_at=membership.instances["127.0.0.1:9001"].registered_at,
        id="127.0.0.1:9001",
    )


def test_sees_a_new_instance_promptly_and_a_cleanly_stopped_one_at_once(
    zk_hosts: str,
    register: Callable[[int], Registrar],
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
) -> None:
    register(9000)
    membership = watch(zk_hosts)
    changes: list[MembershipChange] = []
    membership.subscribe(changes.append)

    started = time.monotonic()
    registrar = register(9001)
    assert membership.wait_for(lambda view: ports(view) == {9000, 9001}, timeout=1.0)
    joined_after = time.monotonic() - started

    started = time.monotonic()
    registrar.stop()
    assert membership.wait_for(lambda view: ports(view) == {9000}, timeout=1.0)
    left_after = time.monotonic() - started

    assert [c.joined[0].port for c in changes if c.joined] == [9001]
    assert [c.left[0].port for c in changes if c.left] == [9001]
    assert events_named(captured, events.INSTANCE_JOINED)[-1]["instance"] == "127.0.0.1:9001"
    assert events_named(captured, events.INSTANCE_LEFT)[-1]["instance"] == "127.0.0.1:9001"
    print(f"joined seen after {joined_after * 1000:.1f} ms, left after {left_after * 1000:.1f} ms")


@pytest.mark.gevent_timeout(60)
def test_a_killed_servers_instance_stays_until_its_session_times_out(
    zk_hosts: str,
    servers: Callable[..., ServerProcess],
    watch: Callable[..., Membership],
) -> None:
    session_timeout = 2.0
    survivor = servers("--zookeeper", zk_hosts, "--session-timeout", "10")
    victim = servers("--zookeeper", zk_hosts, "--session-timeout", str(session_timeout))
    membership = watch(zk_hosts, empty_protection=0)
    assert set(membership.instances) == {survivor.address, victim.address}

    killed_at = time.monotonic()
    victim.kill()
    gevent.sleep(session_timeout / 2)
    assert victim.address in membership.instances  # ZooKeeper cannot know yet
    assert membership.wait_for(lambda view: victim.address not in view, session_timeout + 5)
    gone_after = time.monotonic() - killed_at

    assert set(membership.instances) == {survivor.address}
    assert gone_after >= session_timeout * 0.9
    print(f"killed server's instance left after {gone_after:.2f} s (session {session_timeout} s)")


def test_malformed_children_are_rejected_while_valid_siblings_stay_and_changes_still_arrive(
    zk: KazooClient,
    zk_hosts: str,
    register: Callable[[int], Registrar],
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
) -> None:
    register(9001)
    bad = {
        "bad-json": b"{this is not json",
        "huge": b'{"schema_version": 1, "zone": "' + b"x" * 1_000_000 + b'"}',
        "port-70000": native(port=9090).replace(b"9090", b"70000"),
        "unspecified": native().replace(b"127.0.0.1", b"0.0.0.0"),
        "metadata-address": native().replace(b"127.0.0.1", b"169.254.169.254"),
        "not-utf8": b'{"schema_version": 1, "host": "\xff\xfe", "port": 1}',
    }
    for name, data in bad.items():
        zk.create(f"{PATH}/{name}", data)
    membership = watch(zk_hosts)

    assert ports(membership.instances) == {9001}
    assert set(membership.rejected) == set(bad)
    assert membership.stats.rejected == len(bad)
    assert {
        e["path"].rsplit("/", 1)[1] for e in events_named(captured, "instance_rejected")
    } == set(bad)
    register(9002)  # the watch is alive
    zk.create(f"{PATH}/late-bad", b"[]")
    assert membership.wait_for(lambda view: ports(view) == {9001, 9002}, 5)
    wait_until(lambda: "late-bad" in membership.rejected, 5)
    zk.delete(f"{PATH}/late-bad")
    wait_until(lambda: "late-bad" not in membership.rejected, 5)


def test_curator_and_finagle_fleets_are_read_as_instances(
    zk: KazooClient, zk_hosts: str, watch: Callable[..., Membership]
) -> None:
    zk.create("/curator/calc/6d4e", curator("10.0.0.5", 8005), makepath=True)
    zk.create("/serverset/calc/member_0000000042", finagle("10.0.0.3", 9090), makepath=True)
    zk.create("/serverset/calc/member_0000000043", finagle("10.0.0.4", 9090, status="DEAD"))

    from_curator = watch(zk_hosts, path="/curator/calc")
    from_finagle = watch(zk_hosts, path="/serverset/calc")

    [cur] = from_curator.instances.values()
    assert (cur.host, cur.port, cur.source, cur.id) == ("10.0.0.5", 8005, "curator", "6d4e")
    [fin] = from_finagle.instances.values()
    assert (fin.host, fin.port, fin.source) == ("10.0.0.3", 9090, "finagle")
    assert from_finagle.rejected == {
        "member_0000000043": "ServerSet member status is 'DEAD', not 'ALIVE'"
    }


def test_a_service_path_created_later_is_picked_up(
    zk_hosts: str, register: Callable[[int], Registrar], watch: Callable[..., Membership]
) -> None:
    membership = watch(zk_hosts)
    assert membership.instances == {}
    register(9001)
    assert membership.wait_for(lambda view: ports(view) == {9001}, 5)


def test_a_failing_subscriber_is_logged_and_the_watch_goes_on(
    zk_hosts: str,
    register: Callable[[int], Registrar],
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
) -> None:
    membership = watch(zk_hosts)

    def broken(change: MembershipChange) -> None:
        raise ValueError("subscriber bug")

    seen: list[MembershipChange] = []
    membership.subscribe(broken)
    membership.subscribe(seen.append)
    register(9001)
    register(9002)
    assert membership.wait_for(lambda view: ports(view) == {9001, 9002}, 5)
    wait_until(lambda: sum(len(c.joined) for c in seen) == 2, 5)
    assert len(events_named(captured, events.MEMBERSHIP_SUBSCRIBER_FAILED)) >= 2


def test_the_cache_serves_through_a_lost_connection_and_catches_up_after_it(
    zk_proxy: TcpProxy,
    chroot: str,
    register: Callable[[int], Registrar],
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
) -> None:
    register(9001)
    membership = watch(zk_proxy.address + chroot)
    zk_proxy.blackhole()
    wait_until(lambda: events_named(captured, events.MEMBERSHIP_SUSPENDED), 15)
    register(9002)  # a change the membership cannot see now
    assert ports(membership.instances) == {9001}  # still serving the cache
    zk_proxy.restore()
    assert membership.wait_for(lambda view: ports(view) == {9001, 9002}, 15)
    assert events_named(captured, events.MEMBERSHIP_REFRESHED)


def test_after_a_real_session_expiry_the_view_is_reread_and_kept_current(
    zookeeper: ZooKeeperServer,
    chroot: str,
    register: Callable[[int], Registrar],
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
) -> None:
    register(9001)
    membership = watch(zookeeper.hosts + chroot)
    removed: list[Instance] = []
    membership.subscribe(lambda change: removed.extend(change.left))

    expire_session(membership._client, zookeeper.hosts)
    wait_until(lambda: events_named(captured, events.MEMBERSHIP_SESSION_LOST), 10)
    wait_until(lambda: events_named(captured, events.MEMBERSHIP_REFRESHED), 10)
    assert ports(membership.instances) == {9001} and not removed
    register(9002)  # the new session's watch works
    assert membership.wait_for(lambda view: ports(view) == {9001, 9002}, 5)


def test_empty_protection_keeps_the_last_view_for_a_bounded_time_when_all_children_vanish(
    zk: KazooClient,
    zk_hosts: str,
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
) -> None:
    for port in (9001, 9002):
        zk.create(f"{PATH}/127.0.0.1:{port}", native(port=port), makepath=True)
    membership = watch(zk_hosts, empty_protection=1.0)
    wipe = zk.transaction()  # every child gone in one step: an operator's mistake
    for name in zk.get_children(PATH):
        wipe.delete(f"{PATH}/{name}")
    assert all(result is True for result in wipe.commit())
    wait_until(lambda: events_named(captured, events.EMPTY_PROTECTION_ENGAGED), 5)
    engaged = time.monotonic()
    assert membership.protecting and ports(membership.instances) == {9001, 9002}

    assert membership.wait_for(lambda view: not view, 5)
    assert time.monotonic() - engaged >= 0.9
    [expired] = events_named(captured, events.EMPTY_PROTECTION_EXPIRED)
    assert expired["dropped"] == 2 and not membership.protecting


def test_empty_protection_clears_when_instances_come_back(
    zk: KazooClient,
    zk_hosts: str,
    register: Callable[[int], Registrar],
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
) -> None:
    registrar = register(9001)
    membership = watch(zk_hosts, empty_protection=30.0)
    registrar._loop.stop()  # keep the registrar from putting its node back
    zk.delete(registrar.path)
    wait_until(lambda: membership.protecting, 5)
    register(9002)
    assert membership.wait_for(lambda view: ports(view) == {9002}, 5)
    assert not membership.protecting
    assert events_named(captured, events.EMPTY_PROTECTION_CLEARED)


@pytest.mark.ensemble
@pytest.mark.gevent_timeout(120)
@pytest.mark.parametrize("victim", ["serving member", "leader"])
def test_killing_an_ensemble_member_loses_no_cached_instance(
    victim: str,
    ensemble: ZooKeeperEnsemble,
    ensemble_hosts: str,
    clients: Callable[..., KazooClient],
    watch: Callable[..., Membership],
) -> None:
    registrar_client = clients(ensemble_hosts)
    registrars = [Registrar(registrar_client, "echo", instance(p)) for p in (9001, 9002, 9003)]
    for registrar in registrars:
        registrar.start()
    membership = watch(ensemble_hosts)
    assert ports(membership.instances) == {9001, 9002, 9003}
    removed: list[Instance] = []
    membership.subscribe(lambda change: removed.extend(change.left))

    session = membership._client.client_id[0]
    member = ensemble.serving(session) if victim == "serving member" else ensemble.leader()
    member.kill()
    late = Registrar(registrar_client, "echo", instance(9004))
    late.start(timeout=30)  # a change made while the membership may be reconnecting

    assert membership.wait_for(lambda view: ports(view) == {9001, 9002, 9003, 9004}, 30)
    assert removed == []
    assert membership._client.connected
    for registrar in [*registrars, late]:
        registrar.stop()


@pytest.mark.parametrize("how", ["re-created", "data changed"])
def test_a_child_re_created_or_rewritten_under_the_same_name_is_seen_as_updated(
    zk: KazooClient,
    zk_hosts: str,
    watch: Callable[..., Membership],
    captured: list[MutableMapping[str, Any]],
    how: str,
) -> None:
    """A server restarted on the same host and port writes its node under the same name: the
    children do not change, only the node's data (or its creation)."""
    node = f"{PATH}/127.0.0.1:9000"
    zk.create(node, native(port=9000, transport="buffered"), makepath=True)
    membership = watch(zk_hosts)
    changes: list[MembershipChange] = []
    membership.subscribe(changes.append)
    restarted = native(port=9000, transport="framed", weight=5)
    started = time.monotonic()
    if how == "re-created":
        transaction = zk.transaction()
        transaction.delete(node)
        transaction.create(node, restarted)
        transaction.commit()
    else:
        zk.set(node, restarted)
    assert membership.wait_for(
        lambda view: [(i.transport, i.weight) for i in view.values()] == [("framed", 5)], 1.0
    )
    print(f"{how}: seen after {(time.monotonic() - started) * 1000:.1f} ms")
    assert [c.updated[0].transport for c in changes if c.updated] == ["framed"]
    assert events_named(captured, events.INSTANCE_UPDATED)
    zk.set(node, native(port=9000, transport="framed", weight=2))  # the watch was set again
    assert membership.wait_for(lambda view: [i.weight for i in view.values()] == [2], 1.0)


def test_the_only_child_re_created_while_empty_protection_holds_it_is_read_again(
    zk: KazooClient, zk_hosts: str, watch: Callable[..., Membership]
) -> None:
    """The refresh may run between the delete and the create: the view, held by empty-list
    protection, still has the old payload, and the re-created child must be read anew."""
    node = f"{PATH}/127.0.0.1:9000"
    zk.create(node, native(port=9000, transport="buffered"), makepath=True)
    membership = watch(zk_hosts)
    zk.delete(node)
    assert membership.wait_for(lambda view: membership.protecting, 1.0)
    zk.create(node, native(port=9000, transport="framed"))
    assert membership.wait_for(lambda view: [i.transport for i in view.values()] == ["framed"], 1.0)
