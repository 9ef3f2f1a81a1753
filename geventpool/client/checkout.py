"""Getting a connection for one call: choose an instance, borrow from its pool, fail over.

:class:`Checkout` promises:

* **The deadline is the caller's.** A connect cut short by the call's own deadline is no
  failure of the instance: the caller gets :class:`~geventpool.errors.CallTimeoutError`
  (``sent`` False) and the instance is not charged.
* **Safe failover.** A failure to connect (:class:`~geventpool.errors.ConnectError`: nothing
  was sent) or a pool that retired or ejected its instance while the caller waited is retried
  on another instance, at most ``retries`` more times and never past the call's deadline;
  every attempt is kept in :class:`~geventpool.errors.RetriesExhaustedError`.
* **Never nowhere to go while an instance exists.** If every instance is ejected, the least
  loaded one is tried anyway.
* **Bounded exhaustion.** A wait that runs out raises the service-wide
  :class:`~geventpool.errors.PoolExhaustedError` from the :class:`ExhaustionReporter`.
* A call that succeeds at once allocates nothing here: the lists of failed attempts are made
  only after a failure.

The retry policy and the routing of the next issues (budgets, idempotent retries after
sending, routing around slow instances) grow here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence

from geventpool import events
from geventpool.client.balancer import Balancer
from geventpool.client.connection import PooledConnection
from geventpool.client.exhaustion import ExhaustionReporter
from geventpool.client.pool import ACTIVE, InstancePool
from geventpool.client.pools import ServicePools
from geventpool.client.retrying import RetryBudget
from geventpool.errors import (
    CallTimeoutError,
    ConnectError,
    GeventPoolError,
    NoInstancesError,
    PoolClosedError,
    PoolExhaustedError,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
)


class Checkout:
    """Borrows connections from ``pools`` as ``balancer`` chooses, trying others on failure."""

    def __init__(
        self,
        service_name: str,
        pools: ServicePools,
        balancer: Balancer,
        exhaustion: ExhaustionReporter,
        *,
        retries: int,
        budget: RetryBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service_name = service_name
        self._pools = pools
        self._balancer = balancer
        self._exhaustion = exhaustion
        self._retries = retries
        self._budget = budget
        self._clock = clock
        self.failovers = 0  # connects retried on another instance
        self._budget_event = float("-inf")

    def acquire(
        self,
        deadline: float,
        method: str = "connection",
        avoid: tuple[InstancePool, ...] = (),
        key: Hashable = None,
    ) -> tuple[InstancePool, PooledConnection]:
        """A pool and a connection from it for a call of ``method``, by ``deadline`` (clock
        seconds) at the latest, from another pool than those in ``avoid`` while one is left
        (a retry's earlier attempts). A connect that the deadline itself cut short raises
        :class:`CallTimeoutError` (``sent`` False), not a failure of the instance."""
        tried: tuple[InstancePool, ...] = avoid
        attempts: tuple[GeventPoolError, ...] = ()
        pools = self._pools
        while True:
            now = self._clock()
            balancer = self._balancer
            pool = balancer.choose(pools.active, now, tried, key) or self._any_pool(tried)
            if pool is None and avoid and tried == avoid:
                tried = ()  # every instance was tried before: any of them again
                pool = balancer.choose(pools.active, now, (), key) or self._any_pool(())
            if pool is None:
                if attempts:
                    raise RetriesExhaustedError(self._service_name, list(attempts))
                if pools.closed:
                    raise PoolClosedError(f"client of {self._service_name!r} is closed")
                raise NoInstancesError(self._service_name)
            try:
                return pool.checkout(deadline)
            except (ConnectError, PoolClosedError) as error:
                if isinstance(error, ConnectError) and error.deadline_spent:
                    raise CallTimeoutError(pool.name, method, 0.0, sent=False) from error
                tried, attempts = (*tried, pool), (*attempts, error)
                now = self._clock()
                if len(attempts) > self._retries or now >= deadline:
                    raise RetriesExhaustedError(self._service_name, list(attempts)) from error
                budget = self._budget
                if isinstance(error, ConnectError) and budget and not budget.withdraw(now):
                    self.budget_spent(method)
                    raise RetryBudgetExhaustedError(
                        self._service_name, list(attempts), budget.describe()
                    ) from error
                self.failovers += 1
            except PoolExhaustedError as error:
                raise self._exhaustion.report(pools.active, error.timeout) from None

    def budget_spent(self, method: str) -> None:
        """The retry budget refused a retry of ``method`` (here or after a call failed): the
        ``retry_budget_exhausted`` event, at most one a second."""
        now = self._clock()
        budget = self._budget
        if budget is None or now - self._budget_event < 1.0:
            return
        self._budget_event = now
        events.emit(
            events.RETRY_BUDGET_EXHAUSTED,
            "warning",
            service=self._service_name,
            method=method,
            budget=budget.describe(),
            retries=budget.retries,
            refused=budget.refused,
        )

    def _any_pool(self, tried: Sequence[InstancePool]) -> InstancePool | None:
        """Every instance is ejected: rather than fail, try the least loaded one anyway."""
        candidates = [p for p in self._pools.active if p.state is ACTIVE and p not in tried]
        return min(candidates, key=lambda p: p.in_use + p.waiting, default=None)
