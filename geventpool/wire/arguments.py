"""A call's arguments bound to the IDL's names and checked against its types before anything is
encoded or sent.

:func:`method_spec` promises, for one method of a thriftpy2 service (computed once, cached):

* **Binding as Python binds a call.** Every argument is required unless the IDL gives it a
  default (as Apache Thrift's generated Python client does); too many, unknown, repeated or
  missing arguments raise :class:`~geventpool.errors.InvalidArgumentsError`.
* **Values checked against the IDL types**, into containers and structs: integers must be
  ``int`` (never a ``float``, which the codec would silently truncate) within their width;
  ``double`` takes ``int`` or ``float``; ``bool`` takes ``bool`` (or the ints 0 and 1);
  ``string`` takes ``str``, or ``bytes`` that are UTF-8 (other bytes would make the peer's
  decoder fail: declare the field ``binary``); ``binary`` takes ``bytes`` or ``str`` (not
  ``bytearray`` or ``memoryview``: pass ``bytes(value)``); lists and sets take lists, tuples,
  sets; maps take dicts; structs take instances of their class, nested at most 64 deep (a
  cyclic value is refused, not a ``RecursionError``). ``None`` means "not sent", as in
  thriftpy2. The error names the argument and the position in it, and shows at most a short
  description of the value, never the value itself; the check of a good value builds no
  text.
"""

from __future__ import annotations

import functools
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from geventpool.errors import InvalidArgumentsError

Problem = tuple[str, str]
"""What is wrong with a value: where in it (``"[3].name"``, or ``""``) and what."""

Check = Callable[[Any, int], "Problem | None"]
"""A value and its nesting depth to None, or to its :data:`Problem`. The good path builds no
text: where a problem is is found only once there is one."""

MAX_DEPTH = 64  # structs and containers nested in an argument (what the decoders accept)

_INT_BITS = {3: 8, 6: 16, 8: 32, 10: 64}  # byte, i16, i32, i64
_TYPE_NAMES = {
    2: "bool",
    3: "byte",
    4: "double",
    6: "i16",
    8: "i32",
    10: "i64",
    11: "string",
    12: "struct",
    13: "map",
    14: "set",
    15: "list",
    18: "binary",
}


@dataclass(frozen=True)
class MethodSpec:
    """What the client needs to know of one method: its argument names in IDL order, which
    have no default, the argument and result struct classes, whether it is oneway, and the
    names of its declared exceptions."""

    name: str
    names: tuple[str, ...]
    required: frozenset[str]
    args_class: Any
    result_class: Any
    oneway: bool
    returns_value: bool
    exceptions: tuple[str, ...]
    checks: tuple[tuple[str, Check], ...]
    check_result: Check | None

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The argument struct for a call, bound and checked (see the module)."""
        names = self.names
        if not kwargs and len(args) == len(names):  # the common call: every argument, in order
            bound = dict(zip(names, args, strict=True))
        else:
            bound = self._bind(args, kwargs)
        for name, check in self.checks:
            value = bound.get(name)
            if value is not None:
                problem = check(value, 1)
                if problem is not None:
                    raise InvalidArgumentsError(
                        self.name, f"argument {name!r}{problem[0]}: {problem[1]}"
                    )
        return self.args_class(**bound)

    def result_problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` as this method's result (None: nothing), as
        :meth:`arguments` checks arguments: for a server, before it encodes a reply."""
        if value is None or self.check_result is None:
            return None
        problem = self.check_result(value, 1)
        if problem is None:
            return None
        return f"{self.name}() returned{problem[0]}: {problem[1]}"

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        names, method = self.names, self.name
        if len(args) > len(names):
            raise InvalidArgumentsError(
                method, f"takes {len(names)} arguments ({', '.join(names)}), {len(args)} given"
            )
        bound = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in names:
                raise InvalidArgumentsError(method, f"unexpected argument {name!r}")
            if name in bound:
                raise InvalidArgumentsError(method, f"argument {name!r} given twice")
            bound[name] = value
        missing = self.required - bound.keys()
        if missing:
            raise InvalidArgumentsError(method, f"missing required arguments {sorted(missing)}")
        return bound


@functools.lru_cache(maxsize=4096)
def method_spec(service: Any, method: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``method`` of thriftpy2 ``service`` (raises
    :class:`InvalidArgumentsError` for a method the service does not have)."""
    try:
        args_class = getattr(service, f"{method}_args")
        result_class = getattr(service, f"{method}_result")
    except AttributeError:
        raise InvalidArgumentsError(method, "no such method in the service") from None
    spec = args_class.thrift_spec
    fields = [spec[key] for key in sorted(spec)]
    names = tuple(field[1] for field in fields)
    defaults = dict(getattr(args_class, "default_spec", ()))
    required = frozenset(name for name in names if defaults.get(name) is None)
    result_spec = result_class.thrift_spec
    return MethodSpec(
        name=method,
        names=names,
        required=required,
        args_class=args_class,
        result_class=result_class,
        oneway=bool(getattr(result_class, "oneway", False)),
        returns_value=0 in result_spec,
        exceptions=tuple(result_spec[key][1] for key in sorted(result_spec) if key != 0),
        checks=tuple((field[1], checker(field[0], _inner(field))) for field in fields),
        check_result=(
            checker(result_spec[0][0], _inner(result_spec[0])) if 0 in result_spec else None
        ),
    )


def _inner(field: tuple[Any, ...]) -> Any:
    """The element spec of a field (``(ttype, name, spec, required)``), or None."""
    return field[2] if len(field) > 3 else None


def describe(value: object) -> str:
    """A short description of ``value`` for an error message: its type and a clipped repr."""
    text = reprlib.repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def checker(ttype: int, spec: Any) -> Check:
    """The check of one value of thrift type ``ttype`` (with its element ``spec``)."""
    expected = _TYPE_NAMES.get(ttype, f"type {ttype}")
    bits = _INT_BITS.get(ttype)
    if bits is not None:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

        def check_int(value: Any, depth: int) -> Problem | None:
            if type(value) is int and low <= value <= high:
                return None
            if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
                return None  # an IntEnum member
            if isinstance(value, int) and not isinstance(value, bool):
                return "", f"{value} is out of range for {expected} ({low} .. {high})"
            return "", f"expected {expected} (an int), got {describe(value)}"

        return check_int
    if ttype == 2:
        return lambda value, depth: (
            None
            if isinstance(value, bool) or (type(value) is int and value in (0, 1))
            else ("", f"expected bool, got {describe(value)}")
        )
    if ttype == 4:
        return lambda value, depth: (
            None
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else ("", f"expected double, got {describe(value)}")
        )
    if ttype == 11:
        return _check_string
    if ttype == 18:
        return lambda value, depth: (
            None
            if isinstance(value, (bytes, str))
            else ("", f"expected binary (bytes or str), got {describe(value)}")
        )
    if ttype in (14, 15):
        element_type, element_spec = (spec, None) if isinstance(spec, int) else spec
        check_element = checker(element_type, element_spec)

        def check_sequence(value: Any, depth: int) -> Problem | None:
            if not isinstance(value, (list, tuple, set, frozenset)):
                return "", f"expected {expected}, got {describe(value)}"
            if depth >= MAX_DEPTH:
                return "", f"nested deeper than {MAX_DEPTH}"
            depth += 1
            for element in value:
                if element is None:
                    return f"[{_index(value, element)}]", f"None in a {expected}"
                problem = check_element(element, depth)
                if problem is not None:
                    return f"[{_index(value, element)}]{problem[0]}", problem[1]
            return None

        return check_sequence
    if ttype == 13:
        (key_type, key_spec), (value_type, value_spec) = (
            (part, None) if isinstance(part, int) else part for part in spec
        )
        check_key, check_value = checker(key_type, key_spec), checker(value_type, value_spec)

        def check_map(value: Any, depth: int) -> Problem | None:
            if not isinstance(value, Mapping):
                return "", f"expected map, got {describe(value)}"
            if depth >= MAX_DEPTH:
                return "", f"nested deeper than {MAX_DEPTH}"
            depth += 1
            for key, item in value.items():
                if key is None or item is None:
                    return "", "None in a map"
                problem = check_key(key, depth)
                if problem is not None:
                    return f" key {describe(key)}{problem[0]}", problem[1]
                problem = check_value(item, depth)
                if problem is not None:
                    return f"[{reprlib.repr(key)[:20]}]{problem[0]}", problem[1]
            return None

        return check_map
    if ttype == 12:
        return functools.partial(_check_struct, spec)
    return lambda value, depth: ("", f"type {ttype} cannot be sent")


def _check_string(value: Any, depth: int) -> Problem | None:
    if type(value) is str:
        return None
    if isinstance(value, bytes):  # sent as is: it must be UTF-8, or the peer cannot read it
        if value.isascii():
            return None
        try:
            value.decode()
        except UnicodeDecodeError as error:
            return "", (
                f"bytes that are not UTF-8 ({error.reason} at byte {error.start}) for a"
                " string: declare it binary to send bytes"
            )
        return None
    if isinstance(value, str):
        return None
    return "", f"expected string, got {describe(value)}"


def _index(sequence: Any, element: Any) -> int:
    """The position of ``element`` in ``sequence``: counted only once a check failed, so that
    the good path counts nothing (the first occurrence of the same object is as bad)."""
    return next(index for index, item in enumerate(sequence) if item is element)


def _check_struct(cls: Any, value: Any, depth: int) -> Problem | None:
    if not isinstance(value, cls):
        return "", f"expected {cls.__name__}, got {describe(value)}"
    if depth >= MAX_DEPTH:
        return "", f"nested deeper than {MAX_DEPTH}"
    depth += 1
    for name, check in _struct_checks(cls):
        item = getattr(value, name, None)
        if item is not None:
            problem = check(item, depth)
            if problem is not None:
                return f".{name}{problem[0]}", problem[1]
    return None


@functools.lru_cache(maxsize=4096)
def _struct_checks(cls: Any) -> tuple[tuple[str, Check], ...]:
    spec = cls.thrift_spec
    return tuple((spec[key][1], checker(spec[key][0], _inner(spec[key]))) for key in sorted(spec))
