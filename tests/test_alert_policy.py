"""The alerting policy, exactly, on a fake clock: dedupe, repeats, grace, resolved notices,
the rate limit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from geventpool import events
from geventpool.alerts.notification import FIRING, RESOLVED, Notification
from geventpool.alerts.policy import AlertPolicy, AlertSettings
from geventpool.errors import ConfigurationError

EXHAUSTED = {
    "service": "calc",
    "max_connections": 20,
    "in_use": 20,
    "waiters": 57,
    "waited": 1.0,
    "suppressed": 12,
    "instances": [
        {"instance": "10.0.0.5:9090", "in_use": 10, "max": 10, "waiters": 30},
        {"instance": "10.0.0.6:9090", "in_use": 10, "max": 10, "waiters": 27},
    ],
    "advice": "add server instances",
}


def policy(**settings: Any) -> AlertPolicy:
    return AlertPolicy(AlertSettings(**settings), wall=lambda: 1_700_000_000.0)


def run(
    policy: AlertPolicy, script: Sequence[tuple[float, str | None, Mapping[str, Any]]]
) -> list[tuple[float, str, str, int]]:
    """Feed (time, event or None for a tick, fields); return (time, status, condition, repeat)."""
    told: list[tuple[float, str, str, int]] = []
    for now, event, fields in script:
        notices = policy.observe(event, fields, now) if event else policy.tick(now)
        told += [(now, n.status, n.condition, n.repeat) for n in notices]
    return told


def test_sustained_exhaustion_is_told_once_then_repeated_then_resolved() -> None:
    alerts = policy(repeat_interval=10.0, resolve_after=3.0)
    script: list[tuple[float, str | None, dict[str, Any]]] = [
        (float(t), events.POOL_EXHAUSTED, EXHAUSTED)
        for t in range(0, 25)  # one a second
    ]
    script += [(float(t), None, {}) for t in range(25, 30)]
    assert run(alerts, script) == [
        (0.0, FIRING, "pool_exhausted", 0),
        (10.0, FIRING, "pool_exhausted", 1),
        (20.0, FIRING, "pool_exhausted", 2),
        (27.0, RESOLVED, "pool_exhausted", 3),  # 3 s after the last report at 24 s
    ]
    assert (alerts.stats.fired, alerts.stats.repeated, alerts.stats.resolved) == (1, 2, 1)


def test_occurrences_are_told_apart_by_their_key() -> None:
    alerts = policy()
    told = run(
        alerts,
        [
            (0.0, events.INSTANCE_EJECTED, {"service": "calc", "instance": "a:1"}),
            (0.5, events.INSTANCE_EJECTED, {"service": "calc", "instance": "a:1"}),
            (1.0, events.INSTANCE_EJECTED, {"service": "calc", "instance": "b:1"}),
            (2.0, events.INSTANCE_RESTORED, {"service": "calc", "instance": "a:1"}),
            (3.0, events.INSTANCE_LEFT, {"service": "calc", "instance": "b:1"}),
        ],
    )
    assert told == [
        (0.0, FIRING, "instance_ejected", 0),
        (1.0, FIRING, "instance_ejected", 0),
        (2.0, RESOLVED, "instance_ejected", 1),
        (3.0, RESOLVED, "instance_ejected", 1),
    ]


def test_an_unresponsive_instance_is_its_own_condition_and_ends_when_it_answers() -> None:
    alerts = policy()
    where = {"service": "calc", "instance": "a:1"}
    told = run(
        alerts,
        [
            (0.0, events.INSTANCE_EJECTED, where),
            (0.0, events.INSTANCE_UNRESPONSIVE, {**where, "timeouts": 3}),
            (5.0, events.INSTANCE_RESTORED, where),
        ],
    )
    assert told == [
        (0.0, FIRING, "instance_ejected", 0),
        (0.0, FIRING, "instance_unresponsive", 0),
        (5.0, RESOLVED, "instance_ejected", 1),
        (5.0, RESOLVED, "instance_unresponsive", 1),
    ]


def test_zookeeper_outage_is_told_only_after_its_grace_and_resolved_on_reconnect() -> None:
    zk = events.ZOOKEEPER_STATE_CHANGED
    hosts = {"hosts": "zk1:2181"}
    alerts = policy(zookeeper_grace=5.0)
    short = run(
        alerts,
        [
            (0.0, zk, {**hosts, "state": "SUSPENDED"}),
            (4.0, None, {}),
            (4.5, zk, {**hosts, "state": "CONNECTED"}),
        ],
    )
    assert short == []  # over before its grace: nobody is woken
    long = run(
        alerts,
        [
            (10.0, zk, {**hosts, "state": "SUSPENDED"}),
            (12.0, zk, {**hosts, "state": "LOST"}),
            (15.0, None, {}),
            (20.0, zk, {**hosts, "state": "CONNECTED"}),
        ],
    )
    assert long == [
        (15.0, FIRING, "zookeeper_unreachable", 0),
        (20.0, RESOLVED, "zookeeper_unreachable", 1),
    ]


def test_the_rate_limit_suppresses_firing_notices_but_never_resolved_ones() -> None:
    alerts = policy(rate_limit=2, rate_window=10.0, repeat_interval=0)
    unavailable = [(float(n), events.SERVICE_UNAVAILABLE, {"service": f"s{n}"}) for n in range(4)]
    back = [(5.0 + n, events.SERVICE_AVAILABLE, {"service": f"s{n}"}) for n in range(4)]
    later = [(12.0, events.SERVICE_UNAVAILABLE, {"service": "s9"})]
    assert run(alerts, unavailable + back + later) == [
        (0.0, FIRING, "no_instances", 0),
        (1.0, FIRING, "no_instances", 0),
        (5.0, RESOLVED, "no_instances", 1),  # s2 and s3 were never told: no resolved for them
        (6.0, RESOLVED, "no_instances", 1),
        (12.0, FIRING, "no_instances", 0),  # the window has room again
    ]
    assert alerts.stats.suppressed == 2


def test_a_suppressed_notice_is_retried_at_each_repeat_while_the_limit_allows() -> None:
    alerts = policy(rate_limit=1, rate_window=10.0, repeat_interval=4.0)
    told = run(
        alerts,
        [
            (0.0, events.SERVICE_UNAVAILABLE, {"service": "a"}),
            (1.0, events.SERVICE_UNAVAILABLE, {"service": "b"}),  # over the limit
            (5.0, None, {}),  # both repeats due; still no room
            (10.0, None, {}),  # a's notice at 0 left the window: room for one
        ],
    )
    # a takes the only slot at 0 and again at 10 (its notice from 0 left the window); b was
    # suppressed at 1, 5 and 10, a at 5
    assert told == [(0.0, FIRING, "no_instances", 0), (10.0, FIRING, "no_instances", 1)]
    assert alerts.stats.suppressed == 4


def test_the_exhaustion_notice_states_the_numbers_and_the_advice() -> None:
    [notice] = policy().observe(events.POOL_EXHAUSTED, EXHAUSTED, 0.0)
    assert isinstance(notice, Notification)
    text = notice.text
    for expected in (
        "calc",
        "20 of 20 in use",
        "57 callers waiting",
        "10.0.0.5:9090: in use 10/10, waiters 30",
        "advice: add server instances",
        "since: 2023-11-14T22:13:20Z",
    ):
        assert expected in text
    assert notice.summary == "[geventpool] CRITICAL pool_exhausted: calc"


@pytest.mark.parametrize(
    "settings", [{"rate_limit": 0}, {"rate_window": 0}, {"retries": -1}, {"queue_size": True}]
)
def test_invalid_alert_settings_raise_configuration_error(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        AlertSettings(**settings)
