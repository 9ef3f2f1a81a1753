"""What a reply means for the call it answers: shared by both kinds of connection."""

from __future__ import annotations

from typing import Any

from thriftpy2.thrift import TApplicationException

from geventpool.errors import MalformedMessageError
from geventpool.wire.arguments import MethodSpec
from geventpool.wire.messages import EXCEPTION, MESSAGE_TYPES, REPLY, MessageCodec

_APPLICATION_EXCEPTION: dict[int, Any] = TApplicationException.thrift_spec


def reply_spec(
    spec: MethodSpec, waiting: int, name: str, message_type: int, seqid: int
) -> dict[int, Any]:
    """The ``thrift_spec`` to walk a reply with, if its header (``name``, ``message_type``,
    ``seqid``) is that of the reply to call #``waiting`` of ``spec``; raises
    :class:`MalformedMessageError` saying what was seen otherwise."""
    if seqid != waiting or name != spec.name or message_type not in (REPLY, EXCEPTION):
        kind = MESSAGE_TYPES.get(message_type, f"type {message_type}")
        raise MalformedMessageError(
            f"expected the REPLY to {spec.name}() #{waiting}, got {kind} {name[:64]!r} #{seqid}"
        )
    if message_type == EXCEPTION:
        return _APPLICATION_EXCEPTION
    result: dict[int, Any] = spec.result_class.thrift_spec
    return result


def outcome(
    codec: MessageCodec, spec: MethodSpec, message_type: int, body: bytes, values: int
) -> tuple[bool, Any]:
    """What a checked reply to a call of ``spec`` means: (True, the result) or (False, the
    exception to raise: declared in the IDL, or a ``TApplicationException``)."""
    if message_type == EXCEPTION:
        return False, codec.decode(body, TApplicationException(), values)
    result = codec.decode(body, spec.result_class(), values)
    if spec.returns_value and result.success is not None:
        return True, result.success
    for name in spec.exceptions:
        error = getattr(result, name, None)
        if error is not None:
            return False, error
    if not spec.returns_value:
        return True, None
    return False, TApplicationException(
        TApplicationException.MISSING_RESULT, f"{spec.name}() returned no result"
    )
