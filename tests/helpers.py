"""Small helpers shared by the tests."""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from typing import Any

import gevent

from geventpool.discovery.instance import Instance
from geventpool.discovery.payloads import encode_instance


def events_named(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured structlog events called ``name``."""
    return [entry for entry in logs if entry["event"] == name]


def native(host: str = "127.0.0.1", port: int = 9090, **fields: Any) -> bytes:
    """A native payload for an instance at ``host:port``."""
    return encode_instance(Instance(host=host, port=port, **fields))


def curator(address: str, port: int | None, ssl_port: int | None = None) -> bytes:
    """A payload as Curator's ServiceDiscovery writes it."""
    return json.dumps(
        {
            "name": "calc",
            "id": "6d4e2a1c-0000-4000-8000-000000000001",
            "address": address,
            "port": port,
            "sslPort": ssl_port,
            "payload": None,
            "registrationTimeUTC": 1610116500446,
            "serviceType": "DYNAMIC",
            "uriSpec": None,
        }
    ).encode()


def finagle(
    host: str,
    port: int,
    status: str = "ALIVE",
    shard: int = 0,
    additional: dict[str, Any] | None = None,
) -> bytes:
    """A payload as a Finagle / Twitter ServerSet member writes it."""
    return json.dumps(
        {
            "serviceEndpoint": {"host": host, "port": port},
            "additionalEndpoints": additional or {},
            "status": status,
            "shard": shard,
        }
    ).encode()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 10 ms; fail the test if it is not true within ``timeout`` s."""
    with gevent.Timeout(timeout, AssertionError(f"not true within {timeout}s: {predicate}")):
        while not predicate():
            gevent.sleep(0.01)
