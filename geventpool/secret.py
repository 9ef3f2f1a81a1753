"""Secrets (passwords, tokens, webhook URLs) that cannot end up in a log or an error message.

A :class:`Secret` hides its value from ``repr``, ``str`` and formatting; only
:meth:`Secret.reveal` returns it, at the one place it is used. :func:`redact` removes known
secret values from any text before it is logged (an exception message, a server's answer).
"""

from __future__ import annotations

from collections.abc import Iterable


class Secret:
    """A value that shows itself only through :meth:`reveal`."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "") -> None:
        self._value = value
        self.source = source  # where it came from (an env var or file name), safe to show

    def reveal(self) -> str:
        """The secret value itself; pass it straight to where it is needed."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted>{', from ' + self.source if self.source else ''})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def redact(text: str, secrets: Iterable[Secret | None]) -> str:
    """``text`` with every value of ``secrets`` (4 characters or more) replaced by ``***``."""
    for secret in secrets:
        if secret is not None and len(secret.reveal()) >= 4:
            text = text.replace(secret.reveal(), "***")
    return text
