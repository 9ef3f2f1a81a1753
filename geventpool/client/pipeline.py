"""One connection that carries many calls at once: pipelined, matched by sequence id.

A :class:`PipelinedConnection` promises what a :class:`~geventpool.client.connection.Connection`
does (**a caller receives only the reply to its own call**; arguments are checked and encoded
before anything is written; every failure is typed), for any number of concurrent callers:

* **One flush per batch.** Callers append their encoded requests to the connection's queue; a
  writer greenlet writes everything queued with one ``sendall``. A request is whole before it is
  queued, so a bad argument never sends half a message.
* **Replies in any order.** A reader greenlet reads every reply, checks its header against the
  call waiting with its sequence id (the method name and the type must be that call's, and the
  call must have been written), walks it against that call's IDL and hands it to the caller,
  which decodes it. Anything else (an unknown sequence id, a reply to a call not written yet, a
  malformed or oversized message) breaks the connection.
* **No request is written too late**: with ``min_time_left`` or less before its deadline
  (at the call, or when the writer comes to it) a call fails at once with
  :class:`~geventpool.errors.CallTimeoutError`, ``sent`` False.
* **A deadline costs the caller, not the connection.** A caller whose deadline passes leaves at
  once with :class:`~geventpool.errors.CallTimeoutError`. A request not yet written is taken
  back (``sent=False``); one in the batch the writer has begun to write is committed (it
  leaves with the batch once the peer reads: ``sent=True``, it may run), and its late reply,
  like any other, is recognised by its sequence id and dropped. A late call keeps no request
  bytes. The connection stays in service, unless its late replies pile up or the reader is
  partway through the late reply (nothing behind it can be read until its rest comes, and a
  hostile or broken server may never send it). One that owes more than :data:`MAX_LATE` late
  replies, or whose partly read reply's caller left, retires: it takes no new call, its calls
  in flight end as they would, and it closes when the last one does (their callers left: not
  the instance's failure). One whose oldest late reply is overdue by ``stuck_after`` seconds is
  stuck (:meth:`overdue`): the instance did not answer, and the pool breaks it.
* **A break fails every call at once.** When the connection breaks (reset, end of file, a
  protocol violation, stuck), each call whose request was written gets a
  :class:`~geventpool.errors.TransportError` (or :class:`~geventpool.errors.ProtocolViolationError`
  saying what was seen): it may have run. Each call not yet written gets
  :class:`~geventpool.errors.ConnectionClosedError`: nothing was sent, so it is safe to try
  elsewhere.
* **Oneway calls take no reply slot**: they return once written.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey
from gevent.event import Event
from gevent.hub import Waiter, get_hub

from geventpool import events
from geventpool.client.replies import outcome, reply_spec
from geventpool.discovery.instance import Instance
from geventpool.errors import (
    CallTimeoutError,
    ConnectionClosedError,
    InvalidArgumentsError,
    MalformedMessageError,
    ProtocolViolationError,
    TransportError,
)
from geventpool.tls import refused_our_certificate
from geventpool.wire.arguments import MethodSpec, method_spec
from geventpool.wire.limits import DEFAULT_LIMITS, WireLimits
from geventpool.wire.messages import CALL, ONEWAY, MessageCodec, let_others_run, receiver

_poll = monkey.get_original("select", "poll")
_CLOSED = select.POLLHUP | select.POLLERR | select.POLLNVAL
_SEQID_LIMIT = 2**31 - 1
MAX_LATE = 1024
"""The most late replies (of callers that left) a connection waits for before it is stuck."""
_YIELD_AFTER = 1 << 20
"""The reader lets others run after this many bytes of replies (each counting 16 KiB more):
a recv that finds data returns without a switch, so back-to-back replies would hold the hub."""
_REPLY_WEIGHT = 1 << 14


class _Call:
    """One call on a pipelined connection, from its queueing to its reply."""

    __slots__ = ("deadline", "request", "seqid", "spec", "waiter", "written")

    def __init__(
        self, spec: MethodSpec, seqid: int, request: bytes, waiter: Waiter, deadline: float
    ) -> None:
        self.spec = spec
        self.seqid = seqid
        self.request = request
        self.waiter = waiter
        self.deadline = deadline
        self.written = False


class PipelinedConnection:
    """A connection to ``instance`` shared by concurrent calls of thriftpy2 ``service``; made
    by :func:`~geventpool.client.connection.open_connection` with ``max_inflight`` above 1.
    The pool counts its callers in :attr:`holders`; :attr:`inflight` is how many calls await
    their reply."""

    def __init__(
        self,
        instance: Instance,
        sock: socket.socket,
        service: Any,
        *,
        clock: Callable[[], float],
        expires_at: float,
        limits: WireLimits = DEFAULT_LIMITS,
        stuck_after: float = 5.0,
        min_time_left: float = 0.0,
    ) -> None:
        self.instance = instance
        self._name = str(instance)
        self._sock = sock
        self._poller = _poll()
        self._poller.register(sock.fileno(), _CLOSED)
        self._service = service
        self._codec = MessageCodec(instance.transport, instance.protocol, limits)
        self._buffer = bytearray()
        self._more = receiver(sock, self._buffer)
        self._clock = clock
        self._stuck_after = stuck_after
        self._min_time_left = min_time_left  # with less left, a request is not written
        self._seqid = 0
        self._queue: list[_Call] = []  # encoded, not yet written
        self._writing: list[_Call] = []  # the batch being written now
        self._pending: dict[int, _Call] = {}  # seqid -> call awaiting its reply
        self._late: dict[int, _Call] = {}  # seqid -> call whose caller left; reply dropped
        self._reading = 0  # the seqid of the reply being read, once its header was read (or 0)
        self._wake = Event()
        self._hub = get_hub()
        self.created_at = self.last_used = clock()
        self.expires_at = expires_at
        self.broken = False
        self.holders = 0  # callers holding it: counted by the pool only
        self.pool_state: str | None = None  # see InstancePool._move: set by the pool only
        self._writer = gevent.spawn(self._write_loop)
        self._reader = gevent.spawn(self._read_loop)

    @property
    def inflight(self) -> int:
        """Calls queued or awaiting their reply (not counting those whose caller left)."""
        return len(self._pending) + sum(1 for call in self._queue if call.spec.oneway)

    # -- calls -----------------------------------------------------------------------------------

    def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float
    ) -> Any:
        """Call ``method`` and return its result; the reply must arrive before ``deadline``
        (on the connection's clock). See the module for what each failure means."""
        if self.broken:
            raise ConnectionClosedError(self._name, method, "the connection is closed")
        remaining = deadline - self._clock()
        if remaining <= self._min_time_left:
            raise CallTimeoutError(self._name, method, 0.0, sent=False)
        spec = method_spec(self._service, method)
        body = spec.arguments(args, kwargs)
        seqid = self._seqid = self._seqid % _SEQID_LIMIT + 1
        try:
            request = self._codec.encode(method, ONEWAY if spec.oneway else CALL, seqid, body)
        except Exception as error:  # noqa: BLE001 - whatever the codec refused, nothing was sent
            raise InvalidArgumentsError(method, f"cannot be encoded: {error!r:.200}") from None
        waiter = Waiter()
        call = _Call(spec, seqid, request, waiter, deadline)
        if not spec.oneway:
            self._pending[seqid] = call
        self._queue.append(call)
        if len(self._queue) == 1:
            self._wake.set()  # the writer runs once this loop iteration's callers queued
        timer = gevent.Timeout(remaining)
        timer.start()
        try:
            reply = waiter.get()
        except gevent.Timeout as error:
            sent = self._leave(call)
            if error is not timer:
                raise
            raise CallTimeoutError(self._name, method, remaining, sent=sent) from None
        except BaseException:
            self._leave(call)
            raise
        finally:
            timer.close()
        if isinstance(reply, BaseException):
            raise reply
        if reply is None:  # a oneway call, written
            return None
        message_type, body_bytes, values = reply
        try:
            ok, result = outcome(self._codec, spec, message_type, body_bytes, values)
        except MalformedMessageError as error:
            self._break(error)
            raise ProtocolViolationError(self._name, method, error.reason) from None
        self.last_used = self._clock()
        if ok:
            return result
        raise result

    def _leave(self, call: _Call) -> bool:
        """The caller of ``call`` leaves before its reply: whether its request was written
        (then its reply, when it comes, is dropped)."""
        if not call.written:
            with contextlib.suppress(ValueError):
                self._queue.remove(call)
            self._pending.pop(call.seqid, None)
            return False
        if self._pending.pop(call.seqid, None) is not None:
            self._late[call.seqid] = call
            if len(self._late) > MAX_LATE or self._stalled_by(call):
                self.expires_at = float("-inf")  # retires: no new call (see the module)
        return True

    def _stalled_by(self, call: _Call) -> bool:
        """Whether the reader is partway through ``call``'s reply (or through a message whose
        header it has not read yet, a frame arriving): nothing behind it can be read before
        its rest comes, if it ever does."""
        reading = self._reading
        return reading == call.seqid or (not reading and bool(self._buffer))

    # -- the writer and the reader ---------------------------------------------------------------

    def _write_loop(self) -> None:
        """Write everything queued, one ``sendall`` per batch, until the connection breaks."""
        wake, sock = self._wake, self._sock
        try:
            while True:
                wake.wait()
                wake.clear()
                while self._queue:
                    batch, self._queue = self._queue, []
                    soon = self._clock() + self._min_time_left
                    for call in batch:
                        if call.deadline <= soon:  # queued too long: its caller gives up
                            batch = self._drop_short(batch, soon)
                            break
                        call.written = True
                    if not batch:
                        continue
                    data = (
                        batch[0].request
                        if len(batch) == 1
                        else b"".join([call.request for call in batch])
                    )
                    self._writing = batch
                    sock.sendall(data)
                    self._writing = []
                    for call in batch:
                        call.request = b""  # a late reply's call keeps no request bytes
                        if call.spec.oneway:
                            self._hub.loop.run_callback(call.waiter.switch, None)
        except gevent.GreenletExit:
            pass
        except BaseException as error:  # every caller must learn of it
            self._break(error)
            if not isinstance(error, (OSError, EOFError)):
                raise  # a bug: the hub prints it

    def _drop_short(self, batch: list[_Call], soon: float) -> list[_Call]:
        """``batch`` without the calls whose deadline comes before ``soon``: each fails at once
        with :class:`CallTimeoutError`, ``sent`` False (the writer was held up, by a server
        that does not read, say, and the server would run a call whose caller gave up)."""
        keep = []
        run_callback = self._hub.loop.run_callback
        for call in batch:
            if call.deadline > soon:
                call.written = True
                keep.append(call)
                continue
            self._pending.pop(call.seqid, None)
            error = CallTimeoutError(self._name, call.spec.name, 0.0, sent=False)
            run_callback(call.waiter.switch, error)
        return keep

    def _read_loop(self) -> None:
        """Read replies and hand each to its caller, until the connection breaks."""
        buffer, codec, more, expect = self._buffer, self._codec, self._more, self._expect
        pending, late = self._pending, self._late
        run_callback = self._hub.loop.run_callback
        handled = 0
        try:
            while True:
                if not buffer:
                    more(1)
                _, message_type, seqid, body, size, values = codec.split(
                    buffer, expect, more, let_others_run
                )
                self._reading = 0
                del buffer[:size]
                handled += size + _REPLY_WEIGHT
                if handled > _YIELD_AFTER:
                    handled = 0
                    let_others_run()
                call = pending.pop(seqid, None)
                if call is None:
                    late.pop(seqid, None)  # its caller left: dropped
                    continue
                run_callback(call.waiter.switch, (message_type, body, values))
        except gevent.GreenletExit:
            pass
        except BaseException as error:  # every caller must learn of it
            self._break(error)
            if isinstance(error, MalformedMessageError):  # told, whether or not a call waited
                events.emit(
                    events.PROTOCOL_VIOLATION, "warning", instance=self._name, seen=error.reason
                )
            elif not isinstance(error, (OSError, EOFError)):
                raise  # a bug: the hub prints it

    def _expect(self, name: str, message_type: int, seqid: int) -> dict[int, Any]:
        call = self._pending.get(seqid) or self._late.get(seqid)
        if call is None or not call.written:
            what = "no call" if call is None else "a call not sent yet"
            raise MalformedMessageError(f"a reply to {what}: {name[:64]!r} #{seqid}")
        spec = reply_spec(call.spec, seqid, name, message_type, seqid)
        self._reading = seqid
        return spec

    # -- breaking ----------------------------------------------------------------------------------

    def _break(self, error: BaseException) -> None:
        """Break the connection for ``error``: every call still waiting gets its own typed
        error (see the module), and the socket closes."""
        if self.broken:
            return
        self.broken = True
        calls = [
            *self._pending.values(),
            *(c for c in (*self._writing, *self._queue) if c.spec.oneway),
        ]
        self._pending.clear()
        self._late.clear()
        self._queue.clear()
        self._writing = []
        run_callback = self._hub.loop.run_callback
        for call in calls:
            run_callback(call.waiter.switch, self._failure(call, error))
        current = gevent.getcurrent()
        for greenlet in (self._writer, self._reader):
            if greenlet is not current:
                greenlet.kill(block=False)
        with contextlib.suppress(OSError):
            self._sock.close()

    def _failure(self, call: _Call, error: BaseException) -> GeventPoolErrorType:
        method = call.spec.name
        refused = refused_our_certificate(self._name, error)
        if refused is not None:
            return refused
        if not call.written:
            return ConnectionClosedError(self._name, method, f"the connection broke: {error!r}")
        if isinstance(error, MalformedMessageError):
            return ProtocolViolationError(self._name, method, error.reason)
        if isinstance(error, TransportError):
            return TransportError(self._name, f"{method}(): {error.reason}")
        return TransportError(self._name, f"{method}(): {error!r}")

    def overdue(self, now: float) -> bool:
        """Whether the connection is stuck: a late reply is overdue by ``stuck_after``
        seconds."""
        late = self._late
        if not late:
            return False
        oldest = next(iter(late.values()))  # dicts keep insertion order: the first left first
        return now - oldest.deadline > self._stuck_after

    def fail_stuck(self, now: float) -> None:
        """Break the connection as stuck (see :meth:`overdue`)."""
        oldest = next(iter(self._late.values()), None)
        overdue = now - oldest.deadline if oldest is not None else 0.0
        self._break(
            TransportError(
                self._name,
                f"stuck: {len(self._late)} replies overdue, the oldest by {overdue:.3f}s",
            )
        )

    # -- what the pool asks ------------------------------------------------------------------------

    def usable(self, now: float) -> bool:
        """Whether the connection may take another call: not broken, not past its lifetime,
        not closed by its peer, not stuck."""
        if self.broken or now >= self.expires_at:
            return False
        try:
            if self._poller.poll(0):
                return False
        except OSError:
            return False
        return not self.overdue(now)

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the connection (idempotent): calls still waiting fail as after a break."""
        self._break(ConnectionResetError("the connection was closed by its pool"))


GeventPoolErrorType = TransportError | ConnectionClosedError
