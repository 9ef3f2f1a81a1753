"""The one exception hierarchy of geventpool.

Every error the library raises on purpose derives from :class:`GeventPoolError`, so an
application can catch the library's failures in one clause. Errors carry their context as
attributes (the path, the timeout, the reason) as well as in their message, so handlers and log
processors never have to parse text.
"""

from __future__ import annotations


class GeventPoolError(Exception):
    """Root of every error raised by geventpool."""


class ConfigurationError(GeventPoolError):
    """A setting or argument is invalid; raised before anything is started."""


class RegistryError(GeventPoolError):
    """Something went wrong between us and the ZooKeeper registry."""


class ZooKeeperUnavailableError(RegistryError):
    """ZooKeeper could not be reached (or did not answer) within a bounded time.

    ``hosts`` is the connect string and ``timeout`` the time waited, in seconds.
    """

    def __init__(self, hosts: str, timeout: float, detail: str = "") -> None:
        self.hosts = hosts
        self.timeout = timeout
        self.detail = detail
        message = f"ZooKeeper at {hosts!r} not reachable within {timeout:.2f}s"
        super().__init__(f"{message}: {detail}" if detail else message)


class RegistrationError(RegistryError):
    """An instance could not be registered at ``path`` (no permission, bad path, ...)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot register {path!r}: {reason}")


class DiscoveryError(RegistryError):
    """The instances of a service could not be discovered."""


class InvalidInstanceError(DiscoveryError):
    """A registry entry was rejected; ``node`` names it and ``reason`` says why."""

    def __init__(self, reason: str, node: str = "") -> None:
        self.node = node
        self.reason = reason
        super().__init__(f"rejected instance {node!r}: {reason}" if node else reason)


class NoInstancesError(DiscoveryError):
    """The service has no live (or no usable) instance to call right now."""

    def __init__(self, service: str, detail: str = "") -> None:
        self.service = service
        message = f"no instance of {service!r} available"
        super().__init__(f"{message}: {detail}" if detail else message)


class PoolError(GeventPoolError):
    """A connection could not be had from a pool."""


class PoolClosedError(PoolError):
    """The pool (or the client owning it) is closed, or its instance left the service."""


class ConnectionClosedError(PoolError):
    """A call on a connection that can no longer be used: an earlier call on it failed (and
    closed it), or it went back to its pool. Nothing was sent."""

    def __init__(self, instance: str, method: str, why: str) -> None:
        self.instance = instance
        self.method = method
        super().__init__(f"{instance}: {method}(): {why}; nothing was sent")


class ConnectionBusyError(PoolError):
    """A call on a connection while another call on it is in progress: a borrowed connection
    (``with client.connection() as c:``) shared by greenlets. Nothing was sent; the other
    call goes on undisturbed. Borrow one connection per greenlet."""

    def __init__(self, instance: str, method: str) -> None:
        self.instance = instance
        self.method = method
        super().__init__(
            f"{instance}: {method}(): another call is in progress on this connection;"
            " nothing was sent"
        )


class PoolExhaustedError(PoolError):
    """Every connection was busy and none could be opened within the wait.

    ``service``, ``max_connections`` (over all instances tried), ``in_use`` (calls holding a
    connection), ``waiters``, ``timeout`` (seconds waited) and ``capacity`` (the calls they
    can carry at once: ``max_connections`` unless connections are pipelined) are attributes
    as well as part of the message.
    """

    def __init__(  # noqa: PLR0917 - the numbers of the message, in its order
        self,
        service: str,
        max_connections: int,
        in_use: int,
        waiters: int,
        timeout: float,
        capacity: int | None = None,
    ) -> None:
        self.service = service
        self.max_connections = max_connections
        self.in_use = in_use
        self.waiters = waiters
        self.timeout = timeout
        self.capacity = max_connections if capacity is None else capacity
        if self.capacity == max_connections:
            busy = f"{in_use} of {max_connections} connections in use"
        else:
            busy = (
                f"{in_use} of {self.capacity} call slots in use"
                f" ({max_connections} pipelined connections)"
            )
        super().__init__(
            f"pool of {service!r} exhausted: {busy}, {waiters} callers waiting, none free"
            f" within {timeout:.3f}s; add server instances or raise max_connections"
        )


class TransportError(GeventPoolError):
    """The call failed on the wire; ``instance`` names where, ``reason`` says how.

    The request may have been sent (and executed): retry only idempotent calls.
    """

    def __init__(self, instance: str, reason: str) -> None:
        self.instance = instance
        self.reason = reason
        super().__init__(f"{instance}: {reason}")


class ConnectError(TransportError):
    """No connection could be opened: nothing was sent, so another instance may be tried.

    ``deadline_spent`` is True when the call's own deadline, not the instance, ended the
    attempt (no time was left, or the connect was cut short by it): such an attempt does not
    count against the instance, and the caller gets :class:`CallTimeoutError` (``sent``
    False)."""

    def __init__(self, instance: str, reason: str, *, deadline_spent: bool = False) -> None:
        self.deadline_spent = deadline_spent
        super().__init__(instance, reason)


class TlsError(ConnectError):
    """A TLS handshake failed: nothing was sent (another instance may be tried). ``reason``
    says why; ``peer_at_fault`` is False when the peer refused our own certificate (a fault of
    this side's credential, which every instance would refuse alike: it does not count
    towards ejection), True otherwise (its certificate did not verify, it speaks no TLS, it
    did not finish the handshake in time)."""

    def __init__(self, peer: str, reason: str, *, peer_at_fault: bool = True) -> None:
        self.peer_at_fault = peer_at_fault
        super().__init__(peer, f"TLS handshake failed: {reason}")


class CallTimeoutError(TransportError):
    """The call's deadline passed. ``timeout`` in seconds; ``sent`` tells whether the request
    may have been sent (False: the deadline was gone before, e.g. spent waiting for a
    connection, and the instance is not to blame)."""

    def __init__(self, instance: str, method: str, timeout: float, *, sent: bool = True) -> None:
        self.method = method
        self.timeout = timeout
        self.sent = sent
        if sent:
            reason = f"{method}() got no reply within its {timeout:.3f}s deadline"
        else:
            reason = f"{method}(): the deadline passed before the call was sent"
        super().__init__(instance, reason)


class ProtocolViolationError(TransportError):
    """The peer sent something that is not the reply to this call: a reply to another call
    (wrong sequence id), to another method, of the wrong message type, bytes nobody asked for,
    or a malformed or oversized message. Nobody receives it as a result: the connection is
    closed. ``seen`` says what arrived; the request may have been executed."""

    def __init__(self, instance: str, method: str, seen: str) -> None:
        self.method = method
        self.seen = seen
        super().__init__(instance, f"{method}(): {seen}")


class MalformedMessageError(GeventPoolError, ValueError):
    """Bytes that are not a valid Thrift message: ``reason`` says what was seen and where.

    Raised by the wire layer (:mod:`geventpool.wire`); a client sees it as the
    :class:`ProtocolViolationError` it causes, a server closes that one connection.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class MessageLimitError(MalformedMessageError):
    """A message claims more than a limit allows (``limit`` names it, ``claimed`` and
    ``allowed`` are the numbers); refused before anything of that size is allocated."""

    def __init__(self, limit: str, claimed: int, allowed: int, where: str = "") -> None:
        self.limit = limit
        self.claimed = claimed
        self.allowed = allowed
        at = f" {where}" if where else ""
        super().__init__(f"{limit} exceeded{at}: {claimed:,} claimed, {allowed:,} allowed")


class RetriesExhaustedError(GeventPoolError):
    """A call was attempted more than once (or every instance refused a connection) and no
    attempt succeeded; ``attempts`` holds each attempt's error, oldest first, ``reason`` the
    last. ``sent`` tells whether any attempt may have run on a server."""

    def __init__(self, service: str, attempts: list[BaseException], why: str = "") -> None:
        self.service = service
        self.attempts = attempts
        self.reason = attempts[-1] if attempts else None
        self.sent = any(
            not isinstance(a, (ConnectError, PoolError)) and getattr(a, "sent", True)
            for a in attempts
        )
        connects = all(isinstance(a, ConnectError) for a in attempts)
        what = "failed to connect" if connects else "failed"
        super().__init__(f"{service!r}: {len(attempts)} attempts {what}{why}; last: {self.reason}")


class RetryBudgetExhaustedError(RetriesExhaustedError):
    """The call could have been made again, but the client's retry budget is spent (too many
    calls are failing: see :class:`~geventpool.client.retrying.RetryBudget`)."""

    def __init__(self, service: str, attempts: list[BaseException], budget: str) -> None:
        self.budget = budget
        super().__init__(service, attempts, f" (the retry budget, {budget}, is spent)")


class InvalidArgumentsError(GeventPoolError, TypeError):
    """The arguments do not fit the IDL of ``method``; nothing was sent.

    Also a ``TypeError``, as Python raises for a bad call.
    """

    def __init__(self, method: str, reason: str) -> None:
        self.method = method
        self.reason = reason
        super().__init__(f"{method}(): {reason}")
