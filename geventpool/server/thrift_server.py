"""A gevent Thrift server for a thriftpy2 service, registered in ZooKeeper while it serves.

:class:`ThriftServer` promises:

* **Bounded connections.** At most ``max_connections`` are served at once; further clients
  wait in the listen backlog until one closes (``server_connection_limit_reached`` is logged).
* **A chosen idle timeout.** A connection with no request for ``idle_timeout`` seconds is
  closed (``None``: never). thriftpy2's own threaded server silently drops idle connections
  after 3 s; keep this longer than the client pool's idle timeout so that clients, which can
  tell, close idle connections first.
* **One bad peer stays one bad peer.** Every request is read by our message layer
  (:mod:`geventpool.wire.messages`) and checked against ``limits`` (a
  :class:`~geventpool.wire.limits.WireLimits`: frame, message, string, container and depth
  bounds) before anything is allocated or decoded; a request that is malformed, oversized or
  not a CALL closes that connection only (``server_connection_error`` says what was seen).
  Memory follows the limits, never a peer's claims, and no request can stall the hub: a
  request is walked once however it trickles in, the walk pauses every few thousand values,
  a request must arrive whole within ``request_timeout``, and a connection's pipelined
  requests let the others in every few requests.
* **Pipelined clients served concurrently.** With ``concurrency`` above 1 (the default,
  32), a connection's requests run side by side and each reply is written as soon as it is
  ready, tagged with its sequence id, so a slow call does not hold back the fast ones behind
  it; a connection with ``concurrency`` calls running is not read until one ends.
* **No hung callers.** A handler exception not declared in the IDL is logged
  (``server_handler_failed``) and answered with a ``TApplicationException(INTERNAL_ERROR)``;
  the connection stays usable. Declared exceptions reach the caller as declared.
* **Registration only while serving.** It registers (see :class:`Registration`) once it
  accepts, and on stop deregisters first.
* **Graceful stop** (:meth:`ThriftServer.stop`, or SIGTERM/SIGINT under
  :meth:`ThriftServer.serve_forever`): deregister, wait ``deregister_grace`` seconds for
  clients to notice, stop accepting, answer every request already received (calls in
  progress finish and send their replies) for up to ``drain_timeout`` seconds, then close
  what is left.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent.server import StreamServer
from kazoo.client import KazooClient
from thriftpy2.thrift import TApplicationException

from geventpool import events
from geventpool.discovery.instance import OUT_OF_ORDER, PIPELINING, Instance
from geventpool.discovery.registrar import Registrar
from geventpool.discovery.zk import DEFAULT_ROOT, ZooKeeper, close, connect_or_use
from geventpool.errors import (
    ConfigurationError,
    MalformedMessageError,
    MessageLimitError,
    TlsError,
)
from geventpool.observers import Observers, new_record
from geventpool.server.observing import (
    APPLICATION_ERROR,
    CANCELLED,
    DECLARED_EXCEPTION,
    HANDLER_ERROR,
    OK,
    UNKNOWN_METHOD,
    UNKNOWN_NAME,
    ServedCall,
    ServerObserver,
    server_observers,
)
from geventpool.tls import ServerTls, handshake
from geventpool.validation import check_seconds
from geventpool.wire.arguments import method_spec
from geventpool.wire.limits import DEFAULT_LIMITS, WireLimits
from geventpool.wire.messages import (
    CALL,
    EXCEPTION,
    MESSAGE_TYPES,
    ONEWAY,
    REPLY,
    Message,
    MessageCodec,
    let_others_run,
    receiver,
)
from geventpool.wire.scan import IncompleteMessageError, incomplete

_YIELD_EVERY = 16  # requests answered in a row without blocking, before letting others run
MAX_UNSENT = 1 << 20
"""Bytes of a connection's replies queued but not yet taken by its peer, past which its calls
wait to queue theirs and no new request of it starts (see ``_Replies``)."""


_UNSPECIFIED_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class Registration:
    """Where and how a :class:`ThriftServer` registers itself.

    ``zookeeper`` is a connect string, a :class:`~geventpool.discovery.zk.ZooKeeperConfig` (the
    server opens and closes its own client) or a started kazoo client (used, never stopped).
    ``advertise_host`` is the address clients connect to; it defaults to the bound host, and
    must be given when the server binds to all interfaces. ``start_timeout`` bounds the wait
    for ZooKeeper at start, in seconds.
    """

    zookeeper: ZooKeeper
    service: str
    root: str = DEFAULT_ROOT
    advertise_host: str | None = None
    weight: float = 1.0
    zone: str | None = None
    version: str | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    start_timeout: float = 10.0


@dataclass
class ServerStats:
    """Counters of a server: ``connections`` open now, ``accepted`` and ``calls`` since start,
    ``handler_errors`` (undeclared exceptions), ``killed`` (calls cut by the drain timeout),
    connections closed for a request ``over_limits`` (a
    :class:`~geventpool.errors.MessageLimitError`) or ``malformed`` (any other
    :class:`~geventpool.errors.MalformedMessageError`), and connections accepted ``at_capacity``
    (the last of ``max_connections``: more wait in the backlog)."""

    connections: int = 0
    accepted: int = 0
    calls: int = 0
    handler_errors: int = 0
    killed: int = 0
    over_limits: int = 0
    malformed: int = 0
    at_capacity: int = 0


class _Connection:
    __slots__ = ("answered_at", "calls", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0  # handlers running for it
        self.answered_at = time.monotonic()  # when its last concurrent call ended

    @property
    def busy(self) -> bool:
        """Whether a handler is running for one of its requests."""
        return self.calls > 0

    def stop_reading(self) -> None:
        """Make a pending or next read see end-of-file; replies can still be written (on
        TLS too: the socket's own shutdown, not the TLS one, which would end writing)."""
        with contextlib.suppress(OSError):
            gevent.socket.socket.shutdown(self.sock, socket.SHUT_RD)


class _Replies:
    """The replies of one connection's concurrent calls, written as each is ready: a writer
    greenlet sends every reply finished in the same turn of the event loop with one
    ``sendall``. Replies not yet sent are bounded: the queue holds at most
    :data:`MAX_UNSENT` bytes (or one larger reply); a call whose reply does not fit waits
    for room, holding its slot, and no new request of the connection is started while the
    queue is full. So a peer that never reads costs at most ``MAX_UNSENT`` plus the replies
    of the ``concurrency`` calls already running. A failed write ends it (the peer is gone);
    later replies are dropped."""

    __slots__ = ("_closing", "_failed", "_queue", "_room", "_sock", "_unsent", "_wake", "_writer")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: list[bytes] = []
        self._unsent = 0
        self._wake = gevent.event.Event()
        self._room = gevent.event.Event()
        self._room.set()
        self._closing = self._failed = False
        self._writer = gevent.spawn(self._write_loop)

    def write(self, reply: bytes) -> None:
        """Queue ``reply`` (a whole encoded message) once there is room for it: the queue
        holds at most :data:`MAX_UNSENT` bytes, or one reply larger than that."""
        while self._unsent and self._unsent + len(reply) > MAX_UNSENT and not self._failed:
            self._room.clear()
            self._room.wait()
        if self._failed:
            return
        self._queue.append(reply)
        self._unsent += len(reply)
        if len(self._queue) == 1:
            self._wake.set()

    def wait_for_room(self) -> None:
        """Return once fewer than :data:`MAX_UNSENT` bytes are unsent (or the peer is gone):
        no new call of the connection starts while its peer does not read its replies."""
        while self._unsent >= MAX_UNSENT and not self._failed:
            self._room.clear()
            self._room.wait()

    def _write_loop(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                while self._queue:
                    batch, self._queue = self._queue, []
                    data = batch[0] if len(batch) == 1 else b"".join(batch)
                    self._sock.sendall(data)
                    self._unsent -= len(data)
                    self._room.set()  # the waiters see whether theirs fits now
                if self._closing:
                    return
        except OSError:
            self._failed = True
            self._queue, self._unsent = [], 0
            self._room.set()

    def close(self) -> None:
        """Send what is queued, then stop (the caller bounds how long it waits)."""
        self._closing = True
        self._wake.set()
        self._writer.join()

    def abort(self) -> None:
        """Stop now; what is queued is dropped."""
        self._writer.kill(block=False)
        self._failed = True
        self._room.set()


class _Dispatcher:
    """Calls the handler for one request and encodes its answer: the result, a declared
    exception, or a ``TApplicationException`` (unknown method; INTERNAL_ERROR for an
    undeclared exception or a result that does not fit the IDL, both logged); tells the
    ``observers`` (None: none, no cost) each call's start and end. ``port`` is the server's,
    set once it is bound."""

    def __init__(
        self,
        service: Any,
        handler: object,
        on_failure: Callable[[str, Exception], None],
        observers: Observers[ServedCall] | None = None,
    ) -> None:
        self._service = service
        self._handler = handler
        self._methods = frozenset(service.thrift_services)
        self._arguments = {name: getattr(service, f"{name}_args") for name in self._methods}
        self._specs = {name: method_spec(service, name) for name in self._methods}
        self._on_failure = on_failure
        self.observers = observers
        self.port = 0

    def expect(self, name: str, message_type: int, seqid: int) -> dict[int, Any] | None:
        """The spec a request's struct is walked against: its method's arguments (None for an
        unknown method, answered UNKNOWN_METHOD); anything but a CALL is refused."""
        if message_type not in (CALL, ONEWAY):
            kind = MESSAGE_TYPES.get(message_type, f"type {message_type}")
            raise MalformedMessageError(f"expected a CALL, got {kind} {name[:64]!r} #{seqid}")
        arguments = self._arguments.get(name)
        return arguments.thrift_spec if arguments is not None else None

    def answer(  # noqa: PLR0917 - one request, as split it
        self,
        codec: MessageCodec,
        name: str,
        seqid: int,
        body: bytes,
        values: int,
        connection: _Connection,
    ) -> bytes | None:
        """The encoded reply to request ``name`` #``seqid`` (None for a oneway call); ``body``
        holds ``values`` values (see :meth:`MessageCodec.decode`)."""
        observers = self.observers
        if name not in self._methods:
            if observers is not None:
                call = new_record(ServedCall, (self.port, UNKNOWN_NAME))
                observers.ended(call, UNKNOWN_METHOD, 0.0, None)
            failure = TApplicationException(
                TApplicationException.UNKNOWN_METHOD, f"unknown method {name[:64]!r}"
            )
            return codec.encode(name, EXCEPTION, seqid, failure)
        args = codec.decode(body, self._arguments[name](), values)
        result = getattr(self._service, f"{name}_result")()
        given = [getattr(args, field[1]) for field in args.thrift_spec.values()]
        if observers is None:
            return self._run(codec, name, seqid, result, given, connection)[0]
        call = new_record(ServedCall, (self.port, name))
        if observers.starts:
            observers.started(call)
        outcome: str = CANCELLED  # as long as nothing else ended it
        error: BaseException | None = None
        began = time.monotonic()
        try:
            reply, outcome, error = self._run(codec, name, seqid, result, given, connection)
            return reply
        finally:
            observers.ended(call, outcome, time.monotonic() - began, error)

    def _run(  # noqa: PLR0917 - answer's request, decoded
        self,
        codec: MessageCodec,
        name: str,
        seqid: int,
        result: Any,
        given: list[Any],
        connection: _Connection,
    ) -> tuple[bytes | None, str, Exception | None]:
        """Run the handler: the encoded answer (None for a oneway call), the call's outcome
        and what the handler raised."""
        connection.calls += 1
        try:
            value = getattr(self._handler, name)(*given)
            problem = self._specs[name].result_problem(value)
            if problem is not None:  # the codec would truncate or refuse it: not sent
                failed = TypeError(problem)
                return self._internal_error(codec, name, seqid, failed), HANDLER_ERROR, failed
            result.success = value
            outcome, raised = OK, None
        except TApplicationException as error:
            return codec.encode(name, EXCEPTION, seqid, error), APPLICATION_ERROR, error
        except Exception as error:  # noqa: BLE001 - answered, not raised
            if not _declared(error, result):
                return self._internal_error(codec, name, seqid, error), HANDLER_ERROR, error
            outcome, raised = DECLARED_EXCEPTION, error
        finally:
            connection.calls -= 1
        if result.oneway:
            return None, outcome, raised
        try:
            return codec.encode(name, REPLY, seqid, result), outcome, raised
        except Exception as error:  # noqa: BLE001 - the handler returned what the IDL does not allow
            return self._internal_error(codec, name, seqid, error), HANDLER_ERROR, error

    def _internal_error(
        self, codec: MessageCodec, name: str, seqid: int, error: Exception
    ) -> bytes:
        self._on_failure(name, error)
        failure = TApplicationException(
            TApplicationException.INTERNAL_ERROR, f"{type(error).__name__} in {name}"
        )
        return codec.encode(name, EXCEPTION, seqid, failure)


def _declared(error: Exception, result: Any) -> bool:
    """Put ``error`` into ``result`` if the IDL declares it for the method."""
    for key in sorted(result.thrift_spec):
        field = result.thrift_spec[key]
        if field[1] != "success" and isinstance(error, field[2]):
            setattr(result, field[1], error)
            return True
    return False


class ThriftServer:
    """Serves ``handler`` for the thriftpy2 ``service`` on ``host:port`` (port 0: any free one).

    Durations are float seconds. ``transport`` and ``protocol`` must match the clients';
    ``limits`` bound every request (see :class:`~geventpool.wire.limits.WireLimits`), and
    ``request_timeout`` the time from a request's first byte to its last. ``concurrency``
    is how many calls of one connection run at once, each replied to as soon as it is done
    (1: one after another, in order); above 1 the registration says so (metadata
    ``pipelining: out-of-order``), and geventpool's clients then pipeline their calls.
    ``tls`` (a :class:`~geventpool.tls.ServerTls`) serves TLS only, mutual with a
    ``ca_file``; the registration then says so (clients never call it in plaintext), and a
    failed handshake is a ``server_connection_error`` event.
    """

    def __init__(
        self,
        service: Any,
        handler: object,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = 1000,
        idle_timeout: float | None = 900.0,
        drain_timeout: float = 10.0,
        deregister_grace: float = 0.5,
        transport: str = "buffered",
        protocol: str = "binary",
        registration: Registration | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        request_timeout: float = 60.0,
        concurrency: int = 32,
        tls: ServerTls | None = None,
        observers: Iterable[ServerObserver] = (),
    ) -> None:
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, not {max_connections!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, not {concurrency!r}")
        if tls is not None and not isinstance(tls, ServerTls):
            raise ConfigurationError(f"tls must be a ServerTls, not {tls!r}")
        self._tls = tls
        check_seconds("idle_timeout", idle_timeout, optional=True)
        check_seconds("drain_timeout", drain_timeout, zero=True)
        check_seconds("request_timeout", request_timeout)
        check_seconds("deregister_grace", deregister_grace, zero=True)
        if (
            registration is not None
            and registration.advertise_host is None
            and host in _UNSPECIFIED_HOSTS
        ):
            raise ConfigurationError(
                f"server binds to {host!r}: set Registration.advertise_host to the address"
                " clients should connect to"
            )
        self._service = service
        self._host = host
        self._port = port
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self._drain_timeout = drain_timeout
        self._deregister_grace = deregister_grace
        self._transport = transport
        self._protocol = protocol
        MessageCodec(transport, protocol, limits)  # checks both names now
        self._limits = limits
        self._concurrency = concurrency
        self._watching = tuple(observers)
        self._dispatcher = _Dispatcher(
            service,
            handler,
            self._handler_failed,
            server_observers(self._watching) if self._watching else None,
        )
        self._registration = registration
        self._pool = gevent.pool.Pool(max_connections)
        self._connections: set[_Connection] = set()
        self._stream: StreamServer | None = None
        self._registrar: Registrar | None = None
        self._owned_client: KazooClient | None = None
        self._draining = False
        self._stopping = False
        self._stopped = gevent.event.Event()
        self.stats = ServerStats()

    @property
    def port(self) -> int:
        """The port actually bound (known once started)."""
        return self._stream.server_port if self._stream is not None else self._port

    def observe(self, observer: ServerObserver) -> None:
        """Tell ``observer`` about every call from now on, as those given in ``observers=``
        are (once, however often it is given)."""
        if any(observer is known for known in self._watching):
            return
        self._watching = (*self._watching, observer)
        self._dispatcher.observers = server_observers(self._watching)

    @property
    def registrar(self) -> Registrar | None:
        """The registrar, once started with a :class:`Registration`."""
        return self._registrar

    def start(self) -> None:
        """Bind, start accepting, then register. Raises ``OSError`` if the port is taken,
        and the registrar's errors if registration fails (the server is stopped again)."""
        self._stream = StreamServer((self._host, self._port), self._handle, spawn=self._pool)
        self._stream.start()
        self._dispatcher.port = self.port
        try:
            if self._registration is not None:
                self._register(self._registration)
        except BaseException:
            self._stream.close()
            self._close_client()
            raise
        events.emit(
            events.SERVER_STARTED,
            service=self._registration.service if self._registration else None,
            host=self._host,
            port=self.port,
            transport=self._transport,
            protocol=self._protocol,
        )

    def _register(self, registration: Registration) -> None:
        client, opened = connect_or_use(registration.zookeeper, registration.start_timeout)
        self._owned_client = client if opened else None
        instance = Instance(
            host=registration.advertise_host or self._host,
            port=self.port,
            weight=registration.weight,
            zone=registration.zone,
            transport=self._transport,
            protocol=self._protocol,
            version=registration.version,
            metadata=self._advertised(registration.metadata),
            tls=self._tls is not None,
        )
        self._registrar = Registrar(client, registration.service, instance, root=registration.root)
        self._registrar.start(timeout=registration.start_timeout)

    def _advertised(self, metadata: Mapping[str, str]) -> Mapping[str, str]:
        """The registered metadata: with ``concurrency`` above 1, it says that replies come
        in any order (clients then pipeline by default), unless the caller said otherwise."""
        if self._concurrency > 1 and PIPELINING not in metadata:
            return {**metadata, PIPELINING: OUT_OF_ORDER}
        return metadata

    def serve_forever(self) -> None:
        """Start (if needed) and serve until :meth:`stop`, SIGTERM or SIGINT; then return."""
        if self._stream is None:
            self.start()
        handlers = [
            gevent.signal_handler(signum, self.stop)  # runs in a new greenlet
            for signum in (signal.SIGTERM, signal.SIGINT)
        ]
        try:
            self._stopped.wait()
        finally:
            for handler in handlers:
                handler.cancel()

    def stop(self, drain_timeout: float | None = None) -> None:
        """Deregister, stop accepting, drain, close. Idempotent; a second caller waits."""
        if self._stopping:
            self._stopped.wait()
            return
        self._stopping = True
        drain_timeout = self._drain_timeout if drain_timeout is None else drain_timeout
        events.emit(events.SERVER_STOPPING, port=self.port, connections=len(self._connections))
        if self._registrar is not None:
            self._registrar.stop()
            gevent.sleep(self._deregister_grace)
        if self._stream is not None:
            self._stream.close()
        self._draining = True
        for connection in list(self._connections):
            # Requests already received are still answered; then the read sees end-of-file.
            connection.stop_reading()
        if not self._pool.join(timeout=drain_timeout):
            self.stats.killed = sum(1 for c in self._connections if c.busy)
            events.emit(
                events.SERVER_DRAIN_TIMEOUT,
                "warning",
                port=self.port,
                timeout=drain_timeout,
                killed=self.stats.killed,
            )
            self._pool.kill(block=True, timeout=1.0)
        self._close_client()
        events.emit(events.SERVER_STOPPED, port=self.port, calls=self.stats.calls)
        self._stopped.set()

    def _close_client(self) -> None:
        client, self._owned_client = self._owned_client, None
        close(client)

    def _handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        connection = _Connection(sock)
        self._connections.add(connection)
        self.stats.accepted += 1
        self.stats.connections = len(self._connections)
        if self._pool.full():
            self.stats.at_capacity += 1
            events.emit(
                events.SERVER_CONNECTION_LIMIT_REACHED,
                "warning",
                port=self.port,
                max_connections=self._pool.size,
            )
        try:
            if self._tls is not None:
                tls = self._tls
                sock = handshake(
                    sock,
                    tls.ssl_context(),
                    f"{address[0]}:{address[1]}",
                    tls.handshake_timeout,
                    server_side=True,
                )
                connection.sock = sock
            sock.settimeout(self._idle_timeout)
            self._serve(sock, connection)
        except TlsError as error:
            events.emit(
                events.SERVER_CONNECTION_ERROR,
                "warning",
                port=self.port,
                peer=f"{address[0]}:{address[1]}",
                error=error.reason[:200],
            )
        except (OSError, EOFError):
            pass  # the peer closed, the idle timeout or the drain: the ordinary ends
        except MalformedMessageError as error:
            self._refused(error)
            events.emit(
                events.SERVER_CONNECTION_ERROR,
                "warning",
                port=self.port,
                peer=f"{address[0]}:{address[1]}",
                error=error.reason[:200],
            )
        except Exception as error:  # noqa: BLE001 - one bad peer must not reach the hub
            events.emit(
                events.SERVER_CONNECTION_ERROR,
                "warning",
                port=self.port,
                peer=f"{address[0]}:{address[1]}",
                error=repr(error)[:200],
            )
        finally:
            self._connections.discard(connection)
            self.stats.connections = len(self._connections)
            sock.close()

    def _serve(self, sock: socket.socket, connection: _Connection) -> None:
        """Read requests one by one, each checked before it is decoded, and answer them: one
        after another, or (``concurrency`` above 1) each in a greenlet of its own, at most
        ``concurrency`` at once, replying as each finishes."""
        codec = MessageCodec(self._transport, self._protocol, self._limits)
        buffer = bytearray()
        more = receiver(sock, buffer)
        dispatcher = self._dispatcher
        expect = dispatcher.expect
        replies = _Replies(sock) if self._concurrency > 1 else None
        running = gevent.pool.Pool(self._concurrency) if replies is not None else None
        served = 0
        try:
            while True:
                if not buffer:
                    if running is None:
                        more(1)  # waits for a request up to the idle timeout (the socket's)
                    else:
                        self._await_request(sock, more, running, connection)
                try:
                    message = codec.split(buffer, expect, incomplete, let_others_run)
                except IncompleteMessageError:
                    # The rest is still on its way: it has request_timeout to arrive, however
                    # slowly it trickles (each read alone is bounded by the idle timeout only).
                    late = MalformedMessageError(
                        "a request took over request_timeout"
                        f" ({self._request_timeout:g} s) to arrive"
                    )
                    with gevent.Timeout(self._request_timeout, late):
                        message = codec.split(buffer, expect, more, let_others_run)
                del buffer[: message[4]]
                if running is not None and replies is not None:
                    replies.wait_for_room()
                    running.spawn(self._answer, codec, message, connection, replies)
                else:
                    name, message_type, seqid, body, _, values = message
                    reply = dispatcher.answer(codec, name, seqid, body, values, connection)
                    if reply is not None and message_type == CALL:
                        sock.sendall(reply)
                    self.stats.calls += 1
                served += 1
                if served % _YIELD_EVERY == 0:
                    # Reads of a busy connection return at once, without a switch: let the
                    # other connections in (whether or not requests are left in the buffer).
                    let_others_run()
        finally:
            if running is not None and replies is not None:
                try:
                    running.join()  # the calls in progress reply (stop() bounds the wait)
                    replies.close()
                except BaseException:  # killed by the drain timeout: nothing may outlive it
                    running.kill(block=False)
                    replies.abort()
                    raise

    def _await_request(
        self,
        sock: socket.socket,
        more: Callable[[int], int],
        running: gevent.pool.Pool,
        connection: _Connection,
    ) -> None:
        """Wait for a request of a connection served concurrently: it is idle only once none
        of its calls runs and none ended within the idle timeout (the socket's timeout,
        which is restored)."""
        idle_timeout = self._idle_timeout
        if idle_timeout is None:
            more(1)
            return
        try:
            while True:
                try:
                    more(1)
                    return
                except TimeoutError:
                    idle_for = time.monotonic() - connection.answered_at
                    if not len(running) and idle_for >= idle_timeout:
                        raise
                    wait = idle_timeout if len(running) else idle_timeout - idle_for
                    sock.settimeout(max(wait, 0.001))
        finally:
            if sock.gettimeout() != idle_timeout:
                sock.settimeout(idle_timeout)

    def _answer(
        self, codec: MessageCodec, message: Message, connection: _Connection, replies: _Replies
    ) -> None:
        """Answer one request of a connection served concurrently."""
        name, message_type, seqid, body, _, values = message
        try:
            reply = self._dispatcher.answer(codec, name, seqid, body, values, connection)
        except MalformedMessageError as error:  # undecodable after its walk: drop the peer
            self._refused(error)
            events.emit(
                events.SERVER_CONNECTION_ERROR,
                "warning",
                port=self.port,
                error=error.reason[:200],
            )
            connection.stop_reading()
            return
        self.stats.calls += 1
        if reply is not None and message_type == CALL:
            replies.write(reply)
        connection.answered_at = time.monotonic()

    def _refused(self, error: MalformedMessageError) -> None:
        if isinstance(error, MessageLimitError):
            self.stats.over_limits += 1
        else:
            self.stats.malformed += 1

    def _handler_failed(self, api: str, error: Exception) -> None:
        self.stats.handler_errors += 1
        events.emit(
            events.SERVER_HANDLER_FAILED,
            "error",
            port=self.port,
            method=api,
            error=repr(error),
            exc_info=error,
        )
