"""Prometheus metrics of clients and servers, scraped after real calls to real servers: calls
by outcome, attempt durations and waits, the pool's and the registry's numbers read from
status() at the scrape, and the server's calls, durations, refusals and connections."""

from __future__ import annotations

import socket
from collections.abc import Callable

import gevent
import pytest
from kazoo.client import KazooClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from thriftpy2.thrift import TApplicationException

from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import CallTimeoutError, TransportError
from geventpool.observe.prometheus import ClientMetrics, ServerMetrics
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import echo_thrift
from geventpool.wire.limits import WireLimits
from helpers import native, wait_until

pytestmark = pytest.mark.gevent_timeout(30)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_shows_calls_by_outcome_their_durations_and_the_pools_numbers(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve()
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=server.port)],
        pool=PoolSettings(max_connections=3),
        observers=[metrics],
    )
    metrics.watch(client)
    where = f"127.0.0.1:{server.port}"
    with client:
        for n in range(5):
            assert client.echo(str(n)) == str(n)
        with pytest.raises(echo_thrift.Refused):
            client.refuse("no")
        with pytest.raises(CallTimeoutError):
            client.slow_echo("late", 0.3, timeout=0.05)
        samples = scrape(registry)
    calls = "geventpool_client_calls_total"
    assert samples[(calls, labels(service="echo", method="echo", address=where, outcome="ok"))] == 5
    assert (
        samples[
            (
                calls,
                labels(
                    service="echo", method="refuse", address=where, outcome="declared_exception"
                ),
            )
        ]
        == 1
    )
    timeout = labels(service="echo", method="slow_echo", address=where, outcome="timeout")
    assert samples[(calls, timeout)] == 1
    duration = "geventpool_client_call_duration_seconds"
    assert samples[(f"{duration}_count", labels(service="echo", method="echo"))] == 5
    assert (
        samples[(f"{duration}_bucket", labels(service="echo", method="slow_echo", le="0.1"))] == 1
    )
    pool = labels(service="echo", address=where)
    assert samples[("geventpool_client_connections_max", pool)] == 3
    assert samples[("geventpool_client_connections_in_use", pool)] == 0
    assert samples[("geventpool_client_instance_ejected", pool)] == 0
    assert samples[("geventpool_client_connections_opened_total", pool)] >= 1
    assert samples[("geventpool_client_instances", labels(service="echo"))] == 1
    assert ("geventpool_client_retries_total", labels(service="echo")) in samples
    assert ("geventpool_client_retry_budget", labels(service="echo")) in samples


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


def test_watch_alone_observes_a_client_once_and_shows_waits_and_calls_in_flight(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve()
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=server.port)],
        pool=PoolSettings(max_connections=1, max_inflight=1),
        observers=[metrics],
    )
    metrics.watch(client)
    metrics.watch(client)  # given again and in observers=: still told once per attempt
    where = f"127.0.0.1:{server.port}"
    with client:
        slow = gevent.spawn(client.slow_echo, "slow", 0.3)
        gevent.sleep(0.1)
        during = scrape(registry)
        assert client.echo("waited") == "waited"  # waits for the slow call's connection
        slow.get()
        after = scrape(registry)
    pool = labels(service="echo", address=where)
    assert during[("geventpool_client_calls_in_flight", pool)] == 1
    assert after[("geventpool_client_calls_in_flight", pool)] == 0
    ok = labels(service="echo", method="echo", address=where, outcome="ok")
    assert after[("geventpool_client_calls_total", ok)] == 1
    wait = "geventpool_client_pool_wait_seconds"
    echo = labels(service="echo", method="echo")
    assert after[(f"{wait}_count", echo)] == 1
    assert 0.1 <= after[(f"{wait}_sum", echo)] < 0.5
    assert after[(f"{wait}_bucket", labels(service="echo", method="echo", le="0.1"))] == 0
    assert after[(f"{wait}_bucket", labels(service="echo", method="echo", le="0.25"))] == 1
    unhurried = labels(service="echo", method="slow_echo", le="0.05")
    assert after[(f"{wait}_bucket", unhurried)] == 1  # only its connect: no other call


def test_a_client_of_a_registry_shows_its_rejected_children_and_zookeeper_state(
    serve: Callable[..., ThriftServer], zk: KazooClient, zk_hosts: str
) -> None:
    server = serve()
    zk.create("/geventpool/echo/good", native(port=server.port), makepath=True)
    zk.create("/geventpool/echo/bad", b"{not json")
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    with metrics.watch(ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts)) as client:
        assert client.echo("x") == "x"
        samples = scrape(registry)
        assert client.status().rejected == 1
        assert client.membership is not None and client.membership.rejected.keys() == {"bad"}
    echo = labels(service="echo")
    assert samples[("geventpool_client_instances", echo)] == 1
    assert samples[("geventpool_client_rejected_children", echo)] == 1
    state = "geventpool_client_zookeeper_state"
    assert samples[(state, labels(service="echo", state="CONNECTED"))] == 1
    assert samples[(state, labels(service="echo", state="SUSPENDED"))] == 0


def test_the_counts_of_an_instance_that_left_the_view_are_dropped_at_the_scrape(
    serve: Callable[..., ThriftServer], zk: KazooClient, zk_hosts: str
) -> None:
    staying, leaving = serve(), serve()
    for server in (staying, leaving):
        zk.create(f"/geventpool/echo/{server.port}", native(port=server.port), makepath=True)
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    client = metrics.watch(
        ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts, balancer="round_robin")
    )
    with client:
        for n in range(4):
            client.echo(str(n))
        before = scrape(registry)
        zk.delete(f"/geventpool/echo/{leaving.port}")
        wait_until(lambda: len(client.status().instances) == 1)
        client.echo("after")
        after = scrape(registry)

    def instances(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
        return {
            dict(labels)["address"]
            for name, labels in samples
            if name == "geventpool_client_calls_total"
        }

    gone, kept = f"127.0.0.1:{leaving.port}", f"127.0.0.1:{staying.port}"
    assert instances(before) == {gone, kept}
    assert instances(after) == {kept}  # the departed instance's series ended


def test_a_scrape_shows_each_watched_servers_calls_durations_and_refusals(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve(limits=WireLimits(max_string_size=64), max_connections=3)
    registry = CollectorRegistry()
    ServerMetrics(registry).watch(server)
    with ServiceClient(
        echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
    ) as client:
        for n in range(4):
            client.echo(str(n))
        with pytest.raises(TApplicationException):
            client.crash("boom")
        with pytest.raises(TransportError):
            client.echo("x" * 100)  # over the server's string limit: that connection closed
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as raw:
            raw.sendall(b"\x7f\x00\x00\x00garbage")  # no Thrift message: closed
            assert raw.recv(1) == b""
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        gevent.sleep(0.1)
        samples = scrape(registry)
        for sock in held:
            sock.close()
    port = str(server.port)
    calls = "geventpool_server_calls_total"
    assert samples[(calls, labels(port=port, method="echo", outcome="ok"))] == 4
    assert samples[(calls, labels(port=port, method="crash", outcome="handler_error"))] == 1
    duration = "geventpool_server_call_duration_seconds"
    assert samples[(f"{duration}_count", labels(port=port, method="echo"))] == 4
    refused = "geventpool_server_refused_total"
    assert samples[(refused, labels(port=port, reason="over_limits"))] == 1
    assert samples[(refused, labels(port=port, reason="malformed"))] == 1
    assert samples[("geventpool_server_at_capacity_total", labels(port=port))] >= 1
    assert samples[("geventpool_server_handler_errors_total", labels(port=port))] == 1
    assert samples[("geventpool_server_accepted_total", labels(port=port))] >= 4
    assert samples[("geventpool_server_connections", labels(port=port))] >= 1


def test_clients_sharing_a_service_name_make_one_valid_series_each(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve()
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    where = [Instance(host="127.0.0.1", port=server.port)]
    first = metrics.watch(ServiceClient(echo_thrift.Echo, "echo", instances=where))
    second = metrics.watch(ServiceClient(echo_thrift.Echo, "echo", instances=where))
    with first, second:
        first.echo("a")
        second.echo("b")
        text = generate_latest(registry).decode()
    seen = [
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]
    assert len(seen) == len(set(seen))  # a repeated series makes the scrape invalid
    samples = scrape(registry)
    pool = labels(service="echo", address=f"127.0.0.1:{server.port}")
    assert samples[("geventpool_client_connections_opened_total", pool)] == 2  # summed
    assert samples[("geventpool_client_instances", labels(service="echo"))] == 1
