"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, ClassVar, cast

import gevent

from geventpool.client.connection import Connection
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


_POOL_STATE = cast(Any, Connection.__dict__["pool_state"])  # the slot's descriptor
_POOL_PY = str(Path("geventpool", "client", "pool.py"))


class StateWatched(Connection):
    """A :class:`Connection` that keeps every state its pool moves it through (``history``)
    and notes in ``strays`` every state set anywhere but in ``InstancePool._move``; ``closing``
    (if set) is called with each connection as it closes."""

    __slots__ = ("history",)
    strays: ClassVar[list[str]] = []
    closing: ClassVar[Callable[[StateWatched], None] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.history: list[str | None] = []
        super().__init__(*args, **kwargs)

    @property
    def pool_state(self) -> str | None:
        return cast(str | None, _POOL_STATE.__get__(self, Connection))

    @pool_state.setter
    def pool_state(self, value: str | None) -> None:
        code = sys._getframe(1).f_code
        if not (value is None and code.co_name == "__init__"):  # (Connection's own default)
            if code.co_name != "_move" or not code.co_filename.endswith(_POOL_PY):
                StateWatched.strays.append(f"{code.co_filename}:{code.co_name} set {value!r}")
            self.history.append(value)
        _POOL_STATE.__set__(self, value)

    def close(self) -> None:
        if StateWatched.closing is not None and not self.broken:
            StateWatched.closing(self)
        super().close()


def watched_connector(peers: list[socket.socket]) -> Callable[..., StateWatched]:
    """A pool's connect function making :class:`StateWatched` connections on socket pairs
    (each peer end is appended to ``peers``)."""

    def connect(instance: Instance, service: Any, **options: Any) -> StateWatched:
        mine, peer = socket.socketpair()
        peer.settimeout(0.0)
        peers.append(peer)
        clock = options["clock"]
        return StateWatched(instance, mine, service, clock=clock, expires_at=clock() + 3600)

    return connect
