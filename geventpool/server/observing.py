"""Watching every call a :class:`~geventpool.server.thrift_server.ThriftServer` runs: the hook
that its metrics and tracing hang on.

A :class:`ServerObserver` given to the server (``ThriftServer(observers=[...])``) is told when
each call's handler starts and how the call ended: the server's port, the method, the outcome
(one of :data:`SERVER_OUTCOMES`, a bounded set fit for a metric label) and the seconds the
handler ran. A request for a method the IDL does not have is told too (its handler never
runs: duration 0). Observers run in the greenlet of the call, like the client's (see
:mod:`geventpool.observers`): they must only record, never block.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from geventpool.observers import Observers

OK = "ok"
DECLARED_EXCEPTION = "declared_exception"  # answered with an exception the IDL declares
APPLICATION_ERROR = "application_error"  # the handler raised TApplicationException
HANDLER_ERROR = "handler_error"  # an undeclared exception or a result the IDL does not allow
UNKNOWN_METHOD = "unknown_method"
CANCELLED = "cancelled"  # killed (the drain timeout, say) before it ended
SERVER_OUTCOMES = (
    OK,
    DECLARED_EXCEPTION,
    APPLICATION_ERROR,
    HANDLER_ERROR,
    UNKNOWN_METHOD,
    CANCELLED,
)


#: The method of every call for a method the IDL does not have: the names a peer sends are
#: not kept (each would be a metric label of its own), and no Thrift identifier looks so.
UNKNOWN_NAME = "<unknown>"


class ServedCall(NamedTuple):
    """One call a server runs: the server's port and the method (:data:`UNKNOWN_NAME` for
    one the IDL does not have)."""

    port: int
    method: str


class ServerObserver(Protocol):
    """What a :class:`ThriftServer` tells an observer about each call."""

    def call_started(self, call: ServedCall) -> None:
        """``call``'s handler is about to run."""

    def call_ended(
        self, call: ServedCall, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        """``call`` ended with ``outcome`` (one of :data:`SERVER_OUTCOMES`) after its handler
        ran ``duration`` seconds; ``error`` is what the handler raised (None if it returned)."""


def server_observers(observers: tuple[ServerObserver, ...]) -> Observers[ServedCall]:
    """The dispatch of a server's calls to ``observers``."""
    return Observers(observers, "call_started", "call_ended", lambda call: {"port": call.port})
