"""Walk an encoded Thrift struct the way the decoder will read it, before it is decoded.

The codecs trust what they read. thriftpy2's Cython binary codec allocates a claimed string
length before reading it, reads past the end of a short buffer (exposing whatever memory
follows), and loops on a claimed element count for a type it does not know; its compact codec
reads a list's elements as the IDL's type whatever the wire says, and reads varints of any
length. And both decode **by the IDL**: a map whose wire says "string keys" is read with the
IDL's key type. So a walk of the wire types alone is not enough: a 42-byte request can then
make the decoder read a length out of the middle of a key.

:class:`StructWalker` therefore walks a struct with its IDL spec (``thrift_spec``), exactly as
the decoder will: a field the IDL declares, with the declared type on the wire, is walked as
the IDL says; any other field is walked as the wire says (the decoder skips it). Where the
decoder would read a value as a type the wire does not claim (a compact list whose element
type is not the declared one, a map whose wire says string where the IDL does not), the
message is malformed. Along the way every type code must be known, every length and count
within its limit and within the bytes present, every nesting within the depth, and the values
of the whole message (each struct, string, container and element) within ``max_values``,
which bounds the decoder's time and memory. A struct that passed can be decoded: the decoder
can neither over-allocate, nor run past the walked bytes, nor stall.

The walk asks for bytes as it goes (``more``), so a message that arrives in pieces is walked
once, not once per piece, and it calls ``pause`` every few thousand values, so that a huge
message does not hold the hub while it is walked.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable
from typing import Any

from geventpool.errors import GeventPoolError, MalformedMessageError, MessageLimitError
from geventpool.wire.limits import WireLimits

More = Callable[[int], int]
"""``more(pos)``: make the buffer hold at least ``pos`` bytes and return how many it holds, or
raise (:class:`IncompleteMessageError`, :class:`~geventpool.errors.MalformedMessageError`, or
the receiver's own error)."""

PAUSE_EVERY = 4096  # values walked between two calls of ``pause``
UTF8_CHUNK = 1 << 20  # bytes of a string checked for UTF-8 between two calls of ``pause``


class IncompleteMessageError(GeventPoolError):
    """Not an error of the peer: the message goes on beyond the bytes received so far, which
    must hold at least ``needed`` bytes in all before the walk can go on."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        super().__init__(f"{needed} bytes needed")


def incomplete(pos: int) -> int:
    """A ``more`` for a buffer that will not grow: the message is incomplete."""
    raise IncompleteMessageError(pos)


# thriftpy2's type codes (TType)
BOOL, BYTE, DOUBLE, I16, I32, I64 = 2, 3, 4, 6, 8, 10
STRING, STRUCT, MAP, SET, LIST, BINARY = 11, 12, 13, 14, 15, 18
_NAMES = {
    BOOL: "bool", BYTE: "byte", DOUBLE: "double", I16: "i16", I32: "i32", I64: "i64",
    STRING: "string", STRUCT: "struct", MAP: "map", SET: "set", LIST: "list", BINARY: "binary",
}  # fmt: skip
_STRINGS = (STRING, BINARY)  # one encoding, and the decoders take either for the other
_FIXED = {BOOL: 1, BYTE: 1, DOUBLE: 8, I16: 2, I32: 4, I64: 8}  # binary-protocol sizes
# compact type codes -> TType (1 and 2: a bool field's value, true or false)
_COMPACT = {1: BOOL, 2: BOOL, 3: BYTE, 4: I16, 5: I32, 6: I64, 7: DOUBLE, 8: BINARY,
            9: LIST, 10: SET, 11: MAP, 12: STRUCT}  # fmt: skip
_VARINT_BYTES = {I16: 3, I32: 5, I64: 10}
_VARINT_BITS = {I16: 16, I32: 32, I64: 64}  # a zigzag value of the type has at most these
_COUNTS_ITSELF = (STRING, BINARY, STRUCT, MAP, SET, LIST)  # other elements: their container

_i16 = struct.Struct("!h").unpack_from
_i32 = struct.Struct("!i").unpack_from
_type_count = struct.Struct("!bi").unpack_from
_map_header = struct.Struct("!bbi").unpack_from


def _split_spec(spec: Any) -> tuple[int, Any]:
    """A container element's thriftpy2 spec: ``ttype`` or ``(ttype, spec)``."""
    if isinstance(spec, int):
        return spec, None
    return spec[0], spec[1]


def _same(wire: int, declared: int) -> bool:
    return wire == declared or (wire in _STRINGS and declared in _STRINGS)


def _type_name(ttype: int) -> str:
    return _NAMES.get(ttype, f"type {ttype}")


def read_varint(buf: bytes | bytearray, pos: int, n: int, max_bytes: int) -> tuple[int, int]:
    """An unsigned varint at ``buf[pos]`` of at most ``max_bytes`` bytes, within ``buf[:n]``:
    (value, next pos). Raises :class:`IncompleteMessageError` past ``n``."""
    value = shift = 0
    end = pos + max_bytes
    while True:
        if pos >= n:
            raise IncompleteMessageError(pos + 1)
        if pos >= end:
            raise MalformedMessageError(f"a varint longer than {max_bytes} bytes at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


class StructWalker:
    """Walks structs of one protocol (binary or compact) against ``limits``; one walk at a
    time (a connection's, or a server connection's)."""

    __slots__ = (
        "_buf",
        "_chunk",
        "_is_compact",
        "_left",
        "_limits",
        "_max_string",
        "_more",
        "_n",
        "_pause",
        "_seen",
        "values",
    )

    def __init__(self, compact: bool, limits: WireLimits) -> None:
        self._is_compact = compact
        self._limits = limits
        self._max_string = limits.max_string_size
        self._buf: bytes | bytearray = b""
        self._more: More = incomplete
        self._pause: Callable[[], object] | None = None
        self._seen = self._chunk = self._left = self._n = 0
        self.values = 0
        """How many values the last walk counted (see ``max_values``): what decoding costs."""

    def walk(  # noqa: PLR0917 - the walk's whole context, given once
        self,
        buf: bytes | bytearray,
        pos: int,
        n: int,
        spec: dict[int, Any] | None,
        more: More = incomplete,
        pause: Callable[[], object] | None = None,
    ) -> int:
        """The end of the struct at ``buf[pos]``, walked against ``spec`` (a thriftpy2
        ``thrift_spec``; None: walked as the wire says, as the decoder skips). ``buf[:n]`` is
        what is there so far; ``more`` is asked for the rest (see :data:`More`)."""
        # Kept until the next walk (no try/finally: this is on every call's path).
        self._buf, self._more, self._pause, self._n = buf, more, pause, n
        self._seen, self._chunk = 0, PAUSE_EVERY
        self._left = PAUSE_EVERY
        if self._is_compact:
            end = self._compact_struct(pos, spec, self._limits.max_depth, n)
        else:
            end = self._binary_struct(pos, spec, self._limits.max_depth, n)
        values = self._seen + self._chunk - self._left
        if values > self._limits.max_values:
            self._count_chunk()  # raises
        self.values = values
        return end

    # -- shared --------------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Called when the current chunk of values is spent: check the total, then pause."""
        self._count_chunk()
        if self._pause is not None:
            self._pause()
        self._chunk = self._left = PAUSE_EVERY

    def _count_chunk(self) -> None:
        self._seen += self._chunk - self._left
        self._chunk = self._left = 0
        allowed = self._limits.max_values
        if self._seen > allowed:
            raise MessageLimitError("max_values", self._seen, allowed, "(at least)")

    def _deeper(self, depth: int, pos: int) -> int:
        if depth <= 0:
            limit = self._limits.max_depth
            raise MessageLimitError("max_depth", limit + 1, limit, f"at byte {pos}")
        return depth - 1

    def _check_count(self, count: int, pos: int) -> None:
        self._check_size(count, pos, "element count", "max_container_size")

    def _check_string(self, length: int, pos: int) -> None:
        self._check_size(length, pos, "string length", "max_string_size")

    def _check_size(self, size: int, pos: int, what: str, limit: str) -> None:
        """A claimed ``size`` (``what``) must be non-negative and within ``limit``."""
        if size < 0:
            raise MalformedMessageError(f"negative {what} {size} at byte {pos}")
        allowed = getattr(self._limits, limit)
        if size > allowed:
            raise MessageLimitError(limit, size, allowed, f"at byte {pos}")

    def _charge(self, values: int) -> None:
        """Count ``values`` more values walked (see :meth:`_checkpoint`)."""
        self._left -= values
        if self._left < 0:
            self._checkpoint()

    def _need(self, pos: int) -> int:
        """Make the buffer hold ``pos`` bytes; how many it holds. A caller's ``n`` may be
        older than what an inner value already received: ``more`` is asked only for bytes
        that are not there yet (once per piece of a trickled message, not once per value)."""
        n = self._n
        if pos > n:
            n = self._n = self._more(pos)
        return n

    def _step(self, pos: int, size: int, n: int) -> int:
        pos += size
        if pos > n:
            self._need(pos)
        return pos

    def _map_types(
        self, wire_key: int, wire_value: int, spec: Any, pos: int
    ) -> tuple[int, Any, int, Any]:
        """The key and value types (and specs) the decoder will read a map's entries as."""
        if spec is None:
            return _skipped(wire_key), None, _skipped(wire_value), None
        key, key_spec = _split_spec(spec[0])
        value, value_spec = _split_spec(spec[1])
        # The decoders take a wire "string" for whatever the IDL declares: refuse it unless
        # the IDL declares a string too (otherwise the entry is read as another type).
        for wire, declared in ((wire_key, key), (wire_value, value)):
            if wire in _STRINGS and declared not in _STRINGS:
                raise MalformedMessageError(
                    f"a map of {_type_name(wire)} where the IDL declares {_type_name(declared)}"
                    f" at byte {pos}"
                )
        if _same(wire_key, key) and _same(wire_value, value):
            return key, key_spec, value, value_spec
        return _skipped(wire_key), None, _skipped(wire_value), None  # the decoder skips them

    # -- the binary protocol -------------------------------------------------------------------

    def _binary_struct(self, pos: int, spec: dict[int, Any] | None, depth: int, n: int) -> int:
        if depth <= 0:
            self._deeper(depth, pos)  # raises
        depth -= 1
        if spec is not None:  # the decoder makes the struct with every declared field
            self._left -= len(spec)
        buf = self._buf
        while True:
            self._left -= 1  # the struct, then each field
            if self._left < 0:
                self._checkpoint()
            if pos >= n:
                n = self._need(pos + 1)
            field_type = buf[pos]
            if field_type == 0:
                return pos + 1
            if pos + 3 > n:
                n = self._need(pos + 3)
            field = spec.get(_i16(buf, pos + 1)[0]) if spec is not None else None
            if field is not None and (
                field_type == field[0] or (field_type in _STRINGS and field[0] in _STRINGS)
            ):
                inner = field[2] if len(field) > 3 else None
                pos = self._binary(pos + 3, field[0], inner, depth, n)
            else:  # the decoder skips it: walk it as the wire says (a string is not decoded)
                pos = self._binary(pos + 3, _skipped(field_type), None, depth, n)

    def _binary(self, pos: int, ttype: int, spec: Any, depth: int, n: int) -> int:
        size = _FIXED.get(ttype)
        if size is not None:
            return self._step(pos, size, n)
        if ttype in _STRINGS:
            if pos + 4 > n:
                n = self._need(pos + 4)
            (length,) = _i32(self._buf, pos)
            if length < 0 or length > self._max_string:
                self._check_string(length, pos)  # raises
            self._left -= 1
            if self._left < 0:
                self._checkpoint()
            start = pos + 4
            pos = start + length
            if pos > n:
                self._need(pos)
            if ttype == STRING:
                _check_utf8(self._buf, start, pos, self._pause)
            return pos
        if ttype == STRUCT:
            inner = spec.thrift_spec if spec is not None else None
            return self._binary_struct(pos, inner, depth, n)
        if ttype not in (MAP, SET, LIST):
            raise MalformedMessageError(f"unknown type code {ttype} at byte {pos}")
        depth = self._deeper(depth, pos)
        if ttype == MAP:
            if pos + 6 > n:
                n = self._need(pos + 6)
            wire_key, wire_value, count = _map_header(self._buf, pos)
            _check_binary_type(wire_key, pos)
            _check_binary_type(wire_value, pos)
            self._check_count(count, pos)
            key, key_spec, value, value_spec = self._map_types(wire_key, wire_value, spec, pos)
            pos += 6
            key_size, value_size = _FIXED.get(key), _FIXED.get(value)
            if key_size is not None and value_size is not None:
                self._charge(1 + 2 * count)
                return self._step(pos, count * (key_size + value_size), n)
            self._charge(1 + _loose(key, count) + _loose(value, count))
            for _ in range(count):
                pos = self._binary(pos, key, key_spec, depth, n)
                pos = self._binary(pos, value, value_spec, depth, n)
                if pos > n:  # the entries received more: the next ones see it
                    n = self._n
            return pos
        if pos + 5 > n:
            n = self._need(pos + 5)
        wire_type, count = _type_count(self._buf, pos)
        _check_binary_type(wire_type, pos)
        self._check_count(count, pos)
        pos += 5
        element, element_spec = _skipped(wire_type), None
        if spec is not None:
            declared, declared_spec = _split_spec(spec)
            if _same(wire_type, declared):  # otherwise the decoder skips the elements
                element, element_spec = declared, declared_spec
        size = _FIXED.get(element)
        if size is not None:
            self._charge(1 + count)
            return self._step(pos, count * size, n)
        self._charge(1 + _loose(element, count))
        for _ in range(count):
            pos = self._binary(pos, element, element_spec, depth, n)
            if pos > n:
                n = self._n
        return pos

    # -- the compact protocol ------------------------------------------------------------------

    def _compact_struct(self, pos: int, spec: dict[int, Any] | None, depth: int, n: int) -> int:
        depth = self._deeper(depth, pos)
        if spec is not None:  # the decoder makes the struct with every declared field
            self._left -= len(spec)
        buf = self._buf
        last_fid = 0
        while True:
            self._left -= 1  # the struct, then each field
            if self._left < 0:
                self._checkpoint()
            if pos >= n:
                n = self._need(pos + 1)
            header = buf[pos]
            pos += 1
            code = header & 0x0F
            if code == 0:  # STOP (the decoder looks at the low nibble only)
                return pos
            field_type = _COMPACT.get(code)
            if field_type is None:
                raise MalformedMessageError(f"unknown compact type code {code} at byte {pos - 1}")
            delta = header >> 4
            if delta:
                last_fid += delta
            else:  # the field id follows as a zigzag varint
                zigzag, pos = self._varint(pos, n, 3)
                last_fid = (zigzag >> 1) ^ -(zigzag & 1)
            if field_type == BOOL:
                continue  # a bool field's value is in its header, whatever the IDL says
            field = spec.get(last_fid) if spec is not None else None
            if field is not None and _same(field_type, field[0]):
                inner = field[2] if len(field) > 3 else None
                pos = self._compact(pos, field[0], inner, depth, n)
            else:  # the decoder skips it: walk it as the wire says
                pos = self._compact(pos, field_type, None, depth, n)

    def _varint(self, pos: int, n: int, max_bytes: int) -> tuple[int, int]:
        while True:
            try:
                return read_varint(self._buf, pos, n, max_bytes)
            except IncompleteMessageError as short:
                n = self._need(short.needed)

    def _compact(self, pos: int, ttype: int, spec: Any, depth: int, n: int) -> int:
        """One value of ``ttype`` as a container element or a non-bool field."""
        if ttype in (BOOL, BYTE):
            return self._step(pos, 1, n)
        varint = _VARINT_BYTES.get(ttype)
        if varint is not None:
            value, after = self._varint(pos, n, varint)
            if value >> _VARINT_BITS[ttype]:
                raise MalformedMessageError(
                    f"a varint out of range for {_type_name(ttype)} at byte {pos}"
                )
            return after
        if ttype == DOUBLE:
            return self._step(pos, 8, n)
        if ttype in _STRINGS:
            length, after = self._varint(pos, n, 5)
            self._check_string(length, pos)
            self._charge(1)
            end = self._step(after, length, n)
            if ttype == STRING:  # declared a string: the decoder decodes it
                _check_utf8(self._buf, after, end, self._pause)
            return end
        if ttype == STRUCT:
            inner = spec.thrift_spec if spec is not None else None
            return self._compact_struct(pos, inner, depth, n)
        depth = self._deeper(depth, pos)
        if ttype == MAP:
            return self._compact_map(pos, spec, depth, n)
        # a list or a set: count in the high nibble (15: a varint follows), type in the low one
        if pos >= n:
            n = self._need(pos + 1)
        header = self._buf[pos]
        pos += 1
        wire_type = _COMPACT.get(header & 0x0F)
        if wire_type is None:
            raise MalformedMessageError(
                f"unknown compact element type {header & 0x0F} at byte {pos - 1}"
            )
        count = header >> 4
        if count == 15:
            count, pos = self._varint(pos, n, 5)
        self._check_count(count, pos)
        element, element_spec = wire_type, None
        if spec is not None:
            # The compact decoder reads the elements as the IDL's type, whatever the wire says.
            element, element_spec = _split_spec(spec)
            if not _same(wire_type, element):
                raise MalformedMessageError(
                    f"a list of {_type_name(wire_type)} where the IDL declares"
                    f" {_type_name(element)} at byte {pos}"
                )
        if element in (BOOL, BYTE, DOUBLE):
            self._charge(1 + count)
            return self._step(pos, count * (8 if element == DOUBLE else 1), n)
        self._charge(1)
        loose = element not in _COUNTS_ITSELF  # varints: counted one by one, to pause
        for _ in range(count):
            if loose:
                self._charge(1)
            pos = self._compact(pos, element, element_spec, depth, n)
            if pos > n:
                n = self._n
        return pos

    def _compact_map(self, pos: int, spec: Any, depth: int, n: int) -> int:
        """A map: a varint count, then (unless empty) one byte of key and value types."""
        count, pos = self._varint(pos, n, 5)
        self._check_count(count, pos)
        if count == 0:
            self._charge(1)
            return pos
        if pos >= n:
            n = self._need(pos + 1)
        types = self._buf[pos]
        wire_key, wire_value = _COMPACT.get(types >> 4), _COMPACT.get(types & 0x0F)
        if wire_key is None or wire_value is None:
            raise MalformedMessageError(f"unknown compact map types 0x{types:02x} at byte {pos}")
        key, key_spec, value, value_spec = self._map_types(wire_key, wire_value, spec, pos)
        self._charge(1)
        loose = (key not in _COUNTS_ITSELF) + (value not in _COUNTS_ITSELF)
        pos += 1
        for _ in range(count):
            if loose:  # counted entry by entry, to pause
                self._charge(loose)
            pos = self._compact(pos, key, key_spec, depth, n)
            pos = self._compact(pos, value, value_spec, depth, n)
            if pos > n:
                n = self._n
        return pos


def _loose(ttype: int, count: int) -> int:
    """The values ``count`` elements of ``ttype`` add to their container's count: none when
    each element counts itself."""
    return 0 if ttype in _COUNTS_ITSELF else count


def _skipped(ttype: int) -> int:
    """The type a skipped value is walked as: a string is not decoded when skipped."""
    return BINARY if ttype == STRING else ttype


def _check_utf8(
    buf: bytes | bytearray, start: int, end: int, pause: Callable[[], object] | None = None
) -> None:
    """A value the decoder will decode as a string must be UTF-8: found here, before a
    long decode would fail at its end. A long one is checked :data:`UTF8_CHUNK` bytes at a
    time, with ``pause`` between two pieces (16 MB of text is 30 ms or more of decoding)."""
    if end - start <= UTF8_CHUNK:  # the usual case: one piece
        text = buf[start:end]
        if not text.isascii():
            try:
                text.decode()
            except UnicodeDecodeError as error:
                raise _not_utf8(error, start) from None
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    for at in range(start, end, UTF8_CHUNK):
        last = at + UTF8_CHUNK >= end
        try:
            decoder.decode(buf[at : min(at + UTF8_CHUNK, end)], last)
        except UnicodeDecodeError as error:
            raise _not_utf8(error, at) from None
        if not last and pause is not None:
            pause()


def _not_utf8(error: UnicodeDecodeError, offset: int) -> MalformedMessageError:
    return MalformedMessageError(
        f"a string field is not UTF-8 ({error.reason} at byte {offset + error.start});"
        " declare it binary to receive bytes"
    )


def _check_binary_type(ttype: int, pos: int) -> None:
    if ttype not in _NAMES:
        raise MalformedMessageError(f"unknown type code {ttype} at byte {pos}")
