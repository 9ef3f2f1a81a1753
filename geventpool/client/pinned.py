"""A connection borrowed for several calls (``with client.connection() as c:``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from geventpool.client.connection import PooledConnection
from geventpool.client.pool import InstancePool
from geventpool.discovery.instance import Instance
from geventpool.errors import ConnectionBusyError, ConnectionClosedError


class PinnedConnection:
    """One borrowed connection; ``c.add(1, 2)`` calls on it, each call bounded by ``limit``
    seconds (see :meth:`~geventpool.client.service.ServiceClient.connection`).

    It makes one call at a time, pipelined connection or not: a second greenlet calling
    meanwhile gets :class:`~geventpool.errors.ConnectionBusyError`, and nothing is sent.
    Once the ``with`` block ends the connection is back in the pool, perhaps with another
    caller: calls then raise :class:`~geventpool.errors.ConnectionClosedError` (a
    :class:`~geventpool.errors.PoolError`), as they do once a call on it failed.
    """

    def __init__(
        self,
        pool: InstancePool,
        connection: PooledConnection,
        limit: float,
        clock: Callable[[], float],
        methods: frozenset[str],
        *,
        call: Callable[[PooledConnection, str, tuple[Any, ...], dict[str, Any], float], Any]
        | None = None,
    ) -> None:
        self._methods = methods
        self._call = pool.call if call is None else call  # the client's, when it observes
        self.returned = False
        self._calling = False
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
                raise ConnectionClosedError(
                    str(self._connection.instance), method, "the connection went back to its pool"
                )
            if self._calling:  # one call at a time, as on a connection of one's own
                raise ConnectionBusyError(str(self._connection.instance), method)
            deadline = self._clock() + self._limit
            self._calling = True
            try:
                return self._call(self._connection, method, args, kwargs, deadline)
            finally:
                self._calling = False

        return remote
