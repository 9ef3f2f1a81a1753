"""The pools of one service: one :class:`InstancePool` per live instance.

:class:`ServicePools` promises:

* **Membership drives the pools.** :meth:`ServicePools.apply` (fed by the membership's
  changes) gives a joining instance a pool at once (unless the client's ``tls`` refuses
  plaintext and the instance offers no TLS: then it is left out, ``instance_rejected``),
  with ``min_idle`` connections opened in the background; a leaving instance's pool
  retires (no new checkout, idle connections close now, busy ones at check-in); an updated
  instance gets a fresh pool.
* **Upkeep in the background.** One reaper greenlet closes idle connections that are dead,
  stale or past their lifetime and tops every pool up to ``min_idle``, every
  ``reap_interval`` seconds; an error in one pool never stops it.
* **Fork safety for its part**: :meth:`ServicePools.descriptors` names every socket to kill
  in a forked child, and :meth:`ServicePools.forget` drops them there without a byte sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import gevent

from geventpool import events
from geventpool.client.connection import PLAINTEXT_REFUSED
from geventpool.client.pool import (
    CLOSED,
    RETIRED,
    EjectionGuard,
    InstancePool,
    InstanceStatus,
    PoolSettings,
    WaitingRoom,
)
from geventpool.discovery.instance import Instance
from geventpool.discovery.membership import MembershipChange


class ServicePools(Mapping[str, InstancePool]):
    """The pools of the thriftpy2 ``service`` named ``service_name``, by instance id."""

    def __init__(
        self,
        service_name: str,
        service: Any,
        settings: PoolSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service_name = service_name
        self._service = service
        self._settings = settings
        self._clock = clock
        self._by_id: dict[str, InstancePool] = {}
        self.active: list[InstancePool] = []  # what the balancer chooses from
        self._room = WaitingRoom()  # one queue for the service: the oldest waiter first
        self._guard = EjectionGuard(settings)  # how much of the service may be ejected
        self._started = False  # the first instances (at start) do not ramp up
        self.closed = False
        self._reaper: gevent.Greenlet | None = None

    def __getitem__(self, instance_id: str) -> InstancePool:
        return self._by_id[instance_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # -- membership ----------------------------------------------------------------------------

    def on_change(self, change: MembershipChange) -> None:
        """Apply one change of the membership (an updated instance is left, then joined)."""
        self.apply((*change.joined, *change.updated), (*change.left, *change.updated))

    def apply(self, joined: Iterable[Instance], left: Iterable[Instance]) -> None:
        """Retire the pools of ``left``, then give each of ``joined`` a new pool (nothing
        once closed: a change that arrives while the client stops opens no pool)."""
        if self.closed:
            return
        for instance in left:
            pool = self._by_id.pop(instance.id or str(instance), None)
            if pool is not None:
                pool.shut(RETIRED)
        fresh = []
        tls = self._settings.tls
        for instance in joined:
            if tls is not None and not (tls.plaintext or instance.tls or instance.tls_port):
                events.emit(
                    events.INSTANCE_REJECTED,
                    "warning",
                    service=self._service_name,
                    path=instance.id or str(instance),
                    reason=PLAINTEXT_REFUSED,
                )
                continue
            existing = self._by_id.get(instance.id or str(instance))
            if existing is not None:
                if existing.instance == instance:
                    continue  # known already (the first read is applied twice at start)
                existing.shut(RETIRED)
            pool = InstancePool(
                self._service_name,
                instance,
                self._service,
                self._settings,
                clock=self._clock,
                room=self._room,
                guard=self._guard,
                warming=self._started,
            )
            self._by_id[instance.id or str(instance)] = pool
            fresh.append(pool)
        self.active = list(self._by_id.values())
        self._guard.pools = self.active
        if self._settings.min_idle:
            for pool in fresh:
                gevent.spawn(pool.fill)

    # -- upkeep --------------------------------------------------------------------------------

    def start_reaper(self, tick: Callable[[float], None] | None = None) -> None:
        """Start the background upkeep (idempotent); ``tick(now)`` runs on every round too
        (the client's retry budget marks its window with it). The client runs from now on:
        an instance that joins later ramps up over ``slow_start``."""
        self._started = True
        if self._reaper is None:
            self._reaper = gevent.spawn(self._reap_forever, tick)

    def _reap_forever(self, tick: Callable[[float], None] | None) -> None:
        while True:
            gevent.sleep(self._settings.reap_interval)
            if tick is not None:
                tick(self._clock())
            for pool in list(self.active):
                try:
                    pool.reap()
                    pool.fill()
                except Exception as error:  # noqa: BLE001 - the reaper must outlive a bad pool
                    pool.last_error = repr(error)

    def _stop_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.kill(block=False)

    def close(self) -> None:
        """Stop the reaper and close every pool: idle connections now, busy ones at check-in;
        waiters get PoolClosedError. Idempotent."""
        self.closed = True
        self._stop_reaper()
        for pool in self._by_id.values():
            pool.shut(CLOSED)

    # -- fork safety ---------------------------------------------------------------------------

    def descriptors(self) -> list[int]:
        """The descriptor of every open connection of every pool, idle or checked out."""
        return [fd for pool in self._by_id.values() for fd in pool.descriptors()]

    def forget(self) -> None:
        """In a forked child, once the descriptors were killed: stop the (inherited) reaper
        and drop every connection without touching the parent's."""
        self.closed = True
        self._stop_reaper()
        for pool in self._by_id.values():
            pool.forget()

    # -- status --------------------------------------------------------------------------------

    def status(self) -> tuple[InstanceStatus, ...]:
        """A snapshot of every instance's pool."""
        return tuple(pool.status() for pool in self._by_id.values())
