"""Walk an encoded Thrift struct without decoding it: where it ends, and whether it is sound.

The Cython codec trusts what it reads: it allocates a claimed string length before reading it,
reads past the end of a short buffer, and loops on a claimed element count for a type it does
not know. So every struct is walked here first, over the bytes received so far: every type code
must be known, every length and count within its limit *and* within the bytes present, every
nesting within the depth. Only a struct that passed is handed to the codec, which can then
neither over-allocate nor run past its end nor stall.

``scan_binary`` and ``scan_compact`` return the offset just past the struct that starts at
``pos``, or raise :class:`IncompleteMessageError` (more bytes are needed: at least
``needed`` in all) or :class:`~geventpool.errors.MalformedMessageError`. Fixed-size elements
of a container are stepped over in one move, so a list of a million ints costs one check.
"""

from __future__ import annotations

import struct

from geventpool.errors import GeventPoolError, MalformedMessageError, MessageLimitError
from geventpool.wire.limits import WireLimits


class IncompleteMessageError(GeventPoolError):
    """Not an error of the peer: the message goes on beyond the bytes received so far, which
    must hold at least ``needed`` bytes in all before the walk can go on."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        super().__init__(f"{needed} bytes needed")


# -- the binary protocol -----------------------------------------------------------------------

_BINARY_FIXED = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8}  # bool, byte, double, i16, i32, i64
_BINARY_STRINGS = (11, 18)  # string, and binary as thriftpy2 may write it
_BINARY_NESTED = (12, 13, 14, 15)  # struct, map, set, list
_i32 = struct.Struct("!i").unpack_from
_type_count = struct.Struct("!bi").unpack_from
_map_header = struct.Struct("!bbi").unpack_from


def scan_binary(buf: bytes | bytearray, pos: int, end: int, limits: WireLimits) -> int:
    """The end of the binary-protocol struct that starts at ``buf[pos]``, within ``buf[:end]``
    (see the module)."""
    return _binary(buf, pos, 12, limits.max_depth, end, limits)


def _binary(  # noqa: PLR0917 - a hot recursive walk: arguments beat attributes
    buf: bytes | bytearray, pos: int, ttype: int, depth: int, n: int, limits: WireLimits
) -> int:
    size = _BINARY_FIXED.get(ttype)
    if size is not None:
        pos += size
        if pos > n:
            raise IncompleteMessageError(pos)
        return pos
    if ttype in _BINARY_STRINGS:
        if pos + 4 > n:
            raise IncompleteMessageError(pos + 4)
        (length,) = _i32(buf, pos)
        if length < 0:
            raise MalformedMessageError(f"negative string length {length} at byte {pos}")
        if length > limits.max_string_size:
            raise MessageLimitError(
                "max_string_size", length, limits.max_string_size, f"at byte {pos}"
            )
        pos += 4 + length
        if pos > n:
            raise IncompleteMessageError(pos)
        return pos
    if ttype not in _BINARY_NESTED:
        raise MalformedMessageError(f"unknown type code {ttype} at byte {pos}")
    if depth <= 0:
        raise MessageLimitError(
            "max_depth", limits.max_depth + 1, limits.max_depth, f"at byte {pos}"
        )
    depth -= 1
    if ttype == 12:  # a struct: fields until STOP
        while True:
            if pos >= n:
                raise IncompleteMessageError(pos + 1)
            field_type = buf[pos]
            if field_type == 0:
                return pos + 1
            if pos + 3 > n:
                raise IncompleteMessageError(pos + 3)
            pos = _binary(buf, pos + 3, field_type, depth, n, limits)
    if ttype == 13:  # a map
        if pos + 6 > n:
            raise IncompleteMessageError(pos + 6)
        key_type, value_type, count = _map_header(buf, pos)
        _check_binary_type(key_type, pos)
        _check_binary_type(value_type, pos)
        _check_count(count, pos, limits)
        pos += 6
        key_size, value_size = _BINARY_FIXED.get(key_type), _BINARY_FIXED.get(value_type)
        if key_size is not None and value_size is not None:
            return _step(pos, count * (key_size + value_size), n)
        for _ in range(count):
            pos = _binary(buf, pos, key_type, depth, n, limits)
            pos = _binary(buf, pos, value_type, depth, n, limits)
        return pos
    # a list or a set
    if pos + 5 > n:
        raise IncompleteMessageError(pos + 5)
    element_type, count = _type_count(buf, pos)
    size = _BINARY_FIXED.get(element_type)
    if size is None:
        _check_binary_type(element_type, pos)
    _check_count(count, pos, limits)
    pos += 5
    if size is not None:
        return _step(pos, count * size, n)
    for _ in range(count):
        pos = _binary(buf, pos, element_type, depth, n, limits)
    return pos


def _check_binary_type(ttype: int, pos: int) -> None:
    if ttype not in _BINARY_FIXED and ttype not in _BINARY_STRINGS and ttype not in _BINARY_NESTED:
        raise MalformedMessageError(f"unknown type code {ttype} at byte {pos}")


def _check_count(count: int, pos: int, limits: WireLimits) -> None:
    if count < 0:
        raise MalformedMessageError(f"negative element count {count} at byte {pos}")
    if count > limits.max_container_size:
        raise MessageLimitError(
            "max_container_size", count, limits.max_container_size, f"at byte {pos}"
        )


def _step(pos: int, size: int, n: int) -> int:
    pos += size
    if pos > n:
        raise IncompleteMessageError(pos)
    return pos


# -- the compact protocol ----------------------------------------------------------------------

# Compact type codes: 1/2 true/false (a field's bool), 3 byte, 4 i16, 5 i32, 6 i64, 7 double,
# 8 binary, 9 list, 10 set, 11 map, 12 struct.
_COMPACT_FIXED = {3: 1, 7: 8}
_COMPACT_VARINTS = (4, 5, 6)
_COMPACT_MAX_VARINT = {4: 3, 5: 5, 6: 10}  # bytes of a varint of an i16, i32, i64


def scan_compact(buf: bytes | bytearray, pos: int, end: int, limits: WireLimits) -> int:
    """The end of the compact-protocol struct that starts at ``buf[pos]``, within
    ``buf[:end]`` (see the module)."""
    return _compact(buf, pos, 12, limits.max_depth, end, limits)


def read_varint(buf: bytes | bytearray, pos: int, n: int, max_bytes: int) -> tuple[int, int]:
    """An unsigned varint at ``buf[pos]`` of at most ``max_bytes`` bytes: (value, next pos)."""
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


def _compact_element(  # noqa: PLR0917 - a hot recursive walk: arguments beat attributes
    buf: bytes | bytearray, pos: int, ctype: int, depth: int, n: int, limits: WireLimits
) -> int:
    """One value of compact type ``ctype`` as a container element (a bool is one byte)."""
    if ctype in (1, 2):
        return _step(pos, 1, n)
    return _compact(buf, pos, ctype, depth, n, limits)


def _compact(  # noqa: PLR0917 - a hot recursive walk: arguments beat attributes
    buf: bytes | bytearray, pos: int, ctype: int, depth: int, n: int, limits: WireLimits
) -> int:
    size = _COMPACT_FIXED.get(ctype)
    if size is not None:
        return _step(pos, size, n)
    if ctype in _COMPACT_VARINTS:
        return read_varint(buf, pos, n, _COMPACT_MAX_VARINT[ctype])[1]
    if ctype == 8:
        length, after = read_varint(buf, pos, n, 5)
        if length > limits.max_string_size:
            raise MessageLimitError(
                "max_string_size", length, limits.max_string_size, f"at byte {pos}"
            )
        return _step(after, length, n)
    if ctype not in (9, 10, 11, 12):
        raise MalformedMessageError(f"unknown compact type code {ctype} at byte {pos}")
    if depth <= 0:
        raise MessageLimitError(
            "max_depth", limits.max_depth + 1, limits.max_depth, f"at byte {pos}"
        )
    depth -= 1
    if ctype == 12:  # a struct: field headers until STOP
        while True:
            if pos >= n:
                raise IncompleteMessageError(pos + 1)
            header = buf[pos]
            pos += 1
            if header == 0:
                return pos
            field_type = header & 0x0F
            if header >> 4 == 0:  # the field id follows as a zigzag varint
                pos = read_varint(buf, pos, n, 3)[1]
            if field_type in (1, 2):
                continue  # a bool field: its value is in the header
            pos = _compact(buf, pos, field_type, depth, n, limits)
    if ctype == 11:  # a map: varint count, then one byte of key and value types
        count, pos = read_varint(buf, pos, n, 5)
        _check_count(count, pos, limits)
        if count == 0:
            return pos
        if pos >= n:
            raise IncompleteMessageError(pos + 1)
        types = buf[pos]
        pos += 1
        key_type, value_type = types >> 4, types & 0x0F
        for ctype_ in (key_type, value_type):
            _check_compact_element_type(ctype_, pos)
        for _ in range(count):
            pos = _compact_element(buf, pos, key_type, depth, n, limits)
            pos = _compact_element(buf, pos, value_type, depth, n, limits)
        return pos
    # a list or a set: count in the high nibble (15: a varint follows), type in the low one
    if pos >= n:
        raise IncompleteMessageError(pos + 1)
    header = buf[pos]
    pos += 1
    element_type, count = header & 0x0F, header >> 4
    _check_compact_element_type(element_type, pos)
    if count == 15:
        count, pos = read_varint(buf, pos, n, 5)
    _check_count(count, pos, limits)
    if element_type in (1, 2, 3):
        return _step(pos, count, n)
    if element_type == 7:
        return _step(pos, count * 8, n)
    for _ in range(count):
        pos = _compact_element(buf, pos, element_type, depth, n, limits)
    return pos


def _check_compact_element_type(ctype: int, pos: int) -> None:
    if not 1 <= ctype <= 12:
        raise MalformedMessageError(f"unknown compact type code {ctype} at byte {pos}")
