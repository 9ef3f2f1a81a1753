"""Prometheus metrics of geventpool clients and servers (the ``metrics`` extra:
``prometheus_client``); :class:`ServerMetrics` reads each watched server's ``stats`` at the
scrape.

:class:`ClientMetrics` is a :class:`~geventpool.client.observing.CallObserver` and a
collector. Given as an observer (``ServiceClient(observers=[metrics])``) it counts every
attempt by service, method, instance and outcome, and times it by service and method; told
to :meth:`~ClientMetrics.watch` a client, it reads that client's ``status()`` at each scrape
(pool states, retries, exhaustion), which costs the calls nothing. Label sets are bounded:
no per-call label; the outcome is one of :data:`~geventpool.client.observing.OUTCOMES`.

Names follow Prometheus's conventions:

* ``geventpool_client_calls_total`` (counter; ``service``, ``method``, ``instance``,
  ``outcome``): attempts, retries and hedged backups included;
* ``geventpool_client_call_duration_seconds`` (histogram; ``service``, ``method``): each
  attempt, from its send to its end;
* per instance (``service``, ``instance``): ``geventpool_client_connections_in_use``,
  ``..._connections_idle``, ``..._connections_opening``, ``..._connections_max``,
  ``..._waiters``, ``..._instance_ejected`` (1 or 0), ``..._ejections_total``,
  ``..._connections_opened_total``, ``..._connect_failures`` (the current streak);
* per service (``service``): ``geventpool_client_retries_total``,
  ``..._retries_refused_total`` (by the retry budget), ``..._retry_budget`` (retries it
  allows now), ``..._exhausted_total`` (``PoolExhaustedError``), ``..._hedged_total``,
  ``..._instances`` (in the view).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from geventpool.client.observing import Attempt

if TYPE_CHECKING:
    from geventpool.client.service import ServiceClient
    from geventpool.server.thrift_server import ThriftServer

#: Seconds: from a fast local call to a slow one near the default 5 s deadline.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS = (*(str(bound) for bound in BUCKETS), "+Inf")  # the buckets' le labels

_INSTANCE_GAUGES = (
    ("connections_in_use", "Connections to the instance held by callers now.", "in_use"),
    ("connections_idle", "Idle connections to the instance.", "idle"),
    ("connections_opening", "Connections to the instance being opened.", "opening"),
    ("connections_max", "The most connections the pool opens to the instance.", "max_connections"),
    ("waiters", "Callers waiting for a connection to the instance.", "waiters"),
    ("connect_failures", "Failures in a row of the instance (its current streak).", "failures"),
)
_INSTANCE_COUNTERS = (
    ("ejections", "Times the instance was ejected.", "ejections"),
    ("connections_opened", "Connections opened to the instance.", "opened"),
)
_SERVICE_COUNTERS = (
    ("retries", "Retries made (of calls sent or not).", "retries"),
    ("retries_refused", "Retries the retry budget refused.", "retries_refused"),
    ("exhausted", "Calls that failed with PoolExhaustedError.", "exhausted"),
    ("hedged", "Backup requests sent.", "hedged"),
)


class ClientMetrics:
    """The metrics of the clients it observes and watches, in ``registry`` (default: the
    process's). Attempts are counted in plain dictionaries (no lock, no labelled child to
    look up: the greenlets of a process run one at a time) and turned into metric families
    at each scrape, from a copy taken at once."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._buckets: dict[tuple[str, str], list[float]] = {}  # per bucket, then the sum
        self._clients: weakref.WeakSet[ServiceClient] = weakref.WeakSet()
        registry.register(self)
        registry.register(_StatusCollector(self._clients))

    def watch(self, client: ServiceClient) -> ServiceClient:
        """Report ``client``'s ``status()`` at each scrape (until it is garbage)."""
        self._clients.add(client)
        return client

    def attempt_started(self, attempt: Attempt) -> None:
        """Nothing: an attempt is counted when it ends."""

    def attempt_ended(
        self, attempt: Attempt, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        """Count the attempt and time it."""
        key = (attempt.service, attempt.method, attempt.instance, outcome)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        timed = self._buckets.get(key[:2])
        if timed is None:
            timed = self._buckets[key[:2]] = [0.0] * (len(BUCKETS) + 2)
        timed[bisect_left(BUCKETS, duration)] += 1
        timed[-1] += duration

    def collect(self) -> Iterator[Metric]:
        """The calls counter and the duration histogram, as they are now."""
        calls = CounterMetricFamily(
            "geventpool_client_calls",
            "Attempts of calls, by outcome (retries and hedged backups included).",
            labels=["service", "method", "instance", "outcome"],
        )
        for labels, count in self._counts.copy().items():
            calls.add_metric(list(labels), count)
        duration = HistogramMetricFamily(
            "geventpool_client_call_duration_seconds",
            "Seconds each attempt took, from its send to its end.",
            labels=["service", "method"],
        )
        for where, counted in self._buckets.copy().items():
            timed = list(counted)
            cumulative, buckets = 0.0, []
            for bound, observed in zip(_BOUNDS, timed[:-1], strict=True):
                cumulative += observed
                buckets.append((bound, cumulative))
            duration.add_metric(list(where), buckets, timed[-1])
        yield calls
        yield duration


class _StatusCollector:
    """Reads each watched client's ``status()`` when scraped."""

    def __init__(self, clients: weakref.WeakSet[ServiceClient]) -> None:
        self._clients = clients

    def collect(self) -> Iterator[Metric]:
        prefix = "geventpool_client_"
        gauges = {
            name: GaugeMetricFamily(prefix + name, text, labels=["service", "instance"])
            for name, text, _ in _INSTANCE_GAUGES
        }
        ejected = GaugeMetricFamily(
            prefix + "instance_ejected",
            "1 while the instance is ejected.",
            labels=["service", "instance"],
        )
        counters = {
            name: CounterMetricFamily(prefix + name, text, labels=["service", "instance"])
            for name, text, _ in _INSTANCE_COUNTERS
        }
        service_counters = {
            name: CounterMetricFamily(prefix + name, text, labels=["service"])
            for name, text, _ in _SERVICE_COUNTERS
        }
        budget = GaugeMetricFamily(
            prefix + "retry_budget", "Retries the budget allows now.", labels=["service"]
        )
        members = GaugeMetricFamily(
            prefix + "instances", "Instances in the client's view.", labels=["service"]
        )
        for client in list(self._clients):
            status = client.status()
            service = status.service
            for instance in status.instances:
                labels = [service, instance.instance]
                for name, _, field in _INSTANCE_GAUGES:
                    gauges[name].add_metric(labels, getattr(instance, field))
                for name, _, field in _INSTANCE_COUNTERS:
                    counters[name].add_metric(labels, getattr(instance, field))
                ejected.add_metric(labels, 1.0 if instance.ejected else 0.0)
            for name, _, field in _SERVICE_COUNTERS:
                service_counters[name].add_metric([service], getattr(status, field))
            budget.add_metric([service], status.retry_budget)
            members.add_metric([service], len(status.instances))
        yield from gauges.values()
        yield ejected
        yield from counters.values()
        yield from service_counters.values()
        yield budget
        yield members


_SERVER_NUMBERS = (
    ("connections", "Connections the server holds now.", "connections", GaugeMetricFamily),
    ("accepted", "Connections the server accepted.", "accepted", CounterMetricFamily),
    ("calls", "Calls the server ran.", "calls", CounterMetricFamily),
    (
        "handler_errors",
        "Calls whose handler raised an undeclared exception.",
        "handler_errors",
        CounterMetricFamily,
    ),
    ("killed", "Calls cut short by the drain timeout.", "killed", CounterMetricFamily),
)


class ServerMetrics:
    """The numbers of the :class:`~geventpool.server.thrift_server.ThriftServer` instances it
    watches, read from their ``stats`` at each scrape (``geventpool_server_connections``,
    ``..._accepted_total``, ``..._calls_total``, ``..._handler_errors_total``,
    ``..._killed_total``; label ``port``), in ``registry`` (default: the process's)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._servers: weakref.WeakSet[ThriftServer] = weakref.WeakSet()
        registry.register(self)

    def watch(self, server: ThriftServer) -> ThriftServer:
        """Report ``server``'s numbers at each scrape (until it is garbage)."""
        self._servers.add(server)
        return server

    def collect(self) -> Iterator[Metric]:
        """Each watched server's numbers, as they are now."""
        families = [
            (kind(f"geventpool_server_{name}", text, labels=["port"]), field)
            for name, text, field, kind in _SERVER_NUMBERS
        ]
        for server in list(self._servers):
            for family, field in families:
                family.add_metric([str(server.port)], getattr(server.stats, field))
        for family, _ in families:
            yield family
