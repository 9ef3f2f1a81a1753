"""Checks shared by every settings object: one rule, one message."""

from __future__ import annotations

from geventpool.errors import ConfigurationError


def check_seconds(name: str, value: object, *, optional: bool = False, zero: bool = False) -> None:
    """Raise :class:`ConfigurationError` unless ``value`` is a number of seconds above zero
    (or at least zero with ``zero``; or None with ``optional``)."""
    if value is None and optional:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and (value >= 0 if zero else value > 0)
    )
    if not ok:
        kind = "a number of seconds >= 0" if zero else "a positive number of seconds"
        raise ConfigurationError(
            f"{name} must be {kind}{' or None' if optional else ''}, not {value!r}"
        )
