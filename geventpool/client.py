"""The client: one object per service that every caller greenlet shares.

``client.add(1, 2)`` (or ``client.call("add", 1, 2)``) borrows a connection from one live
instance's pool, makes the call and gives the connection back. :class:`ServiceClient` promises:

* **A total deadline** per call (``timeout``, default ``call_timeout``) over choosing, waiting
  for a connection, connecting, sending and receiving.
* **Safe failover.** A failure to connect (nothing was sent) is retried on another instance,
  up to ``retries`` times within the deadline; every attempt is kept in
  :class:`~geventpool.errors.RetriesExhaustedError`. A call that may have been sent is never
  retried: :class:`~geventpool.errors.TransportError` or
  :class:`~geventpool.errors.CallTimeoutError` reach the caller, and the connection is closed.
* **Local ejection** of an instance after repeated failures, long before ZooKeeper's session
  timeout removes it; if every instance is ejected, the least loaded is tried anyway.
* **Bounded exhaustion.** When every instance's pool is full and the wait runs out, the caller
  gets :class:`~geventpool.errors.PoolExhaustedError` with the service-wide numbers, and a
  ``pool_exhausted`` event (at most one a second, with the count suppressed) tells operators to
  add instances.
* **Membership drives the pools**: a joining instance is usable at once (``min_idle``
  connections opened), a leaving one gets no new calls, its idle connections close at once and
  its busy ones at check-in.
* **Fork safety**: a client used in a forked child rebuilds itself there and never touches the
  parent's sockets or ZooKeeper session (:mod:`geventpool.forking`).
* The instances come from ZooKeeper (``zookeeper=``) or from a fixed list (``instances=``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
from kazoo.client import KazooClient

from geventpool import events, forking
from geventpool.balancer import Balancer, make_balancer
from geventpool.connection import Connection
from geventpool.errors import (
    ConfigurationError,
    ConnectError,
    GeventPoolError,
    NoInstancesError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    RetriesExhaustedError,
    TransportError,
)
from geventpool.instance import Instance
from geventpool.membership import Membership, MembershipChange
from geventpool.pool import ACTIVE, CLOSED, InstancePool, InstanceStatus, PoolSettings
from geventpool.validation import check_seconds
from geventpool.zk import DEFAULT_ROOT, ZooKeeperConfig, connect

EXHAUSTED_EVENT_INTERVAL = 1.0


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


class ServiceClient:
    """A highly available client of the thriftpy2 ``service`` (e.g. ``calc_thrift.Calculator``).

    ``name`` is the service's name in the registry (``<root>/<name>``), or give ``path``.
    Give ``zookeeper`` (a connect string, a :class:`ZooKeeperConfig`, or a started kazoo client
    the caller owns) or a fixed list of ``instances``. ``pool`` sets each instance's pool;
    ``balancer`` is ``least_in_use`` (default) or ``round_robin``; ``call_timeout`` is the
    default deadline of a call in seconds; ``retries`` how many other instances a call may try
    when connecting fails; ``empty_protection`` is passed to the :class:`Membership`.

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
        balancer: str = "least_in_use",
        call_timeout: float = 5.0,
        retries: int = 2,
        empty_protection: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (zookeeper is None) == (instances is None):
            raise ConfigurationError("give either zookeeper= or instances=, not both or neither")
        if not hasattr(service, "thrift_services"):
            raise ConfigurationError(f"{service!r} is not a thriftpy2 service")
        check_seconds("call_timeout", call_timeout)
        if not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, not {retries!r}")
        self._service = service
        self.name = name or (path.rsplit("/", 1)[-1] if path else service.__name__)
        self._zookeeper = zookeeper
        self._static = tuple(instances) if instances is not None else None
        self._root = root
        self._path = path
        self._settings = pool or PoolSettings()
        self._balancer_name = balancer
        self._balancer: Balancer = make_balancer(balancer)
        self._call_timeout = float(call_timeout)
        self._retries = retries
        self._empty_protection = empty_protection
        self._clock = clock
        self._methods = frozenset(service.thrift_services)
        self._reset()

    def _reset(self) -> None:
        self._pools: dict[str, InstancePool] = {}
        self._active: list[InstancePool] = []
        self._membership: Membership | None = None
        self._owned_zk: KazooClient | None = None
        self._reaper: gevent.Greenlet | None = None
        self._started = False
        self._closed = False
        self._forked = False
        self._exhausted = 0
        self._exhausted_suppressed = 0
        self._last_exhausted_event = float("-inf")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Load the instances and start the pools' reaper. Called by the first call if needed.

        Raises :class:`~geventpool.errors.ZooKeeperUnavailableError` if ZooKeeper does not
        answer within ``timeout`` seconds.
        """
        if self._closed:
            raise PoolClosedError(f"client of {self.name!r} is closed")
        if self._started:
            return
        if self._static is not None:
            self._apply(self._static, ())
        else:
            zookeeper = self._zookeeper
            if isinstance(zookeeper, KazooClient):
                client = zookeeper
            else:
                assert zookeeper is not None
                config = (
                    zookeeper
                    if isinstance(zookeeper, ZooKeeperConfig)
                    else ZooKeeperConfig(zookeeper, connect_timeout=timeout)
                )
                client = self._owned_zk = connect(config)
            membership = Membership(
                client,
                None if self._path else self.name,
                root=self._root,
                path=self._path,
                empty_protection=self._empty_protection,
            )
            membership.subscribe(self._on_change)
            try:
                membership.start(timeout)
            except BaseException:
                self._close_zookeeper()
                raise
            self._membership = membership
            self._apply(membership.instances.values(), ())
        self._reaper = gevent.spawn(self._reap_forever)
        self._started = True
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
        if self._reaper is not None:
            self._reaper.kill(block=False)
        if self._membership is not None:
            self._membership.stop()
        for pool in self._pools.values():
            pool.shut(CLOSED)
        self._close_zookeeper()
        events.emit(events.CLIENT_STOPPED, service=self.name)

    def _close_zookeeper(self) -> None:
        client, self._owned_zk = self._owned_zk, None
        if client is not None:
            client.stop()
            client.close()

    def __enter__(self) -> ServiceClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- calls ---------------------------------------------------------------------------------

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_") or method not in self._methods:
            raise AttributeError(f"{self._service.__name__} has no method {method!r}")

        def remote(*args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
            return self.call(method, *args, timeout=timeout, **kwargs)

        remote.__name__ = method
        self.__dict__[method] = remote  # found directly from now on
        return remote

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on one instance and return its result (or raise what it raised).

        ``timeout`` is this call's total deadline in seconds (default ``call_timeout``).
        """
        if not self._started or self._forked:
            self._ensure_started()
        deadline = self._clock() + (self._call_timeout if timeout is None else timeout)
        pool, connection = self._checkout(deadline)
        try:
            return call_on(pool, connection, method, args, kwargs, deadline=deadline)
        finally:
            pool.release(connection)

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
        pinned = PinnedConnection(pool, connection, limit, self._clock, self._methods)
        try:
            yield pinned
        finally:
            pinned.returned = True
            pool.release(connection)

    def _ensure_started(self) -> None:
        if self._forked:
            self._rebuild_after_fork()
        self.start()

    def _checkout(self, deadline: float) -> tuple[InstancePool, Connection]:
        """A pool and a connection from it; other instances are tried when connecting fails.

        The lists of failed attempts are made only after a failure: a call that succeeds at
        once allocates nothing here (fewer objects, fewer garbage collections).
        """
        tried: tuple[InstancePool, ...] = ()
        attempts: tuple[GeventPoolError, ...] = ()
        while True:
            now = self._clock()
            pool = self._balancer.choose(self._active, now, tried) or self._any_pool(tried)
            if pool is None:
                if attempts:
                    raise RetriesExhaustedError(self.name, list(attempts))
                if self._closed:
                    raise PoolClosedError(f"client of {self.name!r} is closed")
                raise NoInstancesError(self.name)
            try:
                return pool, pool.acquire(deadline)
            except (ConnectError, PoolClosedError) as error:
                tried, attempts = (*tried, pool), (*attempts, error)
                if len(attempts) > self._retries or self._clock() >= deadline:
                    raise RetriesExhaustedError(self.name, list(attempts)) from error
            except PoolExhaustedError as error:
                raise self._on_exhausted(error.timeout) from None

    def _any_pool(self, tried: Sequence[InstancePool]) -> InstancePool | None:
        """Every instance is ejected: rather than fail, try the least loaded one anyway."""
        candidates = [p for p in self._active if p.state is ACTIVE and p not in tried]
        return min(candidates, key=lambda p: p.in_use + p.waiting, default=None)

    def _on_exhausted(self, waited: float) -> PoolExhaustedError:
        pools = self._active
        error = PoolExhaustedError(
            self.name,
            sum(p.max_connections for p in pools),
            sum(p.in_use for p in pools),
            sum(p.waiting for p in pools),
            waited,
        )
        self._exhausted += 1
        now = self._clock()
        if now - self._last_exhausted_event < EXHAUSTED_EVENT_INTERVAL:
            self._exhausted_suppressed += 1
            return error
        events.emit(
            events.POOL_EXHAUSTED,
            "error",
            service=self.name,
            max_connections=error.max_connections,
            in_use=error.in_use,
            waiters=error.waiters,
            waited=round(waited, 3),
            suppressed=self._exhausted_suppressed,
            instances=[
                {
                    "instance": p.name,
                    "in_use": p.in_use,
                    "max": p.max_connections,
                    "waiters": p.waiting,
                }
                for p in pools
            ],
            advice="every connection is busy: add server instances or raise max_connections",
        )
        self._last_exhausted_event = now
        self._exhausted_suppressed = 0
        return error

    # -- membership and upkeep -----------------------------------------------------------------

    def _on_change(self, change: MembershipChange) -> None:
        self._apply((*change.joined, *change.updated), (*change.left, *change.updated))

    def _apply(self, joined: Iterable[Instance], left: Iterable[Instance]) -> None:
        for instance in left:
            pool = self._pools.pop(instance.id or str(instance), None)
            if pool is not None:
                pool.shut()
        fresh = []
        for instance in joined:
            pool = InstancePool(
                self.name, instance, self._service, self._settings, clock=self._clock
            )
            self._pools[instance.id or str(instance)] = pool
            fresh.append(pool)
        self._active = list(self._pools.values())
        if self._settings.min_idle:
            for pool in fresh:
                gevent.spawn(pool.fill)

    def _reap_forever(self) -> None:
        while True:
            gevent.sleep(self._settings.reap_interval)
            for pool in list(self._active):
                try:
                    pool.reap()
                    pool.fill()
                except Exception as error:  # noqa: BLE001 - the reaper must outlive a bad pool
                    pool.last_error = repr(error)

    # -- fork safety ---------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """In a forked child, inside the fork: kill every inherited descriptor (see
        :mod:`geventpool.forking`); the client rebuilds itself on its next use."""
        self._forked = True
        forking.kill_descriptors(fd for pool in self._pools.values() for fd in pool.descriptors())
        if self._membership is not None:
            forking.disarm_kazoo(self._membership.client)

    def _rebuild_after_fork(self) -> None:
        if isinstance(self._zookeeper, KazooClient):
            raise PoolClosedError(
                f"client of {self.name!r} was forked with a kazoo client it does not own:"
                " build a new client in the child, or pass hosts instead"
            )
        if self._reaper is not None:
            self._reaper.kill(block=False)
        if self._membership is not None:
            self._membership.stop()
        for pool in self._pools.values():
            pool.forget()
        self._reset()  # the parent's ZooKeeper client is abandoned, never stopped from here
        events.emit(events.CLIENT_REBUILT_AFTER_FORK, service=self.name)

    # -- status --------------------------------------------------------------------------------

    @property
    def zookeeper_session(self) -> int | None:
        """The id of this client's ZooKeeper session (None without ZooKeeper or before start)."""
        if self._membership is None:
            return None
        client_id = self._membership.client.client_id
        return client_id[0] if client_id else None

    def status(self) -> ServiceStatus:
        """A snapshot of every instance's pool and the totals."""
        instances = tuple(pool.status() for pool in self._pools.values())
        return ServiceStatus(
            service=self.name,
            started=self._started and not self._closed,
            in_use=sum(s.in_use for s in instances),
            idle=sum(s.idle for s in instances),
            waiters=sum(s.waiters for s in instances),
            max_connections=sum(s.max_connections for s in instances),
            exhausted=self._exhausted,
            instances=instances,
        )


def call_on(
    pool: InstancePool,
    connection: Connection,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    deadline: float,
) -> Any:
    """Call on a checked-out ``connection`` and tell ``pool`` how its instance did."""
    try:
        result = connection.call(method, args, kwargs, deadline)
    except TransportError as error:
        pool.record_failure(error)
        raise
    if pool.failures:
        pool.record_success()
    return result


class PinnedConnection:
    """One borrowed connection; ``c.add(1, 2)`` calls on it (see ServiceClient.connection).

    Once the ``with`` block ends the connection is back in the pool, perhaps with another
    caller: calls then raise :class:`~geventpool.errors.PoolError`.
    """

    def __init__(
        self,
        pool: InstancePool,
        connection: Connection,
        limit: float,
        clock: Callable[[], float],
        methods: frozenset[str],
    ) -> None:
        self._methods = methods
        self.returned = False
        self._pool = pool
        self._connection = connection
        self._limit = limit
        self._clock = clock

    @property
    def instance(self) -> Instance:
        """The instance this connection goes to."""
        return self._connection.instance

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_") or method not in self._methods:
            raise AttributeError(f"the service has no method {method!r}")

        def remote(*args: Any, **kwargs: Any) -> Any:
            if self.returned:
                raise PoolError(f"{method}(): the connection was returned to the pool")
            deadline = self._clock() + self._limit
            return call_on(self._pool, self._connection, method, args, kwargs, deadline=deadline)

        return remote
