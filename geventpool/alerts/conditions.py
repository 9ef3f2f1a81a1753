"""The conditions worth telling an operator about, and the events that start and end them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from geventpool import events

Match = Callable[[str, Mapping[str, Any]], bool]


def _named(*names: str) -> Match:
    wanted = frozenset(names)
    return lambda event, fields: event in wanted


def _never(event: str, fields: Mapping[str, Any]) -> bool:
    return False


def _zookeeper(*states: str) -> Match:
    wanted = frozenset(states)
    return lambda event, fields: (
        event == events.ZOOKEEPER_STATE_CHANGED and fields.get("state") in wanted
    )


@dataclass(frozen=True)
class Condition:
    """One alertable condition.

    It starts (or goes on) on an event ``fires`` matches and ends on one ``clears`` matches;
    ``key_fields`` name the event fields that tell its occurrences apart (per service, per
    instance...). With ``auto_resolve`` it ends when no starting event came for the policy's
    ``resolve_after`` seconds (exhaustion only ever reports itself). ``pending`` names the
    :class:`~geventpool.alerts.policy.AlertSettings` field giving how long it must last before
    it is told (None: at once).
    """

    name: str
    title: str
    severity: str
    advice: str
    fires: Match
    clears: Match
    key_fields: tuple[str, ...]
    auto_resolve: bool = False
    pending: str | None = None

    def key(self, fields: Mapping[str, Any]) -> tuple[str, ...]:
        """What tells this occurrence apart from others of the same condition."""
        return tuple(str(fields.get(name, "")) for name in self.key_fields)


CONDITIONS: tuple[Condition, ...] = (
    Condition(
        name="pool_exhausted",
        title="connection pool exhausted: every connection busy, callers refused",
        severity="critical",
        advice="add server instances (or raise max_connections if the servers have room)",
        fires=_named(events.POOL_EXHAUSTED),
        clears=_never,
        key_fields=("service",),
        auto_resolve=True,
    ),
    Condition(
        name="no_instances",
        title="no live instance of the service",
        severity="critical",
        advice="start server instances and check that they register",
        fires=_named(events.SERVICE_UNAVAILABLE),
        clears=_named(events.SERVICE_AVAILABLE),
        key_fields=("service",),
    ),
    Condition(
        name="empty_protection",
        title="every instance vanished from the registry at once; the last known set is used",
        severity="critical",
        advice="check the registry and the last deployment before the protection expires",
        fires=_named(events.EMPTY_PROTECTION_ENGAGED),
        clears=_named(events.EMPTY_PROTECTION_CLEARED, events.EMPTY_PROTECTION_EXPIRED),
        key_fields=("service",),
    ),
    Condition(
        name="instance_ejected",
        title="instance ejected after repeated failures",
        severity="warning",
        advice="check the instance; clients probe it again and restore it when it answers",
        fires=_named(events.INSTANCE_EJECTED),
        clears=_named(events.INSTANCE_RESTORED, events.INSTANCE_LEFT),
        key_fields=("service", "instance"),
    ),
    Condition(
        name="instance_unresponsive",
        title="instance does not answer: its calls time out",
        severity="warning",
        advice="the instance takes connections but does not answer (frozen, overloaded or"
        " cut off): check it; clients route around it and probe it again",
        fires=_named(events.INSTANCE_UNRESPONSIVE),
        clears=_named(events.INSTANCE_RESTORED, events.INSTANCE_LEFT),
        key_fields=("service", "instance"),
    ),
    Condition(
        name="zookeeper_unreachable",
        title="ZooKeeper unreachable",
        severity="critical",
        advice="check the ZooKeeper ensemble and the network; clients serve their cached view",
        fires=_zookeeper("SUSPENDED", "LOST"),
        clears=_zookeeper("CONNECTED", "CLOSED"),
        key_fields=("hosts",),
        pending="zookeeper_grace",
    ),
)
