"""Property tests of InstancePool's bookkeeping (a Hypothesis state machine).

Callers acquire, hold, and release (some marking their connection broken); some are killed by
``gevent.Timeout`` or ``GreenletExit`` at random points: while waiting, while connecting,
right after being handed a connection, while holding it. Connects are slow and sometimes fail.
After every step: in use + idle + opening never exceeds the maximum, no idle connection is
broken or closed, no count is negative, and the sockets really open (seen from their peers'
side, by the operating system) are exactly the pool's in use and idle connections, and every
connection's explicit state agrees with where it is (idle ones on the stack, held ones in use,
none set anywhere but in ``InstancePool._move``). The reaper runs, and peers go away. At the end:
every slot is back, no caller ever received a connection that an earlier caller had broken, and
no socket is open but the idle ones.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from geventpool import events
from geventpool.client.connection import Connection, PooledConnection
from geventpool.client.pool import (
    CHECKING,
    IDLE,
    IN_USE,
    LEGAL_MOVES,
    RESERVED,
    InstancePool,
    PoolSettings,
    WaitingRoom,
)
from geventpool.discovery.instance import Instance
from geventpool.errors import ConnectError, PoolClosedError, PoolError, PoolExhaustedError
from helpers import StateWatched

MAX = 3
INSTANCE = Instance(host="127.0.0.1", port=9)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.connect_delay = 0.0
        self.connect_fails = False
        self.peers: list[socket.socket] = []
        self.pool = InstancePool(
            "svc",
            INSTANCE,
            None,
            PoolSettings(max_connections=MAX, pool_timeout=0.05, eject_after=10_000),
            connect=self.connect,
        )
        self.callers: list[gevent.Greenlet] = []
        self.broken: list[PooledConnection] = []  # kept alive, so no id is ever reused
        self.reused_broken: list[PooledConnection] = []
        self.made: list[StateWatched] = []
        StateWatched.strays.clear()

    def connect(self, instance: Instance, service: Any, **options: Any) -> Connection:
        gevent.sleep(self.connect_delay)
        if self.connect_fails:
            raise ConnectError(str(instance), "refused (by the test)")
        mine, peer = socket.socketpair()
        peer.settimeout(0.0)
        self.peers.append(peer)
        clock = options["clock"]
        self.made.append(StateWatched(instance, mine, None, clock=clock, expires_at=clock() + 3600))
        return self.made[-1]

    def caller(self, hold: float, breaks: bool) -> None:
        connection = self.pool.acquire(time.monotonic() + 0.2)
        if any(connection is broken for broken in self.broken):
            self.reused_broken.append(connection)
        try:
            gevent.sleep(hold)
            if breaks:
                connection.broken = True
                self.broken.append(connection)
        finally:
            self.pool.release(connection)

    @rule(
        hold=st.sampled_from([0, 0.001, 0.01, 0.03]),
        breaks=st.booleans(),
        kill_after=st.sampled_from([None, 0, 0.001, 0.005, 0.02]),
    )
    def start_caller(self, hold: float, breaks: bool, kill_after: float | None) -> None:
        def run() -> None:
            try:
                if kill_after is None:
                    self.caller(hold, breaks)
                else:
                    with gevent.Timeout(kill_after, False):
                        self.caller(hold, breaks)
            except (PoolExhaustedError, ConnectError):
                pass

        self.callers.append(gevent.spawn(run))

    @rule(index=st.integers(0, 50))
    def kill_a_caller(self, index: int) -> None:
        if self.callers:
            self.callers[index % len(self.callers)].kill(block=False)

    @rule(delay=st.sampled_from([0, 0.001, 0.01]), fails=st.booleans())
    def change_connects(self, delay: float, fails: bool) -> None:
        self.connect_delay, self.connect_fails = delay, fails

    @rule(seconds=st.sampled_from([0, 0.001, 0.005, 0.02]))
    def let_time_pass(self, seconds: float) -> None:
        gevent.sleep(seconds)

    @rule(index=st.integers(0, 50))
    def a_peer_goes_away(self, index: int) -> None:
        if self.peers:  # the connection sees end of file: found dead at checkout or reaped
            self.peers[index % len(self.peers)].shutdown(socket.SHUT_WR)

    @rule()
    def the_reaper_runs(self) -> None:
        self.pool.reap()

    def sockets_open(self) -> int:
        """How many of the connections' sockets are open, asked of the operating system: a
        peer whose other end was closed reads end-of-file, an open one would block."""
        count = 0
        for peer in self.peers:
            try:
                closed = peer.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                closed = False
            count += not closed
        return count

    @invariant()
    def the_open_sockets_are_the_connections_in_use_and_idle(self) -> None:
        status = self.pool.status()
        assert self.sockets_open() == status.in_use + status.idle, status

    @invariant()
    def the_cap_holds_and_idle_connections_are_sound(self) -> None:
        pool = self.pool
        status = pool.status()
        assert status.in_use >= 0 and status.opening >= 0 and status.waiters >= 0
        assert status.in_use + status.idle + status.opening <= MAX
        for connection in pool._idle:
            assert not connection.broken and connection.fileno() >= 0

    @invariant()
    def every_connection_is_in_the_state_its_place_says(self) -> None:
        pool = self.pool
        assert StateWatched.strays == []
        assert all(connection.pool_state == IDLE for connection in pool._idle)
        for connection in pool._open_connections:
            assert connection.pool_state in (IDLE, IN_USE)  # (checking, reserved: only within
            # a ping or the reaper's log line, and there is neither here)
            assert (connection.pool_state == IN_USE) == (connection.holders > 0)
        states = pool.connection_states()
        assert states[IDLE] == sum(c.pool_state == IDLE for c in pool._open_connections)
        assert (states[CHECKING], states[RESERVED]) == (0, 0)
        assert sum(states.values()) + pool.status().opening <= MAX
        for connection in self.made:
            history = connection.history
            assert all(move in LEGAL_MOVES for move in zip([None, *history], history, strict=False))
            assert (connection.pool_state == "closed") == (connection not in pool._open_connections)

    def teardown(self) -> None:
        gevent.joinall(self.callers, timeout=5)
        assert all(caller.dead for caller in self.callers), "a caller deadlocked"
        status = self.pool.status()
        assert (status.in_use, status.opening, status.waiters) == (0, 0, 0), status
        assert status.idle == status.opened - status.closed  # every open connection accounted
        assert self.reused_broken == []
        assert self.sockets_open() == status.idle
        for connection in list(self.pool._idle):
            connection.close()
        for peer in self.peers:
            peer.close()


PoolMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_bookkeeping_survives_random_callers_kills_and_failing_connects = PoolMachine.TestCase


def _pool_of(
    max_connections: int = 1, room: WaitingRoom | None = None, port: int = 9090
) -> tuple[InstancePool, list[socket.socket], Callable[..., Connection]]:
    """A pool of socket-pair connections, their peers, and its connect function (``room``:
    the waiting room it shares with other pools of its service)."""
    peers: list[socket.socket] = []

    def connect(instance: Instance, service: Any, **options: Any) -> Connection:
        mine, peer = socket.socketpair()
        peers.append(peer)
        return Connection(instance, mine, None, clock=options["clock"], expires_at=float("inf"))

    settings_ = PoolSettings(max_connections=max_connections, pool_timeout=5.0)
    instance = Instance(host="127.0.0.1", port=port)
    pool = InstancePool("svc", instance, None, settings_, connect=connect, room=room)
    return pool, peers, connect


def test_the_oldest_waiter_of_the_service_is_served_by_whichever_pool_has_room_first() -> None:
    """Callers queued at a frozen instance's pool are served by another instance's pool as
    its connections come back, in the order they came, before anyone who came later."""
    room = WaitingRoom()
    frozen, peers, _ = _pool_of(room=room, port=1)
    healthy, more_peers, _ = _pool_of(room=room, port=2)
    stuck = frozen.acquire(time.monotonic() + 1)  # never comes back
    busy = healthy.acquire(time.monotonic() + 1)
    served: list[tuple[int, InstancePool]] = []

    def waiter(index: int, pool: InstancePool) -> None:
        got_pool, connection = pool.checkout(time.monotonic() + 5)
        served.append((index, got_pool))
        gevent.sleep(0.01)
        got_pool.release(connection)

    waiters = [gevent.spawn(waiter, 0, frozen), gevent.spawn(waiter, 1, frozen)]
    gevent.sleep(0.01)
    waiters.append(gevent.spawn(waiter, 2, healthy))  # came last, queued at the healthy one
    gevent.sleep(0.01)
    assert (frozen.waiting, healthy.waiting, room.count) == (2, 1, 3)
    healthy.release(busy)
    gevent.joinall(waiters, timeout=5, raise_error=True)
    assert served == [(0, healthy), (1, healthy), (2, healthy)]
    assert (frozen.in_use, healthy.in_use, healthy.status().idle, room.count) == (1, 0, 1, 0)
    frozen.release(stuck)
    for peer in [*peers, *more_peers]:
        peer.close()


def test_a_waiter_killed_right_after_being_handed_a_connection_passes_it_on() -> None:
    pool, peers, _ = _pool_of()
    held = pool.acquire(time.monotonic() + 1)
    waiter = gevent.spawn(pool.acquire, time.monotonic() + 5)
    gevent.sleep(0.01)
    assert pool.waiting == 1
    waiter.kill(block=False)  # the kill is queued first...
    pool.release(held)  # ...then the connection is handed to the waiter...
    gevent.sleep(0.01)  # ...which dies holding it, before it could use it
    assert waiter.dead
    status = pool.status()
    assert (status.in_use, status.idle, status.waiters) == (0, 1, 0)
    assert pool.acquire(time.monotonic() + 1) is held  # still usable, not lost
    for peer in peers:
        peer.close()


def test_a_waiter_killed_right_after_being_granted_a_slot_gives_it_back() -> None:
    pool, peers, _ = _pool_of()
    held = pool.acquire(time.monotonic() + 1)
    waiter = gevent.spawn(pool.acquire, time.monotonic() + 5)
    gevent.sleep(0.01)
    held.broken = True
    waiter.kill(block=False)  # queued first, as above
    pool.release(held)  # closed; the freed slot is granted to the waiter
    assert pool.status().opening == 1
    gevent.sleep(0.01)
    assert waiter.dead
    status = pool.status()
    assert (status.in_use, status.opening, status.idle, status.waiters) == (0, 0, 0, 0)
    fresh = pool.acquire(time.monotonic() + 1)  # the slot is free again
    assert fresh is not held
    for peer in peers:
        peer.close()


def test_releasing_a_connection_twice_raises_and_changes_nothing() -> None:
    pool, peers, connect = _pool_of(2)
    a = pool.acquire(time.monotonic() + 1)
    b = pool.acquire(time.monotonic() + 1)
    pool.release(a)
    with pytest.raises(PoolError, match="released twice"):
        pool.release(a)  # b is still out: the in-use count alone would not tell
    status = pool.status()
    assert (status.in_use, status.idle) == (1, 1)
    assert pool.acquire(time.monotonic() + 1) is a
    with pytest.raises(PoolError, match="not checked out from this pool"):
        pool.release(connect(INSTANCE, None, clock=time.monotonic))  # never handed out
    pool.release(a)
    pool.release(b)
    for peer in peers:
        peer.close()


def test_the_reaper_takes_connections_off_the_stack_before_it_logs() -> None:
    """A log pipeline that yields while the reaper logs lets another caller check out: it
    must get a live connection, and the reaper must not put that one back on the stack."""
    pool, peers, _ = _pool_of(2)
    alive = pool.acquire(time.monotonic() + 1)
    dead = pool.acquire(time.monotonic() + 1)
    pool.release(alive)
    pool.release(dead)
    peers[1].close()  # dead's peer went away: the reaper closes it
    taken: list[PooledConnection] = []

    def yielding_log(*args: Any, **kwargs: Any) -> None:
        if not taken:  # another caller runs while the log line is written
            taken.append(pool.acquire(time.monotonic() + 1))

    original = events.emit
    events.emit = yielding_log
    try:
        pool.reap()
    finally:
        events.emit = original
    assert taken == [alive]
    assert pool._idle == []  # alive is checked out, not idle as well
    assert (pool.status().in_use, pool.status().closed) == (1, 1)
    pool.release(alive)
    alive.close()
    for peer in peers:
        peer.close()


def test_a_pool_retired_during_a_pre_ping_hands_out_nothing() -> None:
    pool, peers, _ = _pool_of(1)
    pool._settings = PoolSettings(max_connections=1, pre_ping="ping")
    pool.release(pool.acquire(time.monotonic() + 1))  # one idle connection

    def ping_while_retiring(method: str, args: Any, kwargs: Any, deadline: float) -> None:
        pool.shut()  # the instance leaves while the ping is under way

    [connection] = pool._idle
    original = Connection.call  # Connection has slots: the class is patched, for this test
    Connection.call = lambda self, *a: ping_while_retiring(*a)  # type: ignore[method-assign]
    try:
        with pytest.raises(PoolClosedError):
            pool.acquire(time.monotonic() + 1)
    finally:
        Connection.call = original  # type: ignore[method-assign]
    status = pool.status()
    assert (status.in_use, status.idle, status.state) == (0, 0, "retired")
    assert connection.fileno() == -1
    for peer in peers:
        peer.close()
