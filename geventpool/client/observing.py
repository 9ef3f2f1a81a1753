"""Watching every attempt of every call: the hook that metrics and tracing hang on.

A :class:`CallObserver` given to :class:`~geventpool.client.service.ServiceClient`
(``observers=``) is told when each attempt starts and how it ended: the service, the method,
the instance, the attempt's number within its call (1, then 2 for the first retry, ...), the
outcome (one of :data:`OUTCOMES`, a bounded set fit for a metric label) and how long the
attempt took on the client's clock (from the send's start to its end; the wait for a
connection is not in it). Hedged backups are attempts of their own, numbered from 1.

Observers run in the caller's greenlet, on the call path: they must only record, never
block. One that raises loses nothing but its own record: the call goes on, and the first
failure of each observer is told (``call_observer_failed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import gevent
from thriftpy2.thrift import TApplicationException, TException

from geventpool import events
from geventpool.errors import CallTimeoutError, GeventPoolError, TransportError

OK = "ok"
DECLARED_EXCEPTION = "declared_exception"  # the server answered with an IDL exception
APPLICATION_ERROR = "application_error"  # the server answered TApplicationException
TIMEOUT = "timeout"
TRANSPORT_ERROR = "transport_error"
ERROR = "error"  # any other failure on this side (arguments, a closed pool, ...)
CANCELLED = "cancelled"  # the caller's greenlet was killed or its own gevent.Timeout fired
OUTCOMES = (OK, DECLARED_EXCEPTION, APPLICATION_ERROR, TIMEOUT, TRANSPORT_ERROR, ERROR, CANCELLED)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a call: where it goes and which one it is."""

    service: str
    method: str
    instance: str
    attempt: int


class CallObserver(Protocol):
    """What a :class:`ServiceClient` tells an observer about each attempt."""

    def attempt_started(self, attempt: Attempt) -> None:
        """``attempt`` is about to be sent."""

    def attempt_ended(
        self, attempt: Attempt, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        """``attempt`` ended with ``outcome`` (one of :data:`OUTCOMES`) after ``duration``
        seconds; ``error`` is what it raised (None when it returned)."""


def outcome_of(error: BaseException) -> str:
    """The outcome an attempt that raised ``error`` had."""
    if isinstance(error, CallTimeoutError):
        return TIMEOUT
    if isinstance(error, TransportError):
        return TRANSPORT_ERROR
    if isinstance(error, TApplicationException):
        return APPLICATION_ERROR
    if isinstance(error, GeventPoolError):
        return ERROR
    if isinstance(error, TException):
        return DECLARED_EXCEPTION
    if isinstance(error, (gevent.GreenletExit, gevent.Timeout)):
        return CANCELLED
    return ERROR


class Observers:
    """The observers of one client, each told in turn; a failing one never breaks a call."""

    __slots__ = ("_failed", "_observers")

    def __init__(self, observers: tuple[CallObserver, ...]) -> None:
        self._observers = observers
        self._failed: set[int] = set()

    def started(self, attempt: Attempt) -> None:
        for observer in self._observers:
            try:
                observer.attempt_started(attempt)
            except Exception as failure:  # noqa: BLE001 - an observer never breaks a call
                self._tell(observer, attempt, failure)

    def ended(
        self, attempt: Attempt, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        for observer in self._observers:
            try:
                observer.attempt_ended(attempt, outcome, duration, error)
            except Exception as failure:  # noqa: BLE001
                self._tell(observer, attempt, failure)

    def _tell(self, observer: CallObserver, attempt: Attempt, failure: Exception) -> None:
        if id(observer) in self._failed:
            return
        self._failed.add(id(observer))
        events.emit(
            events.CALL_OBSERVER_FAILED,
            "error",
            service=attempt.service,
            observer=type(observer).__name__,
            error=f"{failure!r:.200}",
        )
