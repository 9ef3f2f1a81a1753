"""ThriftServer against deliberately broken clients over real sockets: a request that is
malformed, oversized or of the wrong type closes that one connection at once, the server's
memory follows its limits and not the client's claims, and every other client keeps being
served."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import gevent
import pytest
from thriftpy2.thrift import TApplicationException

from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.server import thrift_server
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import EchoHandler, echo_thrift
from geventpool.testing.hostile_server import binary_header, mutate
from geventpool.testing.processes import ServerProcess
from geventpool.wire.messages import CALL, EXCEPTION, REPLY, MessageCodec
from geventpool.wire.scan import IncompleteMessageError
from helpers import events_named

ECHO_ARGS_STRING = b"\x0b\x00\x01"  # field 1 (msg), a string


@pytest.fixture(scope="module")
def echo_server() -> Iterator[Callable[[str], ServerProcess]]:
    """``echo_server(transport)``: an echo server process per transport, shared."""
    started: dict[str, ServerProcess] = {}

    def get(transport: str) -> ServerProcess:
        if transport not in started:
            started[transport] = ServerProcess(["--transport", transport]).start()
        return started[transport]

    yield get
    for process in started.values():
        process.kill()


def framed(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def request(
    transport: str, body: bytes, seqid: int = 1, message_type: int = CALL, method: str = "echo"
) -> bytes:
    """A binary-protocol ``method`` message with ``body`` as its struct."""
    data = binary_header(method, message_type, seqid) + body
    return framed(data) if transport == "framed" else data


def connect(process: ServerProcess) -> socket.socket:
    assert process.port is not None
    sock = socket.create_connection(("127.0.0.1", process.port), timeout=5)
    sock.settimeout(5)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (instead of answering or waiting)."""
    try:
        return sock.recv(65_536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def served(process: ServerProcess, transport: str) -> bool:
    assert process.port is not None
    instance = Instance(host="127.0.0.1", port=process.port, transport=transport)
    client = ServiceClient(echo_thrift.Echo, "echo", instances=[instance])
    try:
        return bool(client.echo("still serving") == "still serving")
    finally:
        client.stop()


def peak_rss(process: ServerProcess) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("transport", ["buffered", "framed"])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x0f\x00\x01\x63\x7f\xff\xff\xff\x00", id="list-of-unknown-type"),
        pytest.param(ECHO_ARGS_STRING + struct.pack("!i", 2**30), id="string-of-2-30-bytes"),
        pytest.param(ECHO_ARGS_STRING + struct.pack("!i", 2**31 - 1), id="string-of-2-31-bytes"),
        pytest.param(ECHO_ARGS_STRING + struct.pack("!i", -5) + b"\x00", id="negative-length"),
        pytest.param(
            b"\x0f\x00\x05" + b"\x0f\x00\x00\x00\x01" * 100 + b"\x08" + bytes(4) + b"\x00",
            id="nested-100-deep",
        ),
        pytest.param(b"\x0f\x00\x05\x08\x7f\xff\xff\xff\x00", id="list-of-2-31-ints"),
    ],
)
def test_a_malformed_or_oversized_request_closes_that_connection_at_once(
    echo_server: Callable[[str], ServerProcess], transport: str, body: bytes
) -> None:
    process = echo_server(transport)
    with connect(process) as sock:
        sock.sendall(request(transport, body))
        assert closed_by_server(sock)
    assert served(process, transport)


@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_a_reply_sent_to_the_server_closes_that_connection(
    echo_server: Callable[[str], ServerProcess], transport: str
) -> None:
    process = echo_server(transport)
    with connect(process) as sock:
        sock.sendall(
            request(
                transport, ECHO_ARGS_STRING + struct.pack("!i", 1) + b"x\x00", message_type=REPLY
            )
        )
        assert closed_by_server(sock)
    assert served(process, transport)


def test_a_two_gigabyte_frame_is_refused_before_it_is_read_and_memory_stays_flat(
    echo_server: Callable[[str], ServerProcess],
) -> None:
    process = echo_server("framed")
    before = peak_rss(process)
    sent = 0
    with connect(process) as sock:
        sock.sendall(struct.pack("!i", 2_000_000_000))  # 2 GB
        chunk = bytes(1 << 20)
        with pytest.raises(OSError):  # the server closed the connection: the stream breaks
            while sent < 256 << 20:  # bounded: 256 MiB at most
                sock.sendall(chunk)
                sent += len(chunk)
    growth = peak_rss(process) - before
    print(
        f"sent {sent >> 20} MiB before the server closed; its peak memory grew {growth >> 20} MiB"
    )
    assert sent < 64 << 20
    assert growth < 16 << 20
    assert served(process, "framed")


def test_an_unknown_method_is_answered_and_the_connection_kept(
    echo_server: Callable[[str], ServerProcess],
) -> None:
    process = echo_server("buffered")
    codec = MessageCodec("buffered", "binary")
    with connect(process) as sock:
        sock.sendall(binary_header("no_such_method", CALL, 7) + b"\x00")
        name, message_type, seqid, body = read_message(sock, codec)
        error = codec.decode(body, TApplicationException())
        assert (message_type, seqid, error.type) == (
            EXCEPTION,
            7,
            TApplicationException.UNKNOWN_METHOD,
        )
        sock.sendall(codec.encode("echo", CALL, 8, echo_thrift.Echo.echo_args(msg="next")))
        name, message_type, seqid, body = read_message(sock, codec)
        assert (name, message_type, seqid) == ("echo", REPLY, 8)
        assert codec.decode(body, echo_thrift.Echo.echo_result()).success == "next"


def read_message(sock: socket.socket, codec: MessageCodec) -> tuple[str, int, int, bytes]:
    buffer = bytearray()
    while True:
        try:
            name, message_type, seqid, body, *_ = codec.split(buffer)
            return name, message_type, seqid, body
        except IncompleteMessageError:
            data = sock.recv(65_536)
            assert data, "closed"
            buffer += data


def test_other_clients_are_served_while_one_streams_a_huge_request(
    serve: Callable[..., ThriftServer],
) -> None:
    """Counted, not timed: while one client trickles a request that claims (within the
    limits) 16 MB, the server keeps answering another client."""
    server = serve()
    client = ServiceClient(
        echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
    )
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(
            binary_header("echo", CALL, 1) + ECHO_ARGS_STRING + struct.pack("!i", 16_000_000)
        )

        def trickle() -> None:
            for _ in range(100):
                sock.sendall(bytes(65_536))
                gevent.sleep(0.001)

        streaming = gevent.spawn(trickle)
        answered = 0
        while not streaming.dead and answered < 100_000:
            assert client.echo("x") == "x"
            answered += 1
        streaming.get(timeout=10)
        assert answered >= 20
    finally:
        sock.close()
        client.stop()


def test_a_malformed_request_is_logged_with_what_was_seen(
    serve: Callable[..., ThriftServer], captured: list[MutableMapping[str, Any]]
) -> None:
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        sock.sendall(request("buffered", b"\x0f\x00\x01\x63\x7f\xff\xff\xff\x00"))
        assert closed_by_server(sock)
    [event] = events_named(captured, "server_connection_error")
    assert "unknown type code 99" in event["error"]


@pytest.mark.gevent_timeout(120)
@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_random_near_valid_requests_never_take_the_server_down(
    echo_server: Callable[[str], ServerProcess], transport: str
) -> None:
    """300 echo() requests with one to three random bytes changed, cut or added, each on its
    own connection: the server answers the request, answers with an exception, or closes the
    connection; it never stops serving the others."""
    process = echo_server(transport)
    codec = MessageCodec(transport, "binary")
    valid = codec.encode("echo", CALL, 1, echo_thrift.Echo.echo_args(msg="hello"))
    rng = random.Random(transport)
    outcomes: dict[str, int] = {}
    for _ in range(300):
        with connect(process) as sock:
            sock.settimeout(0.05)
            sock.sendall(mutate(valid, rng))
            try:
                data = sock.recv(65_536)
                outcome = "answered" if data else "closed"
            except TimeoutError:
                outcome = "waiting for more"  # a change made the request look longer
            except ConnectionResetError:
                outcome = "closed"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(transport, outcomes)
    assert served(process, transport)
    assert outcomes.get("closed", 0) > 0 and outcomes.get("answered", 0) > 0


@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_arguments_the_decoder_would_read_by_other_types_close_the_connection(
    echo_server: Callable[[str], ServerProcess], transport: str
) -> None:
    """``table(counts: map<string, i32>)`` sent with string values: 42 bytes that made the
    decoder read a length out of the middle of a value (+2 GiB, a 4.7 s stall)."""
    process = echo_server(transport)
    before = peak_rss(process)
    key = struct.pack("!i", 1) + b"k"
    # walked as the wire says: two (string, string) entries; read as the IDL says, the first
    # value is an i32 (the 4 of its length) and the second key's length is 0x7ffffff0
    entries = key + struct.pack("!i", 4) + b"\x7f\xff\xff\xf0" + key + key
    body = b"\x0d\x00\x01\x0b\x0b" + struct.pack("!i", 2) + entries + b"\x00"
    with connect(process) as sock:
        sock.sendall(request(transport, body, method="table"))
        assert closed_by_server(sock)
    assert peak_rss(process) - before < 16 << 20
    assert served(process, transport)


def test_a_request_trickling_in_past_request_timeout_closes_the_connection(
    serve: Callable[..., ThriftServer], captured: list[MutableMapping[str, Any]]
) -> None:
    """A request whose bytes each arrive within the idle timeout, but not the whole of it
    within ``request_timeout``: the connection is closed, not held for ever."""
    server = serve(request_timeout=0.3, idle_timeout=5.0)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(binary_header("echo", CALL, 1) + ECHO_ARGS_STRING + struct.pack("!i", 1000))
        with pytest.raises(OSError):  # the server closed the connection: the writes fail
            while sent < 1000:  # bounded: 1000 bytes, 20 s at most
                sock.sendall(b"x")
                sent += 1
                gevent.sleep(0.02)
    assert sent < 1000
    [event] = events_named(captured, "server_connection_error")
    assert "request_timeout (0.3 s)" in event["error"]


@pytest.mark.parametrize(
    ("size", "count"),
    [(64, 2000), (16_384, 300)],  # 16,384 bytes: each read ends with a request, buffer empty
)
def test_a_connection_s_pipelined_requests_let_other_connections_in(size: int, count: int) -> None:
    """Requests written at once on one connection: another client's calls are answered
    between them, not after the last (the server yields every few requests)."""
    order: list[str] = []

    class Recording(EchoHandler):
        def echo(self, msg: str) -> str:
            order.append(msg)
            return msg

    server = ThriftServer(echo_thrift.Echo, Recording(""), deregister_grace=0.0)
    server.start()
    client = ServiceClient(
        echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
    )
    codec = MessageCodec("buffered", "binary")
    try:
        assert client.echo("other") == "other"  # connected, before the flood
        other = gevent.spawn(lambda: [client.echo("other") for _ in range(200)])
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            text = "pipelined".ljust(size - 24, ".")  # 24 bytes of header and field
            flood = b"".join(
                codec.encode("echo", CALL, seqid, echo_thrift.Echo.echo_args(msg=text))
                for seqid in range(count)
            )
            assert len(flood) == size * count

            def drain() -> None:  # read the replies, or the server's writes would block
                while sock.recv(1 << 20):
                    pass

            reader = gevent.spawn(drain)
            sock.sendall(flood)
            gevent.sleep(0)
            other.get(timeout=30)
            with gevent.Timeout(30):  # bounded: until every pipelined request was answered
                while sum(msg.startswith("pipelined") for msg in order) < count:
                    gevent.sleep(0.01)
            reader.kill()
    finally:
        client.stop()
        server.stop(drain_timeout=1.0)
    flooded = [i for i, msg in enumerate(order) if msg.startswith("pipelined")]
    assert len(flooded) == count
    between = [msg for msg in order[flooded[0] : flooded[-1]] if msg == "other"]
    assert between, "no other call was answered while the pipelined requests were"


@pytest.mark.gevent_timeout(60)
def test_a_client_that_never_reads_its_replies_is_no_longer_read(tmp_path: Path) -> None:
    """Calls of one connection run concurrently and queue their replies: a peer that sends
    requests and never reads the replies must not make the server hold them all. Once
    MAX_UNSENT bytes wait, the calls wait, and the server stops reading the connection."""
    server = ServerProcess([], log_path=tmp_path / "server.log").start()
    assert server.port is not None
    codec = MessageCodec("buffered", "binary")
    request = codec.encode("echo", CALL, 1, echo_thrift.Echo.echo_args(msg="x" * 10_000))
    offered = 20_000  # 200 MB of requests, whose replies would be as large
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
        before = _rss(server.pid)
        with gevent.Timeout(5, False):  # bounded: until the server stops reading
            for _ in range(offered):
                sock.sendall(request)
                sent += 1
        gevent.sleep(0.5)
        grown = _rss(server.pid) - before
    server.kill()
    print(f"{sent} of {offered} requests sent; server memory grew {grown / 2**20:.1f} MiB")
    assert sent < offered / 4, sent  # it stopped reading: 50 MB at most got through
    assert grown < 64 << 20, grown / 2**20


def _rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_connections_queued_replies_never_pass_max_unsent_by_more_than_one_reply(
    serve: Callable[..., ThriftServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each running call queues its reply only when it fits: 100 pipelined requests whose
    replies are 0.12 MB each, from a peer that never reads, never queue more than
    MAX_UNSENT plus one reply (32 calls run at once: before, each queued its reply and then
    waited, 3.8 MB in all)."""
    made: list[Any] = []
    init = thrift_server._Replies.__init__

    def recording(self: Any, sock: socket.socket) -> None:
        init(self, sock)
        made.append(self)

    monkeypatch.setattr(thrift_server._Replies, "__init__", recording)
    server = serve()
    codec = MessageCodec("buffered", "binary")
    requests = b"".join(
        codec.encode("items", CALL, seqid, echo_thrift.Echo.items_args(count=5_000))
        for seqid in range(1, 101)
    )
    reply_size = len(codec.encode("items", REPLY, 1, _items_result(5_000)))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
        sock.sendall(requests)
        gevent.sleep(1.0)
        [replies] = made
        unsent = replies._unsent  # the peer has read nothing yet
    assert 0 < unsent <= thrift_server.MAX_UNSENT + reply_size, (
        unsent,
        reply_size,
    )


def _items_result(count: int) -> Any:
    return echo_thrift.Echo.items_result(
        success=[echo_thrift.Item(id=n, name=f"item {n}") for n in range(count)]
    )
