"""A call's arguments bound to the IDL's names before anything is encoded or sent."""

from __future__ import annotations

import functools
from typing import Any

from geventpool.errors import InvalidArgumentsError


@functools.lru_cache(maxsize=4096)
def _signature(service: Any, method: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """The argument names of ``method`` in IDL order, and the required ones."""
    try:
        spec = getattr(service, f"{method}_args").thrift_spec
    except AttributeError:
        raise InvalidArgumentsError(method, "no such method in the service") from None
    fields = [spec[key] for key in sorted(spec)]
    names = tuple(field[1] for field in fields)
    required = frozenset(field[1] for field in fields if field[-1] is True)
    return names, required


def bind_arguments(
    service: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Map a call's arguments to the IDL's names, as Python binds a call: too many, unknown,
    repeated or missing required arguments raise :class:`InvalidArgumentsError`."""
    names, required = _signature(service, method)
    if not kwargs and len(args) == len(names):  # the common call: every argument, in order
        return dict(zip(names, args, strict=True))
    if len(args) > len(names):
        raise InvalidArgumentsError(
            method, f"takes {len(names)} arguments ({', '.join(names)}), {len(args)} given"
        )
    arguments = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name not in names:
            raise InvalidArgumentsError(method, f"unexpected argument {name!r}")
        if name in arguments:
            raise InvalidArgumentsError(method, f"argument {name!r} given twice")
        arguments[name] = value
    missing = required - arguments.keys()
    if missing:
        raise InvalidArgumentsError(method, f"missing required arguments {sorted(missing)}")
    return arguments
