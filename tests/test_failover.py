"""The client against registered server processes under load: a SIGKILLed instance costs only
its calls in flight and is ejected before ZooKeeper notices; a new instance gets calls at once;
a graceful stop (SIGTERM) costs nothing."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import gevent
import pytest

from geventpool import events
from geventpool.client.pool import PoolSettings
from geventpool.client.retrying import Retry
from geventpool.client.service import ServiceClient
from geventpool.errors import CallTimeoutError, TransportError
from geventpool.server.thrift_server import Registration, ThriftServer
from geventpool.testing.echo import echo_thrift
from geventpool.testing.processes import ServerProcess
from helpers import events_named, wait_until


@dataclass
class Load:
    """Greenlets calling slow_echo() and whoami() in a loop until stopped (at most ``lifetime``
    seconds, or until 10,000 failures).

    Every exception a call raises is recorded in ``failures``, whatever its type, so that an
    unexpected error shows up as a failure instead of silently ending a greenlet; ``stop`` fails
    the test if any greenlet ended before it was stopped.
    """

    client: ServiceClient
    seconds_per_call: float = 0.02
    lifetime: float = 120.0
    served: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, Exception]] = field(default_factory=list)
    greenlets: list[gevent.Greenlet] = field(default_factory=list)

    def start(self, callers: int) -> None:
        end = time.monotonic() + self.lifetime
        self.greenlets = [gevent.spawn(self._loop, end) for _ in range(callers)]

    def _loop(self, end: float) -> None:
        while time.monotonic() < end and len(self.failures) < 10_000:
            try:
                self.client.call("slow_echo", "x", self.seconds_per_call)
                self.served[self.client.whoami()] += 1
            except Exception as error:  # noqa: BLE001 -- every error is a finding here
                self.failures.append((time.monotonic(), error))
                gevent.sleep(0)  # a failure that never yields must not starve the hub

    def stop(self) -> None:
        ended = [g for g in self.greenlets if g.dead]
        gevent.killall(self.greenlets, block=True, timeout=5)
        self.greenlets = []
        assert not ended, f"{len(ended)} load greenlets ended early ({len(self.failures)} failures)"


@pytest.fixture
def load() -> Iterator[Callable[[ServiceClient], Load]]:
    running: list[Load] = []

    def make(client: ServiceClient) -> Load:
        running.append(Load(client))
        return running[-1]

    yield make
    for item in running:
        item.stop()


@pytest.fixture
def registered_client(zk_hosts: str) -> Iterator[Callable[..., ServiceClient]]:
    """``registered_client(instances=0, **options)``: a started client of the echo service
    in ``zk_hosts`` (once it sees ``instances``), stopped after the test."""
    made: list[ServiceClient] = []

    def make(instances: int = 0, **options: Any) -> ServiceClient:
        options = {
            "pool": PoolSettings(max_connections=5, eject_after=3, eject_backoff=30.0),
            "call_timeout": 5.0,
            **options,
        }
        service_client = ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts, **options)
        made.append(service_client)
        service_client.start()
        if instances:
            assert service_client._membership is not None
            assert service_client._membership.wait_for(lambda view: len(view) == instances, 5)
        return service_client

    yield make
    for service_client in made:
        service_client.stop()


@pytest.fixture
def client(registered_client: Callable[..., ServiceClient]) -> ServiceClient:
    return registered_client()


@pytest.mark.gevent_timeout(60)
def test_a_sigkilled_server_costs_only_its_calls_in_flight_and_is_ejected_before_its_znode_goes(
    zk_hosts: str,
    servers: Callable[..., ServerProcess],
    client: ServiceClient,
    load: Callable[[ServiceClient], Load],
) -> None:
    processes = [servers("--zookeeper", zk_hosts, "--session-timeout", "10") for _ in range(3)]
    victim = processes[0]
    assert client._membership is not None
    assert client._membership.wait_for(lambda view: len(view) == 3, 5)
    running = load(client)
    running.start(30)
    gevent.sleep(1.0)
    assert set(running.served) == {p.address for p in processes}

    killed_at = time.monotonic()
    victim.kill()
    wait_until(lambda: any(s.ejected for s in client.status().instances), 5)
    ejected_after = time.monotonic() - killed_at
    served_before = sum(running.served.values())
    gevent.sleep(1.0)
    running.stop()

    assert victim.address in client._membership.instances  # ZooKeeper has not noticed yet
    failures = [error for _, error in running.failures]
    assert failures, "the calls in flight on the killed server should have failed"
    assert all(isinstance(error, TransportError) for error in failures), failures
    [victim_pool] = [s for s in client.status().instances if s.instance == victim.address]
    # At most the calls it can carry were in flight (pipelined: max_inflight per connection).
    assert len(failures) <= victim_pool.max_connections * victim_pool.max_inflight
    assert not any(isinstance(error, CallTimeoutError) for error in failures)  # failed fast
    assert all(at - killed_at < 1.0 for at, _ in running.failures)
    assert sum(running.served.values()) > served_before  # the others kept serving
    print(f"ejected {ejected_after * 1000:.0f} ms after SIGKILL; {len(failures)} failed calls")


@pytest.mark.gevent_timeout(60)
def test_a_new_server_gets_calls_at_once_and_a_sigtermed_one_costs_no_call(
    zk_hosts: str,
    servers: Callable[..., ServerProcess],
    client: ServiceClient,
    load: Callable[[ServiceClient], Load],
) -> None:
    first = servers("--zookeeper", zk_hosts, "--deregister-grace", "0.3")
    second = servers("--zookeeper", zk_hosts, "--deregister-grace", "0.3")
    assert client._membership is not None
    assert client._membership.wait_for(lambda view: len(view) == 2, 5)
    running = load(client)
    running.start(20)
    gevent.sleep(0.5)

    newcomer = servers("--zookeeper", zk_hosts)
    joined_at = time.monotonic()
    wait_until(lambda: running.served[newcomer.address] > 0, 5)
    first_call_after = time.monotonic() - joined_at

    assert first.terminate(timeout=20) == 0  # deregister, drain, exit
    gevent.sleep(1.0)
    running.stop()

    assert running.failures == []
    assert {s.instance for s in client.status().instances} == {second.address, newcomer.address}
    print(f"new server's first call {first_call_after * 1000:.0f} ms after it was ready")


def test_a_leaving_instance_gets_no_new_calls_and_its_busy_connection_closes_at_check_in(
    zk_hosts: str, serve: Callable[..., ThriftServer], client: ServiceClient
) -> None:
    staying = serve(registration=Registration(zookeeper=zk_hosts, service="echo"))
    leaving = serve(registration=Registration(zookeeper=zk_hosts, service="echo"))
    assert client._membership is not None
    assert client._membership.wait_for(lambda view: len(view) == 2, 5)
    leaving_name = f"127.0.0.1:{leaving.port}"
    pool = next(p for p in client._pools.values() if p.name == leaving_name)

    with ExitStack() as borrowed:
        in_flight = None
        for _ in range(50):  # borrow until a connection to the leaving instance comes up
            pinned = borrowed.enter_context(client.connection())
            if str(pinned.instance) == leaving_name:
                in_flight = gevent.spawn(pinned.slow_echo, "finishing", 0.5)
                break
        assert in_flight is not None, "never got a connection to the leaving instance"
        gevent.sleep(0.05)

        assert leaving.registrar is not None
        leaving.registrar.stop()  # it leaves the registry; the server itself keeps serving
        assert client._membership.wait_for(lambda view: leaving_name not in view, 5)
        assert pool.state == "retired" and pool.status().idle == 0

        assert in_flight.get(timeout=5) == "finishing"  # the call in flight completed
    assert pool.status().in_use == 0 and pool.descriptors() == []  # closed at check-in
    answers = {client.whoami() for _ in range(20)}
    assert answers == {f"127.0.0.1:{staying.port}"}  # no new calls to it


@pytest.mark.gevent_timeout(60)
def test_a_server_restarted_on_its_port_with_another_transport_is_called_as_it_is_now(
    zk_hosts: str, servers: Callable[..., ServerProcess], client: ServiceClient
) -> None:
    """The new process replaces the node its dead predecessor left under the same name: the
    client sees the new payload at once (not at its next ZooKeeper reconnect) and retires the
    pool of the old one."""
    first = servers("--zookeeper", zk_hosts, "--session-timeout", "30")
    assert client._membership is not None
    assert client._membership.wait_for(lambda view: len(view) == 1, 5)
    assert client.echo("before") == "before"
    old_pool = next(iter(client._pools.values()))
    assert first.port is not None
    first.kill()
    servers("--zookeeper", zk_hosts, "--port", str(first.port), "--transport", "framed")
    assert client._membership.wait_for(
        lambda view: [i.transport for i in view.values()] == ["framed"], 2
    )
    assert client.echo("after") == "after"
    assert old_pool.state == "retired"
    [status] = client.status().instances
    assert status.failures == 0, status


@pytest.mark.gevent_timeout(60)
def test_a_sigstopped_server_costs_no_idempotent_call_and_strands_no_waiter(
    zk_hosts: str,
    servers: Callable[..., ServerProcess],
    registered_client: Callable[..., ServiceClient],
    load: Callable[[ServiceClient], Load],
    captured: list[MutableMapping[str, Any]],
) -> None:
    """One of three instances freezes for 3 s under a load that keeps callers waiting (9
    connections for 30 callers). Waiters are served by whichever instance has room first,
    so none waits out pool_timeout behind the frozen one; the calls stuck on it are cut by
    attempt_timeout and, idempotent, made again elsewhere."""
    processes = [servers("--zookeeper", zk_hosts) for _ in range(3)]
    client = registered_client(
        3,
        pool=PoolSettings(max_connections=3, max_inflight=1, pool_timeout=0.5, eject_after=3),
        retry=Retry(idempotent=True, attempt_timeout=1.0),
    )
    running = load(client)
    running.start(30)
    gevent.sleep(0.5)
    frozen = processes[0]
    frozen.signal(signal.SIGSTOP)
    try:
        gevent.sleep(3.0)
    finally:
        frozen.signal(signal.SIGCONT)
    gevent.sleep(0.5)
    running.stop()
    served = sum(running.served.values())
    failures = [error for _, error in running.failures]
    print(f"{served} calls served, {len(failures)} failed: {failures[:3]}")
    assert failures == []
    assert served > 200
    ejected = events_named(captured, events.INSTANCE_EJECTED)
    assert {e["instance"] for e in ejected} <= {frozen.address}
    unresponsive = events_named(captured, events.INSTANCE_UNRESPONSIVE)
    assert {e["instance"] for e in unresponsive} == {frozen.address}
    assert not events_named(captured, events.POOL_EXHAUSTED)


def test_the_first_read_of_the_registry_opens_each_instances_connections_once(
    zk_hosts: str,
    serve: Callable[..., ThriftServer],
    registered_client: Callable[..., ServiceClient],
) -> None:
    """The membership's first read reaches the pools twice at start (its change, and the
    instances start() returns): the second must not replace the pools (whose min_idle
    connections would leak)."""
    server = serve(registration=Registration(zookeeper=zk_hosts, service="echo"))
    client = registered_client(pool=PoolSettings(min_idle=2))
    wait_until(lambda: server.stats.connections == 2, 5)
    gevent.sleep(0.3)
    assert server.stats.connections == 2
    [status] = client.status().instances
    assert (status.opened, status.idle) == (2, 2), status


@pytest.mark.gevent_timeout(60)
def test_a_sigkilled_server_costs_no_idempotent_call(
    zk_hosts: str,
    servers: Callable[..., ServerProcess],
    registered_client: Callable[..., ServiceClient],
    load: Callable[[ServiceClient], Load],
) -> None:
    """The calls in flight on the killed server failed on the wire after they were sent;
    idempotent, each is made again on another instance within its deadline."""
    processes = [servers("--zookeeper", zk_hosts, "--session-timeout", "10") for _ in range(3)]
    client = registered_client(3, retry=Retry(idempotent={"slow_echo", "whoami"}))
    running = load(client)
    running.start(30)
    gevent.sleep(1.0)
    processes[0].kill()
    wait_until(lambda: any(s.ejected for s in client.status().instances), 5)
    gevent.sleep(1.0)
    running.stop()
    assert [error for _, error in running.failures] == []
    retried = client.status().retries
    print(f"{sum(running.served.values())} calls served, {retried} retried, none failed")
    assert retried > 0  # the calls in flight on the killed server were made again
