"""The test harness itself: real ZooKeeper processes and the faults it injects are real."""

from __future__ import annotations

from collections.abc import Callable

import gevent
import pytest
from kazoo.client import KazooClient, KazooState

from geventpool.testing.faults import TcpProxy, expire_session
from geventpool.testing.zookeeper import ZooKeeperEnsemble, ZooKeeperServer, four_letter_word


def test_standalone_server_serves_and_answers_four_letter_words(zookeeper: ZooKeeperServer) -> None:
    assert zookeeper.mode() == "standalone"
    assert "zookeeper.version" in four_letter_word(zookeeper.client_port, "envi")


def test_each_test_gets_its_own_empty_chroot(zk: KazooClient, zk_hosts: str) -> None:
    assert "/tests/" in zk_hosts
    assert zk.get_children("/") == []


@pytest.mark.ensemble
def test_ensemble_has_one_leader_and_finds_the_member_serving_a_session(
    ensemble: ZooKeeperEnsemble, clients: Callable[..., KazooClient]
) -> None:
    modes = sorted(member.mode() or "" for member in ensemble.members)
    assert modes == ["follower", "follower", "leader"]
    client = clients(ensemble.hosts)
    assert ensemble.serving(client.client_id[0]) in ensemble.members


@pytest.mark.ensemble
@pytest.mark.gevent_timeout(90)
def test_killing_the_leader_elects_another(ensemble: ZooKeeperEnsemble) -> None:
    old = ensemble.leader()
    old.kill()
    assert not old.running
    ensemble.wait_quorum(30)
    assert ensemble.leader() is not old


def test_real_session_expiry_deletes_ephemerals_and_the_client_sees_lost(
    zookeeper: ZooKeeperServer, chroot: str, clients: Callable[..., KazooClient]
) -> None:
    client = clients(zookeeper.hosts + chroot)
    states: list[str] = []
    client.add_listener(states.append)
    client.create("/mine", ephemeral=True)
    old_session = client.client_id[0]

    expire_session(client, zookeeper.hosts)

    observer = clients(zookeeper.hosts + chroot)
    assert observer.exists("/mine") is None  # the server deleted it
    with gevent.Timeout(10):
        while not (KazooState.LOST in states and client.connected):
            gevent.sleep(0.02)
    assert client.client_id[0] != old_session


def test_proxy_drop_suspends_the_client_which_then_reconnects(
    zk_proxy: TcpProxy, chroot: str, clients: Callable[..., KazooClient]
) -> None:
    client = clients(zk_proxy.address + chroot)
    states: list[str] = []
    client.add_listener(states.append)
    session = client.client_id[0]
    zk_proxy.drop()
    with gevent.Timeout(10):
        while not (KazooState.SUSPENDED in states and client.connected):
            gevent.sleep(0.02)
    assert KazooState.LOST not in states
    assert client.client_id[0] == session  # same session: nothing was lost
