"""Test harness: real ZooKeeper servers, a chroot per test, server processes, time limits.

* Every test is bounded twice: a cooperative ``gevent.Timeout`` raised in the test's greenlet
  (``@pytest.mark.gevent_timeout(s)``, default 60 s) fails it cleanly; a C-level watchdog
  (``faulthandler``, not blockable by gevent) dumps every thread's stack and ends the run if a
  test hangs without yielding for 3 times as long.
* ``zookeeper`` is one standalone server for the whole session, ``ensemble`` a 3-node
  ensemble started on first use and healed (members restarted, quorum awaited) around each
  test that uses it. Each test gets its own chroot (``zk_hosts``).
* When a test fails, the tail of every log it touched (ZooKeeper, server processes) is added to
  its report; the full logs stay under pytest's temporary folder.
"""

from __future__ import annotations

from gevent import monkey

if not monkey.is_module_patched("socket"):
    monkey.patch_all()

import faulthandler
import re
import sys
import uuid
from collections.abc import Callable, Generator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import gevent
import pytest
import structlog
from kazoo.client import KazooClient

from geventpool.discovery.zk import ZooKeeperConfig, connect
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift
from geventpool.testing.faults import TcpProxy
from geventpool.testing.processes import ServerProcess
from geventpool.testing.zookeeper import ZooKeeperEnsemble, ZooKeeperServer

DEFAULT_TEST_TIMEOUT = 60.0
LOGS = pytest.StashKey[list[Path]]()


class CooperativeTimeout(Exception):
    """A test ran past its ``gevent_timeout``."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    marker = item.get_closest_marker("gevent_timeout")
    seconds = float(marker.args[0]) if marker else DEFAULT_TEST_TIMEOUT
    faulthandler.dump_traceback_later(seconds * 3 + 30, exit=True, file=sys.stderr)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    marker = item.get_closest_marker("gevent_timeout")
    seconds = float(marker.args[0]) if marker else DEFAULT_TEST_TIMEOUT
    with gevent.Timeout(seconds, CooperativeTimeout(f"test ran past its {seconds:g}s limit")):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for path in item.stash.get(LOGS, []):
            try:
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-60:])
            except OSError:
                continue
            report.sections.append((f"log {path}", tail))
    return report


def _track_log(request: pytest.FixtureRequest, path: Path) -> None:
    request.node.stash.setdefault(LOGS, []).append(path)


# -- ZooKeeper ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def zookeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"), tick_time=0.1)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def zookeeper(request: pytest.FixtureRequest, zookeeper_server: ZooKeeperServer) -> ZooKeeperServer:
    """The session's standalone ZooKeeper (tick 0.1 s: sessions may be as short as 0.2 s)."""
    _track_log(request, zookeeper_server.log_path)
    return zookeeper_server


@pytest.fixture(scope="session")
def ensemble_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperEnsemble]:
    ensemble = ZooKeeperEnsemble(tmp_path_factory.mktemp("ensemble"), 3, tick_time=0.1)
    ensemble.start()
    yield ensemble
    ensemble.stop()


@pytest.fixture
def ensemble(
    request: pytest.FixtureRequest, ensemble_servers: ZooKeeperEnsemble
) -> Iterator[ZooKeeperEnsemble]:
    """The session's 3-node ensemble, every member serving before and after the test."""
    for member in ensemble_servers.members:
        _track_log(request, member.log_path)

    def heal() -> None:
        for member in ensemble_servers.members:
            member.resume()
            member.start(wait=False)
        ensemble_servers.wait_quorum(60.0)

    heal()
    yield ensemble_servers
    heal()


def _new_chroot(request: pytest.FixtureRequest, hosts: str) -> str:
    """Create ``/tests/<test name>-<random>`` on ``hosts`` and return its path."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:80]
    path = f"/tests/{name}-{uuid.uuid4().hex[:8]}"
    admin = connect(hosts)
    try:
        admin.ensure_path(path)
    finally:
        admin.stop()
        admin.close()
    return path


@pytest.fixture
def clients() -> Iterator[Callable[..., KazooClient]]:
    """``clients(hosts, **config)`` connects a gevent kazoo client, stopped after the test."""
    started: list[KazooClient] = []

    def make(hosts: str, **config: Any) -> KazooClient:
        client = connect(ZooKeeperConfig(hosts, **config))
        started.append(client)
        return client

    yield make
    for client in started:
        client.stop()
        client.close()


@pytest.fixture
def chroot(request: pytest.FixtureRequest, zookeeper: ZooKeeperServer) -> str:
    """A fresh, empty chroot path for this test on the standalone server."""
    return _new_chroot(request, zookeeper.hosts)


@pytest.fixture
def ensemble_hosts(request: pytest.FixtureRequest, ensemble: ZooKeeperEnsemble) -> str:
    """The ensemble's connect string, chrooted to a fresh path of this test's own."""
    return ensemble.hosts + _new_chroot(request, ensemble.hosts)


@pytest.fixture
def zk_hosts(zookeeper: ZooKeeperServer, chroot: str) -> str:
    """The connect string of the standalone server, chrooted to this test's own path."""
    return f"{zookeeper.hosts}{chroot}"


@pytest.fixture
def zk_proxy(zookeeper: ZooKeeperServer) -> Iterator[TcpProxy]:
    """A TCP proxy to the standalone server, to cut or black-hole a client's connection."""
    proxy = TcpProxy(("127.0.0.1", zookeeper.client_port))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def zk(zk_hosts: str, clients: Callable[..., KazooClient]) -> KazooClient:
    """A connected client in this test's chroot."""
    return clients(zk_hosts)


# -- server processes --------------------------------------------------------------------------


@pytest.fixture
def servers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """``servers(*args)`` starts an echo server process; all are killed after the test."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        log = tmp_path / f"server-{len(started)}.log"
        _track_log(request, log)
        process = ServerProcess(args, log_path=log)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def serve() -> Iterator[Callable[..., ThriftServer]]:
    """``serve(**options)`` starts an in-process echo server, stopped after the test."""
    started: list[ThriftServer] = []

    def start(**options: Any) -> ThriftServer:
        options.setdefault("deregister_grace", 0.0)
        handler = EchoHandler("")
        server = ThriftServer(echo_thrift.Echo, handler, **options)
        server.start()
        handler.name = f"127.0.0.1:{server.port}"  # what whoami() answers
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(drain_timeout=1.0)


# -- events ------------------------------------------------------------------------------------


@pytest.fixture
def captured() -> Generator[list[MutableMapping[str, Any]], None, None]:
    """Every structlog event emitted during the test, as dicts (structlog's capture_logs)."""
    with structlog.testing.capture_logs() as logs:
        yield logs
