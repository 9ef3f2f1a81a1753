"""The per-call observer hooks, against real servers: every attempt's start and end reach
each client observer with the service, method, instance, attempt number, its wait, a bounded
outcome and a duration; retries are attempts of their own; a server tells each call's
method, outcome and handler time; a failing observer loses nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
import thriftpy2
from thriftpy2.thrift import TApplicationException

from geventpool import events
from geventpool.client.observing import OUTCOMES, Attempt
from geventpool.client.pool import PoolSettings
from geventpool.client.retrying import Retry
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import CallTimeoutError, RetriesExhaustedError
from geventpool.server.observing import SERVER_OUTCOMES, ServedCall
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift
from helpers import events_named

pytestmark = pytest.mark.gevent_timeout(30)


class Recorder:
    """Keeps what it is told, in order."""

    def __init__(self) -> None:
        self.told: list[tuple[Any, ...]] = []

    def attempt_started(self, attempt: Attempt) -> None:
        self.told.append(("started", attempt))

    def attempt_ended(
        self, attempt: Attempt, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        self.told.append(("ended", attempt, outcome, duration, type(error).__name__))


def client_of(*servers: ThriftServer, **options: Any) -> ServiceClient:
    return ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=server.port) for server in servers],
        pool=PoolSettings(max_connections=2, eject_after=100),
        **options,
    )


def test_each_attempt_is_told_its_start_and_its_end_with_a_bounded_outcome(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve()
    recorder = Recorder()
    with client_of(server, observers=[recorder]) as client:
        assert client.echo("a") == "a"
        with pytest.raises(echo_thrift.Refused):
            client.refuse("no")
        with pytest.raises(CallTimeoutError):
            client.slow_echo("late", 0.5, timeout=0.1)
    where = f"127.0.0.1:{server.port}"
    assert [entry[0] for entry in recorder.told] == ["started", "ended"] * 3
    ended = [entry for entry in recorder.told if entry[0] == "ended"]
    assert [(e[1][:4], e[2], e[4]) for e in ended] == [
        (("echo", "echo", where, 1), "ok", "NoneType"),
        (("echo", "refuse", where, 1), "declared_exception", "Refused"),
        (("echo", "slow_echo", where, 1), "timeout", "CallTimeoutError"),
    ]
    assert {e[2] for e in ended} <= set(OUTCOMES)
    assert all(0 <= e[1].waited < 0.05 for e in ended)  # a free connection: no real wait
    assert 0.09 <= ended[2][3] < 0.5  # the timed-out attempt took about its deadline


def test_a_retry_is_an_attempt_of_its_own_numbered_within_its_call(
    serve: Callable[..., ThriftServer],
) -> None:
    slow, fast = serve(), serve()
    recorder = Recorder()
    retry = Retry(retries=2, idempotent=True, attempt_timeout=0.1)
    client = client_of(slow, fast, observers=[recorder], retry=retry, balancer="round_robin")
    # slow_echo takes 0.3 s on either instance: each attempt times out, then the call
    with client, pytest.raises(RetriesExhaustedError):
        client.slow_echo("x", 0.3, timeout=1.0)
    ended = [entry for entry in recorder.told if entry[0] == "ended"]
    assert [e[1].attempt for e in ended] == [1, 2, 3]
    assert {e[2] for e in ended} == {"timeout"}
    assert {e[1].instance for e in ended} == {
        f"127.0.0.1:{slow.port}",
        f"127.0.0.1:{fast.port}",
    }  # the retry went to the other instance first


def test_an_attempt_says_how_long_it_waited_for_its_connection(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve()
    recorder = Recorder()
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=server.port)],
        pool=PoolSettings(max_connections=1, max_inflight=1),
        observers=[recorder],
    )
    with client:
        holder = gevent.spawn(client.slow_echo, "first", 0.3)
        gevent.sleep(0.05)  # the one connection is taken
        assert client.echo("second") == "second"
        holder.get()
    ended = {e[1].method: e[1] for e in recorder.told if e[0] == "ended"}
    assert ended["slow_echo"].waited < 0.05
    assert 0.2 <= ended["echo"].waited < 0.5  # it waited for the slow call's connection


class Broken:
    def attempt_started(self, attempt: Attempt) -> None:
        raise RuntimeError("observer bug")

    def attempt_ended(self, *args: Any) -> None:
        raise RuntimeError("observer bug")

    call_started = attempt_started
    call_ended = attempt_ended


def test_a_failing_observer_breaks_no_call_and_is_told_once(
    serve: Callable[..., ThriftServer], captured: list[Any]
) -> None:
    server = serve()
    recorder = Recorder()
    with client_of(server, observers=[Broken(), recorder]) as client:
        assert [client.echo(str(n)) for n in range(5)] == [str(n) for n in range(5)]
    assert len([e for e in recorder.told if e[0] == "ended"]) == 5  # the next one still told
    (told,) = events_named(captured, events.CALL_OBSERVER_FAILED)
    assert told["observer"] == "Broken" and "observer bug" in told["error"]


class ServerRecorder:
    """Keeps the server's calls as they end (it asks not to be told the starts)."""

    observes_starts = False

    def __init__(self) -> None:
        self.ended: list[tuple[ServedCall, str, float, str]] = []

    def call_started(self, call: ServedCall) -> None:
        raise AssertionError("observes_starts is False: never told the starts")

    def call_ended(
        self, call: ServedCall, outcome: str, duration: float, error: BaseException | None
    ) -> None:
        self.ended.append((call, outcome, duration, type(error).__name__))


def test_a_server_tells_each_call_its_method_outcome_and_handler_time(
    serve: Callable[..., ThriftServer], tmp_path: Path
) -> None:
    recorder = ServerRecorder()
    server = serve(observers=[Broken(), recorder])  # a failing observer loses nothing
    (tmp_path / "other.thrift").write_text("service Echo { string nosuch(1: string msg) }\n")
    other = thriftpy2.load(str(tmp_path / "other.thrift"), module_name="other_thrift")
    with client_of(server) as client:
        assert client.slow_echo("a", 0.05) == "a"
        with pytest.raises(echo_thrift.Refused):
            client.refuse("no")
        with pytest.raises(TApplicationException):
            client.crash("boom")
    stranger = ServiceClient(
        other.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
    )
    with stranger, pytest.raises(TApplicationException):
        stranger.nosuch("?")
    port = server.port
    assert [(call, outcome, error) for call, outcome, _, error in recorder.ended] == [
        (ServedCall(port, "slow_echo"), "ok", "NoneType"),
        (ServedCall(port, "refuse"), "declared_exception", "Refused"),
        (ServedCall(port, "crash"), "handler_error", "RuntimeError"),
        (ServedCall(port, "<unknown>"), "unknown_method", "NoneType"),  # no peer's name kept
    ]
    assert {entry[1] for entry in recorder.ended} <= set(SERVER_OUTCOMES)
    assert 0.04 <= recorder.ended[0][2] < 0.5  # the handler's own time


class Unlistable(list[Any]):
    """A list whose iteration raises: the server's check of a result fails on it."""

    def __iter__(self) -> Any:
        raise RuntimeError("iteration refused")


class RefusingHandler(EchoHandler):
    def items(self, count: int) -> list[Any]:
        return Unlistable([1])


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_observed_server_answers_a_result_it_cannot_check_as_it_would_unobserved(
    concurrency: int,
) -> None:
    recorder = ServerRecorder()
    server = ThriftServer(
        echo_thrift.Echo,
        RefusingHandler("refusing"),
        concurrency=concurrency,
        observers=[recorder],
        deregister_grace=0.0,
    )
    server.start()
    try:
        with client_of(server, retries=0) as client:
            with pytest.raises(TApplicationException) as raised:
                client.items(1, timeout=2.0)
            assert raised.value.type == TApplicationException.INTERNAL_ERROR
            assert client.echo("next") == "next"  # the same connection, still in use
            assert client.status().instances[0].opened == 1
    finally:
        server.stop(drain_timeout=1.0)
    assert [(call.method, outcome) for call, outcome, _, _ in recorder.ended] == [
        ("items", "handler_error"),
        ("echo", "ok"),
    ]


class Interrupting:
    """Its start raises what ends the caller's wait: the attempt is over before it is sent."""

    def attempt_started(self, attempt: Attempt) -> None:
        raise gevent.Timeout()

    def attempt_ended(self, *args: Any) -> None:
        pass


def test_an_attempt_told_its_start_is_told_its_end_whatever_ends_it(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve()
    recorder = Recorder()
    with client_of(server, observers=[recorder, Interrupting()]) as client:
        with pytest.raises(gevent.Timeout):
            client.echo("a")
        assert client.status().in_use == 0  # the slot went back
    assert [entry[0] for entry in recorder.told] == ["started", "ended"]
    assert recorder.told[1][2] == "cancelled"


def test_each_call_on_a_borrowed_connection_is_an_attempt_told_to_the_observers(
    serve: Callable[..., ThriftServer],
) -> None:
    server = serve()
    recorder = Recorder()
    with client_of(server, observers=[recorder]) as client, client.connection() as pinned:
        assert pinned.echo("a") == "a"
        with pytest.raises(echo_thrift.Refused):
            pinned.refuse("no")
    ended = [(e[1].method, e[1].attempt, e[2]) for e in recorder.told if e[0] == "ended"]
    assert ended == [("echo", 1, "ok"), ("refuse", 1, "declared_exception")]
