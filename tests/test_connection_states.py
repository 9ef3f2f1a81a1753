"""The explicit state of every pooled connection (issue 10, point 5).

Every connection of an :class:`InstancePool` is idle, in use, checking (off the stack for
``pre_ping``), reserved (off the stack, to be closed) or closed, and changes state only through
``InstancePool._move``, which refuses any move not in ``LEGAL_MOVES``. The connections here are
:class:`helpers.StateWatched`: they keep their history and note any state set elsewhere.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import gevent
import pytest

from geventpool import events
from geventpool.client.connection import Connection, PooledConnection
from geventpool.client.pipeline import PipelinedConnection
from geventpool.client.pool import (
    CHECKING,
    CLOSED,
    IDLE,
    IN_USE,
    LEGAL_MOVES,
    RESERVED,
    InstancePool,
    PoolSettings,
)
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import PoolClosedError, PoolError, TransportError
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift
from helpers import StateWatched, events_named, watched_connector

INSTANCE = Instance(host="127.0.0.1", port=9)
STATES = (IDLE, IN_USE, CHECKING, RESERVED, CLOSED)


@pytest.fixture(autouse=True)
def no_stray_state() -> Iterator[None]:
    """After each test: no connection's state was set anywhere but in ``_move``."""
    StateWatched.strays.clear()
    StateWatched.closing = None
    yield
    StateWatched.closing = None
    assert StateWatched.strays == []


@pytest.fixture
def peers() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for peer in made:
        peer.close()


def pool_of(peers: list[socket.socket], **options: Any) -> InstancePool:
    """A pool of :class:`StateWatched` connections on socket pairs."""
    settings = PoolSettings(**{"max_connections": 2, "pool_timeout": 2.0, **options})
    return InstancePool("svc", INSTANCE, None, settings, connect=watched_connector(peers))


def acquire(pool: InstancePool) -> StateWatched:
    connection = pool.acquire(time.monotonic() + 2)
    assert isinstance(connection, StateWatched)
    return connection


def counts(pool: InstancePool) -> tuple[dict[str, int], int, int, int]:
    status = pool.status()
    return pool.connection_states(), len(pool._open_connections), status.in_use, status.closed


def legal(history: list[str | None]) -> bool:
    return all(move in LEGAL_MOVES for move in zip([None, *history], history, strict=False))


# -- the table -----------------------------------------------------------------------------------


def test_the_legal_moves_are_these_and_no_others() -> None:
    assert {
        (None, IDLE),
        (IDLE, IN_USE),
        (IDLE, CHECKING),
        (IDLE, RESERVED),
        (CHECKING, IN_USE),
        (CHECKING, CLOSED),
        (IN_USE, IDLE),
        (IN_USE, CLOSED),
        (RESERVED, CLOSED),
    } == LEGAL_MOVES


@pytest.mark.parametrize(
    ("was", "to"),
    [(was, to) for was in (None, *STATES) for to in STATES if (was, to) not in LEGAL_MOVES],
)
def test_every_illegal_move_raises_naming_both_states_and_changes_nothing(
    peers: list[socket.socket], was: str | None, to: str
) -> None:
    pool = pool_of(peers)
    bystander = acquire(pool)  # so that the counts are not all zero
    mine, peer = socket.socketpair()
    peers.append(peer)
    connection = Connection(INSTANCE, mine, None, clock=time.monotonic, expires_at=float("inf"))
    connection.pool_state = was  # (a plain Connection: the test sets the scene)
    before = counts(pool)
    with pytest.raises(PoolError, match=f"from {was or 'not adopted'} to {to} "):
        pool._move(connection, to)
    assert connection.pool_state == was
    assert counts(pool) == before
    pool.release(bystander)
    connection.close()


# -- every path moves through _move -----------------------------------------------------------


def test_a_connection_goes_idle_in_use_idle_and_is_handed_to_a_waiter_in_use(
    peers: list[socket.socket],
) -> None:
    pool = pool_of(peers, max_connections=1)
    connection = acquire(pool)
    assert connection.pool_state == IN_USE
    pool.release(connection)
    assert connection.pool_state == IDLE and pool._idle == [connection]
    held = acquire(pool)
    waiter = gevent.spawn(acquire, pool)
    gevent.sleep(0.01)
    pool.release(held)  # handed straight to the waiter
    assert waiter.get(timeout=1) is connection and connection.pool_state == IN_USE
    pool.release(connection)
    assert connection.history == [IDLE, IN_USE, IDLE, IN_USE, IDLE, IN_USE, IDLE]
    assert pool.connection_states() == {IDLE: 1, IN_USE: 0, CHECKING: 0, RESERVED: 0}


def test_min_idle_fills_with_idle_connections_and_hands_them_to_waiters(
    peers: list[socket.socket],
) -> None:
    pool = pool_of(peers, max_connections=2, min_idle=2)
    pool.fill()
    assert [c.pool_state for c in pool._idle] == [IDLE, IDLE]
    assert pool.connection_states() == {IDLE: 2, IN_USE: 0, CHECKING: 0, RESERVED: 0}


def test_a_connection_released_broken_is_closed_and_a_second_release_raises(
    peers: list[socket.socket],
) -> None:
    pool = pool_of(peers)
    connection = acquire(pool)
    connection.broken = True
    pool.release(connection)
    assert connection.history == [IDLE, IN_USE, CLOSED]
    assert connection not in pool._open_connections and connection.fileno() == -1
    before = counts(pool)
    with pytest.raises(PoolError, match=r"released twice\?\): it is closed"):
        pool.release(connection)
    assert counts(pool) == before


def test_a_double_release_raises_naming_the_states_while_another_is_out(
    peers: list[socket.socket],
) -> None:
    pool = pool_of(peers)
    a = acquire(pool)
    b = acquire(pool)
    pool.release(a)
    before = counts(pool)
    with pytest.raises(PoolError, match=r"released twice\?\): it is idle here, not in use"):
        pool.release(a)  # b is out: the number of calls in use alone would not tell
    assert counts(pool) == before and a.pool_state == IDLE and pool._idle == [a]
    assert acquire(pool) is a  # handed out once, to one caller
    pool.release(a)
    pool.release(b)
    assert a.history == [IDLE, IN_USE, IDLE, IN_USE, IDLE]


def test_a_release_of_another_pools_or_an_unknown_connection_raises_and_changes_nothing(
    peers: list[socket.socket],
) -> None:
    one, other = pool_of(peers), pool_of(peers)
    mine = acquire(one)
    theirs = acquire(other)
    before = counts(one), counts(other)
    with pytest.raises(PoolError, match=r"not checked out from this pool.*in use in another pool"):
        one.release(theirs)
    stranger = watched_connector(peers)(INSTANCE, None, clock=time.monotonic)
    with pytest.raises(PoolError, match=r"not checked out from this pool.*no pool ever adopted"):
        one.release(stranger)
    assert (counts(one), counts(other)) == before and theirs.holders == 1
    other.release(theirs)
    mine_before = counts(one)
    with pytest.raises(PoolError, match="it is idle in another pool"):
        one.release(theirs)
    assert counts(one) == mine_before
    assert theirs.history == [IDLE, IN_USE, IDLE] and stranger.history == []
    one.release(mine)


def test_a_pipelined_connection_is_in_use_from_its_first_hold_to_its_last_release(
    peers: list[socket.socket],
) -> None:
    def connect(instance: Instance, service: Any, **options: Any) -> PipelinedConnection:
        mine, peer = socket.socketpair()
        peers.append(peer)
        return PipelinedConnection(instance, mine, None, clock=time.monotonic, expires_at=1e18)

    settings = PoolSettings(max_connections=1, max_inflight=4)
    pool = InstancePool("svc", INSTANCE, None, settings, connect=connect)
    holds = [pool.acquire(time.monotonic() + 1) for _ in range(3)]
    [connection] = set(holds)
    assert (connection.pool_state, connection.holders) == (IN_USE, 3)
    pool.release(connection)
    pool.release(connection)
    assert (connection.pool_state, connection.holders) == (IN_USE, 1)
    assert pool.connection_states()[IN_USE] == 1
    pool.release(connection)
    assert (connection.pool_state, pool._idle) == (IDLE, [connection])
    with pytest.raises(PoolError, match="it is idle here, not in use"):
        pool.release(connection)  # a release beyond its holders
    assert (connection.holders, pool.in_use) == (0, 0)
    connection.close()


# -- taken off the stack before it is closed or logged ------------------------------------------


def test_the_reaper_reserves_doomed_connections_before_closing_or_logging_and_they_count(
    peers: list[socket.socket], captured: list[MutableMapping[str, Any]]
) -> None:
    """A log pipeline that yields while the reaper logs lets callers run: they never get a
    doomed connection, and the reserved ones count against the cap (two sockets at most)."""
    now = [0.0]
    settings = PoolSettings(max_connections=2, pool_timeout=2.0, idle_timeout=10.0)
    pool = InstancePool(
        "svc", INSTANCE, None, settings, connect=watched_connector(peers), clock=lambda: now[0]
    )
    doomed = [acquire(pool), acquire(pool)]
    for connection in doomed:
        pool.release(connection)
    now[0] = 11.0  # both idle for longer than idle_timeout
    seen: list[tuple[list[str | None], dict[str, int], int]] = []
    served: list[PooledConnection] = []
    callers: list[gevent.Greenlet] = []

    def sockets_open() -> int:
        return sum(connection.fileno() >= 0 for connection in pool._open_connections)

    def borrow() -> None:
        connection = pool.acquire(now[0] + 5)
        served.append(connection)
        assert sockets_open() <= 2

    def yielding_log(event: str, level: str, fields: Mapping[str, Any]) -> None:
        if event != events.CONNECTION_REAPED:
            return
        seen.append(([c.pool_state for c in doomed], pool.connection_states(), sockets_open()))
        if not callers:  # two callers run meanwhile: one socket is free, the other reserved
            callers.extend(gevent.spawn(borrow) for _ in range(2))
        gevent.sleep(0.01)  # the log pipeline yields: the callers run

    remove = events.add_listener(yielding_log)
    try:
        pool.reap()
    finally:
        remove()
    gevent.joinall(callers, timeout=2, raise_error=True)
    first, second = seen
    assert first[0] == [CLOSED, RESERVED] and first[1][RESERVED] == 1 and first[2] == 1
    assert second[0] == [CLOSED, CLOSED]
    assert len(served) == 2 and not any(s is d for s in served for d in doomed)
    assert all(c.history == [IDLE, IN_USE, IDLE, RESERVED, CLOSED] for c in doomed)
    assert len(events_named(captured, events.CONNECTION_REAPED)) == 2
    assert pool._idle == [] and pool.status().reaped == 2
    for borrowed in served:
        pool.release(borrowed)


def test_an_ejection_and_a_retirement_take_every_idle_connection_off_before_closing_any(
    peers: list[socket.socket], captured: list[MutableMapping[str, Any]]
) -> None:
    for end in ("eject", "shut"):
        pool = pool_of(peers, max_connections=3, eject_after=1)
        idle = [acquire(pool) for _ in range(3)]
        for connection in idle:
            pool.release(connection)
        at_close: list[tuple[list[str | None], int]] = []
        StateWatched.closing = lambda c: at_close.append(  # noqa: B023
            ([d.pool_state for d in idle], len(pool._idle))  # noqa: B023
        )
        if end == "eject":
            pool.record_failure(TransportError(str(INSTANCE), "reset (by the test)"))
        else:
            pool.shut()
        StateWatched.closing = None
        assert at_close[0] == ([CLOSED, RESERVED, RESERVED], 0), end
        assert all(c.history == [IDLE, IN_USE, IDLE, RESERVED, CLOSED] for c in idle), end
        assert pool._open_connections == set()
    assert events_named(captured, events.INSTANCE_EJECTED)


def test_a_dead_idle_connection_found_at_checkout_is_reserved_then_closed(
    peers: list[socket.socket],
) -> None:
    pool = pool_of(peers, max_connections=1)
    dead = acquire(pool)
    pool.release(dead)
    peers[0].close()  # its peer went away
    fresh = acquire(pool)
    assert fresh is not dead and dead.history == [IDLE, IN_USE, IDLE, RESERVED, CLOSED]
    pool.release(fresh)


def test_a_connection_opened_after_its_pool_retired_is_reserved_then_closed(
    peers: list[socket.socket],
) -> None:
    made: list[StateWatched] = []
    connect = watched_connector(peers)

    def connect_while_retiring(instance: Instance, service: Any, **options: Any) -> Any:
        gevent.sleep(0.01)
        made.append(connect(instance, service, **options))
        return made[-1]

    pool = InstancePool("svc", INSTANCE, None, PoolSettings(), connect=connect_while_retiring)
    caller = gevent.spawn(pool.acquire, time.monotonic() + 1)
    gevent.sleep(0)
    pool.shut()
    with pytest.raises(PoolClosedError):
        caller.get(timeout=1)
    assert made[0].history == [IDLE, RESERVED, CLOSED]


def test_forget_closes_every_connection_and_a_later_release_raises(
    peers: list[socket.socket],
) -> None:
    pool = pool_of(peers)
    held = acquire(pool)
    idle = acquire(pool)
    pool.release(idle)
    pool.forget()
    assert held.history == [IDLE, IN_USE, CLOSED]
    assert idle.history == [IDLE, IN_USE, IDLE, RESERVED, CLOSED]
    assert pool._open_connections == set() and held.fileno() == idle.fileno() == -1
    with pytest.raises(PoolError, match="it is closed"):
        pool.release(held)


# -- pre_ping: checking -----------------------------------------------------------------------


class Pinged(StateWatched):
    """Answers ``ping`` after ``delay`` seconds (or not at all: ``answers`` False)."""

    __slots__ = ()
    delay = 0.0
    answers = True

    def call(self, method: str, args: Any, kwargs: Any, deadline: float) -> Any:
        gevent.sleep(Pinged.delay)
        if not Pinged.answers:
            self.broken = True
            raise TransportError(str(self.instance), "no answer (by the test)")
        return None


def pinged_pool(peers: list[socket.socket]) -> InstancePool:
    def connect(instance: Instance, service: Any, **options: Any) -> Pinged:
        mine, peer = socket.socketpair()
        peers.append(peer)
        return Pinged(instance, mine, None, clock=time.monotonic, expires_at=1e18)

    settings = PoolSettings(max_connections=1, pool_timeout=2.0, pre_ping="ping")
    return InstancePool("svc", INSTANCE, None, settings, connect=connect)


def test_a_connection_being_pinged_is_checking_and_counts_against_the_cap(
    peers: list[socket.socket],
) -> None:
    Pinged.delay, Pinged.answers = 0.05, True
    pool = pinged_pool(peers)
    connection = pool.acquire(time.monotonic() + 1)
    pool.release(connection)
    first = gevent.spawn(pool.acquire, time.monotonic() + 1)
    gevent.sleep(0.01)
    assert connection.pool_state == CHECKING and pool.connection_states()[CHECKING] == 1
    assert not pool.has_capacity()
    second = gevent.spawn(pool.acquire, time.monotonic() + 1)  # waits: no second socket
    gevent.sleep(0.01)
    assert (len(peers), pool.waiting) == (1, 1)
    assert first.get(timeout=1) is connection
    pool.release(connection)  # handed to the waiter, not pinged again
    assert second.get(timeout=1) is connection
    pool.release(connection)
    assert isinstance(connection, Pinged)
    assert connection.history == [IDLE, IN_USE, IDLE, CHECKING, IN_USE, IDLE, IN_USE, IDLE]


def test_a_failed_or_cancelled_ping_closes_the_connection_and_frees_its_slot(
    peers: list[socket.socket],
) -> None:
    Pinged.delay, Pinged.answers = 0.0, False
    pool = pinged_pool(peers)
    failed = pool.acquire(time.monotonic() + 1)
    pool.release(failed)
    fresh = pool.acquire(time.monotonic() + 1)  # the ping failed: a new one is opened
    assert isinstance(failed, Pinged) and failed.history[-3:] == [IDLE, CHECKING, CLOSED]
    pool.release(fresh)
    Pinged.delay, Pinged.answers = 1.0, True
    caller = gevent.spawn(pool.acquire, time.monotonic() + 5)
    gevent.sleep(0.01)
    assert fresh.pool_state == CHECKING
    caller.kill()  # cancelled mid-ping
    assert isinstance(fresh, Pinged) and fresh.history[-2:] == [CHECKING, CLOSED]
    assert pool.connection_states() == {IDLE: 0, IN_USE: 0, CHECKING: 0, RESERVED: 0}
    Pinged.delay = 0.0
    assert pool.acquire(time.monotonic() + 1) not in (failed, fresh)


def test_pre_ping_with_one_connection_never_opens_a_second_socket_while_it_pings() -> None:
    """Real sockets: a slow ``whoami`` as the ping, callers queued behind it; the server sees
    one connection, ever."""
    handler = EchoHandler("slow")
    server = ThriftServer(echo_thrift.Echo, handler, deregister_grace=0.0)
    server.start()
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=server.port)],
        pool=PoolSettings(max_connections=1, pre_ping="whoami", pool_timeout=5.0),
        call_timeout=5.0,
    )
    client.start()
    try:
        assert client.echo("warm") == "warm"  # one idle connection
        [pool] = client._pools.values()
        handler.latency = 0.2  # whoami (the ping) and echo take 0.2 s
        samples: list[tuple[int, int, int]] = []
        checking: list[bool] = []

        def sample() -> None:
            while True:
                states = pool.connection_states()
                checking.append(states[CHECKING] == 1)
                sockets = len(pool._open_connections) + pool._opening
                samples.append((server.stats.connections, server.stats.accepted, sockets))
                gevent.sleep(0.005)

        sampler = gevent.spawn(sample)
        callers = [gevent.spawn(client.echo, f"call {n}") for n in range(4)]
        gevent.joinall(callers, timeout=10, raise_error=True)
        sampler.kill()
        assert [c.value for c in callers] == [f"call {n}" for n in range(4)]
        assert any(checking)
        assert max(s[0] for s in samples) == 1 and samples[-1][1] == 1
        assert max(s[2] for s in samples) == 1
        assert server.stats.accepted == 1
    finally:
        client.stop()
        server.stop(drain_timeout=1.0)


def test_every_history_is_a_walk_through_the_legal_moves(peers: list[socket.socket]) -> None:
    pool = pool_of(peers, max_connections=2)
    a, b = acquire(pool), acquire(pool)
    b.broken = True
    pool.release(a)
    pool.release(b)
    pool.shut()
    assert legal(a.history) and legal(b.history)
    assert a.history[-1] == b.history[-1] == CLOSED
    assert not legal([IDLE, CLOSED])  # (the helper itself)
