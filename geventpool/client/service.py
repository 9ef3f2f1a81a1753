"""The client: one object per service that every caller greenlet shares.

``client.add(1, 2)`` (or ``client.call("add", 1, 2)``) borrows a connection from one live
instance's pool, makes the call and gives the connection back. :class:`ServiceClient` promises:

* **A total deadline** per call (``timeout``, default ``call_timeout``) over choosing, waiting
  for a connection, connecting, sending and receiving.
* **Safe failover.** A call that was not sent (a failed connect, a request never written) is
  made on another instance; one that may have run is sent again only if its
  :class:`~geventpool.client.retrying.Retry` says it is idempotent; always within the
  deadline and the client's :class:`~geventpool.client.retrying.RetryBudget`, every attempt
  kept in :class:`~geventpool.errors.RetriesExhaustedError`. Otherwise
  :class:`~geventpool.errors.TransportError` or :class:`~geventpool.errors.CallTimeoutError`
  reach the caller. An optional :class:`~geventpool.client.hedging.Hedge` sends a slow
  idempotent call once more.
* **No caller stranded**: callers that must wait queue once for the whole service and are
  served by whichever instance has room first.
* **Local ejection** of an instance after repeated failures or a low success rate, long before
  ZooKeeper's session timeout removes it, never of more than ``max_ejected_share`` of the
  service; below ``panic_threshold`` in rotation every instance takes calls again.
* **Bounded exhaustion.** When every instance's pool is full and the wait runs out, the caller
  gets :class:`~geventpool.errors.PoolExhaustedError` with the service-wide numbers, and a
  ``pool_exhausted`` event (at most one a second, with the count suppressed) tells operators to
  add instances; an instance that stops answering gets its own ``instance_unresponsive``.
* **Membership drives the pools**: a joining instance is usable at once (``min_idle``
  connections opened), a leaving one gets no new calls, its idle connections close at once and
  its busy ones at check-in.
* **Fork safety**: a client used in a forked child rebuilds itself there and never touches the
  parent's sockets or ZooKeeper session (:mod:`geventpool.client.forking`).
* The instances come from ZooKeeper (``zookeeper=``) or from a fixed list (``instances=``).

It is the wiring of parts: a source of instances (:mod:`~geventpool.client.source`) feeds the
service's pools (:mod:`~geventpool.client.pools`); :mod:`~geventpool.client.checkout` borrows
a connection for each call, failing over and reporting exhaustion
(:mod:`~geventpool.client.exhaustion`); the pool counts how the instance did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from kazoo.client import KazooClient

from geventpool import events
from geventpool.client import forking
from geventpool.client.balancer import make_balancer
from geventpool.client.checkout import Checkout
from geventpool.client.connection import PooledConnection
from geventpool.client.exhaustion import ExhaustionReporter
from geventpool.client.hedging import Hedge, Hedger
from geventpool.client.observing import (
    OK,
    Attempt,
    CallObserver,
    client_observers,
    new_record,
    outcome_of,
)
from geventpool.client.pinned import PinnedConnection
from geventpool.client.pool import InstancePool, InstanceStatus, PoolSettings
from geventpool.client.pools import ServicePools
from geventpool.client.retrying import RESEND, Retry, RetryBudget, classify, emit_retry
from geventpool.client.source import RegistryInstances, StaticInstances
from geventpool.discovery.instance import Instance
from geventpool.discovery.membership import Membership
from geventpool.discovery.zk import DEFAULT_ROOT, ZooKeeperConfig
from geventpool.errors import (
    ConfigurationError,
    GeventPoolError,
    PoolClosedError,
    PoolError,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
    TransportError,
)
from geventpool.tls import ClientTls
from geventpool.validation import check_seconds


def first_argument(method: str, args: tuple[Any, ...]) -> Hashable:
    """The ``consistent_hash`` balancer's key by default: a call's first argument (Dubbo's);
    None (any instance) for a call without arguments."""
    return args[0] if args else None


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot of a client: totals over its instances, and each instance's numbers."""

    service: str
    started: bool
    in_use: int
    idle: int
    waiters: int
    max_connections: int
    exhausted: int
    instances: tuple[InstanceStatus, ...]
    #: Retries made since start (of calls sent or not), retries the budget refused, and
    #: the retries it allows now.
    retries: int = 0
    retries_refused: int = 0
    retry_budget: float = 0.0
    #: Backup requests sent (with a Hedge).
    hedged: int = 0
    #: The state of the client's ZooKeeper connection (``CONNECTED``, ``SUSPENDED``,
    #: ``LOST``; None with static instances), and how many children of the service's path
    #: are rejected now (which, and why: ``client.membership.rejected``).
    zookeeper: str | None = None
    rejected: int = 0


class ServiceClient:
    """A highly available client of the thriftpy2 ``service`` (e.g. ``calc_thrift.Calculator``).

    ``name`` is the service's name in the registry (``<root>/<name>``), or give ``path``.
    Give ``zookeeper`` (a connect string, a :class:`ZooKeeperConfig`, or a started kazoo client
    the caller owns) or a fixed list of ``instances``. ``pool`` sets each instance's pool;
    ``balancer`` is ``peak_ewma`` (default), ``least_in_use``, ``round_robin`` or
    ``consistent_hash`` (see :mod:`geventpool.client.balancer`), with ``hash_key(method,
    args)`` giving a call's key (default: its first argument); ``zone`` prefers the instances
    of that zone while one of them has room; ``call_timeout`` is the default deadline of a
    call in seconds; ``retry`` a :class:`~geventpool.client.retrying.Retry` (``retries`` is
    its shorthand) and ``retry_budget`` a
    :class:`~geventpool.client.retrying.RetryBudget`; ``hedge`` a
    :class:`~geventpool.client.hedging.Hedge` (backup requests for slow idempotent calls,
    off by default); ``tls`` a :class:`~geventpool.tls.ClientTls` (TLS to every instance, the
    registry's TLS ports used; plaintext instances left out unless it allows ``plaintext``;
    without it, TLS only to instances the registry lists as TLS-only, with the system's CAs),
    the same as ``pool``'s ``tls``; ``empty_protection`` is passed to the :class:`Membership`.

    IDL methods whose names clash with this class's own (``start``, ``stop``, ``call``,
    ``status``, ``connection``) are called with ``client.call("stop", ...)``.
    """

    def __init__(
        self,
        service: Any,
        name: str | None = None,
        *,
        zookeeper: str | ZooKeeperConfig | KazooClient | None = None,
        instances: Iterable[Instance] | None = None,
        root: str = DEFAULT_ROOT,
        path: str | None = None,
        pool: PoolSettings | None = None,
        balancer: str = "peak_ewma",
        zone: str | None = None,
        hash_key: Callable[[str, tuple[Any, ...]], Hashable] | None = None,
        call_timeout: float = 5.0,
        retries: int | None = None,
        retry: Retry | None = None,
        retry_budget: RetryBudget | None = None,
        hedge: Hedge | None = None,
        tls: ClientTls | None = None,
        observers: Iterable[CallObserver] = (),
        empty_protection: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (zookeeper is None) == (instances is None):
            raise ConfigurationError("give either zookeeper= or instances=, not both or neither")
        if not hasattr(service, "thrift_services"):
            raise ConfigurationError(f"{service!r} is not a thriftpy2 service")
        check_seconds("call_timeout", call_timeout)
        if retries is not None and retry is not None:
            raise ConfigurationError("give retry= (a Retry) or retries= (its shorthand), not both")
        if retry is None:
            retry = Retry() if retries is None else Retry(retries=retries)
        elif not isinstance(retry, Retry):
            raise ConfigurationError(f"retry must be a Retry, not {retry!r}")
        make_balancer(balancer)  # a bad name fails here, not at the first call
        if hash_key is None and balancer == "consistent_hash":
            hash_key = first_argument
        self._zone = zone
        self._hash_key = hash_key
        self._service = service
        self.name = name or (path.rsplit("/", 1)[-1] if path else service.__name__)
        self._zookeeper = zookeeper
        self._static = tuple(instances) if instances is not None else None
        self._root = root
        self._path = path
        self._settings = pool or PoolSettings()
        if tls is not None:
            if self._settings.tls not in (None, tls):
                raise ConfigurationError("give tls= or pool=PoolSettings(tls=...), not both")
            self._settings = dataclasses.replace(self._settings, tls=tls)
        self._balancer_name = balancer
        self._call_timeout = float(call_timeout)
        self._retry = retry
        self._attempt_timeout = retry.attempt_timeout
        self._budget = retry_budget or RetryBudget(clock=clock)
        self._retried = 0  # every retry, budgeted or not
        self._hedger = Hedger(hedge) if hedge is not None else None
        self._empty_protection = empty_protection
        self._clock = clock
        self._watching = tuple(observers)
        # None: no cost per call
        self._observers = client_observers(self._watching) if self._watching else None
        self._methods = frozenset(service.thrift_services)
        self._rebuilding: Event | None = None  # set while one greenlet rebuilds after a fork
        self._reset()

    def _reset(self) -> None:
        """Fresh parts: at construction, and in a forked child before it rebuilds."""
        self._source: StaticInstances | RegistryInstances
        if self._static is not None:
            self._source = StaticInstances(self._static)
        else:
            assert self._zookeeper is not None
            self._source = RegistryInstances(
                self._zookeeper,
                None if self._path else self.name,
                root=self._root,
                path=self._path,
                empty_protection=self._empty_protection,
            )
        self._pools = ServicePools(self.name, self._service, self._settings, clock=self._clock)
        self._exhaustion = ExhaustionReporter(self.name, clock=self._clock)
        self._checkouts = Checkout(
            self.name,
            self._pools,
            make_balancer(self._balancer_name, self._zone),
            self._exhaustion,
            retries=self._retry.retries,
            budget=self._budget,
            clock=self._clock,
        )
        self._checkout = self._checkouts.acquire
        self._min_time_left = self._settings.min_time_left
        self._started = False
        self._starting: AsyncResult | None = None  # set while one greenlet starts the client
        self._closed = False
        self._forked = False

    @property
    def _membership(self) -> Membership | None:
        return self._source.membership

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Load the instances and start the pools' reaper. Called by the first call if needed.

        Raises :class:`~geventpool.errors.ZooKeeperUnavailableError` if ZooKeeper does not
        answer within ``timeout`` seconds. It runs once however many greenlets call it (the
        first calls of a new client, say): the others wait for that one and share its
        outcome, its error included.
        """
        while True:
            if self._closed:
                raise PoolClosedError(f"client of {self.name!r} is closed")
            if self._started:
                return
            starting = self._starting
            if starting is None:
                break
            starting.get()  # the starter's outcome; if it was killed, start here instead
        self._starting = starting = AsyncResult()
        try:
            self._pools.apply(self._source.start(self._pools.on_change, timeout), ())
            self._pools.start_reaper(self._budget.tick)
        except Exception as error:
            self._starting = None
            starting.set_exception(error)
            raise
        except BaseException:  # the starter was killed: a waiter starts instead
            self._starting = None
            starting.set(None)
            raise
        self._started = True
        self._starting = None
        starting.set(None)
        forking.track(self)
        events.emit(
            events.CLIENT_STARTED,
            service=self.name,
            instances=len(self._pools),
            max_connections=self._settings.max_connections,
            balancer=self._balancer_name,
        )

    def stop(self) -> None:
        """Stop: no new calls (PoolClosedError), idle connections close now, busy ones at
        check-in; membership and the owned ZooKeeper client stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        forking.untrack(self)
        self._pools.close()  # first: stopping the source yields, and no call may start meanwhile
        self._source.stop()
        events.emit(events.CLIENT_STOPPED, service=self.name)

    def __enter__(self) -> ServiceClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- calls ---------------------------------------------------------------------------------

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_") or method not in self._methods:
            raise AttributeError(f"{self._service.__name__} has no method {method!r}")

        hedged = self._hedger is not None and self._retry.may_resend(method)
        call_once = self._call

        def remote(*args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
            if hedged or not self._started or self._forked:
                return self.call(method, *args, timeout=timeout, **kwargs)
            return call_once(method, args, kwargs, timeout)  # as call() would: one frame less

        remote.__name__ = method
        self.__dict__[method] = remote  # found directly from now on
        return remote

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on one instance and return its result (or raise what it raised).

        ``timeout`` is this call's total deadline in seconds (default ``call_timeout``). A
        failed call is made again as the client's :class:`Retry` allows (see
        :mod:`geventpool.client.retrying`), within the same deadline; a call attempted more
        than once that never succeeded raises
        :class:`~geventpool.errors.RetriesExhaustedError` with every attempt's error. With a
        :class:`~geventpool.client.hedging.Hedge`, a slow idempotent call is sent once more
        and the first reply wins (see :mod:`geventpool.client.hedging`).
        """
        if not self._started or self._forked:
            self._ensure_started()
        if self._hedger is not None and self._retry.may_resend(method):
            return self._hedged(method, args, kwargs, timeout)
        return self._call(method, args, kwargs, timeout)

    def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        *,
        avoid: tuple[InstancePool, ...] = (),
        chosen: list[InstancePool] | None = None,
        ends_at: float | None = None,
    ) -> Any:
        """One call, retried as the policy allows (see :meth:`call`); elsewhere than ``avoid``
        while another instance is left; the pool it goes to is appended to ``chosen``. Its
        deadline is ``timeout`` from now, or ``ends_at`` on the client's clock when given."""
        now = self._clock()
        if ends_at is None:
            deadline = now + (self._call_timeout if timeout is None else timeout)
        else:
            deadline = ends_at
        self._budget.calls += 1
        key = None if self._hash_key is None else self._hash_key(method, args)
        pool, connection = self._checkout(deadline, method, avoid, key)
        if chosen is not None:
            chosen.append(pool)
        attempt_timeout = self._attempt_timeout  # from the send: a wait does not eat it
        ends = (
            deadline if attempt_timeout is None else min(deadline, self._clock() + attempt_timeout)
        )
        try:
            if self._observers is not None:
                result = self._observed(pool, connection, method, args, kwargs, ends, 1, now, now)
            else:
                result = pool.call(connection, method, args, kwargs, ends, started=now)
        except Exception as error:  # noqa: BLE001 - the policy decides what is retried
            pool.release(connection)
            return self._again(method, args, kwargs, deadline, pool=pool, error=error, key=key)
        except BaseException:
            pool.release(connection)
            raise
        pool.release(connection)
        return result

    def _hedged(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """The call, and a backup of it if it is slower than most (see the module
        :mod:`geventpool.client.hedging`); the first success wins, the other is abandoned."""
        hedger = self._hedger
        assert hedger is not None
        clock = self._clock
        began = clock()
        ends_at = began + (self._call_timeout if timeout is None else timeout)
        delay = hedger.delay()
        chosen: list[InstancePool] = []

        def attempt(**where: Any) -> tuple[bool, Any]:
            # (ok, result or error): the error goes to the caller, not to the hub's printout
            try:
                return True, self._call(method, args, kwargs, None, ends_at=ends_at, **where)
            except Exception as error:  # noqa: BLE001 - raised in the caller's greenlet
                return False, error

        first = gevent.spawn(attempt, chosen=chosen)
        racing = [first]
        try:
            first.join(delay)
            if not first.ready() and hedger.allow():
                events.emit(
                    events.CALL_HEDGED, "debug", service=self.name, method=method, after=delay
                )
                elsewhere = tuple(chosen)  # the instance the first went to, if it is known
                racing.append(gevent.spawn(attempt, avoid=elsewhere))
            ok, outcome = self._first_success(racing)
        finally:
            for greenlet in racing:
                if not greenlet.ready():
                    greenlet.kill(block=False)  # the loser: its connection is given back
        hedger.observe(clock() - began)
        if ok:
            return outcome
        raise outcome

    @staticmethod
    def _first_success(racing: list[gevent.Greenlet]) -> tuple[bool, Any]:
        """The outcome of the first of ``racing`` to succeed, or of the last to fail."""
        pending = list(racing)
        while True:
            done = gevent.wait(pending, count=1)
            for greenlet in done:
                pending.remove(greenlet)
                outcome: tuple[bool, Any] = greenlet.get()
                if outcome[0] or not pending:
                    return outcome

    def _again(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float,
        *,
        pool: InstancePool,
        error: Exception,
        key: Hashable,
    ) -> Any:
        """The call failed with ``error`` on ``pool``: make it again while the policy, the
        budget and the deadline allow; else raise (``error`` itself after one attempt)."""
        retry, budget, clock = self._retry, self._budget, self._clock
        attempts: list[BaseException] = [error]
        tried: tuple[InstancePool, ...] = (pool,)
        while True:
            now = clock()
            how = classify(error, retry, method, now < deadline - self._min_time_left)
            if how is None:  # the call's outcome (an answer of the server's, say)
                if len(attempts) == 1 or not isinstance(error, (TransportError, PoolError)):
                    raise error
                raise RetriesExhaustedError(self.name, attempts) from error
            if len(attempts) > retry.retries:
                raise RetriesExhaustedError(self.name, attempts) from error
            if how is RESEND and not budget.withdraw(now):
                self._checkouts.budget_spent(method)
                raise RetryBudgetExhaustedError(self.name, attempts, budget.describe()) from error
            self._retried += 1
            emit_retry(self.name, method, len(attempts) + 1, error, how)
            pause = retry.delay(len(attempts))
            if pause:
                gevent.sleep(min(pause, max(0.0, deadline - clock())))
            asked = clock()  # the wait for this attempt's connection starts
            try:
                pool, connection = self._checkout(deadline, method, tried, key)
            except RetryBudgetExhaustedError as refused:
                raise RetryBudgetExhaustedError(
                    self.name, [*attempts, *refused.attempts], budget.describe()
                ) from refused
            except RetriesExhaustedError as exhausted:
                raise RetriesExhaustedError(
                    self.name, [*attempts, *exhausted.attempts]
                ) from exhausted
            except GeventPoolError as failure:  # nowhere to go (no instance left, say)
                attempts.append(failure)
                raise RetriesExhaustedError(self.name, attempts) from failure
            ends = deadline
            if retry.attempt_timeout is not None:
                ends = min(deadline, clock() + retry.attempt_timeout)
            try:
                if self._observers is not None:
                    number = len(attempts) + 1
                    result = self._observed(
                        pool, connection, method, args, kwargs, ends, number, asked
                    )
                else:
                    result = pool.call(connection, method, args, kwargs, ends)
            except Exception as failure:  # noqa: BLE001 - the policy decides, as above
                pool.release(connection)
                error = failure
                attempts.append(failure)
                tried = (*tried, pool)
                continue
            except BaseException:
                pool.release(connection)
                raise
            pool.release(connection)
            return result

    def _observed(  # noqa: PLR0917 - pool.call's arguments and the attempt's number
        self,
        pool: InstancePool,
        connection: PooledConnection,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ends: float,
        number: int,
        asked: float,
        started: float | None = None,
    ) -> Any:
        """``pool.call`` told to the observers as attempt ``number``, whose connection was
        asked for at ``asked`` on the client's clock."""
        observers, clock = self._observers, self._clock
        assert observers is not None  # called only when there are some
        began = clock()
        attempt = new_record(Attempt, (self.name, method, pool.name, number, began - asked))
        try:  # an attempt told its start is told its end, whatever ends it
            if observers.starts:
                observers.started(attempt)
                began = clock()
            result = pool.call(connection, method, args, kwargs, ends, started=started)
        except BaseException as error:
            observers.ended(attempt, outcome_of(error), clock() - began, error)
            raise
        observers.ended(attempt, OK, clock() - began, None)
        return result

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[PinnedConnection]:
        """Borrow one connection for several calls: ``with client.connection() as c:``.

        ``timeout`` bounds getting the connection and each call made on it. The connection
        goes back at the end of the block, or is closed if a call did not complete cleanly.
        """
        if not self._started or self._forked:
            self._ensure_started()
        limit = self._call_timeout if timeout is None else timeout
        pool, connection = self._checkout(self._clock() + limit)
        observed = None
        if self._observers is not None:

            def observed(
                connection: PooledConnection,
                method: str,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                deadline: float,
            ) -> Any:  # each call on the borrowed connection is an attempt of its own
                now = self._clock()
                return self._observed(pool, connection, method, args, kwargs, deadline, 1, now)

        pinned = PinnedConnection(
            pool, connection, limit, self._clock, self._methods, call=observed
        )
        try:
            yield pinned
        finally:
            pinned.returned = True
            pool.release(connection)

    def _ensure_started(self) -> None:
        if self._forked:
            self._rebuild_after_fork()
        self.start()

    # -- fork safety ---------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """In a forked child, inside the fork: kill every inherited descriptor (see
        :mod:`geventpool.client.forking`); the client rebuilds itself on its next use."""
        self._forked = True
        forking.kill_descriptors(self._pools.descriptors())
        self._source.after_fork_in_child()

    def _rebuild_after_fork(self) -> None:
        """Once, whichever greenlet of the child comes first (abandoning the parent's watch
        yields: a second caller meanwhile must not rebuild again)."""
        if self._rebuilding is not None:
            self._rebuilding.wait()
            return
        self._rebuilding = rebuilding = Event()
        try:
            self._abandon_parent()
        finally:
            self._rebuilding = None
            rebuilding.set()

    def _abandon_parent(self) -> None:
        self._source.abandon_after_fork(self.name)
        self._pools.forget()
        self._reset()  # the parent's ZooKeeper client is abandoned, never stopped from here
        events.emit(events.CLIENT_REBUILT_AFTER_FORK, service=self.name)

    def observe(self, observer: CallObserver) -> None:
        """Tell ``observer`` about every attempt from now on, as those given in
        ``observers=`` are (once, however often it is given)."""
        if any(observer is known for known in self._watching):
            return
        self._watching = (*self._watching, observer)
        self._observers = client_observers(self._watching)

    # -- status --------------------------------------------------------------------------------

    @property
    def zookeeper_session(self) -> int | None:
        """The id of this client's ZooKeeper session (None without ZooKeeper or before start)."""
        membership = self._source.membership
        if membership is None:
            return None
        client_id = membership.client.client_id
        return client_id[0] if client_id else None

    @property
    def membership(self) -> Membership | None:
        """The registry view the instances come from (its rejected children, its kazoo
        client's state), read-only use; None with ``instances=`` or before start."""
        return self._source.membership

    def status(self) -> ServiceStatus:
        """A snapshot of every instance's pool and the totals."""
        instances = self._pools.status()
        membership = self._source.membership
        return ServiceStatus(
            service=self.name,
            started=self._started and not self._closed,
            in_use=sum(s.in_use for s in instances),
            idle=sum(s.idle for s in instances),
            waiters=sum(s.waiters for s in instances),
            max_connections=sum(s.max_connections for s in instances),
            exhausted=self._exhaustion.count,
            instances=instances,
            retries=self._retried + self._checkouts.failovers,
            retries_refused=self._budget.refused,
            retry_budget=round(self._budget.available(self._clock()), 1),
            hedged=self._hedger.backups if self._hedger is not None else 0,
            zookeeper=None if membership is None else str(membership.client.state),
            rejected=0 if membership is None else len(membership.rejected),
        )
