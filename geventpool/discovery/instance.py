"""The immutable description of one live server instance, and the rules that make it valid.

An :class:`Instance` is a value: two instances with the same fields are equal, and nothing can
change one after it is built. Every instance is valid by construction; an invalid one raises
:class:`~geventpool.errors.InvalidInstanceError` naming the field and the reason, so a bad
registry entry can be rejected on its own without touching its siblings.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from geventpool.errors import InvalidInstanceError
from geventpool.wire.codecs import PROTOCOLS, TRANSPORTS

SOURCES = frozenset({"native", "curator", "finagle"})

MAX_WEIGHT = 10_000.0
MAX_METADATA_ITEMS = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
MAX_SHORT_TEXT = 256

# Names that resolve to cloud metadata services: never a Thrift server, always a risk.
FORBIDDEN_HOSTNAMES = frozenset(
    {"metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal"}
)
# Metadata addresses outside the link-local ranges (AWS's IPv6 instance metadata endpoint).
FORBIDDEN_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254")})

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_EMPTY: Mapping[str, str] = MappingProxyType({})


def check_host(host: object) -> str:
    """Return ``host`` if it is a routable host name or IP address, else raise.

    Accepted: DNS names (RFC 1123 labels) and IPv4/IPv6 literals, loopback included. Rejected:
    unspecified (``0.0.0.0``, ``::``), link-local (``169.254.0.0/16`` with the cloud metadata
    address ``169.254.169.254``, ``fe80::/10``), multicast, reserved and broadcast addresses,
    metadata host names, and names whose last label is numeric (a mistyped IPv4 address).
    """
    if not isinstance(host, str) or not host:
        raise InvalidInstanceError(f"host must be a non-empty string, not {host!r}")
    if len(host) > 253:
        raise InvalidInstanceError(f"host is {len(host)} characters long (at most 253)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return _check_hostname(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        _check_address(address.ipv4_mapped, host)
    _check_address(address, host)
    return host


def _check_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> None:
    if address.is_unspecified:
        raise InvalidInstanceError(f"host {text!r} is the unspecified address, not routable")
    if address.is_link_local:
        raise InvalidInstanceError(f"host {text!r} is link-local (cloud metadata range)")
    if address.is_multicast:
        raise InvalidInstanceError(f"host {text!r} is a multicast address")
    if address in FORBIDDEN_ADDRESSES:
        raise InvalidInstanceError(f"host {text!r} is a cloud metadata address")
    if isinstance(address, ipaddress.IPv4Address) and (
        address.is_reserved or address == ipaddress.IPv4Address("255.255.255.255")
    ):
        raise InvalidInstanceError(f"host {text!r} is a reserved address")


def _check_hostname(host: str) -> str:
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise InvalidInstanceError(f"host {host!r} is neither an IP address nor a valid DNS name")
    if labels[-1].isdigit():
        raise InvalidInstanceError(f"host {host!r} looks like a malformed IPv4 address")
    if name.lower() in FORBIDDEN_HOSTNAMES:
        raise InvalidInstanceError(f"host {host!r} names a cloud metadata service")
    return host


def check_port(port: object) -> int:
    """Return ``port`` if it is an integer from 1 to 65535 (booleans are not ports), else raise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInstanceError(f"port must be an integer from 1 to 65535, not {port!r}")
    return port


def _check_text(name: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > MAX_SHORT_TEXT:
        raise InvalidInstanceError(
            f"{name} must be a non-empty string of at most {MAX_SHORT_TEXT} characters,"
            f" not {value!r:.80}"
        )


def _frozen_metadata(metadata: object) -> Mapping[str, str]:
    if metadata is None:
        return _EMPTY
    if not isinstance(metadata, Mapping):
        raise InvalidInstanceError(f"metadata must be a mapping, not {type(metadata).__name__}")
    if len(metadata) > MAX_METADATA_ITEMS:
        raise InvalidInstanceError(
            f"metadata has {len(metadata)} items (at most {MAX_METADATA_ITEMS})"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key) > MAX_METADATA_KEY:
            raise InvalidInstanceError(f"metadata key {key!r:.80} is not a short string")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise InvalidInstanceError(
                f"metadata[{key!r}] must be a string of at most {MAX_METADATA_VALUE} characters"
            )
    return MappingProxyType(dict(metadata))


PIPELINING, OUT_OF_ORDER = "pipelining", "out-of-order"
"""The metadata with which a server advertises that it answers a connection's calls
concurrently, each reply as soon as it is ready (:class:`~geventpool.server.ThriftServer`
does): clients pipeline their calls to it by default."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One server instance of a service, as found in (or written to) the registry.

    ``host``/``port`` say where to connect; ``weight`` (0 < weight <= 10000, default 1) is its
    relative share; ``zone`` an optional locality label; ``transport`` (``buffered`` or
    ``framed``) and ``protocol`` (``binary`` or ``compact``) must match the server's;
    ``version`` is the server's own version string; ``registered_at`` the registration time in
    Unix seconds; ``metadata`` free-form string pairs. ``tls`` True says that ``port`` speaks
    only TLS (clients never call it in plaintext); ``tls_port`` is a second port that speaks
    TLS, for an instance whose ``port`` is plaintext (Curator's ``port`` and ``sslPort``).
    ``id`` is the znode name the instance was read from (empty before registration) and
    ``source`` the payload format it was read from.
    """

    host: str
    port: int
    weight: float = 1.0
    zone: str | None = None
    transport: str = "buffered"
    protocol: str = "binary"
    version: str | None = None
    registered_at: float | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    id: str = ""
    source: str = "native"
    tls: bool = False
    tls_port: int | None = None

    def __post_init__(self) -> None:
        check_host(self.host)
        check_port(self.port)
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or not 0 < weight <= MAX_WEIGHT
        ):
            raise InvalidInstanceError(
                f"weight must be a number above 0 and at most {MAX_WEIGHT:g}, not {weight!r}"
            )
        object.__setattr__(self, "weight", float(weight))
        if self.transport not in TRANSPORTS:
            raise InvalidInstanceError(
                f"transport must be one of {sorted(TRANSPORTS)}, not {self.transport!r}"
            )
        if self.protocol not in PROTOCOLS:
            raise InvalidInstanceError(
                f"protocol must be one of {sorted(PROTOCOLS)}, not {self.protocol!r}"
            )
        _check_text("zone", self.zone)
        _check_text("version", self.version)
        registered_at = self.registered_at
        if registered_at is not None and (
            isinstance(registered_at, bool)
            or not isinstance(registered_at, int | float)
            or not math.isfinite(registered_at)
            or registered_at < 0
        ):
            raise InvalidInstanceError(
                f"registered_at must be Unix seconds, not {registered_at!r:.40}"
            )
        object.__setattr__(self, "metadata", _frozen_metadata(self.metadata))
        if self.source not in SOURCES:
            raise InvalidInstanceError(f"source must be one of {sorted(SOURCES)}")
        if not isinstance(self.id, str):
            raise InvalidInstanceError(f"id must be a string, not {self.id!r}")
        if not isinstance(self.tls, bool):
            raise InvalidInstanceError(f"tls must be true or false, not {self.tls!r:.40}")
        if self.tls_port is not None:
            check_port(self.tls_port)
            if self.tls:
                raise InvalidInstanceError("tls_port is for an instance whose port is plaintext")

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``: where a connection to this instance goes."""
        return (self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
