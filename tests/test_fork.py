"""Fork safety: a client used in a forked child rebuilds itself there, with its own ZooKeeper
session and its own connections, and the parent's session and connections are untouched."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest

from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.zk import ZooKeeperConfig
from geventpool.testing.echo import echo_thrift
from geventpool.testing.processes import ServerProcess


def local_ports(client: ServiceClient) -> set[tuple[int, int]]:
    """Each open connection's (local port, server port): Linux gives the same local port to
    connections to different servers, so the pair is what names a connection."""
    return {
        (
            connection._sock.getsockname()[1],  # type: ignore[attr-defined]
            connection._sock.getpeername()[1],  # type: ignore[attr-defined]
        )
        for pool in client._pools.values()
        for connection in pool._open_connections
    }


@pytest.mark.gevent_timeout(60)
def test_a_forked_child_rebuilds_its_client_and_never_touches_the_parents_sockets(
    zk_hosts: str, servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    for _ in range(2):
        servers("--zookeeper", zk_hosts)
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        zookeeper=ZooKeeperConfig(zk_hosts, session_timeout=2.0),  # kazoo pings every ~0.7 s
        pool=PoolSettings(max_connections=4),
    )
    client.start()
    try:
        assert client._membership is not None
        assert client._membership.wait_for(lambda view: len(view) == 2, 5)
        gevent.joinall([gevent.spawn(client.echo, "warm") for _ in range(8)], raise_error=True)
        zookeeper = client._membership.client
        parent_session = zookeeper.client_id[0]
        parent_ports = local_ports(client)
        parent_states: list[str] = []
        zookeeper.add_listener(parent_states.append)
        report = tmp_path / "child.json"

        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                answers = [client.echo(f"child {n}") for n in range(20)]
                gevent.sleep(2.0)  # long enough for an inherited kazoo greenlet to ping
                assert client._membership is not None
                report.write_text(
                    json.dumps(
                        {
                            "answers": answers,
                            "session": client._membership.client.client_id[0],
                            "ports": sorted(local_ports(client)),
                        }
                    )
                )
                client.stop()
                code = 0
            finally:
                os._exit(code)

        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        child = json.loads(report.read_text())
        assert child["answers"] == [f"child {n}" for n in range(20)]
        assert child["session"] != parent_session
        assert not {tuple(pair) for pair in child["ports"]} & parent_ports

        gevent.sleep(1.0)  # give a broken parent session time to show
        assert parent_states == []  # never SUSPENDED, never LOST
        assert zookeeper.client_id[0] == parent_session
        answers = [client.echo(f"parent {n}") for n in range(20)]
        assert answers == [f"parent {n}" for n in range(20)]
        assert all(s.failures == 0 for s in client.status().instances)
    finally:
        client.stop()
