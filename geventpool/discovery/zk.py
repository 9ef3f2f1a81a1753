"""ZooKeeper client construction: kazoo on its gevent handler, with bounded retries.

Nothing else in geventpool builds a :class:`~kazoo.client.KazooClient`. The clients made here
use ``SequentialGeventHandler`` (watch callbacks run one at a time on one greenlet, so they
must never block), retry with ``gevent.sleep``, and back off to at most ``max_retry_delay``
seconds between reconnect attempts (kazoo's default is an hour).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeAlias

import gevent
from kazoo.client import KazooClient, KazooState
from kazoo.handlers.gevent import SequentialGeventHandler
from kazoo.protocol.states import KeeperState
from kazoo.retry import KazooRetry

from geventpool import events
from geventpool.errors import ConfigurationError, ZooKeeperUnavailableError
from geventpool.validation import check_seconds

DEFAULT_ROOT = "/geventpool"
"""Where services live unless told otherwise: ``<root>/<service>/<instance>``."""

_SERVICE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\Z")


@dataclass(frozen=True)
class ZooKeeperConfig:
    """How to reach ZooKeeper. Durations are float seconds.

    ``hosts`` is kazoo's connect string (``"h1:2181,h2:2181/optional/chroot"``);
    ``session_timeout`` the session length requested (the server clamps it to its own bounds);
    ``connect_timeout`` how long :func:`connect` waits for the first connection;
    ``max_retry_delay`` the longest pause between reconnect attempts; ``auth`` a tuple of
    ``(scheme, credential)`` pairs, e.g. ``(("digest", "user:secret"),)``.
    """

    hosts: str
    session_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_retry_delay: float = 2.0
    auth: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.hosts, str) or not self.hosts.strip():
            raise ConfigurationError("ZooKeeper hosts must be a non-empty connect string")
        for name in ("session_timeout", "connect_timeout", "max_retry_delay"):
            check_seconds(name, getattr(self, name))


def make_client(
    config: ZooKeeperConfig | str, client_id: tuple[int, bytes] | None = None
) -> KazooClient:
    """Return a new, unstarted :class:`KazooClient` for ``config`` (or a bare connect string).

    ``client_id`` (a session id and password) attaches to an existing session.
    """
    if isinstance(config, str):
        config = ZooKeeperConfig(config)
    handler = SequentialGeventHandler()
    retry = {
        "max_tries": -1,
        "delay": 0.1,
        "backoff": 2,
        "max_jitter": 0.2,
        "max_delay": config.max_retry_delay,
        "sleep_func": gevent.sleep,
    }
    return KazooClient(
        hosts=config.hosts,
        timeout=config.session_timeout,
        handler=handler,
        connection_retry=KazooRetry(**retry),
        command_retry=KazooRetry(**{**retry, "max_tries": 3}),
        auth_data=list(config.auth) or None,
        client_id=client_id,
    )


def connect(config: ZooKeeperConfig | str) -> KazooClient:
    """Return a started client, connected within ``config.connect_timeout`` seconds.

    Raises :class:`ZooKeeperUnavailableError` otherwise, after stopping the client, so no
    background reconnect loop is left behind.
    """
    if isinstance(config, str):
        config = ZooKeeperConfig(config)
    client = make_client(config)
    watch_state(client, config.hosts)
    client.start_async().wait(timeout=config.connect_timeout)
    if not client.connected:
        client.stop()
        client.close()
        raise ZooKeeperUnavailableError(config.hosts, config.connect_timeout)
    return client


ZooKeeper: TypeAlias = str | ZooKeeperConfig | KazooClient
"""What callers may pass: a connect string, a configuration, or a started client they own."""


def connect_or_use(zookeeper: ZooKeeper, connect_timeout: float) -> tuple[KazooClient, bool]:
    """The kazoo client to use for ``zookeeper``, and whether it was opened here (the caller
    then owns it and must :func:`close` it). A connect string is connected within
    ``connect_timeout`` seconds; a :class:`ZooKeeperConfig` within its own timeout; a kazoo
    client is used as it is, and never stopped by geventpool."""
    if isinstance(zookeeper, KazooClient):
        return zookeeper, False
    if isinstance(zookeeper, str):
        zookeeper = ZooKeeperConfig(zookeeper, connect_timeout=connect_timeout)
    return connect(zookeeper), True


def close(client: KazooClient | None) -> None:
    """Stop and close a client opened by :func:`connect_or_use` (``None``: nothing to do)."""
    if client is not None:
        client.stop()
        client.close()


def watch_state(client: KazooClient, hosts: str) -> None:
    """Emit ``zookeeper_state_changed`` on every state change of ``client``."""

    def listener(state: str) -> None:
        if client.client_state == KeeperState.CLOSED:
            state, level = "CLOSED", "info"  # a clean stop, not an outage
        else:
            level = "info" if state == KazooState.CONNECTED else "warning"
        events.emit(events.ZOOKEEPER_STATE_CHANGED, level, state=state, hosts=hosts)

    client.add_listener(listener)


def service_path(service: str, root: str = DEFAULT_ROOT) -> str:
    """Return ``<root>/<service>``, after checking both (raises :class:`ConfigurationError`)."""
    if not isinstance(service, str) or not _SERVICE_NAME.match(service) or service in (".", ".."):
        raise ConfigurationError(
            f"service name must be 1-128 of [A-Za-z0-9_.-] not starting with '.' or '-',"
            f" not {service!r}"
        )
    if not isinstance(root, str) or not root.startswith("/") or "//" in root:
        raise ConfigurationError(f"root must be an absolute ZooKeeper path, not {root!r}")
    return f"{root.rstrip('/')}/{service}"


def describe_hosts(client: KazooClient) -> str:
    """The connect string of ``client``, for messages (``host:port,...`` plus chroot)."""
    hosts = ",".join(f"{host}:{port}" for host, port in client.hosts)
    return hosts + (client.chroot or "")
