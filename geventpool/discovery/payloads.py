"""Registry payloads: write the native format, read native, Curator and Finagle ones.

Three formats are understood (``docs/registry.md`` documents them with examples):

* **native** (written by :class:`~geventpool.discovery.registrar.Registrar`): a JSON object with
  ``"schema_version": 1``, ``host``, ``port``, ``weight``, ``zone``, ``transport``,
  ``protocol``, ``version``, ``registered_at`` (Unix seconds) and ``metadata``; ``tls``
  and ``tls_port`` only when set (a reader that does not know them refuses the payload,
  rather than call a TLS-only instance in plaintext).
* **Curator** service discovery (``ServiceInstance`` JSON): ``address``, ``port`` and/or
  ``sslPort``, ``registrationTimeUTC`` (milliseconds), ``payload``.
* **Finagle / Twitter ServerSet**: ``serviceEndpoint`` ``{host, port}``, ``status``
  (only ``ALIVE`` is routable), ``shard``, ``additionalEndpoints`` (the one named
  :data:`FINAGLE_TLS_ENDPOINT` is the instance's TLS port).

:func:`decode_instance` is strict: the bytes must be at most ``max_size`` long, UTF-8, one JSON
object without duplicate keys or NaN/Infinity, of a known format and version, with a routable
host and a valid port. Anything else raises :class:`~geventpool.errors.InvalidInstanceError`
with the reason; it never raises anything else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn

from geventpool.discovery.instance import Instance
from geventpool.errors import InvalidInstanceError

NATIVE_SCHEMA_VERSION = 1
DEFAULT_MAX_PAYLOAD = 64 * 1024
"""Largest payload accepted, in bytes. ZooKeeper allows 1 MiB; no real payload needs that."""

_NATIVE_KEYS = frozenset(
    {
        "schema_version",
        "host",
        "port",
        "weight",
        "zone",
        "transport",
        "protocol",
        "version",
        "registered_at",
        "metadata",
        "tls",
        "tls_port",
    }
)
FINAGLE_TLS_ENDPOINT = "tls"
"""The name of the ServerSet ``additionalEndpoints`` entry that serves TLS (same host)."""


def encode_instance(instance: Instance) -> bytes:
    """Return the native JSON payload of ``instance`` (UTF-8, keys sorted, no whitespace)."""
    document: dict[str, Any] = {
        "schema_version": NATIVE_SCHEMA_VERSION,
        "host": instance.host,
        "port": instance.port,
        "weight": instance.weight,
        "zone": instance.zone,
        "transport": instance.transport,
        "protocol": instance.protocol,
        "version": instance.version,
        "registered_at": instance.registered_at,
        "metadata": dict(instance.metadata),
    }
    if instance.tls:
        document["tls"] = True
    if instance.tls_port is not None:
        document["tls_port"] = instance.tls_port
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def decode_instance(
    data: bytes | None, node: str = "", *, max_size: int = DEFAULT_MAX_PAYLOAD
) -> Instance:
    """Parse one registry payload into an :class:`Instance` whose ``id`` is ``node``.

    Raises :class:`InvalidInstanceError` (with ``node`` and ``reason``) for any payload that is
    not a valid native, Curator or Finagle instance.
    """
    try:
        document = _load_json(data, max_size)
        if "schema_version" in document:
            return _native(document, node)
        if "serviceEndpoint" in document:
            return _finagle(document, node)
        if "address" in document and ("registrationTimeUTC" in document or "sslPort" in document):
            return _curator(document, node)
        raise InvalidInstanceError("unknown payload format (not native, Curator or Finagle)")
    except InvalidInstanceError as error:
        raise InvalidInstanceError(error.reason, node) from None


def _load_json(data: bytes | None, max_size: int) -> Mapping[str, Any]:
    if not data:
        raise InvalidInstanceError("empty payload")
    if len(data) > max_size:
        raise InvalidInstanceError(f"payload is {len(data)} bytes (at most {max_size})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInstanceError(f"payload is not UTF-8: {error.reason}") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise InvalidInstanceError(f"payload is not strict JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidInstanceError(f"payload is a JSON {type(document).__name__}, not an object")
    return document


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise InvalidInstanceError(f"duplicate key {key!r}")
        document[key] = value
    return document


def _reject_constant(name: str) -> NoReturn:
    raise InvalidInstanceError(f"{name} is not allowed in a payload")


def _native(document: Mapping[str, Any], node: str) -> Instance:
    version = document["schema_version"]
    if version != NATIVE_SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidInstanceError(
            f"unknown schema_version {version!r} (this client reads {NATIVE_SCHEMA_VERSION})"
        )
    unknown = set(document) - _NATIVE_KEYS
    if unknown:
        raise InvalidInstanceError(f"unknown keys {sorted(unknown)}")
    if "host" not in document or "port" not in document:
        raise InvalidInstanceError("native payload needs host and port")
    return Instance(
        host=document["host"],
        port=document["port"],
        weight=document.get("weight", 1.0),
        zone=document.get("zone"),
        transport=document.get("transport", "buffered"),
        protocol=document.get("protocol", "binary"),
        version=document.get("version"),
        registered_at=document.get("registered_at"),
        metadata=document.get("metadata") or {},
        id=node,
        source="native",
        tls=document.get("tls", False),
        tls_port=document.get("tls_port"),
    )


def _curator(document: Mapping[str, Any], node: str) -> Instance:
    port: Any = document.get("port")  # checked by Instance
    ssl_port: Any = document.get("sslPort")
    metadata: dict[str, str] = {}
    tls = False
    if port is None and ssl_port is not None:
        port, ssl_port, tls = ssl_port, None, True  # TLS only
    for key in ("name", "id", "serviceType"):
        value = document.get(key)
        if isinstance(value, str) and value:
            metadata[f"curator.{key}"] = value[:256]
    registered_ms = document.get("registrationTimeUTC")
    registered_at = None
    if isinstance(registered_ms, int) and not isinstance(registered_ms, bool):
        registered_at = registered_ms / 1000.0
    return Instance(
        host=document["address"],
        port=port,
        registered_at=registered_at,
        metadata=metadata,
        id=node,
        source="curator",
        tls=tls,
        tls_port=ssl_port,
    )


def _finagle(document: Mapping[str, Any], node: str) -> Instance:
    status = document.get("status", "ALIVE")
    if status != "ALIVE":
        raise InvalidInstanceError(f"ServerSet member status is {status!r}, not 'ALIVE'")
    endpoint = document["serviceEndpoint"]
    if not isinstance(endpoint, dict) or "host" not in endpoint or "port" not in endpoint:
        raise InvalidInstanceError("serviceEndpoint must be an object with host and port")
    metadata: dict[str, str] = {}
    shard = document.get("shard")
    if isinstance(shard, int) and not isinstance(shard, bool):
        metadata["shard"] = str(shard)
    return Instance(
        host=endpoint["host"],
        port=endpoint["port"],
        metadata=metadata,
        id=node,
        source="finagle",
        tls_port=_finagle_tls_port(document.get("additionalEndpoints"), endpoint["host"]),
    )


def _finagle_tls_port(endpoints: Any, host: Any) -> Any:
    """The port of the additional endpoint named :data:`FINAGLE_TLS_ENDPOINT` (None without
    one); it must be on the service endpoint's host."""
    if endpoints is None:
        return None
    if not isinstance(endpoints, dict):
        raise InvalidInstanceError("additionalEndpoints must be an object")
    tls = endpoints.get(FINAGLE_TLS_ENDPOINT)
    if tls is None:
        return None
    if not isinstance(tls, dict) or "port" not in tls:
        raise InvalidInstanceError(f"additionalEndpoints.{FINAGLE_TLS_ENDPOINT} needs a port")
    if tls.get("host", host) != host:
        raise InvalidInstanceError(
            f"additionalEndpoints.{FINAGLE_TLS_ENDPOINT} is on another host than the service"
            " endpoint"
        )
    return tls["port"]
