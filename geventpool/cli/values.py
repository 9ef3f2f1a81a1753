"""JSON values to Thrift values and back, by the IDL's types (what ``geventpool call`` types
and prints).

One rule per Thrift type, the same shape both ways:

============== ================================================================================
Thrift type    JSON
============== ================================================================================
bool           ``true`` / ``false``
byte, i16,     an integer (a float such as ``3.0`` is refused); range checked by the library
i32, i64
enum           its name (``"RED"``) or its number; printed by name (by number if the IDL has
               no name for it)
double         a number, or the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (printed so)
string         a string
binary         a string holding the bytes in **base64** (RFC 4648, standard alphabet, with
               padding): ``"aGk="`` is ``b"hi"``; printed the same way
list, set      an array (a set is printed sorted when its elements can be ordered)
map            an object, its keys written as text (``"7"`` for an integer key, an enum's
               name or number, ``"true"``/``"false"``, base64 for a binary key), or an array of
               ``[key, value]`` pairs (any key type; the only way for struct, list, set or
               map keys); printed as an object when its keys are strings, numbers, enums or
               booleans, else as pairs
struct,        an object of field names (unknown names are refused, required fields must be
exception      there); printed with the fields that are set
void           ``null``
============== ================================================================================

``null`` is never a value: leave a field or an argument out instead. Strings must be valid
Unicode (a lone surrogate such as ``"\\ud800"`` is refused: it has no UTF-8 encoding). Structs
and containers nest at most :data:`MAX_DEPTH` deep, the arguments' own struct counting as one,
as on the wire. Every problem raises :class:`JsonValueError` naming where in the value it is
(``argument 'counts' key "x"``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import re
from collections.abc import Mapping
from typing import Any

from thriftpy2.thrift import TType

from geventpool.errors import GeventPoolError
from geventpool.wire.limits import DEFAULT_LIMITS

_INTS = frozenset({TType.BYTE, TType.I16, TType.I32, TType.I64})
_TEXT_KEYS = frozenset({TType.STRING, TType.BOOL, TType.DOUBLE, TType.BINARY, *_INTS})
_NESTING = frozenset({TType.STRUCT, TType.LIST, TType.SET, TType.MAP})
_SPECIAL_DOUBLES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INTEGER = re.compile(r"-?[0-9]+\Z")
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = DEFAULT_LIMITS.max_depth
"""Structs and containers nested in each other at most (64): what a receiver with the default
:class:`~geventpool.wire.limits.WireLimits` accepts."""
_NAMES = {
    TType.BOOL: "bool",
    TType.BYTE: "byte",
    TType.DOUBLE: "double",
    TType.I16: "i16",
    TType.I32: "i32",
    TType.I64: "i64",
    TType.STRING: "string",
    TType.BINARY: "binary",
    TType.STRUCT: "struct",
    TType.MAP: "map",
    TType.SET: "set",
    TType.LIST: "list",
}


class JsonValueError(GeventPoolError, ValueError):
    """A JSON value does not fit its Thrift type; the message says where and why."""


def field_types(spec: tuple[Any, ...]) -> tuple[int, Any]:
    """``(ttype, inner)`` of a thriftpy2 field spec ``(ttype, name, [inner], required)``."""
    return (spec[0], spec[2]) if len(spec) > 3 else (spec[0], None)


def element_types(spec: Any) -> tuple[int, Any]:
    """``(ttype, inner)`` of a container's element spec (a bare type code, or a pair)."""
    return (spec, None) if isinstance(spec, int) else (spec[0], spec[1])


def type_name(ttype: int, inner: Any) -> str:
    """The IDL name of a type, for messages (an enum or struct by its own name)."""
    if isinstance(inner, type):
        return inner.__name__
    return _NAMES.get(ttype, f"type {ttype}")


def is_enum(inner: Any) -> bool:
    """Whether ``inner`` (an integer field's extra spec) is a thriftpy2 enum class."""
    return isinstance(inner, type) and hasattr(inner, "_NAMES_TO_VALUES")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _fail(where: str, message: str) -> JsonValueError:
    return JsonValueError(f"{where}: {message}" if where else message)


# -- JSON to Thrift ---------------------------------------------------------------------------


def to_thrift(value: Any, ttype: int, inner: Any, where: str = "", depth: int = 0) -> Any:
    """The Thrift value of the parsed JSON ``value`` for type ``ttype`` (with its ``inner``
    spec: element types, the struct or enum class), inside ``depth`` structs and containers;
    :class:`JsonValueError` if it does not fit (see the module for the rules)."""
    expected = type_name(ttype, inner)
    if value is None:
        raise _fail(where, f"null is not a value of {expected} (leave it out instead)")
    if ttype in _NESTING and depth >= MAX_DEPTH:
        raise _fail(
            where,
            f"structs and containers nest at most {MAX_DEPTH} deep (the arguments' own"
            " struct counting as one)",
        )
    if ttype == TType.BOOL:
        if isinstance(value, bool):
            return value
    elif ttype in _INTS:
        if is_enum(inner) and isinstance(value, str):
            return _enum_value(value, inner, where)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ttype == TType.DOUBLE:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value in _SPECIAL_DOUBLES:
            return _SPECIAL_DOUBLES[value]
    elif ttype == TType.STRING:
        if isinstance(value, str):
            return _text(value, where)
    elif ttype == TType.BINARY:
        if isinstance(value, str):
            return _from_base64(value, where)
    elif ttype in (TType.LIST, TType.SET):
        if isinstance(value, list):
            element_type, element_inner = element_types(inner)
            return [
                to_thrift(item, element_type, element_inner, f"{where}[{index}]", depth + 1)
                for index, item in enumerate(value)
            ]
    elif ttype == TType.MAP:
        if isinstance(value, dict | list):
            return _to_map(value, inner, where, depth + 1)
    elif ttype == TType.STRUCT:
        if isinstance(value, dict):
            return to_struct(value, inner, where, depth)
    else:
        raise _fail(where, f"{expected} values cannot be given in JSON")
    raise _fail(where, f"expected {_json_shape(ttype, inner)} for {expected}, got {_kind(value)}")


def _json_shape(ttype: int, inner: Any) -> str:
    if ttype == TType.BOOL:
        return "true or false"
    if ttype in _INTS:
        return "a name or an integer" if is_enum(inner) else "an integer"
    if ttype == TType.DOUBLE:
        return "a number"
    if ttype == TType.BINARY:
        return "a base64 string"
    if ttype == TType.STRING:
        return "a string"
    if ttype in (TType.LIST, TType.SET):
        return "an array"
    if ttype == TType.MAP:
        return "an object or an array of [key, value] pairs"
    return "an object"


def to_struct(value: Mapping[str, Any], cls: Any, where: str = "", depth: int = 0) -> Any:
    """An instance of the thriftpy2 struct (or exception) ``cls`` from a JSON object of its
    field names, inside ``depth`` structs and containers; unknown names and missing required
    fields are refused."""
    if depth >= MAX_DEPTH:
        raise _fail(where, f"structs and containers nest at most {MAX_DEPTH} deep")
    fields = {spec[1]: spec for spec in cls.thrift_spec.values()}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise _fail(
            where,
            f"{cls.__name__} has no field {unknown[0]!r} (its fields: {', '.join(fields)})",
        )
    missing = [name for name, spec in fields.items() if spec[-1] is True and name not in value]
    if missing:
        raise _fail(where, f"{cls.__name__} needs its required field {missing[0]!r}")
    converted = {
        name: to_thrift(item, *field_types(fields[name]), _join(where, f".{name}"), depth + 1)
        for name, item in value.items()
    }
    return cls(**converted)


def _text(value: str, where: str) -> str:
    surrogate = _SURROGATE.search(value)
    if surrogate is not None:
        raise _fail(
            where,
            f"{surrogate.group()!r} at index {surrogate.start()} is a lone surrogate, not"
            " text (strings are sent as UTF-8)",
        )
    return value


def _join(where: str, step: str) -> str:
    return f"{where}{step}" if where else step.lstrip(".")


def _enum_value(name: str, enum: Any, where: str) -> int:
    values: Mapping[str, int] = enum._NAMES_TO_VALUES  # noqa: SLF001 - thriftpy2's enum table
    if name in values:
        return values[name]
    raise _fail(where, f"{enum.__name__} has no value {name!r} (its names: {', '.join(values)})")


def _from_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _fail(where, "binary values are base64 (RFC 4648, with padding)") from None


def _to_map(
    value: dict[str, Any] | list[Any], inner: Any, where: str, depth: int
) -> dict[Any, Any]:
    """A map from a JSON object or ``[key, value]`` pairs; ``depth`` counts the map itself."""
    (key_type, key_inner), (item_type, item_inner) = (element_types(part) for part in inner)
    result: dict[Any, Any] = {}
    if isinstance(value, dict):
        for text, item in value.items():
            key = _key_from_text(text, key_type, key_inner, f"{where} key {text!r}")
            result[key] = to_thrift(item, item_type, item_inner, f"{where}[{text!r}]", depth)
        return result
    for index, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _fail(f"{where}[{index}]", "a map entry is a [key, value] array")
        key = to_thrift(pair[0], key_type, key_inner, f"{where}[{index}] key", depth)
        result[key] = to_thrift(pair[1], item_type, item_inner, f"{where}[{index}] value", depth)
    return result


def _key_from_text(text: str, ttype: int, inner: Any, where: str) -> Any:
    """A map key written as an object's key (always a string in JSON)."""
    if ttype == TType.STRING:
        return _text(text, where)
    if ttype in _INTS:
        if is_enum(inner) and not _INTEGER.match(text):
            return _enum_value(text, inner, where)
        if _INTEGER.match(text):
            return int(text)
    elif ttype == TType.BOOL:
        if text in ("true", "false"):
            return text == "true"
    elif ttype == TType.DOUBLE:
        if text in _SPECIAL_DOUBLES:
            return _SPECIAL_DOUBLES[text]
        try:
            return float(text)
        except ValueError:
            pass
    elif ttype == TType.BINARY:
        return _from_base64(text, where)
    else:
        raise _fail(
            where,
            f"a map with {type_name(ttype, inner)} keys is given as [[key, value], ...]",
        )
    raise _fail(where, f"not a {type_name(ttype, inner)} key")


# -- Thrift to JSON ---------------------------------------------------------------------------


def to_json(value: Any, ttype: int, inner: Any) -> Any:
    """The JSON value (ready for :func:`json.dumps`) of the Thrift ``value`` of type ``ttype``
    (see the module for the rules)."""
    if value is None:
        return None
    if ttype == TType.BOOL:
        return bool(value)
    if ttype in _INTS:
        if is_enum(inner):
            name: str | None = inner._VALUES_TO_NAMES.get(value)  # noqa: SLF001 - enum table
            return value if name is None else name
        return int(value)
    if ttype == TType.DOUBLE:
        return _double_to_json(float(value))
    if ttype == TType.BINARY:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return base64.b64encode(data).decode("ascii")
    if ttype == TType.STRING:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if ttype in (TType.LIST, TType.SET):
        element_type, element_inner = element_types(inner)
        items = [to_json(item, element_type, element_inner) for item in value]
        if ttype == TType.SET:
            with contextlib.suppress(TypeError):  # unordered elements (objects): as they came
                items.sort()
        return items
    if ttype == TType.MAP:
        (key_type, key_inner), (item_type, item_inner) = (element_types(p) for p in inner)
        if key_type in _TEXT_KEYS:
            return {
                _key_to_text(key, key_type, key_inner): to_json(item, item_type, item_inner)
                for key, item in value.items()
            }
        return [
            [to_json(key, key_type, key_inner), to_json(item, item_type, item_inner)]
            for key, item in value.items()
        ]
    if ttype == TType.STRUCT:
        return struct_to_json(value)
    return repr(value)


def struct_to_json(value: Any) -> dict[str, Any]:
    """A thriftpy2 struct or exception as a JSON object of the fields that are set, in the
    IDL's order."""
    result: dict[str, Any] = {}
    for key in sorted(value.thrift_spec):
        spec = value.thrift_spec[key]
        item = getattr(value, spec[1], None)
        if item is not None:
            result[spec[1]] = to_json(item, *field_types(spec))
    return result


def _double_to_json(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _key_to_text(key: Any, ttype: int, inner: Any) -> str:
    if ttype == TType.BOOL:
        return "true" if key else "false"
    converted = to_json(key, ttype, inner)
    return converted if isinstance(converted, str) else repr(converted)
