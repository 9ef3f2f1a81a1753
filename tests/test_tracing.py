"""OpenTelemetry spans from the observer hooks, against real servers: one CLIENT span per
attempt (retries included) and one SERVER span per call, current while the handler runs,
with the outcome and the status each call deserves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from thriftpy2.thrift import TApplicationException

from geventpool.client.pool import PoolSettings
from geventpool.client.retrying import Retry
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import RetriesExhaustedError
from geventpool.observe.tracing import ClientTracing, ServerTracing
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift

pytestmark = pytest.mark.gevent_timeout(30)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def test_each_attempt_is_a_client_span_with_its_outcome_under_the_callers_span(
    serve: Callable[..., ThriftServer], spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    slow, fast = serve(), serve()
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=s.port) for s in (slow, fast)],
        pool=PoolSettings(max_connections=2, eject_after=100),
        retry=Retry(retries=1, idempotent=True, attempt_timeout=0.1),
        balancer="round_robin",
        observers=[ClientTracing(provider)],
    )
    tracer = provider.get_tracer("test")
    with client, tracer.start_as_current_span("caller") as caller:
        assert client.echo("a") == "a"
        with pytest.raises(echo_thrift.Refused):
            client.refuse("no")
        with pytest.raises(RetriesExhaustedError):
            client.slow_echo("late", 0.3, timeout=1.0)
    finished = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert [s.name for s in finished] == ["echo/echo", "echo/refuse"] + ["echo/slow_echo"] * 2
    parent = caller.get_span_context().span_id
    assert all(s.parent is not None and s.parent.span_id == parent for s in finished)
    ok, refused, first, second = finished
    assert ok.status.status_code is StatusCode.UNSET
    assert (
        dict(ok.attributes or {}).items()
        >= {
            "rpc.system": "thrift",
            "rpc.service": "echo",
            "rpc.method": "echo",
            "server.address": "127.0.0.1",
            "geventpool.attempt": 1,
            "geventpool.outcome": "ok",
        }.items()
    )
    assert (ok.attributes or {})["server.port"] in (slow.port, fast.port)
    assert refused.status.status_code is StatusCode.UNSET  # a declared exception: an answer
    assert (refused.attributes or {})["geventpool.outcome"] == "declared_exception"
    assert [(s.attributes or {})["geventpool.attempt"] for s in (first, second)] == [1, 2]
    assert {s.status.status_code for s in (first, second)} == {StatusCode.ERROR}
    assert {(s.attributes or {})["geventpool.outcome"] for s in (first, second)} == {"timeout"}
    assert first.events and first.events[0].name == "exception"


class TracedHandler(EchoHandler):
    """Makes a span of its own inside each echo: it must be the server span's child."""

    def __init__(self, provider: TracerProvider) -> None:
        super().__init__("traced")
        self._tracer = provider.get_tracer("handler")

    def echo(self, msg: str) -> str:
        with self._tracer.start_as_current_span("inside"):
            return msg


def test_each_served_call_is_a_server_span_current_while_its_handler_runs(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    server = ThriftServer(
        echo_thrift.Echo,
        TracedHandler(provider),
        observers=[ServerTracing(provider)],
        deregister_grace=0.0,
    )
    server.start()
    try:
        with ServiceClient(
            echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
        ) as client:
            assert client.echo("a") == "a"
            with pytest.raises(TApplicationException):
                client.crash("boom")
    finally:
        server.stop(drain_timeout=1.0)
    by_name: dict[str, Any] = {s.name: s for s in exporter.get_finished_spans()}
    echo, inside, crash = by_name["echo"], by_name["inside"], by_name["crash"]
    assert echo.kind is SpanKind.SERVER and echo.parent is None
    assert inside.parent is not None and inside.parent.span_id == echo.context.span_id
    assert (echo.attributes or {})["server.port"] == server.port
    assert echo.status.status_code is StatusCode.UNSET
    assert crash.status.status_code is StatusCode.ERROR
    assert (crash.attributes or {})["geventpool.outcome"] == "handler_error"
    assert trace.get_current_span() is trace.INVALID_SPAN  # every context was restored
