"""The alerting policy, as pure logic: events and time in, notifications out.

:class:`AlertPolicy` promises, for each occurrence of a condition (a condition and its key,
e.g. ``pool_exhausted`` of service ``calc``):

* **Dedupe.** Any number of events while it lasts make one firing notice, then one
  **repeat** every ``repeat_interval`` seconds while it goes on (0: no repeats).
* **Grace.** A condition with a ``pending`` grace (ZooKeeper unreachable) is told only once it
  has lasted that long; if it ends first, nothing is told.
* **Resolved.** When it ends (its clearing event, or ``resolve_after`` seconds without news
  for self-reporting conditions) a resolved notice follows, if and only if a firing notice
  went out for it.
* **Rate limit.** At most ``rate_limit`` firing notices (first ones and repeats, all
  conditions together) per ``rate_window`` seconds; one over the limit is not sent but counted
  (``suppressed``) and tried again at its next repeat. Resolved notices are never limited:
  they are bounded by the firing ones sent.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from geventpool.alerts.conditions import CONDITIONS, Condition
from geventpool.alerts.notification import FIRING, RESOLVED, Notification
from geventpool.errors import ConfigurationError
from geventpool.validation import check_seconds


@dataclass(frozen=True)
class AlertSettings:
    """The alerter's settings; durations in float seconds.

    ``resolve_after`` must be longer than the interval at which a self-reporting condition
    reports itself (a client reports exhaustion at most once a second), or the condition
    would resolve between two reports. ``queue_size`` bounds the events waiting for the
    alerter (more are dropped and counted); ``channel_queue_size`` the notifications waiting
    for each channel. ``delivery_timeout`` bounds one delivery attempt; ``retries`` more
    attempts follow a failed one, after ``retry_backoff`` seconds doubled each time. ``tick``
    is how often the time-based rules are checked.
    """

    rate_limit: int = 20
    rate_window: float = 60.0
    repeat_interval: float = 600.0
    resolve_after: float = 30.0
    zookeeper_grace: float = 30.0
    queue_size: int = 1000
    channel_queue_size: int = 100
    delivery_timeout: float = 10.0
    retries: int = 3
    retry_backoff: float = 1.0
    tick: float = 0.5

    def __post_init__(self) -> None:
        for name in ("rate_limit", "queue_size", "channel_queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, not {value!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, not {self.retries!r}")
        for name in ("rate_window", "resolve_after", "delivery_timeout", "tick"):
            check_seconds(name, getattr(self, name))
        for name in ("repeat_interval", "zookeeper_grace", "retry_backoff"):
            check_seconds(name, getattr(self, name), zero=True)


@dataclass
class _Occurrence:
    condition: Condition
    key: tuple[str, ...]
    fields: Mapping[str, Any]
    started: float  # clock
    since: float  # wall clock
    last_event: float
    told: bool = False  # a firing notice went out
    scheduled: bool = False  # the first notice was due (sent or suppressed)
    last_notice: float = 0.0
    notices: int = 0


@dataclass
class PolicyStats:
    """Counters: notices ``fired`` (first ones), ``repeated``, ``resolved``, ``suppressed``."""

    fired: int = 0
    repeated: int = 0
    resolved: int = 0
    suppressed: int = 0
    by_condition: dict[str, int] = field(default_factory=dict)


class AlertPolicy:
    """The state of every condition occurrence; see the module for the rules."""

    def __init__(
        self,
        settings: AlertSettings,
        conditions: Sequence[Condition] = CONDITIONS,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._conditions = tuple(conditions)
        self._wall = wall
        self._open: dict[tuple[str, tuple[str, ...]], _Occurrence] = {}
        self._sent: deque[float] = deque()
        self.stats = PolicyStats()

    @property
    def active(self) -> list[tuple[str, tuple[str, ...]]]:
        """The occurrences going on now: (condition, key)."""
        return list(self._open)

    def observe(self, event: str, fields: Mapping[str, Any], now: float) -> list[Notification]:
        """Take one event at clock time ``now``; return the notices due at once."""
        notices: list[Notification] = []
        for condition in self._conditions:
            if condition.fires(event, fields):
                key = condition.key(fields)
                occurrence = self._open.get((condition.name, key))
                if occurrence is None:
                    occurrence = _Occurrence(condition, key, fields, now, self._wall(), now)
                    self._open[(condition.name, key)] = occurrence
                else:
                    occurrence.fields, occurrence.last_event = fields, now
            elif condition.clears(event, fields):
                occurrence = self._open.pop((condition.name, condition.key(fields)), None)
                if occurrence is not None and occurrence.told:
                    notices.append(self._resolved(occurrence))
        return notices + self.tick(now)

    def tick(self, now: float) -> list[Notification]:
        """Apply the time-based rules at clock time ``now``; return the notices due."""
        notices: list[Notification] = []
        settings = self._settings
        for name_key, occurrence in list(self._open.items()):
            condition = occurrence.condition
            if condition.auto_resolve and now - occurrence.last_event >= settings.resolve_after:
                del self._open[name_key]
                if occurrence.told:
                    notices.append(self._resolved(occurrence))
                continue
            if not occurrence.scheduled:
                grace = getattr(settings, condition.pending) if condition.pending else 0.0
                if now - occurrence.started >= grace:
                    occurrence.scheduled = True
                    notices.extend(self._firing(occurrence, now))
            elif (
                settings.repeat_interval
                and now - occurrence.last_notice >= settings.repeat_interval
            ):
                notices.extend(self._firing(occurrence, now))
        return notices

    def _firing(self, occurrence: _Occurrence, now: float) -> list[Notification]:
        occurrence.last_notice = now
        window = self._settings.rate_window
        while self._sent and now - self._sent[0] >= window:
            self._sent.popleft()
        if len(self._sent) >= self._settings.rate_limit:
            self.stats.suppressed += 1
            return []
        self._sent.append(now)
        repeat = occurrence.notices
        occurrence.notices += 1
        occurrence.told = True
        if repeat:
            self.stats.repeated += 1
        else:
            self.stats.fired += 1
        name = occurrence.condition.name
        self.stats.by_condition[name] = self.stats.by_condition.get(name, 0) + 1
        return [self._notice(occurrence, FIRING, repeat)]

    def _resolved(self, occurrence: _Occurrence) -> Notification:
        self.stats.resolved += 1
        return self._notice(occurrence, RESOLVED, occurrence.notices)

    def _notice(self, occurrence: _Occurrence, status: str, repeat: int) -> Notification:
        condition = occurrence.condition
        fields = occurrence.fields
        subject = " ".join(part for part in occurrence.key if part)
        return Notification(
            status=status,
            condition=condition.name,
            title=condition.title,
            severity=condition.severity,
            advice=str(fields.get("advice") or condition.advice),
            service=fields.get("service"),
            subject=subject,
            since=occurrence.since,
            at=self._wall(),
            repeat=repeat,
            details=dict(fields),
        )
