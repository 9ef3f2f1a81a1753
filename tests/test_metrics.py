"""Prometheus metrics of a client, scraped after real calls to a real server: calls by
outcome, attempt durations, and the pool's numbers read from status() at the scrape."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from thriftpy2.thrift import TApplicationException

from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import CallTimeoutError
from geventpool.observe.prometheus import ClientMetrics, ServerMetrics
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import echo_thrift

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

    def labels(**values: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(values.items()))

    assert (
        samples[(calls, labels(service="echo", method="echo", instance=where, outcome="ok"))] == 5
    )
    assert (
        samples[
            (
                calls,
                labels(
                    service="echo", method="refuse", instance=where, outcome="declared_exception"
                ),
            )
        ]
        == 1
    )
    timeout = labels(service="echo", method="slow_echo", instance=where, outcome="timeout")
    assert samples[(calls, timeout)] == 1
    duration = "geventpool_client_call_duration_seconds"
    assert samples[(f"{duration}_count", labels(service="echo", method="echo"))] == 5
    assert (
        samples[(f"{duration}_bucket", labels(service="echo", method="slow_echo", le="0.1"))] == 1
    )
    pool = labels(service="echo", instance=where)
    assert samples[("geventpool_client_connections_max", pool)] == 3
    assert samples[("geventpool_client_connections_in_use", pool)] == 0
    assert samples[("geventpool_client_instance_ejected", pool)] == 0
    assert samples[("geventpool_client_connections_opened_total", pool)] >= 1
    assert samples[("geventpool_client_instances", labels(service="echo"))] == 1
    assert ("geventpool_client_retries_total", labels(service="echo")) in samples
    assert ("geventpool_client_retry_budget", labels(service="echo")) in samples


def test_a_scrape_shows_each_watched_servers_numbers(serve: Callable[..., ThriftServer]) -> None:
    server = serve()
    registry = CollectorRegistry()
    ServerMetrics(registry).watch(server)
    with ServiceClient(
        echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
    ) as client:
        for n in range(4):
            client.echo(str(n))
        with pytest.raises(TApplicationException):
            client.crash("boom")
        samples = scrape(registry)
    port = (("port", str(server.port)),)
    assert samples[("geventpool_server_calls_total", port)] == 5
    assert samples[("geventpool_server_handler_errors_total", port)] == 1
    assert samples[("geventpool_server_accepted_total", port)] >= 1
    assert samples[("geventpool_server_connections", port)] >= 1
