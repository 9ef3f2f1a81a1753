"""Prometheus metrics of geventpool clients and servers (the ``metrics`` extra:
``prometheus_client``).

:class:`ClientMetrics` is a :class:`~geventpool.client.observing.CallObserver` and a
collector: told to :meth:`~ClientMetrics.watch` a client, it observes that client's attempts
and reads its ``status()`` at each scrape (which costs the calls nothing).
:class:`ServerMetrics` does the same for a
:class:`~geventpool.server.thrift_server.ThriftServer` (its calls through the server's
observer hook, its ``stats`` at the scrape). Label sets are bounded: no per-call label; an
outcome is one of :data:`~geventpool.client.observing.OUTCOMES` or
:data:`~geventpool.server.observing.SERVER_OUTCOMES`.

Client metrics (names by Prometheus's conventions):

* ``geventpool_client_calls_total`` (counter; ``service``, ``method``, ``address``,
  ``outcome``): attempts, retries and hedged backups included;
* ``geventpool_client_call_duration_seconds`` (histogram; ``service``, ``method``): each
  attempt, from its send to its end;
* ``geventpool_client_pool_wait_seconds`` (histogram; ``service``, ``method``): each
  attempt's wait for its connection (or its turn on a shared one);
* per instance (``service``, ``address``: the instance's ``host:port``; not ``instance``,
  which Prometheus gives the scraped process), gauges: ``geventpool_client_connections_in_use``,
  ``..._connections_idle``, ``..._connections_opening``, ``..._connections_max``,
  ``..._waiters``, ``..._calls_in_flight``, ``..._instance_ejected`` (1 or 0),
  ``..._connect_failures`` (the current streak); counters: ``..._ejections_total``,
  ``..._connections_opened_total``;
* per service (``service``): ``geventpool_client_retries_total``,
  ``..._retries_refused_total`` (by the retry budget), ``..._retry_budget`` (retries it
  allows now), ``..._exhausted_total`` (``PoolExhaustedError``), ``..._hedged_total``,
  ``..._instances`` (in the view), ``..._rejected_children`` (children of the registry path
  rejected now), ``..._zookeeper_state`` (``state``: 1 for ``CONNECTED``, ``SUSPENDED`` or
  ``LOST``, whichever holds, 0 for the others; clients of a registry only).

Server metrics (``port``):

* ``geventpool_server_calls_total`` (counter; ``port``, ``method``, ``outcome``) and
  ``geventpool_server_call_duration_seconds`` (histogram; ``port``, ``method``: the
  handler's time);
* ``geventpool_server_connections`` (gauge), ``..._accepted_total``,
  ``..._handler_errors_total``, ``..._killed_total`` (by the drain timeout),
  ``..._at_capacity_total`` (connections accepted as the last of ``max_connections``),
  ``..._refused_total`` (``reason``: ``over_limits`` or ``malformed``: connections closed
  for their request).
"""

from __future__ import annotations

import operator
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

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
    from geventpool.server.observing import ServedCall
    from geventpool.server.thrift_server import ThriftServer

#: Seconds: from a fast local call to a slow one near the default 5 s deadline.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS = (*(str(bound) for bound in BUCKETS), "+Inf")  # the buckets' le labels

#: kazoo's connection states, each a ``state`` label of ``geventpool_client_zookeeper_state``.
ZOOKEEPER_STATES = ("CONNECTED", "SUSPENDED", "LOST")

_INSTANCE_GAUGES = (
    (
        "connections_in_use",
        "Calls holding a connection to the instance now (with pipelining, several share one).",
        "in_use",
    ),
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


class _Histogram:
    """One histogram's series: raw values kept in a short list on the call path (an append
    each) and folded into cumulative buckets at each scrape, or once :data:`FOLD_EVERY` have
    gathered (a sort and one bisection per bucket: a third of a bisection per value)."""

    __slots__ = ("buckets", "pending", "sum")

    def __init__(self) -> None:
        self.pending: list[float] = []
        self.buckets = [0] * (len(BUCKETS) + 1)  # cumulative (le each bound), then +Inf
        self.sum = 0.0

    def fold(self) -> None:
        """Move the raw values into the buckets."""
        values = self.pending
        values.sort()
        for index, bound in enumerate(BUCKETS):
            self.buckets[index] += bisect_right(values, bound)
        self.buckets[-1] += len(values)
        self.sum += sum(values)
        values.clear()

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        """Fold, and add the series to ``family`` with ``labels``."""
        self.fold()
        counts = [(bound, float(count)) for bound, count in zip(_BOUNDS, self.buckets, strict=True)]
        family.add_metric(labels, counts, self.sum)


#: Raw values a series keeps before they are folded into its buckets.
FOLD_EVERY = 1024


class _Slot:
    """The count of one label set (with its outcome), and the raw values of the histograms
    of its label set without the outcome, which it shares with the other outcomes."""

    __slots__ = ("count", "durations", "histograms", "waits")

    def __init__(self, histograms: tuple[_Histogram, ...]) -> None:
        self.count = 0
        self.histograms = histograms
        self.durations = histograms[0].pending
        self.waits = histograms[-1].pending

    def fold(self) -> None:
        for histogram in self.histograms:
            histogram.fold()


class _Counted:
    """Calls counted by label set and outcome, with ``histograms`` histograms (one or two)
    per label set of the first two labels (a service or a port, and the method)."""

    def __init__(self, histograms: int) -> None:
        self.slots: dict[tuple[Any, ...], _Slot] = {}
        self.series: dict[tuple[Any, ...], tuple[_Histogram, ...]] = {}
        self._histograms = histograms

    def new_slot(self, key: tuple[Any, ...]) -> _Slot:
        """The slot of ``key`` (its last item is the outcome), made on its first call."""
        series = self.series.get(key[:2])
        if series is None:
            series = self.series[key[:2]] = tuple(_Histogram() for _ in range(self._histograms))
        slot = self.slots[key] = _Slot(series)
        return slot

    def counter(self, name: str, text: str, labels: list[str]) -> CounterMetricFamily:
        """The family of the counts."""
        family = CounterMetricFamily(name, text, labels=[*labels, "outcome"])
        for key, slot in self.slots.copy().items():
            family.add_metric([str(label) for label in key], slot.count)
        return family

    def histogram(
        self, which: int, name: str, text: str, labels: list[str]
    ) -> HistogramMetricFamily:
        """The family of histogram ``which`` (0: the first) of every label set."""
        family = HistogramMetricFamily(name, text, labels=labels)
        for where, series in self.series.copy().items():
            series[which].add_to(family, [str(label) for label in where])
        return family


class ClientMetrics:
    """The metrics of the clients it observes and watches, in ``registry`` (default: the
    process's). Attempts are counted in plain dictionaries (no lock, no labelled child to
    look up: the greenlets of a process run one at a time) and turned into metric families
    at each scrape. Per attempt: one dictionary look-up and two appends; memory: at most
    :data:`FOLD_EVERY` raw values per (service, method) and histogram."""

    observes_starts = False  # an attempt is counted when it ends

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._counted = _Counted(histograms=2)  # the attempts' durations, then their waits
        self._slots = self._counted.slots
        self._clients: weakref.WeakSet[ServiceClient] = weakref.WeakSet()
        registry.register(self)
        registry.register(_StatusCollector(self._clients))

    def watch(self, client: ServiceClient) -> ServiceClient:
        """Observe ``client``'s calls and report its ``status()`` at each scrape (until it is
        garbage)."""
        client.observe(self)
        self._clients.add(client)
        return client

    def attempt_started(self, attempt: Attempt) -> None:
        """Nothing: an attempt is counted when it ends (``observes_starts`` is False)."""

    def attempt_ended(
        self, attempt: Attempt, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        """Count the attempt, and keep its duration and its wait for a connection."""
        service, method, instance, _, waited = attempt
        key = (service, method, instance, outcome)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._counted.new_slot(key)
        slot.count += 1
        durations = slot.durations
        durations.append(duration)
        slot.waits.append(waited)
        if len(durations) >= FOLD_EVERY:
            slot.fold()

    def _forget_departed(self) -> None:
        """Drop the counts of instances no longer in their watched client's view."""
        services: set[str] = set()
        present: set[tuple[str, str]] = set()
        for client in list(self._clients):
            services.add(client.name)
            present.update((client.name, view.instance) for view in client.status().instances)
        for key in list(self._slots):
            if key[0] in services and (key[0], key[2]) not in present:
                del self._slots[key]

    def collect(self) -> Iterator[Metric]:
        """The calls counter and the duration and pool-wait histograms, as they are now.
        The counts of an instance that has left a watched client's view are dropped (its
        series end), so instances coming and going do not grow the metrics for ever."""
        counted = self._counted
        self._forget_departed()
        yield counted.counter(
            "geventpool_client_calls",
            "Attempts of calls, by outcome (retries and hedged backups included).",
            ["service", "method", "address"],
        )
        yield counted.histogram(
            0,
            "geventpool_client_call_duration_seconds",
            "Seconds each attempt took, from its send to its end.",
            ["service", "method"],
        )
        yield counted.histogram(
            1,
            "geventpool_client_pool_wait_seconds",
            "Seconds each attempt waited for its connection (or its turn on a shared one).",
            ["service", "method"],
        )


#: The families read from ``status()``: name (after ``geventpool_client_``), kind, help, labels
#: and how the values of clients that share a service name combine (summed, or the largest).
_STATUS_FAMILIES: dict[
    str,
    tuple[
        type[GaugeMetricFamily] | type[CounterMetricFamily],
        str,
        tuple[str, ...],
        Callable[..., float],
    ],
] = {
    **{
        name: (GaugeMetricFamily, text, ("service", "address"), operator.add)
        for name, text, _ in _INSTANCE_GAUGES
        if name != "connect_failures"
    },
    "connect_failures": (
        GaugeMetricFamily,
        "Failures in a row of the instance (its current streak).",
        ("service", "address"),
        max,
    ),
    "instance_ejected": (
        GaugeMetricFamily,
        "1 while the instance is ejected.",
        ("service", "address"),
        max,
    ),
    "calls_in_flight": (
        GaugeMetricFamily,
        "Calls sent to the instance and not yet answered.",
        ("service", "address"),
        operator.add,
    ),
    **{
        name: (CounterMetricFamily, text, ("service", "address"), operator.add)
        for name, text, _ in _INSTANCE_COUNTERS
    },
    **{
        name: (CounterMetricFamily, text, ("service",), operator.add)
        for name, text, _ in _SERVICE_COUNTERS
    },
    "retry_budget": (
        GaugeMetricFamily,
        "Retries the budget allows now.",
        ("service",),
        operator.add,
    ),
    "instances": (GaugeMetricFamily, "Instances in the client's view.", ("service",), max),
    "rejected_children": (
        GaugeMetricFamily,
        "Children of the service's registry path rejected now (bad payloads).",
        ("service",),
        max,
    ),
    "zookeeper_state": (
        GaugeMetricFamily,
        "1 for the client's ZooKeeper connection state now, 0 for the others.",
        ("service", "state"),
        max,
    ),
}


class _StatusCollector:
    """Reads each watched client's ``status()`` when scraped. Clients that share a service
    name (and so label sets) are combined into one series each: counts summed, states and
    streaks the largest (a second series of the same labels would make the scrape invalid)."""

    def __init__(self, clients: weakref.WeakSet[ServiceClient]) -> None:
        self._clients = clients

    def collect(self) -> Iterator[Metric]:
        values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _STATUS_FAMILIES}

        def add(name: str, labels: tuple[str, ...], value: float) -> None:
            series = values[name]
            known = series.get(labels)
            series[labels] = value if known is None else _STATUS_FAMILIES[name][3](known, value)

        for client in list(self._clients):
            status = client.status()
            service = status.service
            for instance in status.instances:
                labels = (service, instance.instance)
                for name, _, field in (*_INSTANCE_GAUGES, *_INSTANCE_COUNTERS):
                    add(name, labels, getattr(instance, field))
                add("instance_ejected", labels, 1.0 if instance.ejected else 0.0)
                add("calls_in_flight", labels, sum(instance.inflight))
            for name, _, field in _SERVICE_COUNTERS:
                add(name, (service,), getattr(status, field))
            add("retry_budget", (service,), status.retry_budget)
            add("instances", (service,), len(status.instances))
            if status.zookeeper is not None:
                add("rejected_children", (service,), status.rejected)
                for state in ZOOKEEPER_STATES:
                    add("zookeeper_state", (service, state), float(state == status.zookeeper))
        for name, (kind, text, names, _) in _STATUS_FAMILIES.items():
            family = kind(f"geventpool_client_{name}", text, labels=list(names))
            for where, value in values[name].items():
                family.add_metric(list(where), value)
            yield family


_SERVER_NUMBERS = (
    ("connections", "Connections the server holds now.", "connections", GaugeMetricFamily),
    ("accepted", "Connections the server accepted.", "accepted", CounterMetricFamily),
    (
        "handler_errors",
        "Calls whose handler raised an undeclared exception.",
        "handler_errors",
        CounterMetricFamily,
    ),
    ("killed", "Calls cut short by the drain timeout.", "killed", CounterMetricFamily),
    (
        "at_capacity",
        "Connections accepted as the last of max_connections (more wait in the backlog).",
        "at_capacity",
        CounterMetricFamily,
    ),
)
#: Why a server closed a connection for its request: the ``reason`` label of
#: ``geventpool_server_refused_total`` and the ``ServerStats`` field that counts it.
_REFUSALS = (("over_limits", "over_limits"), ("malformed", "malformed"))


class ServerMetrics:
    """The calls and numbers of :class:`~geventpool.server.thrift_server.ThriftServer`
    instances, in ``registry`` (default: the process's). As a
    :class:`~geventpool.server.observing.ServerObserver` (given by :meth:`watch`) it counts
    every call by port, method and outcome (``geventpool_server_calls_total``) and times its
    handler (``geventpool_server_call_duration_seconds``, by port and method); at each
    scrape it reads each watched server's ``stats``: ``geventpool_server_connections``,
    ``..._accepted_total``, ``..._handler_errors_total``, ``..._killed_total``,
    ``..._at_capacity_total`` and ``..._refused_total`` (connections closed for a request
    over the wire limits or malformed, label ``reason``); label ``port``."""

    observes_starts = False  # a call is counted when it ends

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._counted = _Counted(histograms=1)
        self._slots = self._counted.slots
        self._servers: weakref.WeakSet[ThriftServer] = weakref.WeakSet()
        registry.register(self)

    def watch(self, server: ThriftServer) -> ThriftServer:
        """Observe ``server``'s calls and report its numbers at each scrape (until it is
        garbage)."""
        server.observe(self)
        self._servers.add(server)
        return server

    def call_started(self, call: ServedCall) -> None:
        """Nothing: a call is counted when it ends (``observes_starts`` is False)."""

    def call_ended(
        self, call: ServedCall, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        """Count the call and keep its duration."""
        key = (call[0], call[1], outcome)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._counted.new_slot(key)
        slot.count += 1
        durations = slot.durations
        durations.append(duration)
        if len(durations) >= FOLD_EVERY:
            slot.fold()

    def collect(self) -> Iterator[Metric]:
        """The calls and their durations, and each watched server's numbers, as they are now."""
        counted = self._counted
        yield counted.counter(
            "geventpool_server_calls", "Calls the server ran, by outcome.", ["port", "method"]
        )
        yield counted.histogram(
            0,
            "geventpool_server_call_duration_seconds",
            "Seconds each call's handler ran.",
            ["port", "method"],
        )
        families = [
            (kind(f"geventpool_server_{name}", text, labels=["port"]), field)
            for name, text, field, kind in _SERVER_NUMBERS
        ]
        refused = CounterMetricFamily(
            "geventpool_server_refused",
            "Connections closed for a request over the wire limits or malformed.",
            labels=["port", "reason"],
        )
        for server in list(self._servers):
            port, stats = str(server.port), server.stats
            for family, field in families:
                family.add_metric([port], getattr(stats, field))
            for reason, field in _REFUSALS:
                refused.add_metric([port, reason], getattr(stats, field))
        for family, _ in families:
            yield family
        yield refused
