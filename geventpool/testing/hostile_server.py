"""A deliberately broken Echo server in a process of its own, for tests of what a client does
with replies it must not trust: ``python -m geventpool.testing.hostile_server``.

It reads each request properly and answers ``echo(msg)`` as ``msg`` says (the part before a
``:`` names the misbehaviour, the rest is its argument); any other method gets a correct reply.
Prints ``{"event": "ready", "port": N}`` once it serves; SIGTERM stops it.

Replies: ``ok:TEXT`` (correct, TEXT), ``wrong-seqid``, ``wrong-name``, ``wrong-type`` (a CALL),
``trailing`` (a correct reply and a second one in the same write), ``late-duplicate`` (a correct
reply, the same again 150 ms later), ``stale`` (a reply with the previous call's sequence id),
``claim-string:N`` (a string claiming N bytes, then half of it, at most 32 MiB, slowly),
``claim-list:N`` (a list of i32 claiming N elements, none sent), ``unknown-list`` (a list of
type code 99 claiming 2^31-1 elements: 47 bytes in all), ``negative-length``, ``deep:N`` (N
nested lists), ``bad-utf8``, ``claim-frame:N`` (framed: a frame header claiming N bytes),
``garbage:SEED`` (random bytes), ``mutate:SEED`` (the correct reply with a few random bytes
changed, cut or added), ``close`` (no reply), ``silence`` (no reply, the connection open),
``next-body:HEX`` (answers ``armed``; the connection's next call of another method gets a
correct header and HEX as its struct, in any protocol).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from geventpool.errors import GeventPoolError  # noqa: E402
from geventpool.testing.echo import echo_thrift  # noqa: E402
from geventpool.wire.messages import CALL, REPLY, MessageCodec  # noqa: E402
from geventpool.wire.scan import IncompleteMessageError  # noqa: E402

_VERSION_1 = 0x80010000
_CHUNK = 65_536
_MAX_STREAMED = 32 << 20


def binary_header(name: str, message_type: int, seqid: int) -> bytes:
    """A strict binary-protocol message header."""
    encoded = name.encode()
    return (
        struct.pack("!II", _VERSION_1 | message_type, len(encoded))
        + encoded
        + struct.pack("!i", seqid)
    )


class Hostile:
    """One connection's misbehaviour, request by request."""

    def __init__(self, sock: socket.socket, codec: MessageCodec) -> None:
        self.sock = sock
        self.codec = codec
        self.previous_seqid = 0
        self.next_body: bytes | None = None  # set by next-body: the next other call's reply

    def frame(self, data: bytes) -> bytes:
        return struct.pack("!i", len(data)) + data if self.codec.transport == "framed" else data

    def reply(self, name: str, seqid: int, text: str, message_type: int = REPLY) -> bytes:
        return self.codec.encode(
            name, message_type, seqid, echo_thrift.Echo.echo_result(success=text)
        )

    def header(self, name: str, seqid: int) -> bytes:
        """A REPLY header in the connection's protocol (no frame): an empty struct's
        encoding without its STOP byte."""
        encoded = self.codec.encode(name, REPLY, seqid, echo_thrift.Echo.ping_result())
        return encoded[4:-1] if self.codec.transport == "framed" else encoded[:-1]

    def answer(self, name: str, seqid: int, body: bytes) -> None:
        if name != "echo" and self.next_body is not None:
            raw, self.next_body = self.next_body, None
            self.sock.sendall(self.frame(self.header(name, seqid) + raw))
            return
        if name != "echo":
            result = getattr(echo_thrift.Echo, f"{name}_result")()
            if result.oneway:
                return
            if name == "whoami":
                result.success = "hostile"
            self.sock.sendall(self.codec.encode(name, REPLY, seqid, result))
            return
        msg = self.codec.decode(body, echo_thrift.Echo.echo_args()).msg or ""
        mode, _, argument = msg.partition(":")
        send = self.sock.sendall
        if mode == "ok":
            send(self.reply(name, seqid, argument))
        elif mode == "wrong-seqid":
            send(self.reply(name, seqid + 1000, "wrong seqid"))
        elif mode == "stale":
            send(self.reply(name, self.previous_seqid, "stale"))
        elif mode == "wrong-name":
            send(self.reply("whoami", seqid, "wrong name"))
        elif mode == "wrong-type":
            send(self.reply(name, seqid, "wrong type", CALL))
        elif mode == "trailing":
            send(self.reply(name, seqid, "trailing") + self.reply(name, seqid, "extra"))
        elif mode == "late-duplicate":
            send(self.reply(name, seqid, "late-duplicate"))
            gevent.sleep(0.15)
            send(self.reply(name, seqid, "duplicate"))
        elif mode == "claim-string":
            claimed = int(argument)
            head = binary_header(name, REPLY, seqid) + b"\x0b\x00\x00" + struct.pack("!i", claimed)
            if self.codec.transport == "framed":
                head = struct.pack("!i", min(len(head) + claimed + 1, 2**31 - 1)) + head
            send(head)
            streamed = 0
            while streamed < min(claimed // 2, _MAX_STREAMED):
                send(b"\0" * _CHUNK)
                streamed += _CHUNK
                gevent.sleep(0.001)
        elif mode == "claim-list":
            send(
                self.frame(
                    binary_header(name, REPLY, seqid)
                    + b"\x0f\x00\x01\x08"
                    + struct.pack("!i", int(argument))
                )
            )
        elif mode == "unknown-list":
            send(
                self.frame(binary_header(name, REPLY, seqid) + b"\x0f\x00\x01\x63\x7f\xff\xff\xff")
            )
        elif mode == "negative-length":
            send(
                self.frame(binary_header(name, REPLY, seqid) + b"\x0b\x00\x00\xff\xff\xff\xfb\x00")
            )
        elif mode == "deep":
            depth = int(argument)
            nested = (
                b"\x0f\x00\x05"
                + b"\x0f\x00\x00\x00\x01" * depth
                + b"\x08\x00\x00\x00\x00"
                + b"\x00"
            )
            send(self.frame(binary_header(name, REPLY, seqid) + nested))
        elif mode == "bad-utf8":
            send(
                self.frame(
                    binary_header(name, REPLY, seqid) + b"\x0b\x00\x00\x00\x00\x00\x02\xff\xfe\x00"
                )
            )
        elif mode == "claim-frame":
            send(struct.pack("!i", int(argument)) + b"\0" * 1024)
        elif mode == "garbage":
            send(random.Random(argument).randbytes(64))
        elif mode == "mutate":
            send(mutate(self.reply(name, seqid, "mutated"), random.Random(argument)))
        elif mode == "next-body":
            self.next_body = bytes.fromhex(argument)
            send(self.reply(name, seqid, "armed"))
        elif mode == "close":
            self.sock.close()
        elif mode == "silence":
            gevent.sleep(30)
        else:
            send(self.reply(name, seqid, f"unknown mode {mode!r}"))
        self.previous_seqid = seqid


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one to three random changes: a byte replaced, bytes cut, bytes added."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(3)
        at = rng.randrange(len(out)) if out else 0
        if kind == 0 and out:
            out[at] = rng.randrange(256)
        elif kind == 1 and out:
            del out[at : at + rng.randint(1, 4)]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 4))
    return bytes(out)


def serve_connection(sock: socket.socket, address: object, codec: MessageCodec) -> None:
    hostile = Hostile(sock, codec)
    buffer = bytearray()
    try:
        while True:
            try:
                name, _, seqid, body, size, _ = codec.split(buffer)
            except IncompleteMessageError:
                data = sock.recv(_CHUNK)
                if not data:
                    return
                buffer += data
                continue
            del buffer[:size]
            hostile.answer(name, seqid, body)
    except (OSError, GeventPoolError):
        pass
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transport", default="buffered")
    parser.add_argument("--protocol", default="binary")
    args = parser.parse_args(argv)
    server = StreamServer(
        ("127.0.0.1", 0),
        lambda sock, address: serve_connection(
            sock, address, MessageCodec(args.transport, args.protocol)
        ),
    )
    server.start()
    print(json.dumps({"event": "ready", "port": server.server_port}), flush=True)
    stopped = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopped.set)
    stopped.wait()
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
