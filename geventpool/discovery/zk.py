"""ZooKeeper client construction: kazoo on its gevent handler, with bounded retries.

Nothing else in geventpool builds a :class:`~kazoo.client.KazooClient`. The clients made here
use ``SequentialGeventHandler`` (watch callbacks run one at a time on one greenlet, so they
must never block), retry with ``gevent.sleep``, and back off to at most ``max_retry_delay``
seconds between reconnect attempts (kazoo's default is an hour).

**A reconnect attempt takes at most a third of the session** (:data:`ATTEMPT_SHARE`). kazoo
gives the TCP connect the whole session timeout, and ZooKeeper's answer to the connect request
the session timeout divided by the number of hosts: with one host, one connection that
ZooKeeper accepts and never answers (it does so while starting up, and a frozen server does)
outlasts the session, which the server then expires, deleting every ephemeral node it held:
a ZooKeeper restart could empty a service's view. With a third, two more attempts fit within
the session.

Security (docs/security.md): ``auth`` credentials are sent on every (re)connect; with a
``digest`` credential the nodes this client creates are protected (every right for that
identity, reading for anyone) unless ``protect`` is False or ``acl`` says otherwise; ``tls``
speaks TLS to ZooKeeper through gevent's own TLS (kazoo's ``use_ssl`` uses the standard
library's, which blocks the hub unless gevent's monkey-patching is applied), certificates and
host names verified by default.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import gevent
import gevent.socket
from gevent import monkey
from kazoo.client import KazooClient, KazooState
from kazoo.handlers.gevent import SequentialGeventHandler
from kazoo.hosts import collect_hosts
from kazoo.protocol.connection import ConnectionHandler
from kazoo.protocol.serialization import Connect
from kazoo.protocol.states import KeeperState
from kazoo.retry import KazooRetry
from kazoo.security import ACL, ANYONE_ID_UNSAFE, Id, Permissions, make_digest_acl

from geventpool import events
from geventpool.errors import ConfigurationError, TlsError, ZooKeeperUnavailableError
from geventpool.tls import ClientTls, handshake
from geventpool.validation import check_seconds

DEFAULT_ROOT = "/geventpool"
"""Where services live unless told otherwise: ``<root>/<service>/<instance>``."""

_SERVICE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\Z")


@dataclass(frozen=True)
class ZooKeeperConfig:
    """How to reach ZooKeeper. Durations are float seconds.

    ``hosts`` is kazoo's connect string (``"h1:2181,h2:2181/optional/chroot"``: ``host``,
    ``host:port`` or ``[v6 address]:port`` entries, the port from 1 to 65535, 2181 if left out;
    a chroot without ``.`` or ``..`` parts);
    ``session_timeout`` the session length requested (the server clamps it to its own bounds);
    ``connect_timeout`` how long :func:`connect` waits for the first connection;
    ``max_retry_delay`` the longest pause between reconnect attempts; ``auth`` a tuple of
    ``(scheme, credential)`` pairs, e.g. ``(("digest", "user:secret"),)``.

    ``sasl`` authenticates by SASL instead (kazoo's ``sasl_options``, for pure-sasl: e.g.
    ``{"mechanism": "DIGEST-MD5", "username": "registrar", "password": "..."}``; needs the
    ``sasl`` extra).

    ``protect`` (with a ``digest`` credential in ``auth``, or a SASL ``username``): every
    node this client creates (a registration and the parents it makes) gets every right for
    that identity and only reading for anyone else, so that only holders of the credential
    can register or delete under the service path while any client can read (False:
    ZooKeeper's open ACL). ``acl`` replaces that: the kazoo :class:`~kazoo.security.ACL`
    list every created node gets.
    ``tls`` (a :class:`~geventpool.tls.ClientTls`) speaks TLS to ZooKeeper (the hosts then
    name its ``secureClientPort``); the host name in ``hosts`` is checked against the
    server's certificate unless the ``ClientTls`` says otherwise.
    """

    hosts: str
    session_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_retry_delay: float = 2.0
    auth: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    sasl: Mapping[str, str] | None = field(default=None, repr=False)
    protect: bool = True
    acl: tuple[ACL, ...] | None = None
    tls: ClientTls | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hosts, str) or not self.hosts.strip():
            raise ConfigurationError("ZooKeeper hosts must be a non-empty connect string")
        _check_hosts(self.hosts)
        for name in ("session_timeout", "connect_timeout", "max_retry_delay"):
            check_seconds(name, getattr(self, name))
        for pair in self.auth:
            if not (
                isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
            ):
                raise ConfigurationError("ZooKeeper auth must be (scheme, credential) pairs")
            if pair[0] == "digest" and ":" not in pair[1]:
                raise ConfigurationError("a ZooKeeper digest credential is 'user:password'")
        if self.acl is not None and not (
            self.acl and all(isinstance(entry, ACL) for entry in self.acl)
        ):
            raise ConfigurationError("ZooKeeper acl must be a non-empty tuple of kazoo ACLs")
        if self.sasl is not None:
            _check_sasl(self.sasl)
        if self.tls is not None and not isinstance(self.tls, ClientTls):
            raise ConfigurationError(f"ZooKeeper tls must be a ClientTls, not {self.tls!r}")

    def node_acl(self) -> list[ACL] | None:
        """The ACL of the nodes this client creates (None: ZooKeeper's open ACL)."""
        if self.acl is not None:
            return list(self.acl)
        owners = [
            make_digest_acl(*credential.split(":", 1), all=True)
            for scheme, credential in self.auth
            if scheme == "digest"
        ]
        if self.sasl is not None and self.sasl.get("username"):
            owners.append(ACL(Permissions.ALL, Id("sasl", self.sasl["username"])))
        if not (self.protect and owners):
            return None
        return [*owners, ACL(Permissions.READ, ANYONE_ID_UNSAFE)]


_HOST = re.compile(r"[^\s/:@?#\[\],]+\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")


def _check_hosts(hosts: str) -> None:
    """Refuse a connect string kazoo would fail on (a ``ValueError`` when the client is made)
    or read otherwise than written (port 0 is 2181 to kazoo)."""
    servers, slash, chroot = hosts.partition("/")
    for entry in servers.split(","):
        reason = _host_port_problem(entry.strip())
        if reason is not None:
            raise ConfigurationError(f"ZooKeeper hosts {hosts!r}: {reason}")
    if slash and any(part in (".", "..") for part in chroot.split("/")):
        raise ConfigurationError(
            f"ZooKeeper hosts {hosts!r}: the chroot must not have '.' or '..' parts"
        )


def _host_port_problem(entry: str) -> str | None:
    """Why ``entry`` is not ``host``, ``host:port`` or ``[v6 address]:port`` (None if it is)."""
    if not entry:
        return "an empty entry (hosts are separated by single commas)"
    if entry.startswith("["):
        address, bracket, rest = entry[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return f"{entry!r} is not [IPv6 address] or [IPv6 address]:port"
        if not bracket or not (rest == "" or rest.startswith(":")):
            return f"{entry!r} is not [IPv6 address] or [IPv6 address]:port"
        colon, port = bool(rest), rest[1:]
    else:
        host, colon_text, port = entry.partition(":")
        if ":" in port:
            return f"{entry!r}: an IPv6 address is written in brackets, e.g. [::1]:2181"
        if not _HOST.match(host.strip()):
            return f"{entry!r} is not host or host:port"
        colon = bool(colon_text)
    if colon and not (_PORT.match(port) and 1 <= int(port) <= 65535):
        return f"port must be an integer from 1 to 65535, not {port!r}"
    return None


def _check_sasl(options: Mapping[str, str]) -> None:
    if not isinstance(options, Mapping) or not isinstance(options.get("mechanism"), str):
        raise ConfigurationError("ZooKeeper sasl must be a mapping with a 'mechanism'")
    try:
        import puresasl.client  # noqa: F401, PLC0415 - only where SASL is asked for
    except ImportError:
        raise ConfigurationError(
            "ZooKeeper sasl needs pure-sasl: pip install 'geventpool[sasl]'"
        ) from None


ATTEMPT_SHARE = 3
"""A reconnect attempt's TCP connect, and its wait for ZooKeeper's answer to the connect
request, each take at most the session timeout divided by this."""


class GeventHandler(SequentialGeventHandler):  # type: ignore[misc]  # kazoo is untyped
    """kazoo's gevent handler, whose TCP connects take at most a third of the session (kazoo
    passes the whole session timeout)."""

    def create_connection(
        self,
        address: tuple[str, int],
        hostname: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Any:
        """A TCP connection to ``address`` within a third of ``timeout`` (the session's)."""
        return super().create_connection(
            address=address, hostname=hostname, timeout=_attempt_timeout(timeout), **options
        )


def _attempt_timeout(session_timeout: float | None) -> float:
    return (10.0 if session_timeout is None else session_timeout) / ATTEMPT_SHARE


class _ConnectionHandler(ConnectionHandler):  # type: ignore[misc]  # kazoo is untyped
    """kazoo's connection loop, waiting for ZooKeeper's answer to a connect request at most a
    third of the session (kazoo waits the session divided by the number of hosts)."""

    def _invoke(self, timeout: float, request: Any, xid: int | None = None) -> Any:
        if isinstance(request, Connect):
            session = self.client._session_timeout / 1000.0  # noqa: SLF001 - kazoo's, in ms
            timeout = min(timeout, _attempt_timeout(session))
        return super()._invoke(timeout, request, xid)


class TlsGeventHandler(GeventHandler):
    """kazoo's gevent handler whose connections speak TLS by gevent's own TLS, so that the
    handshake and every read and write yield to the hub with or without monkey-patching. A
    failed handshake is an ``OSError`` to kazoo (which retries, backing off) and a
    ``zookeeper_tls_failed`` event that says why."""

    def __init__(self, tls: ClientTls) -> None:
        super().__init__()
        self._tls = tls

    def create_connection(
        self,
        address: tuple[str, int],
        hostname: str | None = None,
        timeout: float | None = None,
        **_kazoo_tls: Any,
    ) -> Any:
        """A TLS connection to ``address`` within a third of ``timeout`` (the session's: the
        TCP connect and the handshake together); kazoo's own TLS options are ignored: ``tls``
        decides."""
        timeout = _attempt_timeout(timeout)
        sock = gevent.socket.create_connection(address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = f"{address[0]}:{address[1]}"
        try:
            return handshake(
                sock,
                self._tls.ssl_context(),
                peer,
                timeout,
                server_hostname=self._tls.hostname_for(hostname or address[0]),
            )
        except TlsError as error:
            events.emit(events.ZOOKEEPER_TLS_FAILED, "warning", peer=peer, reason=error.reason)
            raise OSError(str(error)) from None


def make_client(
    config: ZooKeeperConfig | str, client_id: tuple[int, bytes] | None = None
) -> KazooClient:
    """Return a new, unstarted :class:`KazooClient` for ``config`` (or a bare connect string).

    ``client_id`` (a session id and password) attaches to an existing session.
    """
    if isinstance(config, str):
        config = ZooKeeperConfig(config)
    _check_resolution(config.hosts)
    handler = GeventHandler() if config.tls is None else TlsGeventHandler(config.tls)
    retry = {
        "max_tries": -1,
        "delay": 0.1,
        "backoff": 2,
        "max_jitter": 0.2,
        "max_delay": config.max_retry_delay,
        "sleep_func": gevent.sleep,
    }
    client = KazooClient(
        hosts=config.hosts,
        timeout=config.session_timeout,
        handler=handler,
        connection_retry=KazooRetry(**retry),
        command_retry=KazooRetry(**{**retry, "max_tries": 3}),
        auth_data=list(config.auth) or None,
        default_acl=config.node_acl(),
        sasl_options=None if config.sasl is None else dict(config.sasl),  # kazoo adds to it
        client_id=client_id,
    )
    # kazoo has no hook for its connection loop: the same object, with bounded attempts.
    client._connection.__class__ = _ConnectionHandler  # noqa: SLF001
    return client


def _check_resolution(hosts: str) -> None:
    """kazoo resolves the connect string's host names with the standard library's
    ``getaddrinfo`` on every connect attempt, which blocks the hub unless gevent's
    monkey-patching applies: refuse names (not addresses) then, rather than freeze."""
    if monkey.is_module_patched("socket"):
        return
    names = [
        host for host, _ in collect_hosts(hosts)[0] if not _is_address(host.strip().strip("[]"))
    ]
    if names:
        raise ConfigurationError(
            f"ZooKeeper hosts {', '.join(names)} are names, which kazoo resolves with the"
            " standard library's blocking getaddrinfo (the whole process would wait for DNS on"
            " every connect): give IP addresses, or apply gevent.monkey.patch_all() first"
        )


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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
