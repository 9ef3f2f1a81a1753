"""Thrift messages on a byte stream: our own framing and headers, thriftpy2's codecs for structs.

:class:`MessageCodec` promises, for one transport (buffered or framed) and one protocol (binary
or compact):

* **Encoding is complete before anything is written.** :meth:`MessageCodec.encode` returns the
  whole message (frame included) as bytes, so an argument that fails to encode sends nothing.
* **Nothing is decoded before it is checked.** :meth:`MessageCodec.split` reads one message off
  the front of a receive buffer: the frame length and the header (version, type, name,
  sequence id) are checked, the caller says (``expect``) whether it wants a message with that
  header and which IDL struct it will decode it as, and the struct is walked against that
  spec (:mod:`geventpool.wire.scan`), all against the
  :class:`~geventpool.wire.limits.WireLimits` and the bytes present. Bytes still missing are
  asked of ``more`` (a socket's :func:`receiver`), never beyond the limits; so a message that
  arrives in pieces is walked once. It raises
  :class:`~geventpool.errors.MalformedMessageError` saying what was seen.
* **Decoding a checked struct cannot fail untyped.** :meth:`MessageCodec.decode` runs the
  (Cython) codec over exactly the checked bytes; whatever it still objects to (a ``string``
  field that is not UTF-8: declare the field ``binary`` to receive bytes) is a
  :class:`~geventpool.errors.MalformedMessageError`.

The codec holds one encode buffer: use it from one thread (any number of greenlets).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import gevent
from thriftpy2.protocol import TCompactProtocol, TCyBinaryProtocol
from thriftpy2.transport import TCyMemoryBuffer, TMemoryBuffer

from geventpool.errors import ConfigurationError, MalformedMessageError, MessageLimitError
from geventpool.wire.codecs import PROTOCOLS, TRANSPORTS
from geventpool.wire.limits import DEFAULT_LIMITS, WireLimits
from geventpool.wire.scan import (
    IncompleteMessageError,
    More,
    StructWalker,
    incomplete,
    read_varint,
)

CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
MESSAGE_TYPES = {CALL: "CALL", REPLY: "REPLY", EXCEPTION: "EXCEPTION", ONEWAY: "ONEWAY"}

RECEIVE = 16_384  # bytes asked of one recv() when a message's size is not known yet
RECEIVE_MAX = 1 << 20  # the most asked of one recv() for a message known to be larger
_VERSION_1 = -2147418112  # 0x80010000 as a signed i32
_VERSION_MASK = -65536  # 0xffff0000
_COMPACT_ID = 0x82
_i32 = struct.Struct("!i").unpack_from
_two_i32 = struct.Struct("!ii").unpack_from
_frame = struct.Struct("!i").pack


Expect = Callable[[str, int, int], "dict[int, Any] | None"]
"""``expect(name, type, seqid)``: the ``thrift_spec`` a message's struct will be decoded with,
or an exception raised to refuse the message (see :meth:`MessageCodec.split`)."""

Message = tuple[str, int, int, bytes, int, int]
"""One message read off a buffer: ``(name, type, seqid, body, size, values)``: its header, its
struct's bytes (checked), how many bytes of the buffer it took, and how many values its struct
holds (what decoding it costs: give it to :meth:`MessageCodec.decode`). A plain tuple: it is
made for every reply, and a named tuple costs ten times as much to make."""

OFF_HUB_VALUES = 20_000
"""A struct of more values than this is decoded in gevent's thread pool, not in the hub's
thread: the codec is one uninterruptible call (about 0.2 us a value with the Cython binary
codec, 0.85 us with the pure-Python compact one), and 2,000,000 values held the hub 0.4-1.7 s.
In a thread, the hub gets the interpreter lock back every few milliseconds; the hand-off costs
about 0.1 ms, under 3% of decoding that many values."""

OFF_HUB_BYTES = 1 << 20
"""A struct of more bytes than this is decoded in gevent's thread pool too, however few its
values: the pure-Python compact codec decodes 1 MiB of strings in milliseconds (16 MB of map
keys held the hub 67-97 ms). One C call of the Cython codec (a single long string) still
holds the interpreter lock while it runs: that is bounded by ``max_string_size``."""


class MessageCodec:
    """Messages of one ``transport`` and ``protocol``, checked against ``limits``."""

    def __init__(self, transport: str, protocol: str, limits: WireLimits = DEFAULT_LIMITS) -> None:
        if transport not in TRANSPORTS:
            raise ConfigurationError(f"transport must be one of {sorted(TRANSPORTS)}")
        if protocol not in PROTOCOLS:
            raise ConfigurationError(f"protocol must be one of {sorted(PROTOCOLS)}")
        self.transport = transport
        self.protocol = protocol
        self.limits = limits
        self._framed = transport == "framed"
        self._compact = protocol == "compact"
        self._header: Callable[[bytes | bytearray, int, int], tuple[str, int, int, int]]
        self._walker = StructWalker(self._compact, limits)
        self._receive: More = incomplete
        self._bounded: More = self._more  # made once: split passes it to every walk
        self._walk = self._walker.walk
        self._frame = 0
        if self._compact:
            self._header = self._compact_header
            self._out: Any = TMemoryBuffer()
            self._writer: Any = TCompactProtocol(self._out)
        else:
            self._header = self._binary_header
            self._out = TCyMemoryBuffer()
            self._writer = TCyBinaryProtocol(self._out)
            self._in = TCyMemoryBuffer()
            self._reader = TCyBinaryProtocol(
                self._in, strict_decode=True, max_depth=limits.max_depth + 1
            )

    # -- out -----------------------------------------------------------------------------------

    def encode(self, name: str, message_type: int, seqid: int, body: Any) -> bytes:
        """The whole message (framed if the transport is): header and ``body`` (a thriftpy2
        struct). Raises whatever the codec raises for a value it cannot write; nothing of a
        failed message is left behind."""
        out, writer = self._out, self._writer
        if self._compact:  # a varint, unsigned (thriftpy2 would loop for ever on a negative)
            seqid &= 0xFFFFFFFF
        try:
            writer.write_message_begin(name, message_type, seqid)
            writer.write_struct(body)
            writer.write_message_end()
            data: bytes = out.getvalue()
        finally:
            self._reset_out()
        if self._framed:
            return _frame(len(data)) + data
        return data

    def _reset_out(self) -> None:
        if self._compact:
            self._out = TMemoryBuffer()
            self._writer = TCompactProtocol(self._out)
        else:
            self._out.clean()

    # -- in ------------------------------------------------------------------------------------

    def split(
        self,
        buf: bytes | bytearray,
        expect: Expect | None = None,
        more: More = incomplete,
        pause: Callable[[], object] | None = None,
    ) -> Message:
        """The message at the front of ``buf`` (see the module for what is checked).

        ``expect(name, type, seqid)`` is called once the header is read: it returns the
        ``thrift_spec`` the struct will be decoded with (None: walked as the wire says), or
        raises to refuse the message before its body is walked. ``more(pos)`` is asked for
        bytes the buffer does not hold yet (by default the message is incomplete:
        :class:`~geventpool.wire.scan.IncompleteMessageError`); it is never asked for more
        than the limits allow. ``pause()`` is called every few thousand values walked."""
        if self._framed:
            return self._split_frame(buf, expect, more, pause)
        self._receive = more
        n = len(buf)
        while True:
            try:
                name, message_type, seqid, start = self._header(buf, 0, n)
                break
            except IncompleteMessageError as short:
                n = self._more(short.needed)
        spec = expect(name, message_type, seqid) if expect is not None else None
        stop = self._walk(buf, start, n, spec, self._bounded, pause)
        if stop > self.limits.max_message_size:  # it may have been in the buffer already
            raise MessageLimitError("max_message_size", stop, self.limits.max_message_size)
        return name, message_type, seqid, bytes(buf[start:stop]), stop, self._walker.values

    def _more(self, pos: int) -> int:
        limit = self.limits.max_message_size
        if pos > limit:
            raise MessageLimitError("max_message_size", pos, limit, "(at least)")
        return self._receive(pos)

    def _split_frame(
        self,
        buf: bytes | bytearray,
        expect: Expect | None,
        more: More,
        pause: Callable[[], object] | None,
    ) -> Message:
        n = len(buf)
        if n < 4:
            n = more(4)
        (frame,) = _i32(buf, 0)
        if frame < 0:
            raise MalformedMessageError(f"negative frame length {frame}")
        limit = self.limits.max_frame_size
        if frame > limit:
            raise MessageLimitError("max_frame_size", frame, limit)
        end = 4 + frame
        if n < end:
            more(end)  # the whole frame: its size is within the limit
        try:
            name, message_type, seqid, start = self._header(buf, 4, end)
        except IncompleteMessageError:
            raise _past_frame(frame) from None
        spec = expect(name, message_type, seqid) if expect is not None else None
        self._frame = frame
        stop = self._walk(buf, start, end, spec, self._past_end, pause)
        if stop != end:
            raise MalformedMessageError(
                f"{end - stop} bytes follow the message inside its {frame}-byte frame"
            )
        return name, message_type, seqid, bytes(buf[start:stop]), end, self._walker.values

    def _past_end(self, pos: int) -> int:
        raise _past_frame(self._frame)

    def _binary_header(
        self, buf: bytes | bytearray, pos: int, end: int
    ) -> tuple[str, int, int, int]:
        if end - pos < 8:
            raise IncompleteMessageError(pos + 8)
        version_type, length = _two_i32(buf, pos)
        if version_type & _VERSION_MASK != _VERSION_1:
            raise MalformedMessageError(
                f"not a binary-protocol message: header 0x{version_type & 0xFFFFFFFF:08x}"
            )
        if length < 0 or length > self.limits.max_string_size:
            raise _bad_name_length(length, self.limits)
        start = pos + 8
        name_end = start + length
        if end < name_end + 4:
            raise IncompleteMessageError(name_end + 4)
        try:
            name = buf[start:name_end].decode()
        except UnicodeDecodeError:
            raise MalformedMessageError("the method name is not UTF-8") from None
        return name, version_type & 0xFF, _i32(buf, name_end)[0], name_end + 4

    def _compact_header(
        self, buf: bytes | bytearray, pos: int, end: int
    ) -> tuple[str, int, int, int]:
        if end - pos < 2:
            raise IncompleteMessageError(pos + 2)
        if buf[pos] != _COMPACT_ID:
            raise MalformedMessageError(
                f"not a compact-protocol message: first byte 0x{buf[pos]:02x}"
            )
        version_type = buf[pos + 1]
        if version_type & 0x1F != 1:
            raise MalformedMessageError(f"compact protocol version {version_type & 0x1F}, not 1")
        seqid, pos = read_varint(buf, pos + 2, end, 5)
        if seqid > 0xFFFFFFFF:
            raise MalformedMessageError(f"a sequence id out of range: {seqid}")
        if seqid >= 2**31:  # an i32 written unsigned, as Apache Thrift does
            seqid -= 2**32
        length, pos = read_varint(buf, pos, end, 5)
        if length > self.limits.max_string_size:
            raise _bad_name_length(length, self.limits)
        if end < pos + length:
            raise IncompleteMessageError(pos + length)
        try:
            name = buf[pos : pos + length].decode()
        except UnicodeDecodeError:
            raise MalformedMessageError("the method name is not UTF-8") from None
        return name, version_type >> 5, seqid, pos + length

    def decode(self, body: bytes, obj: Any, values: int = 0) -> Any:
        """Fill the thriftpy2 struct ``obj`` from a ``body`` that :meth:`split` checked and
        counted ``values`` in; above :data:`OFF_HUB_VALUES` or :data:`OFF_HUB_BYTES`, in
        gevent's thread pool (the calling greenlet waits; the others run)."""
        if values > OFF_HUB_VALUES or len(body) > OFF_HUB_BYTES:
            decoded, failure = gevent.get_hub().threadpool.apply(self._decode_apart, (body, obj))
            if failure is not None:  # raised here, in the caller's greenlet: gevent's thread
                raise failure  # pool would print a traceback of its own for it
            return decoded
        if self._compact:
            return _read(TCompactProtocol(TMemoryBuffer(body), strict_decode=True), obj)
        self._in.setvalue(body)  # no yield until the struct is read: safe to share
        return _read(self._reader, obj)

    def _decode_apart(self, body: bytes, obj: Any) -> tuple[Any, Exception | None]:
        """:meth:`decode` in another thread, with a reader of its own: the struct, or what
        decoding it raised."""
        reader: Any
        if self._compact:
            reader = TCompactProtocol(TMemoryBuffer(body), strict_decode=True)
        else:
            depth = self.limits.max_depth + 1
            reader = TCyBinaryProtocol(TCyMemoryBuffer(body), strict_decode=True, max_depth=depth)
        try:
            return _read(reader, obj), None
        except Exception as failure:  # noqa: BLE001 - handed to the caller's greenlet
            return None, failure


def _read(reader: Any, obj: Any) -> Any:
    """``obj`` filled by ``reader``; whatever the decoder still objects to in checked bytes (a
    ``string`` field that is not UTF-8) is a malformed message."""
    try:
        reader.read_struct(obj)
    except UnicodeDecodeError as error:
        raise MalformedMessageError(
            f"a string field is not UTF-8 ({error.reason} at byte {error.start});"
            " declare it binary to receive bytes"
        ) from None
    except Exception as error:  # noqa: BLE001 - checked bytes; anything left is malformed
        raise MalformedMessageError(f"undecodable {type(obj).__name__}: {error!r:.200}") from None
    return obj


def _past_frame(frame: int) -> MalformedMessageError:
    return MalformedMessageError(f"the message runs past the end of its {frame}-byte frame")


def _bad_name_length(length: int, limits: WireLimits) -> MalformedMessageError:
    if length < 0:
        return MalformedMessageError(f"negative method name length {length}")
    return MessageLimitError("max_string_size", length, limits.max_string_size, "(method name)")


def let_others_run() -> None:
    """A ``pause`` for :meth:`MessageCodec.split` (and for a server between requests): let
    gevent's event loop run once, timers and I/O included. ``gevent.sleep(0)`` runs only the
    greenlets already scheduled: a walk pausing with it held a timer 1.3 s."""
    gevent.sleep(1e-6)


def receiver(sock: Any, buffer: bytearray) -> More:
    """A ``more`` for :meth:`MessageCodec.split` that receives from ``sock`` into ``buffer``
    (and returns at once if the buffer already holds the bytes asked for); it raises
    ``EOFError`` if the peer closes first."""

    def more(needed: int) -> int:
        while len(buffer) < needed:
            data = sock.recv(min(max(needed - len(buffer), RECEIVE), RECEIVE_MAX))
            if not data:
                raise EOFError("the peer closed the connection")
            buffer.extend(data)
        return len(buffer)

    return more
