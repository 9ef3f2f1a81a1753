"""Watching every attempt of every call: the hook that metrics and tracing hang on.

A :class:`CallObserver` given to :class:`~geventpool.client.service.ServiceClient`
(``observers=``) is told when each attempt starts and how it ended: the service, the method,
the instance, the attempt's number within its call (1, then 2 for the first retry, ...), how
long it waited for its connection, the outcome (one of :data:`OUTCOMES`, a bounded set fit for
a metric label) and how long the attempt took on the client's clock (from the send's start to
its end; the wait for a connection is not in it). Hedged backups are attempts of their own,
numbered from 1.

Observers run in the caller's greenlet, on the call path: they must only record, never
block. One that raises loses nothing but its own record (see :mod:`geventpool.observers`);
one that needs only the ends sets ``observes_starts = False``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import gevent
from thriftpy2.thrift import TApplicationException, TException

from geventpool.errors import CallTimeoutError, GeventPoolError, TransportError
from geventpool.observers import Observers, new_record

OK = "ok"
DECLARED_EXCEPTION = "declared_exception"  # the server answered with an IDL exception
APPLICATION_ERROR = "application_error"  # the server answered TApplicationException
TIMEOUT = "timeout"
TRANSPORT_ERROR = "transport_error"
ERROR = "error"  # any other failure on this side (arguments, a closed pool, ...)
CANCELLED = "cancelled"  # the caller's greenlet was killed or its own gevent.Timeout fired
OUTCOMES = (OK, DECLARED_EXCEPTION, APPLICATION_ERROR, TIMEOUT, TRANSPORT_ERROR, ERROR, CANCELLED)


class Attempt(NamedTuple):
    """One attempt of a call: where it goes, which one it is, and the seconds it waited for
    its connection (a tuple: made once per attempt on the call path, it must be cheap)."""

    service: str
    method: str
    instance: str
    attempt: int
    waited: float = 0.0


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


def client_observers(observers: tuple[CallObserver, ...]) -> Observers[Attempt]:
    """The dispatch of a client's attempts to ``observers``."""
    return Observers(
        observers, "attempt_started", "attempt_ended", lambda attempt: {"service": attempt.service}
    )


__all__ = ["OUTCOMES", "Attempt", "CallObserver", "client_observers", "new_record", "outcome_of"]
