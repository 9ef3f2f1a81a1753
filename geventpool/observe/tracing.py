"""OpenTelemetry spans of geventpool's calls (the ``tracing`` extra: ``opentelemetry-api``).

:class:`ClientTracing` is a :class:`~geventpool.client.observing.CallObserver`: every attempt
of a call becomes a span of kind CLIENT, a child of whatever span is current in the caller's
greenlet, named ``<service>/<method>``, with the attributes ``rpc.system`` (``thrift``),
``rpc.service``, ``rpc.method``, ``server.address``, ``server.port``,
``geventpool.attempt`` (1, 2 for the first retry, ...) and ``geventpool.pool_wait``
(seconds waited for the connection); an attempt that failed gets the status ERROR, its
exception recorded (an exception the IDL declares is an answer, not an error); every span
has ``geventpool.outcome``. :class:`ServerTracing` is a
:class:`~geventpool.server.observing.ServerObserver`: every call a ``ThriftServer`` runs
becomes a span of kind SERVER, current while the handler runs (so the handler's own spans
are its children), named after the method.

Thrift messages carry no headers, so the trace context does not travel from client to
server: each side's spans are joined by time and by ``server.port``, not by parentage.

Give ``tracer_provider`` to use one other than the global one. The spans cost the call path
what the SDK makes them cost (a few microseconds each with the SDK's batch processor);
without an SDK configured the API's no-op tracer makes them nearly free.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from geventpool.client import observing as client_outcomes
from geventpool.client.observing import Attempt
from geventpool.server import observing as server_outcomes
from geventpool.server.observing import ServedCall

_SCOPE = "geventpool"
_ANSWERED = frozenset(
    {
        client_outcomes.OK,
        client_outcomes.DECLARED_EXCEPTION,
        server_outcomes.OK,
        server_outcomes.DECLARED_EXCEPTION,
    }
)


class ClientTracing:
    """Spans of a client's attempts (see the module). Give it as an observer:
    ``ServiceClient(..., observers=[ClientTracing()])`` or ``client.observe(...)``."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self._spans: dict[int, trace.Span] = {}  # by the attempt's id, while it runs

    def attempt_started(self, attempt: Attempt) -> None:
        """Start the attempt's span."""
        host, _, port = attempt.instance.rpartition(":")
        attributes: dict[str, Any] = {
            "rpc.system": "thrift",
            "rpc.service": attempt.service,
            "rpc.method": attempt.method,
            "server.address": host.strip("[]"),
            "geventpool.attempt": attempt.attempt,
            "geventpool.pool_wait": attempt.waited,
        }
        if port.isdigit():
            attributes["server.port"] = int(port)
        self._spans[id(attempt)] = self._tracer.start_span(
            f"{attempt.service}/{attempt.method}", kind=SpanKind.CLIENT, attributes=attributes
        )

    def attempt_ended(
        self, attempt: Attempt, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        """End the attempt's span, with its outcome."""
        span = self._spans.pop(id(attempt), None)
        if span is not None:
            _end(span, outcome, error)


class ServerTracing:
    """Spans of the calls a server runs (see the module). Give it as an observer:
    ``ThriftServer(..., observers=[ServerTracing()])`` or ``server.observe(...)``."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        # by the call's id, while its handler runs: the span and the token that made it current
        self._spans: dict[int, tuple[trace.Span, object]] = {}

    def call_started(self, call: ServedCall) -> None:
        """Start the call's span and make it current for the handler."""
        span = self._start(call)
        token = otel_context.attach(trace.set_span_in_context(span))
        self._spans[id(call)] = (span, token)

    def call_ended(
        self, call: ServedCall, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        """End the call's span, with its outcome, and restore the context."""
        started = self._spans.pop(id(call), None)
        if started is None:  # never started: an unknown method, answered without a handler
            _end(self._start(call), outcome, error)
            return
        span, token = started
        otel_context.detach(token)  # type: ignore[arg-type]
        _end(span, outcome, error)

    def _start(self, call: ServedCall) -> trace.Span:
        return self._tracer.start_span(
            call.method,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "thrift",
                "rpc.method": call.method,
                "server.port": call.port,
            },
        )


def _end(span: trace.Span, outcome: str, error: BaseException | None) -> None:
    """End ``span``; its status is ERROR unless the call returned or answered with an
    exception its IDL declares (a result, not a failure)."""
    span.set_attribute("geventpool.outcome", outcome)
    if outcome not in _ANSWERED:
        if error is not None:
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, outcome))
    span.end()
