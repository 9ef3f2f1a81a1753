"""What an operator receives: one condition starting (firing) or ending (resolved)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FIRING, RESOLVED = "firing", "resolved"


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass(frozen=True)
class Notification:
    """A condition's state, with the numbers of the last event that reported it.

    ``since`` and ``at`` are Unix times (when it started, when this was written); ``repeat``
    counts earlier notices of the same occurrence; ``details`` are the event's fields.
    """

    status: str
    condition: str
    title: str
    severity: str
    advice: str
    service: str | None
    subject: str
    since: float
    at: float
    repeat: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """One line, for a subject or a chat message's first line."""
        state = "RESOLVED" if self.status == RESOLVED else self.severity.upper()
        what = self.subject or self.service or ""
        return f"[geventpool] {state} {self.condition}: {what}"

    @property
    def short(self) -> str:
        """The summary and when it started: one line for an SMS."""
        return f"{self.summary} since {_stamp(self.since)}"

    @property
    def text(self) -> str:
        """The whole message: what, where, since when, the numbers, what to do."""
        lines = [
            self.summary,
            "",
            self.title if self.status != RESOLVED else f"resolved: {self.title}",
        ]
        if self.service:
            lines.append(f"service: {self.service}")
        if self.subject and self.subject != self.service:
            lines.append(f"subject: {self.subject}")
        minutes, seconds = divmod(int(self.at - self.since), 60)
        lines.append(f"since: {_stamp(self.since)} ({minutes}m{seconds:02d}s)")
        numbers = self._numbers()
        if numbers:
            lines.append(numbers)
        for instance in self.details.get("instances") or ():
            lines.append(
                f"  {instance.get('instance')}: in use {instance.get('in_use')}/"
                f"{instance.get('max')}, waiters {instance.get('waiters')}"
            )
        if self.status != RESOLVED:
            lines.append(f"advice: {self.advice}")
        return "\n".join(lines)

    def _numbers(self) -> str:
        details = self.details
        if "max_connections" in details:
            return (
                f"connections: {details.get('in_use')} of {details.get('max_connections')} in use,"
                f" {details.get('waiters')} callers waiting, waited {details.get('waited')}s,"
                f" {details.get('suppressed', 0)} more refused since the last report"
            )
        shown = {k: v for k, v in details.items() if k not in ("instances", "advice", "service")}
        return ", ".join(f"{key}: {value}" for key, value in shown.items())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the generic webhook's body)."""
        return {
            "status": self.status,
            "condition": self.condition,
            "severity": self.severity,
            "service": self.service,
            "subject": self.subject,
            "title": self.title,
            "summary": self.summary,
            "since": _stamp(self.since),
            "at": _stamp(self.at),
            "since_unix": self.since,
            "at_unix": self.at,
            "repeat": self.repeat,
            "advice": self.advice,
            "details": dict(self.details),
            "text": self.text,
        }
