"""One connection to one instance: a socket and our message layer, with a total deadline.

A :class:`Connection` promises that **a caller receives only the reply to its own call**: every
request carries its own sequence id, and a reply is returned only if its sequence id, method
name and message type are those of the call (see :mod:`geventpool.wire.messages`). Anything
else breaks the connection, never to be reused:

* Completed replies keep the connection: the result, an exception declared in the IDL, or a
  ``TApplicationException`` from the server.
* A reply to another call, to another method, of the wrong type, a malformed or oversized
  message (checked against the :class:`~geventpool.wire.limits.WireLimits` before anything is
  allocated), or bytes following the reply nobody asked for: it is closed, and the caller gets
  :class:`~geventpool.errors.ProtocolViolationError` saying what was seen (a reply followed by
  stray bytes is still delivered: it was checked to be this call's).
* A failure on the wire (reset, end of file) breaks it and raises
  :class:`~geventpool.errors.TransportError`; the request may have been executed.
* The deadline is total (connect excluded), enforced by a ``gevent.Timeout`` that belongs to
  the call, so a peer trickling one byte a second cannot stretch it; it breaks the connection
  and raises :class:`~geventpool.errors.CallTimeoutError`.
* A request is not written with ``min_time_left`` or less before its deadline (the server
  would run a call whose caller gave up): :class:`~geventpool.errors.CallTimeoutError` with
  ``sent`` False, and the connection stays in service.
* Arguments are bound, checked against the IDL and encoded before a byte is written: a bad one
  raises :class:`~geventpool.errors.InvalidArgumentsError`, nothing is sent, and the
  connection stays in service.
* A broken (or closed) connection refuses calls with
  :class:`~geventpool.errors.ConnectionClosedError`, sending nothing; a call while another is
  in progress on it (greenlets sharing a borrowed connection) is refused with
  :class:`~geventpool.errors.ConnectionBusyError`, sending nothing and leaving the other call
  alone.
* Anything else raised mid-call (a caller's own ``gevent.Timeout``, ``GreenletExit``) breaks
  it and propagates unchanged.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.socket
import gevent.ssl
from gevent import monkey

from geventpool import events
from geventpool.client.pipeline import PipelinedConnection
from geventpool.client.replies import outcome, reply_spec
from geventpool.discovery.instance import Instance
from geventpool.errors import (
    CallTimeoutError,
    ConnectError,
    ConnectionBusyError,
    ConnectionClosedError,
    InvalidArgumentsError,
    MalformedMessageError,
    ProtocolViolationError,
    TlsError,
    TransportError,
)
from geventpool.tls import ClientTls, handshake, refused_our_certificate
from geventpool.wire.arguments import MethodSpec, method_spec
from geventpool.wire.limits import DEFAULT_LIMITS, WireLimits
from geventpool.wire.messages import (
    CALL,
    ONEWAY,
    MessageCodec,
    let_others_run,
    receiver,
)

# The health check polls without blocking, with the unpatched poll: select() cannot watch a
# descriptor >= 1024 and would call every connection of a busy process dead.
_poll = monkey.get_original("select", "poll")
_READABLE = select.POLLIN | select.POLLPRI
_SEQID_LIMIT = 2**31 - 1


class PooledConnection(Protocol):
    """What a pool needs of a connection: a :class:`Connection`, or a
    :class:`~geventpool.client.pipeline.PipelinedConnection`."""

    instance: Instance
    broken: bool
    holders: int  # callers holding it: counted by the pool only
    pool_state: str | None  # its state in its pool (None until adopted): moved by the pool only
    last_used: float
    expires_at: float

    def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float
    ) -> Any: ...

    def usable(self, now: float) -> bool: ...

    def overdue(self, now: float) -> bool: ...

    def fail_stuck(self, now: float) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class Connection:
    """A connection to ``instance`` for calls of thriftpy2 ``service``; made by
    :func:`open_connection`, used by one caller at a time (a pool hands it out), closed once
    :attr:`broken` or no longer wanted."""

    __slots__ = (
        "_buffer",
        "_calling",
        "_clock",
        "_codec",
        "_expect_reply",
        "_min_time_left",
        "_more",
        "_pending",
        "_poller",
        "_seqid",
        "_service",
        "_sock",
        "_waiting",
        "broken",
        "created_at",
        "expires_at",
        "holders",
        "instance",
        "last_used",
        "pool_state",
    )

    def __init__(
        self,
        instance: Instance,
        sock: socket.socket,
        service: Any,
        *,
        clock: Callable[[], float],
        expires_at: float,
        limits: WireLimits = DEFAULT_LIMITS,
        min_time_left: float = 0.0,
    ) -> None:
        self.instance = instance
        self._min_time_left = min_time_left  # with less left, a request is not written
        self._sock = sock
        self._poller = _poll()
        self._poller.register(sock.fileno(), _READABLE)
        self._service = service
        self._codec = MessageCodec(instance.transport, instance.protocol, limits)
        self._buffer = bytearray()  # bytes received and not yet taken by a reply
        self._more = receiver(sock, self._buffer)
        # on TLS, decrypted bytes may wait in the socket, not in the buffer
        self._pending = sock.pending if isinstance(sock, gevent.ssl.SSLSocket) else None
        self._expect_reply = self._expect
        self._waiting: tuple[MethodSpec, int] | None = None
        self._seqid = 0
        self._calling = False
        self._clock = clock
        self.created_at = self.last_used = clock()
        self.expires_at = expires_at
        self.broken = False
        self.holders = 0  # callers holding it (0 or 1): counted by the pool only
        self.pool_state: str | None = None  # see InstancePool._move: set by the pool only

    def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float
    ) -> Any:
        """Call ``method`` and return its result; the reply must arrive before ``deadline``
        (on the connection's clock). See the module for what breaks the connection."""
        if self.broken:
            raise ConnectionClosedError(
                str(self.instance), method, "the connection was closed by an earlier failure"
            )
        remaining = deadline - self._clock()
        if remaining <= self._min_time_left:  # nothing sent: the connection stays clean
            raise CallTimeoutError(str(self.instance), method, 0.0, sent=False)
        spec = method_spec(self._service, method)
        body = spec.arguments(args, kwargs)
        seqid = self._seqid = self._seqid % _SEQID_LIMIT + 1
        try:
            request = self._codec.encode(method, ONEWAY if spec.oneway else CALL, seqid, body)
        except Exception as error:  # noqa: BLE001 - whatever the codec refused, nothing was sent
            raise InvalidArgumentsError(method, f"cannot be encoded: {error!r:.200}") from None
        if self._calling:  # a borrowed connection shared by greenlets: the other call goes on
            raise ConnectionBusyError(str(self.instance), method)
        self._calling = True
        timer = gevent.Timeout(remaining)
        timer.start()
        try:
            self._sock.sendall(request)
            outcome: tuple[bool, Any] = (True, None) if spec.oneway else self._receive(spec, seqid)
        except gevent.Timeout as error:
            self.broken = True
            if error is not timer:
                raise
            raise CallTimeoutError(str(self.instance), method, remaining) from None
        except MalformedMessageError as error:
            self.broken = True
            raise ProtocolViolationError(str(self.instance), method, error.reason) from None
        except (OSError, EOFError) as error:
            self.broken = True
            refused = refused_our_certificate(str(self.instance), error)
            if refused is not None:
                raise refused from None
            raise TransportError(str(self.instance), f"{method}(): {error!r}") from error
        except BaseException:
            self.broken = True
            raise
        finally:
            timer.close()
            self._calling = False
        self.last_used = self._clock()
        ok, result = outcome
        if ok:
            return result
        raise result

    def _receive(self, spec: MethodSpec, seqid: int) -> tuple[bool, Any]:
        """The reply to call ``seqid``: (True, result) or (False, the exception to raise)."""
        buffer, codec = self._buffer, self._codec
        self._waiting = (spec, seqid)
        if not buffer:
            self._more(1)
        _, message_type, _, body, size, values = codec.split(
            buffer, self._expect_reply, self._more, let_others_run
        )
        del buffer[:size]
        if buffer or (self._pending is not None and self._pending()):
            self.broken = True  # bytes nobody asked for follow a reply: not for the next call
            events.emit(
                events.PROTOCOL_VIOLATION,
                "warning",
                instance=str(self.instance),
                seen=f"{len(buffer) or 'some'} bytes after the reply to #{seqid}, unasked",
            )
        return outcome(codec, spec, message_type, body, values)

    def _expect(self, name: str, message_type: int, seqid: int) -> dict[int, Any]:
        """The spec of the reply the waiting call expects; anything else is refused before
        its body is read."""
        if self._waiting is None:
            raise MalformedMessageError("a message arrived while no call was waiting")
        spec, waiting = self._waiting
        return reply_spec(spec, waiting, name, message_type, seqid)

    def usable(self, now: float) -> bool:
        """Whether the connection may be handed out: not broken, not past its lifetime, and
        its peer neither closed it nor sent anything unasked (a zero-timeout poll)."""
        if self.broken or now >= self.expires_at or self._buffer:
            return False
        if self._pending is not None and self._pending():
            return False  # decrypted bytes nobody asked for
        try:
            if not self._poller.poll(0):
                return True
        except OSError:
            return False
        # Anything (data, end of file, error) means no, but on TLS the bytes may be records
        # that carry no data (TLS 1.3 session tickets, sent after the handshake).
        return self._pending is not None and _only_tls_records(self._sock)

    def overdue(self, now: float) -> bool:
        """Never: its one call at a time is bounded by that call's own deadline."""
        return False

    def fail_stuck(self, now: float) -> None:
        """Close (see :meth:`overdue`)."""
        self.close()

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent); the connection is broken from now on."""
        self.broken = True
        with contextlib.suppress(OSError):
            self._sock.close()


def _only_tls_records(sock: gevent.ssl.SSLSocket) -> bool:
    """Whether what is waiting on TLS ``sock`` held no data: read at once, without waiting
    (True: nothing but whole records of TLS's own; False: data, a record not whole yet, end
    of file or an error)."""
    if not _whole_records(sock.fileno()):
        return False  # part of a record: it may be data, and reading it would hide the rest
    sock.settimeout(0.0)
    try:
        sock.recv(1)  # data (unasked: the connection is unusable), or b"" at end of file
    except ssl.SSLWantReadError:
        return True  # the records were TLS's own; no data
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)
    return False


def _whole_records(fd: int) -> bool:
    """Whether the bytes waiting on socket ``fd`` are whole TLS records (peeked, not read)."""
    try:
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as peek:
            waiting = peek.recv(_PEEK_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    at = 0
    while at + 5 <= len(waiting):  # a record: type, version (2 bytes), length (2 bytes)
        at += 5 + int.from_bytes(waiting[at + 3 : at + 5], "big")
    return 0 < at == len(waiting)


_PEEK_MAX = 1 << 16


def _secure(
    sock: Any, instance: Instance, port: int, tls: ClientTls, *, timeout: float, by_deadline: bool
) -> Any:
    """``sock`` after its TLS handshake with ``instance``, within the connect's ``timeout``
    (``by_deadline``: what is left of the call's deadline, shorter than ``connect_timeout``);
    a handshake the deadline cut short is ``deadline_spent``, as a connect would be."""
    if timeout <= 0:
        sock.close()
        raise ConnectError(str(instance), "no time left for the TLS handshake", deadline_spent=True)
    name = f"{instance.host}:{port}" if port != instance.port else str(instance)
    try:
        return handshake(
            sock, tls.ssl_context(), name, timeout, server_hostname=tls.hostname_for(instance.host)
        )
    except TlsError as error:
        if by_deadline and "no handshake within" in error.reason:
            raise ConnectError(
                str(instance), f"the call's deadline ended the {error.reason}", deadline_spent=True
            ) from None
        raise


_DEFAULT_TLS: list[ClientTls] = []


def _default_tls() -> ClientTls:
    """TLS with the system's CAs, for a TLS-only instance of a client with no ``tls`` (made
    at the first use: loading the system's CAs takes milliseconds)."""
    if not _DEFAULT_TLS:
        _DEFAULT_TLS.append(ClientTls())
    return _DEFAULT_TLS[0]


def tls_endpoint(instance: Instance, tls: ClientTls | None) -> tuple[int, ClientTls | None]:
    """The port to connect to for ``instance`` and the TLS to speak there (None:
    plaintext): a TLS-only instance always gets TLS (``tls``, or the system's CAs); with
    ``tls``, an instance that offers a TLS port gets it; a plaintext instance only where
    ``tls`` is None or allows ``plaintext`` (else :class:`ConnectError`; the client's pools
    leave such instances out before it comes to that)."""
    if instance.tls:
        return instance.port, tls or _default_tls()
    if tls is None:
        return instance.port, None
    if instance.tls_port is not None:
        return instance.tls_port, tls
    if tls.plaintext:
        return instance.port, None
    raise ConnectError(str(instance), PLAINTEXT_REFUSED)


PLAINTEXT_REFUSED = (
    "the registry lists no TLS for it, and the client's tls refuses plaintext"
    " (ClientTls(plaintext=True) allows it)"
)


def open_connection(
    instance: Instance,
    service: Any,
    *,
    connect_timeout: float,
    deadline: float,
    lifetime: float,
    clock: Callable[[], float] = time.monotonic,
    limits: WireLimits = DEFAULT_LIMITS,
    max_inflight: int = 1,
    stuck_after: float = 5.0,
    min_time_left: float = 0.0,
    tls: ClientTls | None = None,
) -> PooledConnection:
    """Connect to ``instance`` within ``connect_timeout`` seconds (and before ``deadline``),
    the TLS handshake included (see :func:`tls_endpoint` for when TLS is spoken), speaking its
    registered transport and protocol: a :class:`Connection`, or with ``max_inflight`` above
    1 a :class:`~geventpool.client.pipeline.PipelinedConnection`. Raises
    :class:`ConnectError` (:class:`~geventpool.errors.TlsError` for a failed handshake)."""
    began = clock()
    left = deadline - began
    timeout = min(connect_timeout, left)
    if timeout <= 0:
        raise ConnectError(
            str(instance), "no time left before the deadline to connect", deadline_spent=True
        )
    port, speak_tls = tls_endpoint(instance, tls)
    try:
        sock = gevent.socket.create_connection((instance.host, port), timeout=timeout)
    except OSError as error:
        if isinstance(error, TimeoutError) and left < connect_timeout:
            raise ConnectError(
                str(instance),
                f"the call's deadline ended the connect after {timeout:.3f}s",
                deadline_spent=True,
            ) from None
        raise ConnectError(str(instance), f"connect failed: {error!r}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if speak_tls is not None:
        sock = _secure(
            sock,
            instance,
            port,
            speak_tls,
            timeout=timeout - (clock() - began),
            by_deadline=left < connect_timeout,
        )
    sock.settimeout(None)  # every call is bounded by its own deadline instead
    expires_at = clock() + lifetime
    if max_inflight > 1:
        return PipelinedConnection(
            instance,
            sock,
            service,
            clock=clock,
            expires_at=expires_at,
            limits=limits,
            stuck_after=stuck_after,
            min_time_left=min_time_left,
        )
    return Connection(
        instance,
        sock,
        service,
        clock=clock,
        expires_at=expires_at,
        limits=limits,
        min_time_left=min_time_left,
    )
