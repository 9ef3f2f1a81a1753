"""The connections to one instance: bounded, fair, self-healing.

:class:`InstancePool` promises:

* **The cap always holds.** Every connection not closed (whatever its state, below) plus the
  connects under way is at most ``max_connections``: a slot is taken *before* a connect yields,
  so concurrent callers can never open more than the maximum.
* **Every connection has one explicit state, owned by the pool** (HikariCP's, plus checking):
  ``idle`` (on the idle stack, or being handed out without a yield), ``in use`` (held by at
  least one caller: pipelined, from its first hold to its last release), ``checking`` (taken
  off the stack for ``pre_ping``), ``reserved`` (taken off the stack to be closed: by the
  reaper, an ejection, retirement, or found dead) and ``closed``. Every change goes through
  :meth:`InstancePool._move`, which refuses a move not in :data:`LEGAL_MOVES` with
  :class:`~geventpool.errors.PoolError` naming both states (a bug, or a double release).
* **First come, first served, across the service.** When nothing is free, callers queue in
  one :class:`WaitingRoom` shared by every pool of the service; a released connection (or
  its room, pipelined) is handed straight to the oldest waiter, whichever pool it queued at
  (the releasing greenlet cannot take it back), and a freed slot is granted to the oldest
  waiter to open a new connection. Nobody overtakes a waiter, so no waiter starves, and no
  waiter stays stranded behind a frozen or slow instance while another has room. An ejected
  instance hands nothing to waiters.
* **Bounded waits.** A wait ends by ``pool_timeout`` (or the call's deadline) with
  :class:`~geventpool.errors.PoolExhaustedError` stating the numbers.
* **Nothing leaks.** A caller killed at any point (``gevent.Timeout``, ``GreenletExit``)
  gives back whatever it held or was being handed; a release of a connection not ``in use``
  in this pool (another pool's, never handed out, released twice) raises (for a pipelined
  connection, a release beyond its holders: a hold is counted, not tied to its caller, so
  :class:`~geventpool.client.service.ServiceClient` releases each hold exactly once).
* **No dying connection is handed out.** An idle connection is checked at checkout (broken,
  past its lifetime, closed by the peer, or failing the optional ``pre_ping``) and the reaper
  takes idle connections out of the stack (``reserved``) before closing them or logging.
  Broken connections are closed at check-in, never reused.
* **Local ejection.** ``eject_after`` consecutive failures take the instance out of
  rotation for a back-off that doubles on each ejection in a row (``eject_backoff`` up to
  ``max_eject_backoff`` seconds); then it takes one probing call at a time, and the first
  success restores it.
* **Retirement.** When the instance leaves the service, no new checkout is served, idle
  connections close at once, busy ones at check-in, and waiters get PoolClosedError (as they
  do when the instance is ejected: the client then tries another).

Everything runs on one gevent hub, so the bookkeeping needs no lock: it only has to avoid
yielding in the middle of an update, which it does.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gevent.event import AsyncResult

from geventpool import events
from geventpool.client.connection import PooledConnection, open_connection
from geventpool.client.latency import PeakEwma
from geventpool.discovery.instance import OUT_OF_ORDER, PIPELINING, Instance
from geventpool.errors import (
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    TransportError,
)
from geventpool.tls import ClientTls
from geventpool.validation import check_seconds
from geventpool.wire.limits import DEFAULT_LIMITS, WireLimits

ACTIVE, RETIRED, CLOSED = "active", "retired", "closed"
# The states of a pooled connection (see the module); CLOSED serves pools and connections alike.
IDLE, IN_USE, CHECKING, RESERVED = "idle", "in use", "checking", "reserved"
# from -> {to: whether the move changes a count InstancePool._move keeps}; idle <-> in use, the
# call path's moves, change none (in use is counted as what is left: see _connections_held)
_MOVES: dict[str | None, dict[str, bool]] = {
    None: {IDLE: True},  # opened: adopted by the pool (then handed to its opener, or idle)
    IDLE: {
        IN_USE: False,  # handed out (checkout, hand-over to a waiter, to its opener)
        CHECKING: True,  # taken off the stack for pre_ping
        RESERVED: True,  # taken off the stack to be closed (reaper, ejection, shut, dead)
    },
    CHECKING: {
        IN_USE: True,  # answered the ping
        CLOSED: True,  # no answer, its caller was cancelled, or the pool shut meanwhile
    },
    IN_USE: {
        IDLE: False,  # its last holder released it, healthy: to a waiter, or the stack
        CLOSED: True,  # its last holder released it broken or expired, or the pool is shut
    },
    RESERVED: {CLOSED: True},
    CLOSED: {},
}
LEGAL_MOVES: frozenset[tuple[str | None, str]] = frozenset(
    (was, to) for was, moves in _MOVES.items() for to in moves
)
"""Every legal ``(from, to)`` of :meth:`InstancePool._move` (``None``: not yet adopted). An
idle connection is never closed straight away: it is reserved first, off the stack."""
PIPELINED_INFLIGHT = 32
"""``max_inflight`` by default with an instance that advertises out-of-order replies."""
_OPEN_SLOT = object()  # handed to a waiter: a slot is reserved for you, open a connection
_CANCELLED = object()  # a waiter that left; whoever pops it passes it over
_SHUT = object()  # the pool retired or closed while the waiter waited
_EJECTED = object()  # the instance was ejected while the waiter waited: go elsewhere


class _Waiter:
    """A caller waiting in a :class:`WaitingRoom`; ``pool`` is where it queued."""

    __slots__ = ("pool", "result")

    def __init__(self, pool: InstancePool) -> None:
        self.pool = pool
        self.result = AsyncResult()


class EjectionGuard:
    """How much of one service may be ejected at once, and when ejection is ignored.

    At most ``max_ejected_share`` of the instances (at least one) are ejected at a time
    (Envoy's ``max_ejection_percent``); once fewer than ``panic_threshold`` of them are in
    rotation the service panics (Envoy's panic threshold): every instance is chosen as if
    none were ejected, because a wrong ejection of most of a fleet would overload the rest;
    except an instance whose last failure was a failed connect (it is down, not wrongly
    ejected).
    """

    __slots__ = ("ejected", "max_share", "panic_below", "pools", "suspected")

    def __init__(self, settings: PoolSettings) -> None:
        self.max_share = settings.max_ejected_share
        self.panic_below = settings.panic_threshold
        self.ejected = 0  # pools ejected now (or on probation)
        self.suspected = 0  # of them, those not ejected for refusing connections
        self.pools: list[InstancePool] = []  # the service's pools (ServicePools keeps it)

    def may_eject(self) -> bool:
        """Whether one more instance may be ejected for failed calls (one that refuses
        connections always may: it is down for certain, and not counted here)."""
        total = max(len(self.pools), 1)
        return self.suspected < max(1, int(total * self.max_share))

    def count(self, pool_refused: bool, change: int) -> None:
        """An instance was ejected (``change`` 1) or is no longer (-1)."""
        self.ejected += change
        if not pool_refused:
            self.suspected += change

    @property
    def panicking(self) -> bool:
        """Whether too few instances are in rotation: then ejection is ignored."""
        total = len(self.pools)
        return total > 0 and total - self.ejected < total * self.panic_below


class WaitingRoom:
    """The callers waiting for a connection in any pool of one service, oldest first: any
    pool with room serves the oldest of them (see the module)."""

    __slots__ = ("count", "queue")

    def __init__(self) -> None:
        self.queue: deque[_Waiter] = deque()  # oldest first; also some that left
        self.count = 0  # waiting and not yet served

    def next(self) -> _Waiter | None:
        """Take the oldest waiter still waiting (it is being served), or None."""
        queue = self.queue
        while queue:
            waiter = queue.popleft()
            if not waiter.result.ready():
                self.count -= 1
                return waiter
        return None

    def tell(self, waiter: _Waiter, value: object) -> None:
        """Serve ``waiter`` (still waiting, not taken by :meth:`next`) with ``value``."""
        self.count -= 1
        waiter.result.set(value)


@dataclass(frozen=True)
class PoolSettings:
    """How each instance's pool behaves. Durations are float seconds.

    ``max_connections`` per instance; ``max_inflight`` calls at once on one connection (1: each
    call has its connection to itself; above 1, calls are pipelined: see
    :mod:`geventpool.client.pipeline`; None, the default: :data:`PIPELINED_INFLIGHT` with
    instances that advertise out-of-order replies, 1 with any other); ``stuck_after`` how long
    past its deadline a pipelined call's reply may be late before its connection is broken as
    stuck; ``min_time_left`` the least time before its deadline with which a request is
    still written (with less, the call fails at once with
    :class:`~geventpool.errors.CallTimeoutError`, ``sent`` False: the server would run a call
    whose caller had given up); ``count_timeouts_after``: a call that timed out counts against
    its instance only if it was given at least this long, and at least twice the time the
    instance's calls usually take from the send (a caller's own 5 ms deadline says nothing
    of an instance that answers in 10, nor 77 ms left after a wait in the client's own queue
    of one that answers in 80); ``min_idle`` idle connections kept open (also
    the count opened when an instance joins); ``pool_timeout`` the longest wait for a connection;
    ``connect_timeout`` for opening one; ``idle_timeout`` after which an idle connection above
    ``min_idle`` is closed (None: never); ``max_lifetime`` after which any connection is
    retired, shortened by up to ``lifetime_jitter`` (a fraction) so they do not all expire at
    once; ``pre_ping`` the name of a no-argument method called on an idle connection before
    it is handed out (None: only the free socket check); ``eject_after``,
    ``eject_backoff`` and ``max_eject_backoff`` govern local ejection, which also comes when
    fewer than ``min_success_rate`` of the calls of a ``success_window`` succeeded (once
    ``success_min_calls`` were made; None: never); at most ``max_ejected_share`` of a
    service's instances (at least one) are ejected at once, and once fewer than
    ``panic_threshold`` of them are in rotation ejection is ignored (see
    :class:`EjectionGuard`); ``slow_start`` the seconds over which an instance that joins
    while the client runs ramps from a tenth of its weight to all of it (0: at once);
    ``reap_interval`` is
    the reaper's period; ``limits`` bound every reply (see
    :class:`~geventpool.wire.limits.WireLimits`); ``tls`` how to speak TLS to instances (see
    :class:`~geventpool.tls.ClientTls`; None: TLS only to instances the registry lists as
    TLS-only, verified against the system's CAs).
    """

    max_connections: int = 10
    max_inflight: int | None = None
    stuck_after: float = 5.0
    min_time_left: float = 0.001
    count_timeouts_after: float = 0.05
    min_idle: int = 0
    pool_timeout: float = 1.0
    connect_timeout: float = 1.0
    idle_timeout: float | None = 600.0
    max_lifetime: float | None = 1800.0
    lifetime_jitter: float = 0.1
    pre_ping: str | None = None
    eject_after: int = 3
    eject_backoff: float = 1.0
    max_eject_backoff: float = 30.0
    min_success_rate: float | None = 0.8
    success_min_calls: int = 20
    success_window: float = 30.0
    max_ejected_share: float = 0.5
    panic_threshold: float = 0.5
    slow_start: float = 10.0
    reap_interval: float = 1.0
    limits: WireLimits = DEFAULT_LIMITS
    tls: ClientTls | None = None

    def inflight_for(self, instance: Instance) -> int:
        """The ``max_inflight`` that applies to ``instance``."""
        if self.max_inflight is not None:
            return self.max_inflight
        return PIPELINED_INFLIGHT if instance.metadata.get(PIPELINING) == OUT_OF_ORDER else 1

    def __post_init__(self) -> None:
        if not isinstance(self.limits, WireLimits):
            raise ConfigurationError(f"limits must be a WireLimits, not {self.limits!r}")
        if self.tls is not None and not isinstance(self.tls, ClientTls):
            raise ConfigurationError(f"tls must be a ClientTls, not {self.tls!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, not {self.max_connections!r}")
        if self.max_inflight is not None and (
            not isinstance(self.max_inflight, int) or self.max_inflight < 1
        ):
            raise ConfigurationError(
                f"max_inflight must be None or an integer >= 1, not {self.max_inflight!r}"
            )
        if not isinstance(self.min_idle, int) or not 0 <= self.min_idle <= self.max_connections:
            raise ConfigurationError(
                f"min_idle must be from 0 to max_connections ({self.max_connections}),"
                f" not {self.min_idle!r}"
            )
        if not isinstance(self.eject_after, int) or self.eject_after < 1:
            raise ConfigurationError(f"eject_after must be >= 1, not {self.eject_after!r}")
        if not isinstance(self.success_min_calls, int) or self.success_min_calls < 1:
            raise ConfigurationError(
                f"success_min_calls must be >= 1, not {self.success_min_calls!r}"
            )
        for name in ("min_success_rate", "max_ejected_share", "panic_threshold"):
            value = getattr(self, name)
            if value is None and name == "min_success_rate":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigurationError(f"{name} must be a fraction from 0 to 1, not {value!r}")
        for name in (
            "pool_timeout",
            "connect_timeout",
            "eject_backoff",
            "max_eject_backoff",
            "reap_interval",
            "stuck_after",
            "success_window",
        ):
            check_seconds(name, getattr(self, name))
        check_seconds("min_time_left", self.min_time_left, zero=True)
        check_seconds("slow_start", self.slow_start, zero=True)
        check_seconds("count_timeouts_after", self.count_timeouts_after, zero=True)
        for name in ("idle_timeout", "max_lifetime"):
            check_seconds(name, getattr(self, name), optional=True)
        if not 0 <= self.lifetime_jitter < 1:
            raise ConfigurationError("lifetime_jitter must be a fraction from 0 to below 1")


@dataclass(frozen=True)
class InstanceStatus:
    """A snapshot of one instance's pool (what operators, the demo and load tests read)."""

    instance: str
    state: str
    in_use: int
    idle: int
    opening: int
    waiters: int
    max_connections: int
    opened: int
    closed: int
    reaped: int
    checkouts: int
    failures: int
    ejected: bool
    ejections: int
    last_error: str | None
    held: int = 0
    max_inflight: int = 1
    #: Calls in flight on each open connection, most loaded first (idle ones count 0).
    inflight: tuple[int, ...] = ()


Connector = Callable[..., PooledConnection]


class InstancePool:
    """The connections of one ``instance`` of the thriftpy2 ``service``."""

    def __init__(
        self,
        service_name: str,
        instance: Instance,
        service: Any,
        settings: PoolSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        connect: Connector = open_connection,
        room: WaitingRoom | None = None,
        guard: EjectionGuard | None = None,
        warming: bool = False,
    ) -> None:
        self.instance = instance
        now = clock()
        self.latency = PeakEwma(now)  # what its calls cost now (the peak_ewma balancer)
        self.typical = 0.0  # its calls' usual time from the send, an EWMA of its successes
        # joined while the client ran: its weight ramps up over slow_start seconds
        self._warm_until = now + settings.slow_start if warming else float("-inf")
        self.name = str(instance)
        self._service_name = service_name
        self._service = service
        self._settings = settings
        self._clock = clock
        self._connect = connect
        self._max_inflight = settings.inflight_for(instance)
        self._idle: list[PooledConnection] = []  # a stack: the most recently used on top
        self._shared: list[PooledConnection] = []  # held, with room for more calls (pipelined)
        # every connection in a state but closed: kept by _move, which is also the only one to
        # change _checking and _reserved (in use: what is left, see _connections_held)
        self._open_connections: set[PooledConnection] = set()
        self._room = room if room is not None else WaitingRoom()  # shared by the service
        self._waiting = 0  # callers that queued at this pool, waiting now
        self._in_use = 0  # calls holding a connection (with max_inflight 1: connections held)
        self._checking = 0  # connections CHECKING: off the idle stack for a pre_ping
        self._reserved = 0  # connections RESERVED: off the idle stack, about to be closed
        self._opening = 0  # slots reserved by callers whose connect is under way
        self.state = ACTIVE
        self.failures = 0
        self._timeouts = 0  # of the failures in a row, how many were timeouts in a row
        self._refused = False  # the last failure was a connect that failed
        self._ejected_refused = False  # ejected for refusing connections (EjectionGuard)
        self._window_start = clock()  # the success-rate window: its start, its outcomes
        self._window_ok = self._window_failed = 0
        self._guard = guard if guard is not None else EjectionGuard(settings)
        self.ejections_capped = 0  # ejections not made: too much of the service was out
        self._ejected_until: float | None = None
        self._restored_at = float("-inf")  # when the last ejection ended
        self._ejections_in_row = 0
        self.opened = self.closed = self.reaped = self.checkouts = self.ejections = 0
        self.last_error: str | None = None

    # -- checkout and check-in ---------------------------------------------------------------

    @property
    def in_use(self) -> int:
        """Calls holding a connection now (connections checked out, with ``max_inflight`` 1)."""
        return self._in_use

    def weight_at(self, now: float) -> float:
        """The instance's registry weight, ramped up from a tenth over ``slow_start`` seconds
        after it joined while the client ran (so a cold instance meets no herd)."""
        weight = self.instance.weight
        left = self._warm_until - now
        if left <= 0:
            return weight
        return weight * max(0.1, 1.0 - left / self._settings.slow_start)

    @property
    def max_inflight(self) -> int:
        """Calls at once on one connection of this pool."""
        return self._max_inflight

    @property
    def capacity(self) -> int:
        """Calls this pool can carry at once: ``max_connections`` times ``max_inflight``."""
        return self._settings.max_connections * self._max_inflight

    @property
    def waiting(self) -> int:
        """Callers waiting for a connection now."""
        return self._waiting

    @property
    def max_connections(self) -> int:
        """The cap of this pool."""
        return self._settings.max_connections

    def has_capacity(self) -> bool:
        """Whether a caller would get a connection without waiting (nobody waits anywhere
        in the service, and this pool has room)."""
        return self._room.count == 0 and (
            bool(self._idle)
            or bool(self._shared)
            or len(self._open_connections) + self._opening < self._settings.max_connections
        )

    def acquire(self, deadline: float) -> PooledConnection:
        """A connection for one caller, by ``deadline`` at the latest (clock seconds).

        Raises :class:`ConnectError` (nothing sent; the failure counts towards ejection),
        :class:`PoolExhaustedError` when the wait ends, :class:`PoolClosedError` when the pool
        is retired or closed.
        """
        return self.checkout(deadline)[1]

    def checkout(self, deadline: float) -> tuple[InstancePool, PooledConnection]:
        """As :meth:`acquire`, and which pool the connection is from: a caller that waits
        is served by whichever pool of the service has room first."""
        if self.state is not ACTIVE:
            raise PoolClosedError(f"pool of {self.name} is {self.state}")
        room = self._room
        if room.count == 0:  # nobody waits anywhere: nobody is overtaken
            if room.queue:
                room.queue.clear()  # only waiters that left are in it
            now = self._clock()
            while self._idle:
                connection = self._idle.pop()
                if not connection.usable(now):
                    self._close_idle(connection)
                elif self._ping(connection, deadline):
                    if self.state is ACTIVE:
                        return self, self._take(connection)
                    self._discard(connection)  # retired or closed during the ping
                    raise PoolClosedError(f"pool of {self.name} is {self.state}")
                else:
                    self._discard(connection)  # no answer to the ping
            if self._shared:
                least = self._least_loaded(now)
                if least is not None:
                    return self, self._take(least)
            # the idle stack is empty: every connection not closed is in use, checking or
            # reserved
            if len(self._open_connections) + self._opening < self._settings.max_connections:
                self._opening += 1  # reserve the slot before the connect yields
                return self, self._opened(self._open(deadline))
        return self._wait(deadline)

    def _least_loaded(self, now: float) -> PooledConnection | None:
        """The shared connection with the fewest callers (broken or retired ones leave the
        list: they close once their last caller leaves)."""
        shared = self._shared
        best: PooledConnection | None = None
        for connection in list(shared):
            if connection.broken or now >= connection.expires_at:
                shared.remove(connection)
            elif best is None or connection.holders < best.holders:
                best = connection
        return best

    def call(
        self,
        connection: PooledConnection,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float,
        *,
        started: float | None = None,
    ) -> Any:
        """Call on ``connection`` (checked out from this pool) and count how the instance did:
        a failure on the wire towards ejection, a success as the end of a failure streak. A
        call that began before the instance was last ejected counts neither way: its success
        cannot undo the ejection (only a probe can), its failure says nothing new. Its latency
        (from ``started``, default now: the caller's wait for the connection counts) feeds
        :attr:`latency`."""
        ejections = self.ejections
        sent = self._clock()
        if started is None:
            started = sent
        try:
            result = connection.call(method, args, kwargs, deadline)
        except TransportError as error:
            ended = self._clock()
            self.latency.observe(ended - started, ended)
            # a call begun before an ejection is not news; a refusal of our certificate
            # (TlsError) is our fault, not the instance's
            if ejections == self.ejections and getattr(error, "peer_at_fault", True):
                self.record_failure(error)
            raise
        ended = connection.last_used  # stamped by the connection as the call ended
        self.latency.observe(ended - started, ended)
        self.typical += (ended - sent - self.typical) * 0.1
        self._window_ok += 1
        if self.failures and ejections == self.ejections:
            self.record_success()  # (only a call begun after an ejection can end it)
        return result

    def _take(self, connection: PooledConnection) -> PooledConnection:
        """Count ``connection`` as held by (one more) caller it is handed to."""
        holders = connection.holders
        if holders == 0:
            self._move(connection, IN_USE)
        connection.holders = holders = holders + 1
        self._in_use += 1
        self.checkouts += 1
        if self._max_inflight > 1:  # pipelined: shared while it has room
            if holders == 1 and holders < self._max_inflight:
                self._shared.append(connection)
            elif holders == self._max_inflight:
                self._shared.remove(connection)
        return connection

    def release(self, connection: PooledConnection) -> None:
        """Check a caller's hold on ``connection`` back in: to the oldest waiter, to the idle
        stack (or, pipelined, to the connections with room), or closed (broken, past its
        lifetime, or the pool is not active) once nobody holds it. Raises PoolError, changing
        nothing, for a connection not ``in use`` in this pool: one this pool did not hand out,
        or that was released already (pipelined: by more callers than held it)."""
        if connection.pool_state is not IN_USE or connection not in self._open_connections:
            raise self._not_ours(connection)
        connection.holders = holders = connection.holders - 1
        self._in_use -= 1
        # last_used was stamped when its call ended: no second clock read on the hot path
        if (
            connection.broken
            or self.state is not ACTIVE
            or connection.last_used >= connection.expires_at
        ):
            if self._max_inflight > 1 and connection in self._shared:
                self._shared.remove(connection)
            if holders == 0:
                self._discard(connection)
                self._grant_slot()
            return
        if self._max_inflight > 1:
            if holders:
                if holders == self._max_inflight - 1:
                    self._shared.append(connection)  # room again: for the waiters, or anyone
                if self._room.count:
                    self._share_room(connection)
                return
            self._shared.remove(connection)  # nobody holds it: handed on, or idle, below
        self._move(connection, IDLE)
        self._deliver(connection)

    def _not_ours(self, connection: PooledConnection) -> PoolError:
        """The error for a release of ``connection``, which is not in use in this pool."""
        state = connection.pool_state
        if state is None:
            where = "no pool ever adopted it"
        elif state is CLOSED:
            where = "it is closed"
        elif connection in self._open_connections:
            where = f"it is {state} here, not {IN_USE}"
        else:
            where = f"it is {state} in another pool"
        return PoolError(
            f"release of a connection to {self.name} that is not checked out from this pool"
            f" (released twice?): {where}"
        )

    def _move(self, connection: PooledConnection, to: str) -> None:
        """The one place a connection changes state (see the module): the move must be in
        :data:`LEGAL_MOVES`, or PoolError (changing nothing) names both states. It keeps the
        count of every state but idle (the stack's length) and the set of open connections."""
        was = connection.pool_state
        try:
            counted = _MOVES[was][to]
        except KeyError:
            raise PoolError(
                f"illegal move of a connection to {self.name} from {was or 'not adopted'} to"
                f" {to} (a bug, or a release of a connection already released)"
            ) from None
        connection.pool_state = to
        if counted:  # not idle <-> in use, the call path's moves
            if was is CHECKING:
                self._checking -= 1
            elif was is RESERVED:
                self._reserved -= 1
            elif was is None:
                self._open_connections.add(connection)
            if to is CHECKING:
                self._checking += 1
            elif to is RESERVED:
                self._reserved += 1
            elif to is CLOSED:
                self._open_connections.discard(connection)

    def _connections_held(self) -> int:
        """Connections in use: every open one neither idle (on the stack: an idle one is off
        it only within a step that does not yield), checking nor reserved."""
        return len(self._open_connections) - len(self._idle) - self._checking - self._reserved

    def connection_states(self) -> dict[str, int]:
        """How many of this pool's connections are in each state but closed (for tests and
        operators: counted here, not on the call path)."""
        return {
            IDLE: len(self._idle),
            IN_USE: self._connections_held(),
            CHECKING: self._checking,
            RESERVED: self._reserved,
        }

    def _opened(self, connection: PooledConnection) -> PooledConnection:
        """Take a new connection for its opener; pipelined, its room goes to the waiters that
        queued meanwhile."""
        self._take(connection)
        self._share_room(connection)
        return connection

    def _share_room(self, connection: PooledConnection) -> None:
        """Give ``connection``'s room to the oldest waiters, as many as it has room for (one
        with ``max_inflight`` 1): nobody may wait while a connection has room."""
        while connection.holders < self._max_inflight and self._hand_over(connection):
            pass

    def _hand_over(self, connection: PooledConnection) -> bool:
        """Give a hold on ``connection`` to the service's oldest waiter, if one is still
        waiting (an ejected instance serves only when no other can: see :meth:`_serves`)."""
        room = self._room
        if not room.count or not self._serves():
            return False
        waiter = room.next()
        if waiter is None:
            return False
        waiter.result.set((self, self._take(connection)))
        return True

    def _serves(self) -> bool:
        """Whether this pool may hand room to waiters: not when it is ejected (on probation
        too) while another instance of the service is available."""
        if self._ejected_until is None:
            return True
        now = self._clock()
        return not any(p is not self and p.available(now) for p in self._guard.pools)

    def _deliver(self, connection: PooledConnection) -> None:
        """An idle connection off the stack (released, or just opened): to the oldest waiters
        (pipelined: as many as it has room for), or onto the idle stack."""
        if self._room.count:
            self._share_room(connection)
        if connection.holders == 0:
            self._idle.append(connection)

    def _grant_slot(self) -> None:
        """Give a free slot to the oldest waiter, which will open a connection with it."""
        if self.state is not ACTIVE or not self._room.count or not self._serves():
            return
        if len(self._open_connections) + self._opening < self._settings.max_connections:
            waiter = self._room.next()
            if waiter is not None:
                self._opening += 1
                waiter.result.set((self, _OPEN_SLOT))

    def serve_room(self) -> None:
        """Give whatever room this pool has to the service's waiters, oldest first (a caller
        that found someone waiting calls it before it queues, so that room here never sits
        unused behind a queue: the balancer may have sent the waiters elsewhere)."""
        room = self._room
        if self.state is not ACTIVE or not self._serves():
            return
        now = self._clock()
        while room.count and self._idle:
            connection = self._idle.pop()
            if not connection.usable(now):
                self._close_idle(connection)
                continue
            self._share_room(connection)
            if connection.holders == 0:
                self._idle.append(connection)
                return
        for connection in list(self._shared):
            if not room.count:
                return
            if not connection.broken and now < connection.expires_at:
                self._share_room(connection)
        while room.count:
            opening = self._opening
            self._grant_slot()
            if self._opening == opening:
                return

    def _open(self, deadline: float) -> PooledConnection:
        """Open a connection in the slot the caller reserved (``_opening`` counts it)."""
        settings = self._settings
        lifetime = float("inf")
        if settings.max_lifetime is not None:
            lifetime = settings.max_lifetime * (1 - random.random() * settings.lifetime_jitter)
        try:
            connection = self._connect(
                self.instance,
                self._service,
                connect_timeout=settings.connect_timeout,
                deadline=deadline,
                lifetime=lifetime,
                clock=self._clock,
                limits=settings.limits,
                max_inflight=self._max_inflight,
                stuck_after=settings.stuck_after,
                min_time_left=settings.min_time_left,
                tls=settings.tls,
            )
        except BaseException as error:
            self._opening -= 1
            self._grant_slot()
            if (
                isinstance(error, ConnectError)
                and not error.deadline_spent
                and getattr(error, "peer_at_fault", True)  # TlsError: our certificate refused
            ):
                self.record_failure(error)
            raise
        self._opening -= 1
        self.opened += 1
        self._move(connection, IDLE)  # adopted: for its opener, or the idle stack
        if self.state is not ACTIVE:  # retired while we were connecting
            self._close_idle(connection)
            raise PoolClosedError(f"pool of {self.name} is {self.state}")
        return connection

    def _wait(self, deadline: float) -> tuple[InstancePool, PooledConnection]:
        """Queue in the service's waiting room until any pool of the service hands this
        caller a connection (or a slot to open one), by ``pool_timeout`` at the latest."""
        now = self._clock()
        timeout = min(deadline - now, self._settings.pool_timeout)
        if timeout <= 0:
            raise self.exhausted(0.0)
        room = self._room
        if room.count:
            self.serve_room()  # room here goes to those who came first
        waiter = _Waiter(self)
        room.queue.append(waiter)
        room.count += 1
        self._waiting += 1
        result = waiter.result
        for pool in self._guard.pools:  # room elsewhere (the balancer's choice was full)
            if result.ready():
                break
            if pool is not self:
                pool.serve_room()
        try:
            value = result.wait(timeout)
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            self._waiting -= 1
        if not result.ready():
            self._abandon(waiter)
            raise self.exhausted(timeout)
        if isinstance(value, tuple):
            pool, what = value
            if what is _OPEN_SLOT:
                return pool, pool.open_in_slot(deadline)
            return pool, what
        reason = "was ejected" if value is _EJECTED else f"is {self.state}"
        raise PoolClosedError(f"pool of {self.name} {reason}")

    def open_in_slot(self, deadline: float) -> PooledConnection:
        """Open a connection in the slot this pool granted to a waiter, for that waiter."""
        return self._opened(self._open(deadline))

    def give_back_slot(self) -> None:
        """The waiter granted a slot here left: the slot goes to the next one."""
        self._opening -= 1
        self._grant_slot()

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiter leaves: pass on whatever was handed to it meanwhile."""
        result = waiter.result
        if not result.ready():
            self._room.tell(waiter, _CANCELLED)  # it leaves unserved
            return
        value = result.value
        if isinstance(value, tuple):
            pool, what = value
            if what is _OPEN_SLOT:
                pool.give_back_slot()
            else:
                pool.checkouts -= 1
                pool.release(what)

    def exhausted(self, waited: float) -> PoolExhaustedError:
        """The error for a wait of ``waited`` seconds that found nothing free."""
        return PoolExhaustedError(
            self._service_name,
            self.max_connections,
            self._in_use,
            self._waiting,
            waited,
            self.capacity,
        )

    def _ping(self, connection: PooledConnection, deadline: float) -> bool:
        """Whether ``connection`` (off the idle stack) answers ``pre_ping``; while it is being
        asked it counts against the cap, so no second socket is opened meanwhile."""
        method = self._settings.pre_ping
        if method is None:
            return True
        ping_deadline = min(deadline, self._clock() + self._settings.connect_timeout)
        self._move(connection, CHECKING)
        try:
            connection.call(method, (), {}, ping_deadline)
            answered = True
        except TransportError:
            answered = False
        except Exception:  # noqa: BLE001 - a declared exception is still an answer
            answered = not connection.broken
        except BaseException:  # the caller was cancelled mid-ping: its slot goes on
            self._discard(connection)
            self._grant_slot()
            raise
        return answered  # still CHECKING: handed out, or closed, by the caller

    def _discard(self, connection: PooledConnection) -> None:
        """Close ``connection`` (in use, checking or reserved: an idle one is reserved first,
        off the stack)."""
        self._move(connection, CLOSED)
        connection.close()
        self.closed += 1

    def _close_idle(self, connection: PooledConnection) -> None:
        """Close an idle connection already taken off the stack."""
        self._move(connection, RESERVED)
        self._discard(connection)

    def _reserve_idle(self) -> list[PooledConnection]:
        """Take every connection off the idle stack, reserved to be closed (before anything
        can yield: nobody can be handed one of them)."""
        doomed = self._idle[:]
        self._idle.clear()
        for connection in doomed:
            self._move(connection, RESERVED)
        return doomed

    # -- health --------------------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """Whether the balancer may choose this pool now: active, and not ejected. Once an
        ejection's back-off is over the instance is on probation: it takes one call at a time
        until a success restores it, so a still-dead instance meets no herd of callers."""
        if self.state is not ACTIVE:
            return False
        if self._ejected_until is None:
            return True
        if self._guard.panicking and not self._refused:
            return True  # panic: too much of the service is ejected, so none is (but one
            # that refused connections is down for certain, not wrongly ejected)
        return self._on_probation(now)

    def _on_probation(self, now: float) -> bool:
        """Whether an ejected instance may take its one probing call now."""
        assert self._ejected_until is not None
        return (
            now >= self._ejected_until
            and self._connections_held() + self._checking + self._opening == 0
        )

    def _low_rate(self) -> bool:
        """Whether the calls of the current window succeeded less often than
        ``min_success_rate`` (counted once ``success_min_calls`` were made)."""
        settings = self._settings
        if settings.min_success_rate is None:
            return False
        total = self._window_ok + self._window_failed
        return (
            total >= settings.success_min_calls
            and self._window_ok < settings.min_success_rate * total
        )

    def record_success(self) -> None:
        """A call succeeded: the consecutive failures end, an ejection is over (its count
        is kept until the instance stays healthy for ``max_eject_backoff``, so that an
        instance that flaps is ejected for longer each time)."""
        if self._ejected_until is not None:
            if self._clock() < self._ejected_until and not self._guard.panicking:
                return  # chosen before the ejection (it was connecting, say): not a probe
            self.failures = self._timeouts = 0
            self._ejected_until = None
            self._restored_at = self._clock()
            self._guard.count(self._ejected_refused, -1)
            events.emit(events.INSTANCE_RESTORED, service=self._service_name, instance=self.name)
            return
        self.failures = self._timeouts = 0

    def record_failure(self, error: BaseException) -> None:
        """A connect or call failed on the wire; eject after ``eject_after`` in a row. A
        deadline that ran out before anything was sent is not the instance's failure."""
        if self.state is not ACTIVE:
            return  # retired or closed: it takes no more calls, and counts no ejection
        if isinstance(error, CallTimeoutError) and (
            not error.sent
            or error.timeout < self._settings.count_timeouts_after
            or error.timeout < 2 * self.typical
        ):
            return  # the caller's deadline, not the instance: nothing sent, or too little time
        self.failures += 1
        self._timeouts = self._timeouts + 1 if isinstance(error, CallTimeoutError) else 0
        self._refused = isinstance(error, ConnectError)
        self.last_error = repr(error)
        now = self._clock()
        settings = self._settings
        if now - self._window_start > settings.success_window:
            self._window_start, self._window_ok, self._window_failed = now, 0, 0
        self._window_failed += 1
        ejected_until = self._ejected_until
        probing = ejected_until is not None and now >= ejected_until
        if ejected_until is not None and not probing:
            return  # ejected already
        if not probing and self.failures < settings.eject_after and not self._low_rate():
            return
        guard = self._guard
        if ejected_until is None:
            if not self._refused and not guard.may_eject():
                self.ejections_capped += 1  # too much of the service is out already
                return
            self._ejected_refused = self._refused
            guard.count(self._refused, 1)
        if now - self._restored_at > settings.max_eject_backoff:
            self._ejections_in_row = 0  # healthy long enough since the last ejection ended
        backoff = min(
            settings.max_eject_backoff, settings.eject_backoff * 2**self._ejections_in_row
        )
        self._ejections_in_row += 1
        self._ejected_until = now + backoff
        self.ejections += 1
        self._window_start, self._window_ok, self._window_failed = now, 0, 0
        for connection in self._reserve_idle():  # they are likely dead too
            self._discard(connection)
        self._wake_mine(_EJECTED)  # those that queued here: choose again (go elsewhere)
        events.emit(
            events.INSTANCE_EJECTED,
            "warning",
            service=self._service_name,
            instance=self.name,
            failures=self.failures,
            seconds=backoff,
            error=self.last_error,
        )
        if self._timeouts >= settings.eject_after:
            events.emit(
                events.INSTANCE_UNRESPONSIVE,
                "warning",
                service=self._service_name,
                instance=self.name,
                timeouts=self._timeouts,
                advice="it takes connections but does not answer (frozen, overloaded or cut"
                " off): check that instance; clients route around it meanwhile",
            )

    # -- upkeep --------------------------------------------------------------------------------

    def reap(self) -> None:
        """Close idle connections that are dead, past their lifetime, or idle for longer than
        ``idle_timeout`` while more than ``min_idle`` are idle. Each is taken off the stack
        (reserved) before any is closed or logged, so no borrower can receive it."""
        now = self._clock()
        idle_timeout = self._settings.idle_timeout
        keep: list[PooledConnection] = []
        doomed: list[PooledConnection] = []
        surplus = len(self._idle) - self._settings.min_idle
        for connection in self._idle:  # oldest (least recently used) first
            stale = idle_timeout is not None and now - connection.last_used >= idle_timeout
            if not connection.usable(now) or (stale and surplus > 0):
                surplus -= 1
                doomed.append(connection)
            else:
                keep.append(connection)
        self._idle[:] = keep  # before anything can yield (a log pipeline may)
        for connection in doomed:
            self._move(connection, RESERVED)
        if self._max_inflight > 1:  # held pipelined connections whose late replies never came
            for connection in list(self._open_connections):
                if connection.holders and not connection.broken and connection.overdue(now):
                    connection.fail_stuck(now)
        for connection in doomed:
            self.reaped += 1
            self._discard(connection)
            self._grant_slot()  # reserved, it counted: a waiter may have queued meanwhile
            events.emit(
                events.CONNECTION_REAPED,
                "debug",
                service=self._service_name,
                instance=self.name,
                idle_for=round(now - connection.last_used, 3),
            )

    def fill(self) -> None:
        """Open connections until ``min_idle`` are idle (or being opened), within the cap."""
        settings = self._settings
        while (
            self.state is ACTIVE
            and self.available(self._clock())
            and len(self._idle) + self._opening < settings.min_idle
            and len(self._open_connections) + self._opening < settings.max_connections
        ):
            self._opening += 1
            try:
                connection = self._open(self._clock() + settings.connect_timeout)
            except (ConnectError, PoolClosedError):
                return
            self._deliver(connection)

    def shut(self, state: str = RETIRED) -> None:
        """Stop serving: close idle connections now, busy ones at check-in, wake waiters."""
        if self.state is not ACTIVE:
            return
        self.state = state
        if self._ejected_until is not None:  # it no longer counts as ejected
            self._ejected_until = None
            self._ejections_in_row = 0
            self._guard.count(self._ejected_refused, -1)
        for connection in self._reserve_idle():
            self._discard(connection)
        self._wake_mine(_SHUT)

    def _wake_mine(self, reason: object) -> None:
        """Tell ``reason`` to the waiters that queued at this pool (others of the service
        may still serve the rest)."""
        room = self._room
        for waiter in room.queue:
            if waiter.pool is self and not waiter.result.ready():
                room.tell(waiter, reason)

    def descriptors(self) -> list[int]:
        """The descriptors of every open connection, idle or checked out."""
        return [connection.fileno() for connection in self._open_connections]

    def forget(self) -> None:
        """After a fork, in the child: stop serving and drop every connection (their
        descriptors were killed in the fork; closing them touches nothing of the parent's)."""
        self.state = CLOSED
        for connection in self._reserve_idle():  # (not counted as closed: the parent's)
            self._move(connection, CLOSED)
            connection.close()
        for connection in list(self._open_connections):
            if connection.pool_state is IN_USE:  # a checking or reserved one is moved on by
                self._move(connection, CLOSED)  # its pinger or the reaper, still under way
            connection.close()
        self._room.queue.clear()

    def status(self) -> InstanceStatus:
        """A snapshot of this pool; ``state`` is active, ejected, retired or closed."""
        ejected = (
            self.state is ACTIVE
            and self._ejected_until is not None
            and not self._on_probation(self._clock())
        )
        return InstanceStatus(
            instance=self.name,
            state="ejected" if ejected else self.state,
            in_use=self._in_use,
            idle=len(self._idle),
            opening=self._opening,
            waiters=self._waiting,
            max_connections=self._settings.max_connections,
            opened=self.opened,
            closed=self.closed,
            reaped=self.reaped,
            checkouts=self.checkouts,
            failures=self.failures,
            ejected=ejected,
            ejections=self.ejections,
            last_error=self.last_error,
            held=self._connections_held(),
            max_inflight=self._max_inflight,
            inflight=tuple(sorted((c.holders for c in self._open_connections), reverse=True)),
        )
