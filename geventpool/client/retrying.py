"""When a failed call may be made again, and how much retrying a client may do.

:class:`Retry` is an immutable policy (in the manner of urllib3's): which methods are
idempotent, how many further attempts, the back-off between them, an optional timeout per
attempt, and which exceptions declared in the IDL mean "not run, try elsewhere". Its rules:

* **A call that was not sent may always go elsewhere**: a connect that failed, a pool that
  retired or ejected its instance while the caller waited, a pipelined request that was never
  written (:func:`classify` says ``UNSENT``).
* **A call that may have run is sent again only if it is idempotent**: a failure on the wire
  after the request was written, or an attempt that ran out of its ``attempt_timeout``
  (``RESEND``).
* **A declared exception listed in** ``retry_on`` (an ``Overloaded``, say) is the server saying
  it did not run the call: any method may be sent again (``RESEND``).
* Everything else is the call's outcome and reaches the caller as it is: other declared
  exceptions, ``TApplicationException``, bad arguments, exhaustion, the total deadline.
* Always within the call's total deadline, another instance first when there is one.

:class:`RetryBudget` is Finagle's retry budget: over a sliding ``window`` a client may retry
``percent`` of its calls plus ``min_per_second`` retries a second, so an outage of every
instance cannot multiply the load on them. Every retry that contacts an instance again draws
on it: a call sent again, and a connect retried on another instance; a pipelined request
that was never written, or a waiter sent elsewhere, costs nothing.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from geventpool import events
from geventpool.errors import (
    CallTimeoutError,
    ConfigurationError,
    ConnectionClosedError,
    PoolClosedError,
    TransportError,
)
from geventpool.validation import check_seconds

UNSENT = "unsent"
"""Nothing reached the server: the call may go elsewhere, whatever the method."""
RESEND = "resend"
"""The call may have run (or the server declined it): sent again only as the policy allows."""

Idempotent = bool | Collection[str] | Callable[[str], bool]


@dataclass(frozen=True)
class Retry:
    """How a client makes a failed call again.

    ``retries``: further attempts after the first (each on another instance while one is
    left). ``idempotent``: which methods may be sent again after they may have run: False
    (none, the default), True (all), a collection of method names, or a predicate on the
    name. ``retry_on``: names (or classes) of exceptions declared in the IDL that mean the
    server did not run the call. ``backoff``: the delay before the first retry, doubled for
    each one after it up to ``max_backoff``, each drawn at random between zero and that
    (full jitter); 0 retries at once. ``attempt_timeout``: the longest one attempt may take
    once it has its connection (None: the whole deadline), so that an idempotent call stuck
    on a frozen instance is sent elsewhere while its deadline still has time.
    """

    retries: int = 2
    idempotent: Idempotent = False
    retry_on: Collection[str | type] = frozenset()
    backoff: float = 0.0
    max_backoff: float = 1.0
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, not {self.retries!r}")
        idempotent = self.idempotent
        if not isinstance(idempotent, bool) and not callable(idempotent):
            names = _names(idempotent, "idempotent")
            object.__setattr__(self, "idempotent", names)
        object.__setattr__(self, "retry_on", _names(self.retry_on, "retry_on"))
        check_seconds("backoff", self.backoff, zero=True)
        check_seconds("max_backoff", self.max_backoff, zero=True)
        check_seconds("attempt_timeout", self.attempt_timeout, optional=True)

    def may_resend(self, method: str) -> bool:
        """Whether ``method`` may be sent again after it may have run."""
        idempotent = self.idempotent
        if isinstance(idempotent, bool):
            return idempotent
        if callable(idempotent):
            return bool(idempotent(method))
        return method in idempotent

    def delay(self, retry: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        if self.backoff <= 0:
            return 0.0
        ceiling: float = min(self.max_backoff, self.backoff * 2.0 ** (retry - 1))
        return draw() * ceiling


def _names(value: object, what: str) -> frozenset[str]:
    """Method or exception names from a collection of names or classes."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{what} must be a collection of names, not {value!r}")
    names = set()
    for item in value:
        if isinstance(item, type):
            names.add(item.__name__)
        elif isinstance(item, str) and item:
            names.add(item)
        else:
            raise ConfigurationError(f"{what} must hold names or classes, not {item!r}")
    return frozenset(names)


def classify(error: BaseException, retry: Retry, method: str, time_left: bool) -> str | None:
    """Whether the call that failed with ``error`` may be made again: :data:`UNSENT`,
    :data:`RESEND` or None (``error`` is the call's outcome). ``time_left``: whether the
    call's total deadline has time for another attempt."""
    if isinstance(error, (ConnectionClosedError, PoolClosedError)):
        return UNSENT if time_left else None
    if isinstance(error, CallTimeoutError):
        if not time_left:
            return None
        if not error.sent:
            return UNSENT
        return RESEND if retry.may_resend(method) else None
    if isinstance(error, TransportError):
        return RESEND if time_left and retry.may_resend(method) else None
    if type(error).__name__ in retry.retry_on:
        return RESEND if time_left else None
    return None


class RetryBudget:
    """Finagle's retry budget: over the last ``window`` seconds, retries may reach
    ``percent`` of the calls plus ``min_per_second`` per second of the window.

    Counting a call costs one increment of :attr:`calls` (the client's call path does it);
    the window is kept by marks of the counters, taken by :meth:`tick` (the client's reaper
    calls it every ``reap_interval``) and whenever a retry is asked for.
    """

    def __init__(
        self,
        percent: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise ConfigurationError(f"percent must be a number, not {percent!r}")
        if not 0 <= percent <= 10:
            raise ConfigurationError(f"percent must be from 0 to 10, not {percent!r}")
        check_seconds("min_per_second", min_per_second, zero=True)
        check_seconds("window", window)
        self.percent = float(percent)
        self.min_per_second = float(min_per_second)
        self.window = float(window)
        self.clock = clock
        self.calls = 0  # calls since the start: the client adds one per call
        self.retries = 0  # retries taken since the start
        self.refused = 0  # retries the budget refused
        self._marks: deque[tuple[float, int, int]] = deque([(clock(), 0, 0)])

    def tick(self, now: float) -> None:
        """Mark the counters at ``now``; marks older than the window go, but the newest of
        them, which is where the window begins."""
        marks = self._marks
        if now - marks[-1][0] >= 0.5:
            marks.append((now, self.calls, self.retries))
        start = now - self.window
        while len(marks) > 1 and marks[1][0] <= start:
            marks.popleft()

    def available(self, now: float) -> float:
        """Retries the budget allows at ``now``."""
        self.tick(now)
        _, calls, retries = self._marks[0]
        allowed = self.percent * (self.calls - calls) + self.min_per_second * self.window
        return allowed - (self.retries - retries)

    def withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False (counted in ``refused``) if it is spent."""
        if self.available(now) < 1:
            self.refused += 1
            return False
        self.retries += 1
        return True

    def describe(self) -> str:
        """The budget's shape, for errors and events."""
        return f"{self.percent:.0%} of calls plus {self.min_per_second:g}/s over {self.window:g}s"


def emit_retry(service: str, method: str, attempt: int, error: BaseException, how: str) -> None:
    """The ``call_retried`` event (debug): one more attempt of a call."""
    events.emit(
        events.CALL_RETRIED,
        "debug",
        service=service,
        method=method,
        attempt=attempt,
        reason=how,
        error=repr(error)[:200],
    )
