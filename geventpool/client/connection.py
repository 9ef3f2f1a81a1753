"""One connection to one instance: a socket and a thriftpy2 client, with a total deadline.

A :class:`Connection` promises that a call either completes cleanly or leaves the connection
**broken** (never to be reused): thriftpy2 sends seqid 0 and never checks the reply's, so after
a timeout or a half-written request the next caller could read someone else's reply.

* Completed replies keep the connection: the result, an exception declared in the IDL, or a
  ``TApplicationException`` from the server.
* A failure on the wire (reset, end of file, undecodable reply) breaks it and raises
  :class:`~geventpool.errors.TransportError`; the request may have been executed.
* The deadline is total (connect excluded), enforced by a ``gevent.Timeout`` that belongs to
  the call, so a peer trickling one byte a second cannot stretch it; it breaks the connection
  and raises :class:`~geventpool.errors.CallTimeoutError`.
* Arguments that do not fit the IDL raise :class:`~geventpool.errors.InvalidArgumentsError`
  before anything is sent; if they fail only while being encoded, the half-written request in
  the write buffer breaks the connection.
* Anything else raised mid-call (a caller's own ``gevent.Timeout``, ``GreenletExit``) breaks
  it and propagates unchanged.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket
from gevent import monkey
from thriftpy2.thrift import TClient, TException
from thriftpy2.transport import TSocket, TTransportException

from geventpool.discovery.instance import Instance
from geventpool.errors import (
    CallTimeoutError,
    ConnectError,
    InvalidArgumentsError,
    TransportError,
)
from geventpool.wire.arguments import bind_arguments
from geventpool.wire.codecs import WIRE_ERRORS, protocol_factory, transport_factory

# The health check polls without blocking, with the unpatched poll: select() cannot watch a
# descriptor >= 1024 and would call every connection of a busy process dead.
_poll = monkey.get_original("select", "poll")
_READABLE = select.POLLIN | select.POLLPRI


class Connection:
    """A connection to ``instance``; made by :func:`open_connection`, used by one caller at a
    time (a pool hands it out), closed once :attr:`broken` or no longer wanted."""

    __slots__ = (
        "_client",
        "_clock",
        "_poller",
        "_sock",
        "broken",
        "created_at",
        "expires_at",
        "instance",
        "last_used",
    )

    def __init__(
        self,
        instance: Instance,
        sock: socket.socket,
        client: Any,
        *,
        clock: Callable[[], float],
        expires_at: float,
    ) -> None:
        self.instance = instance
        self._sock = sock
        self._poller = _poll()
        self._poller.register(sock.fileno(), _READABLE)
        self._client = client
        self._clock = clock
        self.created_at = self.last_used = clock()
        self.expires_at = expires_at
        self.broken = False

    def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float
    ) -> Any:
        """Call ``method`` and return its result; the reply must arrive before ``deadline``
        (on the connection's clock). See the module for what breaks the connection."""
        remaining = deadline - self._clock()
        if remaining <= 0:  # nothing sent: the connection stays clean
            raise CallTimeoutError(str(self.instance), method, 0.0, sent=False)
        client = self._client
        arguments = bind_arguments(client._service, method, args, kwargs)  # noqa: SLF001
        timer = gevent.Timeout(remaining)
        timer.start()
        try:
            try:
                client._send(method, **arguments)  # noqa: SLF001 - split send from receive
            except (OSError, TTransportException):
                raise
            except Exception as error:
                raise InvalidArgumentsError(method, repr(error)) from error
            oneway = getattr(client._service, f"{method}_result").oneway  # noqa: SLF001
            result = None if oneway else client._recv(method)  # noqa: SLF001
        except TException as error:
            if isinstance(error, WIRE_ERRORS):
                self.broken = True
                raise TransportError(str(self.instance), f"{method}(): {error!r}") from error
            raise  # a complete reply: declared exception or TApplicationException
        except gevent.Timeout as error:
            self.broken = True
            if error is not timer:
                raise
            raise CallTimeoutError(str(self.instance), method, remaining) from None
        except WIRE_ERRORS as error:
            self.broken = True
            raise TransportError(str(self.instance), f"{method}(): {error!r}") from error
        except BaseException:
            self.broken = True
            raise
        finally:
            timer.close()
        self.last_used = self._clock()
        return result

    def usable(self, now: float) -> bool:
        """Whether the connection may be handed out: not broken, not past its lifetime, and
        its peer neither closed it nor sent anything unasked (a zero-timeout poll)."""
        if self.broken or now >= self.expires_at:
            return False
        try:
            return not self._poller.poll(0)  # anything (data, end of file, error) means no
        except OSError:
            return False

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent); the connection is broken from now on."""
        self.broken = True
        with contextlib.suppress(OSError):
            self._sock.close()


def open_connection(
    instance: Instance,
    service: Any,
    *,
    connect_timeout: float,
    deadline: float,
    lifetime: float,
    clock: Callable[[], float] = time.monotonic,
) -> Connection:
    """Connect to ``instance`` within ``connect_timeout`` seconds (and before ``deadline``),
    speaking its registered transport and protocol. Raises :class:`ConnectError`."""
    timeout = min(connect_timeout, deadline - clock())
    if timeout <= 0:
        raise ConnectError(str(instance), "no time left before the deadline to connect")
    try:
        sock = gevent.socket.create_connection(instance.address, timeout=timeout)
    except OSError as error:
        raise ConnectError(str(instance), f"connect failed: {error!r}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)  # every call is bounded by its own deadline instead
    tsocket = TSocket(sock=sock)
    protocol = protocol_factory(instance.protocol).get_protocol(
        transport_factory(instance.transport).get_transport(tsocket)
    )
    return Connection(
        instance, sock, TClient(service, protocol), clock=clock, expires_at=clock() + lifetime
    )
