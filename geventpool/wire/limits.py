"""The bounds every incoming Thrift message is checked against before anything is allocated.

A peer's claims (a frame length, a string length, an element count, a nesting depth) are
compared with these limits, and with the bytes really received, before a buffer is sized or a
value decoded: peak memory follows the limits, never what the peer says. The defaults are
Apache Thrift's where it has one (a 16,384,000-byte frame, depth 64).
"""

from __future__ import annotations

from dataclasses import dataclass

from geventpool.errors import ConfigurationError

DEFAULT_FRAME_SIZE = 16_384_000


@dataclass(frozen=True)
class WireLimits:
    """Limits of one side's incoming messages (replies on a client, requests on a server).

    ``max_frame_size``: bytes of one frame (framed transport). ``max_message_size``: bytes of
    one message (for the buffered transport, which has no frame to announce it).
    ``max_string_size``: bytes of one string or binary value. ``max_container_size``: elements
    of one list, set or map. ``max_depth``: structs and containers nested in each other (the
    message's own struct counts as one); at most 64, what the Cython codec itself allows.
    ``max_values``: values of one message: each struct and each of its fields, each string,
    container and container element. It bounds what decoding the message costs in time
    (the decoder cannot yield to other greenlets) and in memory, whatever its size in bytes:
    a million empty structs take 1 MB on the wire but about 0.6 s and 80 MB to decode.
    """

    max_frame_size: int = DEFAULT_FRAME_SIZE
    max_message_size: int = DEFAULT_FRAME_SIZE
    max_string_size: int = DEFAULT_FRAME_SIZE
    max_container_size: int = 1_000_000
    max_depth: int = 64
    max_values: int = 2_000_000

    def __post_init__(self) -> None:
        for name in ("max_frame_size", "max_message_size", "max_string_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 16 <= value < 2**31:
                raise ConfigurationError(
                    f"{name} must be an int of 16 .. 2**31-1 bytes, not {value!r}"
                )
        for name in ("max_container_size", "max_values"):
            size = getattr(self, name)
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 2**31:
                raise ConfigurationError(f"{name} must be an int of 1 .. 2**31-1, not {size!r}")
        depth = self.max_depth
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 64:
            raise ConfigurationError(f"max_depth must be an int of 1 .. 64, not {depth!r}")


DEFAULT_LIMITS = WireLimits()
