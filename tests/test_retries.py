"""Retries over real servers: an idempotent call that failed after it was sent is made again
on another instance, a call that may have run and is not idempotent never is, a declared
"not run" exception is retried, the budget bounds the retries, and an attempt timeout moves
an idempotent call off a frozen instance within its deadline."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import gevent
import pytest

from geventpool import events
from geventpool.client.hedging import Hedge, Hedger
from geventpool.client.pool import PoolSettings
from geventpool.client.retrying import Retry, RetryBudget
from geventpool.client.service import ServiceClient
from geventpool.config import parse_config
from geventpool.discovery.instance import Instance
from geventpool.errors import (
    ConfigurationError,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
    TransportError,
)
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import echo_thrift
from geventpool.testing.processes import ServerProcess
from geventpool.testing.zookeeper import free_port
from helpers import events_named


@pytest.fixture
def hostile() -> Iterator[ServerProcess]:
    """A hostile echo server: ``echo("close")`` closes the connection without a reply."""
    server = ServerProcess([], module="geventpool.testing.hostile_server").start()
    yield server
    server.kill()


@pytest.fixture
def make_client() -> Iterator[Callable[..., ServiceClient]]:
    made: list[ServiceClient] = []

    def make(ports: list[int], **options: Any) -> ServiceClient:
        pool = PoolSettings(**{"eject_after": 10_000, **options.pop("pool", {})})
        client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            instances=[Instance(host="127.0.0.1", port=port) for port in ports],
            pool=pool,
            balancer="round_robin",
            call_timeout=options.pop("call_timeout", 5.0),
            **options,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


@pytest.mark.parametrize("max_inflight", [1, 8])
def test_an_idempotent_call_cut_after_it_was_sent_is_made_again_on_another_instance(
    hostile: ServerProcess,
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    captured: list[MutableMapping[str, Any]],
    max_inflight: int,
) -> None:
    assert hostile.port is not None
    server = serve()
    client = make_client(
        [hostile.port, server.port],
        retry=Retry(idempotent={"echo"}),
        pool={"max_inflight": max_inflight},
    )
    assert [client.echo("close") for _ in range(6)] == ["close"] * 6
    retried = events_named(captured, events.CALL_RETRIED)
    assert len(retried) >= 2 and all(e["method"] == "echo" for e in retried), retried
    assert server.stats.calls == 6  # each retried once, on the good instance
    assert client.status().retries == len(retried)


def test_a_call_that_may_have_run_and_is_not_idempotent_is_never_sent_again(
    hostile: ServerProcess,
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
) -> None:
    assert hostile.port is not None
    server = serve()
    client = make_client([hostile.port, server.port], retry=Retry(idempotent={"add"}))
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append(client.echo("close"))
        except TransportError as error:  # the error itself, as before retries existed
            outcomes.append(error)
    assert sum(isinstance(o, TransportError) for o in outcomes) == 3, outcomes
    assert server.stats.calls == 3  # never the failed calls a second time
    assert client.status().retries == 0


def test_a_declared_not_run_exception_is_retried_on_each_instance_and_every_attempt_kept(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    servers = [serve(), serve()]
    client = make_client([s.port for s in servers], retry=Retry(retries=2, retry_on={"Refused"}))
    with pytest.raises(RetriesExhaustedError) as caught:
        client.refuse("busy")
    attempts = caught.value.attempts
    assert [type(a).__name__ for a in attempts] == ["Refused"] * 3
    assert caught.value.sent
    plain = make_client([s.port for s in servers])
    with pytest.raises(echo_thrift.Refused):  # not listed: the call's outcome, raised as is
        plain.refuse("busy")


def test_the_retry_budget_bounds_the_retries_when_every_instance_fails(
    make_client: Callable[..., ServiceClient],
    hostile: ServerProcess,
    captured: list[MutableMapping[str, Any]],
) -> None:
    """Every call fails after it was sent: the budget (no share of calls, 5 retries in its
    window) lets five calls retry, then the error says it is spent."""
    assert hostile.port is not None
    client = make_client(
        [hostile.port],
        retry=Retry(retries=3, idempotent=True),
        retry_budget=RetryBudget(percent=0.0, min_per_second=0.5, window=10.0),
    )
    outcomes = []
    for _ in range(20):
        with pytest.raises(RetriesExhaustedError) as caught:
            client.echo("close")
        outcomes.append(caught.value)
    refused = [o for o in outcomes if isinstance(o, RetryBudgetExhaustedError)]
    assert client.status().retries == 5 and len(refused) >= 18, outcomes
    assert "retry budget, 0% of calls plus 0.5/s over 10s, is spent" in str(refused[-1])
    assert client.status().retries_refused == len(refused)
    assert len(events_named(captured, events.RETRY_BUDGET_EXHAUSTED)) == 1  # one a second


def test_a_budget_that_refuses_a_connect_failover_is_said_by_type_and_event(
    make_client: Callable[..., ServiceClient],
    hostile: ServerProcess,
    captured: list[MutableMapping[str, Any]],
) -> None:
    """A sent attempt is cut, the retry's connect is refused (an instance is down), and the
    budget refuses to try another: RetryBudgetExhaustedError (it was a plain
    RetriesExhaustedError) and the event. In a total outage, where every refusal comes from
    a connect failover, the event is told too (it was never)."""
    assert hostile.port is not None
    client = make_client(
        [free_port(), hostile.port],
        retry=Retry(idempotent=True, retries=3),
        retry_budget=RetryBudget(percent=0.0, min_per_second=0.1, window=10.0),
    )
    with pytest.raises(RetryBudgetExhaustedError) as caught:
        client.echo("close")  # to the hostile one first or after the refused connect
    assert client.status().retries_refused == 1
    assert len(caught.value.attempts) >= 2, caught.value.attempts
    assert len(events_named(captured, events.RETRY_BUDGET_EXHAUSTED)) == 1
    client.stop()
    captured.clear()
    outage = make_client(
        [free_port(), free_port(), free_port()],
        retry=Retry(idempotent=True),
        retry_budget=RetryBudget(percent=0.0, min_per_second=0.0, window=10.0),
    )
    for _ in range(3):
        with pytest.raises(RetryBudgetExhaustedError):
            outage.echo("x")
    assert outage.status().retries_refused == 3
    assert len(events_named(captured, events.RETRY_BUDGET_EXHAUSTED)) == 1  # one a second


@pytest.mark.gevent_timeout(30)
def test_an_attempt_timeout_moves_an_idempotent_call_off_a_frozen_instance(
    servers: Callable[..., ServerProcess], make_client: Callable[..., ServiceClient]
) -> None:
    frozen, live = servers(), servers()
    assert frozen.port is not None and live.port is not None
    client = make_client(
        [frozen.port, live.port],
        retry=Retry(idempotent=True, attempt_timeout=0.2),
        call_timeout=2.0,
        pool={"max_inflight": 1},
    )
    assert len({client.whoami() for _ in range(4)}) == 2
    frozen.signal(signal.SIGSTOP)
    try:
        callers = [gevent.spawn(client.echo, f"call {n}") for n in range(20)]
        gevent.joinall(callers, timeout=10, raise_error=True)
        assert [c.value for c in callers] == [f"call {n}" for n in range(20)]
    finally:
        frozen.signal(signal.SIGCONT)


def test_retry_settings_are_checked_and_read_from_toml() -> None:
    with pytest.raises(ConfigurationError, match="retries must be an integer >= 0"):
        Retry(retries=-1)
    with pytest.raises(ConfigurationError, match="idempotent must be a collection of names"):
        Retry(idempotent="echo")
    with pytest.raises(ConfigurationError, match="not both"):
        ServiceClient(echo_thrift.Echo, instances=[], retries=1, retry=Retry())
    data = {
        "services": {
            "echo": {
                "retry": {"retries": 1, "idempotent": ["echo"], "retry_on": ["Refused"]},
                "retry_budget": {"percent": 0.1},
            }
        }
    }
    service = parse_config(data, {}, __import__("pathlib").Path(".")).services["echo"]
    assert service.retry == Retry(retries=1, idempotent=frozenset({"echo"}), retry_on={"Refused"})
    assert service.client_options()["retry_budget"].percent == 0.1
    assert Retry(idempotent=True).may_resend("anything")
    assert Retry(idempotent=lambda name: name.startswith("get")).may_resend("get_user")


def test_the_retry_budget_is_a_sliding_window_of_calls_and_retries() -> None:
    now = 0.0
    budget = RetryBudget(percent=0.5, min_per_second=0.0, window=10.0, clock=lambda: now)
    budget.calls += 100
    assert budget.available(now) == 50
    assert all(budget.withdraw(now) for _ in range(50))
    assert not budget.withdraw(now) and budget.refused == 1
    for second in range(1, 12):  # the reaper's ticks: the calls and retries age out
        now = float(second)
        budget.tick(now)
    assert budget.available(now) == 0
    budget.calls += 10
    assert budget.available(now) == 5
    assert RetryBudget(clock=lambda: 0.0).available(0.0) == 100  # 10/s over 10 s, no calls


def test_a_sent_attempt_is_kept_when_the_retry_finds_no_instance_left(
    hostile: ServerProcess, make_client: Callable[..., ServiceClient]
) -> None:
    assert hostile.port is not None
    client = make_client([hostile.port], retry=Retry(idempotent=True, backoff=0.3))
    client.start()
    [instance] = [pool.instance for pool in client._pools.values()]
    gevent.spawn_later(0.1, client._pools.apply, (), [instance])  # it leaves during the back-off
    with pytest.raises(RetriesExhaustedError) as caught:
        client.echo("close")
    assert isinstance(caught.value.attempts[0], TransportError) and caught.value.sent


def test_connects_retried_elsewhere_show_in_status_retries(
    make_client: Callable[..., ServiceClient],
) -> None:
    client = make_client([free_port() for _ in range(3)], retry=Retry(retries=2))
    with pytest.raises(RetriesExhaustedError):
        client.echo("anyone?")
    assert client.status().retries == 2


@pytest.mark.parametrize("max_extra", [1.0, 0.25, 0.0])
def test_a_slow_idempotent_call_is_hedged_on_another_instance_within_the_extra_load_cap(
    servers: Callable[..., ServerProcess],
    make_client: Callable[..., ServiceClient],
    max_extra: float,
) -> None:
    """Half the calls go to an instance that takes 300 ms: hedged, each of them gets a
    backup after the 40th percentile latency (a fast one's: at least 20 ms) on the other
    instance, whose reply wins; the backups never pass max_extra of the calls (with 0, none
    is sent and those calls take their 300 ms)."""
    fast, slow = servers("--latency", "0.002"), servers("--latency", "0.3")
    assert fast.port is not None and slow.port is not None
    client = make_client(
        [fast.port, slow.port],
        retry=Retry(idempotent={"whoami"}),
        hedge=Hedge(percentile=0.4, min_delay=0.02, max_extra=max_extra, samples=10),
    )
    for _ in range(12):  # the latency samples the hedge delay is taken from
        client.whoami()
    took = []
    for _ in range(20):
        began = time.monotonic()
        client.whoami()
        took.append(time.monotonic() - began)
    hedged = client.status().hedged
    print(f"max_extra {max_extra}: slowest {max(took) * 1000:.0f} ms, {hedged} backups")
    assert hedged <= max_extra * 32, hedged  # 32 hedgeable calls in all
    if max_extra == 1.0:
        assert max(took) < 0.2 and hedged >= 10, (took, hedged)
    elif max_extra:
        assert hedged >= 1 and max(took) >= 0.3, (took, hedged)  # the cap held some back
    else:
        assert max(took) >= 0.3 and hedged == 0, (took, hedged)
    assert Hedger(Hedge(max_extra=0.01)).allow() is False  # the cap: 1% of no calls is none


@pytest.mark.gevent_timeout(30)
def test_a_hedged_call_ends_at_its_deadline_even_when_its_attempt_starts_late(
    hostile: ServerProcess, make_client: Callable[..., ServiceClient]
) -> None:
    """The hedged attempt runs in a greenlet of its own; 80 ms of other greenlets' work queued
    before it must not move the call's deadline (it did: 0.184 s for a 0.1 s timeout)."""
    assert hostile.port is not None
    client = make_client(
        [hostile.port], retry=Retry(idempotent=True, retries=0), hedge=Hedge(max_extra=0.0)
    )
    client.echo("ok:warm up")

    def busy() -> None:
        began = time.perf_counter()
        while time.perf_counter() - began < 0.002:
            pass

    took: list[float] = []

    def caller() -> None:
        began = time.monotonic()
        with pytest.raises(TransportError):
            client.echo("silence", timeout=0.1)
        took.append(time.monotonic() - began)

    calling = gevent.spawn(caller)
    burst = [gevent.spawn(busy) for _ in range(40)]  # queued behind the caller, before its attempt
    gevent.joinall([*burst, calling], timeout=10, raise_error=True)
    assert len(took) == 1 and took[0] < 0.14, took


def test_a_failed_hedged_call_raises_in_the_caller_and_prints_no_traceback(
    servers: Callable[..., ServerProcess],
    make_client: Callable[..., ServiceClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The racing attempts hand their error to the caller; none dies in its greenlet (gevent
    printed a traceback for each failed hedged call)."""
    server = servers()
    assert server.port is not None
    client = make_client([server.port], retry=Retry(idempotent=True), hedge=Hedge())
    printed: list[object] = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "print_exception", lambda *args: printed.append(args))
    for _ in range(3):
        with pytest.raises(echo_thrift.Refused):
            client.refuse("no")
    assert printed == []


def test_hedge_settings_of_the_wrong_type_are_configuration_errors() -> None:
    for bad in ({"percentile": "0.9"}, {"max_extra": None}, {"percentile": True}):
        with pytest.raises(ConfigurationError):
            Hedge(**bad)


def test_an_attempt_timeout_runs_from_the_send_not_from_the_wait_for_a_connection(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient]
) -> None:
    server = serve()
    client = make_client(
        [server.port],
        retry=Retry(attempt_timeout=0.3),
        pool={"max_connections": 1, "max_inflight": 1, "pool_timeout": 2.0},
    )
    holder = gevent.spawn(client.slow_echo, "first", 0.25)
    gevent.sleep(0.01)
    # Waits about 0.24 s for the connection, then needs 0.2 s of its 0.3 s attempt.
    assert client.slow_echo("second", 0.2) == "second"
    assert holder.get(timeout=5) == "first"
