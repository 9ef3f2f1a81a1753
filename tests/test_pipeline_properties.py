"""A Hypothesis state machine over real sockets: many calls share pipelined connections to a
server that answers out of order and late, while callers are killed at random points.

Callers start calls with random server-side delays and deadlines (some shorter than the delay:
their replies come late), some are killed (``GreenletExit``) while queued, written or waiting,
and time passes in random steps. After every step: no caller ever received a reply that was
not its own, every outcome is its own reply or a typed error, and the pool's counts add up
(calls holding a slot = callers alive; never more than the capacity). At the end: every slot
is back, and a fresh call on the same connections gets its own reply.
"""

from __future__ import annotations

import itertools
from typing import Any

import gevent
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import (
    CallTimeoutError,
    GeventPoolError,
    PoolExhaustedError,
    RetriesExhaustedError,
)
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift

MAX_CONNECTIONS, MAX_INFLIGHT = 2, 4
# What a call may end in besides its own reply: its deadline, a full pool, or a deadline too
# short to connect in (nothing sent).
EXPECTED = (CallTimeoutError, PoolExhaustedError, RetriesExhaustedError)
_SERVER: dict[str, ThriftServer] = {}
_NAMES = itertools.count()


def server() -> ThriftServer:
    """One in-process server for the whole test (out of order: concurrency 32)."""
    if "server" not in _SERVER:
        started = ThriftServer(echo_thrift.Echo, EchoHandler("x"), deregister_grace=0.0)
        started.start()
        _SERVER["server"] = started
    return _SERVER["server"]


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            instances=[Instance(host="127.0.0.1", port=server().port)],
            pool=PoolSettings(
                max_connections=MAX_CONNECTIONS,
                max_inflight=MAX_INFLIGHT,
                pool_timeout=0.05,
                eject_after=10_000,
                stuck_after=0.2,
                reap_interval=0.05,
            ),
        )
        self.client.start()
        self.callers: dict[str, gevent.Greenlet] = {}
        self.outcomes: dict[str, Any] = {}
        self.wrong: list[tuple[str, Any]] = []

    def call(self, message: str, delay: float, timeout: float) -> None:
        try:
            reply = self.client.slow_echo(message, delay, timeout=timeout)
        except GeventPoolError as error:  # typed: timed out, exhausted, no time to connect
            self.outcomes[message] = error
            return
        if reply != message:
            self.wrong.append((message, reply))
        self.outcomes[message] = reply

    @rule(
        delay=st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.05]),
        timeout=st.sampled_from([0.005, 0.02, 0.1, 1.0, 1.0]),
        count=st.integers(1, 6),
    )
    def start_calls(self, delay: float, timeout: float, count: int) -> None:
        for _ in range(count):
            message = f"call {next(_NAMES)}"
            self.callers[message] = gevent.spawn(self.call, message, delay, timeout)

    @rule(pick=st.integers(0, 1_000), wait=st.sampled_from([0.0, 0.0, 0.001, 0.01]))
    def kill_a_caller(self, pick: int, wait: float) -> None:
        gevent.sleep(wait)  # so that it is queued, written, or waiting for its reply
        alive = sorted(m for m, g in self.callers.items() if not g.dead)  # timing decides
        if alive:
            self.callers[alive[pick % len(alive)]].kill(block=True)

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.01, 0.03]))
    def let_time_pass(self, seconds: float) -> None:
        gevent.sleep(seconds)

    @invariant()
    def every_reply_is_the_callers_own(self) -> None:
        assert not self.wrong, self.wrong

    @invariant()
    def the_slots_add_up(self) -> None:
        [status] = self.client.status().instances
        alive = sum(1 for g in self.callers.values() if not g.dead)
        assert 0 <= status.in_use <= min(alive, MAX_CONNECTIONS * MAX_INFLIGHT), (status, alive)
        assert status.held <= MAX_CONNECTIONS and status.held + status.idle <= MAX_CONNECTIONS

    def teardown(self) -> None:
        try:
            gevent.joinall(list(self.callers.values()), timeout=5)
            assert all(g.dead for g in self.callers.values())
            assert not self.wrong, self.wrong
            for message, outcome in self.outcomes.items():
                assert outcome == message or isinstance(outcome, EXPECTED), (message, outcome)
            [status] = self.client.status().instances
            assert (status.in_use, status.held, status.waiters) == (0, 0, 0), status
            assert self.client.echo("after", timeout=2.0) == "after"
        finally:
            self.client.stop()


PipelineMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_no_caller_ever_gets_another_calls_reply_while_callers_are_killed = PipelineMachine.TestCase


def teardown_module() -> None:
    """Stop the shared server once the machine is done."""
    started = _SERVER.pop("server", None)
    if started is not None:
        started.stop(drain_timeout=1.0)
