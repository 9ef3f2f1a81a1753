"""Transports and protocols: the names a registry may carry and the thriftpy2 factories.

The Cython factories are used wherever they exist (``TCyBufferedTransportFactory``,
``TCyFramedTransportFactory``, ``TCyBinaryProtocolFactory``): the Cython binary protocol needs
a Cython transport, and both are several times faster than the pure-Python ones.
"""

from __future__ import annotations

from typing import Any

from thriftpy2.protocol import TCompactProtocolFactory, TCyBinaryProtocolFactory
from thriftpy2.protocol.cybin import ProtocolError  # type: ignore[attr-defined]
from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TDecodeException
from thriftpy2.transport import (
    TCyBufferedTransportFactory,
    TCyFramedTransportFactory,
    TTransportException,
)

from geventpool.errors import ConfigurationError

TRANSPORTS = frozenset({"buffered", "framed"})
PROTOCOLS = frozenset({"binary", "compact"})

# What a broken or hostile peer makes thriftpy2 raise while a message is read or written.
WIRE_ERRORS = (
    OSError,
    EOFError,
    TTransportException,
    TProtocolException,
    TDecodeException,
    ProtocolError,
)


def transport_factory(transport: str) -> Any:
    """The (Cython) thriftpy2 transport factory for ``buffered`` or ``framed``."""
    if transport not in TRANSPORTS:
        raise ConfigurationError(f"transport must be one of {sorted(TRANSPORTS)}")
    return TCyFramedTransportFactory() if transport == "framed" else TCyBufferedTransportFactory()


def protocol_factory(protocol: str) -> Any:
    """The thriftpy2 protocol factory for ``binary`` (Cython) or ``compact``."""
    if protocol not in PROTOCOLS:
        raise ConfigurationError(f"protocol must be one of {sorted(PROTOCOLS)}")
    return TCompactProtocolFactory() if protocol == "compact" else TCyBinaryProtocolFactory()
