"""The alerter: events in, notifications out, on greenlets of its own.

:class:`Alerter` promises:

* **A caller never waits.** Its event listener only puts the event in a bounded queue; when
  the queue is full the event is dropped and counted (``alert_queue_full``, at most one log
  line a second).
* **Channels never wait for each other.** Each channel has its own bounded queue and delivery
  greenlet, so a black-holed webhook does not delay the email.
* **Delivery is bounded and never raises.** Each attempt is cut after ``delivery_timeout``;
  a failed one (``alert_delivery_failed``) is retried ``retries`` times with a back-off that
  doubles from ``retry_backoff``; then the notification is dropped (``alert_dropped``, with
  the reason). Errors are logged with every secret of the channel redacted.
* The policy (dedupe, repeats, grace, resolved notices, rate limit) is
  :class:`~geventpool.alerts.policy.AlertPolicy`'s; ``alert_suppressed`` logs its drops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.queue

from geventpool import events
from geventpool.alerts.channels import Channel
from geventpool.alerts.conditions import CONDITIONS, Condition
from geventpool.alerts.notification import Notification
from geventpool.alerts.policy import AlertPolicy, AlertSettings
from geventpool.secret import redact


@dataclass
class ChannelStats:
    """Per channel: notifications ``delivered``, failed ``attempts``, ``dropped`` ones."""

    delivered: int = 0
    failed_attempts: int = 0
    dropped: int = 0
    last_error: str | None = None


class ChannelWorker:
    """The bounded queue and delivery greenlet of one channel."""

    def __init__(self, channel: Channel, settings: AlertSettings) -> None:
        self.channel = channel
        self.stats = ChannelStats()
        self._settings = settings
        self._queue: gevent.queue.Queue[Notification] = gevent.queue.Queue(
            settings.channel_queue_size
        )
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def offer(self, notification: Notification) -> None:
        """Queue ``notification`` for delivery; drop it (counted, logged) if the queue is full."""
        try:
            self._queue.put_nowait(notification)
        except gevent.queue.Full:
            self._drop(notification, "the channel's queue is full")

    def stop(self, timeout: float) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            gevent.sleep(0.01)
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=1.0)

    def _run(self) -> None:
        while True:
            self._deliver(self._queue.get())

    def _deliver(self, notification: Notification) -> None:
        settings = self._settings
        for attempt in range(settings.retries + 1):
            timer = gevent.Timeout(settings.delivery_timeout)
            timer.start()
            try:
                self.channel.send(notification, settings.delivery_timeout)
            except gevent.Timeout as error:
                if error is not timer:
                    raise
                reason = f"no answer within {settings.delivery_timeout:g}s"
            except Exception as error:  # noqa: BLE001 - a channel must never take anything down
                reason = redact(f"{type(error).__name__}: {error}", self.channel.secrets())
            else:
                self.stats.delivered += 1
                return
            finally:
                timer.close()
            self.stats.failed_attempts += 1
            self.stats.last_error = reason
            events.emit(
                events.ALERT_DELIVERY_FAILED,
                "warning",
                channel=self.channel.name,
                condition=notification.condition,
                attempt=attempt + 1,
                error=reason,
            )
            if attempt < settings.retries:
                gevent.sleep(settings.retry_backoff * 2**attempt)
        self._drop(notification, f"{settings.retries + 1} attempts failed; last: {reason}")

    def _drop(self, notification: Notification, reason: str) -> None:
        self.stats.dropped += 1
        events.emit(
            events.ALERT_DROPPED,
            "error",
            channel=self.channel.name,
            condition=notification.condition,
            status=notification.status,
            service=notification.service,
            reason=reason,
        )


class Alerter:
    """Delivers notifications about geventpool's events through ``channels``."""

    def __init__(
        self,
        channels: Sequence[Channel],
        settings: AlertSettings | None = None,
        *,
        conditions: Sequence[Condition] = CONDITIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or AlertSettings()
        self.policy = AlertPolicy(self.settings, conditions)
        self.workers = [ChannelWorker(channel, self.settings) for channel in channels]
        self._clock = clock
        self._queue: gevent.queue.Queue[tuple[str, Mapping[str, Any]]] = gevent.queue.Queue(
            self.settings.queue_size
        )
        self._greenlet: gevent.Greenlet | None = None
        self._remove_listener: Callable[[], None] | None = None
        self.received = 0
        self.dropped_events = 0
        self._last_full_report = float("-inf")
        self._suppressed_reported = 0

    def start(self) -> Alerter:
        """Start listening to events and delivering; returns self."""
        if self._greenlet is None:
            for worker in self.workers:
                worker.start()
            self._greenlet = gevent.spawn(self._run)
            self._remove_listener = events.add_listener(self._listen)
        return self

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop listening; deliver what is queued for up to ``flush_timeout`` seconds."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        deadline = time.monotonic() + flush_timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            gevent.sleep(0.01)
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=1.0)
            self._greenlet = None
        for worker in self.workers:
            worker.stop(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Alerter:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _listen(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        if event.startswith("alert"):
            return  # the alerter's own events
        try:
            self._queue.put_nowait((event, fields))
        except gevent.queue.Full:
            self.dropped_events += 1
            now = time.monotonic()
            if now - self._last_full_report >= 1.0:
                self._last_full_report = now
                events.emit(events.ALERT_QUEUE_FULL, "error", dropped=self.dropped_events)

    def _run(self) -> None:
        tick = self.settings.tick
        while True:
            try:
                event, fields = self._queue.get(timeout=tick)
            except gevent.queue.Empty:
                notices = self.policy.tick(self._clock())
            else:
                self.received += 1
                notices = self.policy.observe(event, fields, self._clock())
            suppressed = self.policy.stats.suppressed
            for notice in notices:
                for worker in self.workers:
                    worker.offer(notice)
            if suppressed != self._suppressed_reported:
                self._suppressed_reported = suppressed
                events.emit(events.ALERT_SUPPRESSED, "warning", suppressed=suppressed)
