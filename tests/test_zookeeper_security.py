"""A secured registry, against a real ZooKeeper that serves mutual TLS on its
``secureClientPort``, with certificates made for this run: only holders of the registration
credential can create or delete under a service path (anyone may read), a plaintext client
cannot use the TLS port, a server whose certificate does not verify is refused with a reason,
and an authenticated TLS server registers, is watched and called as before. TLS to
ZooKeeper never holds the hub, monkey-patched or not."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from geventpool import events
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.discovery.registrar import Registrar
from geventpool.discovery.zk import ZooKeeperConfig, close, connect
from geventpool.errors import ConfigurationError, RegistrationError, ZooKeeperUnavailableError
from geventpool.server.thrift_server import Registration, ThriftServer
from geventpool.testing.echo import echo_thrift
from geventpool.testing.zookeeper import ZooKeeperServer, ZooKeeperTls, write_key_store
from geventpool.tls import ClientTls
from helpers import events_named, native, wait_until

pytestmark = pytest.mark.gevent_timeout(60)

REGISTRAR = ("digest", "registrar:s3cret-registr4r")
SASL_REGISTRAR = {"mechanism": "DIGEST-MD5", "username": "sasl-registrar", "password": "s4sl-pw"}


@dataclass
class Files:
    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@dataclass
class SecureZooKeeper:
    server: ZooKeeperServer
    files: Files

    def config(self, *, tls: bool | ClientTls = True, **options: Any) -> ZooKeeperConfig:
        """A configuration for the TLS port (with this run's client certificate), or the
        plaintext one (``tls=False``)."""
        if tls is False:
            return ZooKeeperConfig(self.server.hosts, **options)
        if tls is True:
            tls = ClientTls(
                ca_file=str(self.files.ca),
                cert_file=str(self.files.client_cert),
                key_file=str(self.files.client_key),
            )
        return ZooKeeperConfig(self.server.secure_hosts, tls=tls, **options)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureZooKeeper]:
    folder = tmp_path_factory.mktemp("secure-zookeeper")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    chain = b"".join(blob.bytes() for blob in server_cert.cert_chain_pems)
    key_store = write_key_store(
        folder / "zookeeper.pem", server_cert.private_key_pem.bytes(), chain
    )
    client = ca.issue_cert("client.geventpool.test")
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    (folder / "client.pem").write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    files = Files(
        folder / "ca.pem", folder / "client.pem", folder / "client.key", folder / "other-ca.pem"
    )
    server = ZooKeeperServer(
        folder / "zk",
        tls=ZooKeeperTls(key_store, folder / "ca.pem"),
        sasl_users={SASL_REGISTRAR["username"]: SASL_REGISTRAR["password"]},
    )
    server.start()
    try:
        yield SecureZooKeeper(server, files)
    finally:
        server.stop()


@pytest.fixture
def root() -> str:
    return f"/secured-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def kazoo_clients() -> Iterator[Callable[[ZooKeeperConfig], KazooClient]]:
    made: list[KazooClient] = []

    def make(config: ZooKeeperConfig) -> KazooClient:
        client = connect(config)
        made.append(client)
        return client

    yield make
    for client in made:
        close(client)


@pytest.fixture
def servers() -> Iterator[Callable[..., ThriftServer]]:
    started: list[ThriftServer] = []

    def start(zookeeper: ZooKeeperConfig, root: str) -> ThriftServer:
        server = ThriftServer(
            echo_thrift.Echo,
            _Echo(),
            deregister_grace=0.0,
            registration=Registration(zookeeper=zookeeper, service="echo", root=root),
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(drain_timeout=1.0)


class _Echo:
    """The part of the echo service these tests call."""

    def echo(self, message: str) -> str:
        return message


def test_only_holders_of_the_registration_credential_may_register_or_delete_and_anyone_reads(
    secure: SecureZooKeeper,
    root: str,
    kazoo_clients: Callable[[ZooKeeperConfig], KazooClient],
    servers: Callable[..., ThriftServer],
) -> None:
    server = servers(secure.config(auth=(REGISTRAR,)), root)
    node = f"{root}/echo/127.0.0.1:{server.port}"
    anonymous = kazoo_clients(secure.config())
    assert anonymous.get_children(f"{root}/echo") == [f"127.0.0.1:{server.port}"]
    assert json.loads(anonymous.get(node)[0])["port"] == server.port
    with pytest.raises(NoAuthError):
        anonymous.create(f"{root}/echo/10.6.6.6:9090", native("10.6.6.6", 9090))
    with pytest.raises(NoAuthError):
        anonymous.delete(node)
    with pytest.raises(NoAuthError):
        anonymous.set(node, native("10.6.6.6", 9090))
    with pytest.raises(NoAuthError):
        anonymous.delete(f"{root}/echo", recursive=False)
    # the same over the plaintext port, and with a wrong password: no permission either
    impostor = kazoo_clients(secure.config(tls=False, auth=(("digest", "registrar:guess"),)))
    registrar = Registrar(impostor, "echo", Instance(host="10.6.6.6", port=9090), root=root)
    with pytest.raises(RegistrationError, match="no permission"):
        registrar.start(timeout=5.0)
    assert anonymous.get_children(f"{root}/echo") == [f"127.0.0.1:{server.port}"]


def test_a_sasl_authenticated_registrar_protects_its_nodes_too(
    secure: SecureZooKeeper,
    root: str,
    kazoo_clients: Callable[[ZooKeeperConfig], KazooClient],
    servers: Callable[..., ThriftServer],
) -> None:
    server = servers(secure.config(sasl=SASL_REGISTRAR), root)
    node = f"{root}/echo/127.0.0.1:{server.port}"
    anonymous = kazoo_clients(secure.config())
    acls, _ = anonymous.get_acls(node)
    assert sorted((a.id.scheme, a.id.id, a.perms) for a in acls) == [
        ("sasl", "sasl-registrar", 31),
        ("world", "anyone", 1),
    ]
    with pytest.raises(NoAuthError):
        anonymous.delete(node)
    with pytest.raises(NoAuthError):
        anonymous.create(f"{root}/echo/10.6.6.6:9090", native("10.6.6.6", 9090))


def test_a_wrong_sasl_password_cannot_register(
    secure: SecureZooKeeper,
    root: str,
    kazoo_clients: Callable[[ZooKeeperConfig], KazooClient],
    servers: Callable[..., ThriftServer],
) -> None:
    servers(secure.config(sasl=SASL_REGISTRAR), root)  # the path exists, protected
    wrong = {**SASL_REGISTRAR, "password": "guess"}
    # ZooKeeper lets the session in, unauthenticated (unless the server sets
    # zookeeper.sessionRequireClientSASLAuth), and refuses what needs the identity
    impostor = kazoo_clients(secure.config(sasl=wrong, connect_timeout=3.0))
    registrar = Registrar(impostor, "echo", Instance(host="10.6.6.6", port=9090), root=root)
    with pytest.raises(RegistrationError, match="authentication failed"):
        registrar.start(timeout=5.0)


def test_an_authenticated_tls_server_registers_is_watched_and_called_as_before(
    secure: SecureZooKeeper,
    root: str,
    servers: Callable[..., ThriftServer],
) -> None:
    registering = secure.config(auth=(REGISTRAR,))
    first = servers(registering, root)
    with ServiceClient(echo_thrift.Echo, "echo", root=root, zookeeper=secure.config()) as client:
        assert client.echo("over a secured registry") == "over a secured registry"
        second = servers(registering, root)
        wait_until(lambda: len(client.status().instances) == 2, 10.0)
        ports = {s.instance.rsplit(":", 1)[1] for s in client.status().instances}
        assert ports == {str(first.port), str(second.port)}
        second.stop(drain_timeout=1.0)
        wait_until(lambda: len(client.status().instances) == 1, 10.0)
        assert client.echo("after a leave") == "after a leave"


def test_a_plaintext_client_cannot_use_the_tls_port(secure: SecureZooKeeper) -> None:
    plaintext = ZooKeeperConfig(secure.server.secure_hosts, connect_timeout=2.0)
    with pytest.raises(ZooKeeperUnavailableError):
        connect(plaintext)


def test_a_zookeeper_whose_certificate_does_not_verify_is_refused_with_the_reason(
    secure: SecureZooKeeper, captured: list[Any]
) -> None:
    stranger = ClientTls(
        ca_file=str(secure.files.other_ca),
        cert_file=str(secure.files.client_cert),
        key_file=str(secure.files.client_key),
    )
    with pytest.raises(ZooKeeperUnavailableError):
        connect(secure.config(tls=stranger, connect_timeout=2.0))
    failed = events_named(captured, events.ZOOKEEPER_TLS_FAILED)
    assert failed, "no zookeeper_tls_failed event"
    assert "certificate" in failed[0]["reason"]
    assert failed[0]["peer"] == secure.server.secure_hosts


def test_a_client_without_a_certificate_is_refused_by_a_mutual_tls_zookeeper(
    secure: SecureZooKeeper,
) -> None:
    anonymous_tls = ClientTls(ca_file=str(secure.files.ca))
    with pytest.raises(ZooKeeperUnavailableError):
        connect(secure.config(tls=anonymous_tls, connect_timeout=2.0))


def test_a_service_path_made_open_before_protection_is_reported(
    secure: SecureZooKeeper,
    root: str,
    kazoo_clients: Callable[[ZooKeeperConfig], KazooClient],
    servers: Callable[..., ThriftServer],
    captured: list[Any],
) -> None:
    kazoo_clients(secure.config()).ensure_path(f"{root}/echo")  # open ACL: anyone may write
    servers(secure.config(auth=(REGISTRAR,)), root)
    (told,) = events_named(captured, events.REGISTRY_UNPROTECTED)
    assert told["path"] == f"{root}/echo"
    assert told["open_to"] == ["world:anyone"]


def test_protection_follows_the_configuration() -> None:
    (owner, reader) = ZooKeeperConfig("h:1", auth=(REGISTRAR,)).node_acl() or []
    assert (owner.id.scheme, owner.perms) == ("digest", 31)  # every right
    assert (reader.id.scheme, reader.id.id, reader.perms) == ("world", "anyone", 1)  # READ
    assert ZooKeeperConfig("h:1").node_acl() is None
    assert ZooKeeperConfig("h:1", auth=(REGISTRAR,), protect=False).node_acl() is None
    with pytest.raises(ConfigurationError, match="user:password"):
        ZooKeeperConfig("h:1", auth=(("digest", "no-colon"),))
    with pytest.raises(ConfigurationError, match="must be a ClientTls"):
        ZooKeeperConfig("h:1", tls="yes")  # type: ignore[arg-type]


UNPATCHED = textwrap.dedent(
    """
    import json, socket, sys, time
    import gevent
    from geventpool.discovery.zk import ZooKeeperConfig, connect
    from geventpool.errors import ZooKeeperUnavailableError
    from geventpool.tls import ClientTls

    ca, cert, key, hosts = sys.argv[1:5]
    hole = socket.socket()  # accepts (the kernel does) and never answers a TLS hello
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    tls = ClientTls(ca_file=ca, cert_file=cert, key_file=key)
    ticks = []

    def tick():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    ticker = gevent.spawn(tick)
    gevent.sleep(0.05)
    began, count = time.monotonic(), len(ticks)
    try:
        connect(ZooKeeperConfig("127.0.0.1:%d" % hole.getsockname()[1], tls=tls,
                                session_timeout=2.0, connect_timeout=1.5))
        black_holed = "connected"
    except ZooKeeperUnavailableError:
        black_holed = "unavailable"
    hole_ticks, hole_seconds = len(ticks) - count, time.monotonic() - began
    client = connect(ZooKeeperConfig(hosts, tls=tls, connect_timeout=10.0))
    children = client.get_children("/")
    client.stop()
    print(json.dumps({
        "patched": socket.socket.__module__.startswith("gevent"),
        "black_holed": black_holed, "ticks": hole_ticks, "seconds": hole_seconds,
        "children": children,
    }))
    """
)


def test_tls_to_zookeeper_never_holds_the_hub_without_monkey_patching(
    secure: SecureZooKeeper,
) -> None:
    files = secure.files
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            UNPATCHED,
            str(files.ca),
            str(files.client_cert),
            str(files.client_key),
            secure.server.secure_hosts,
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["patched"] is False
    assert figures["black_holed"] == "unavailable"
    assert "zookeeper" in figures["children"]
    # a ticker due every 10 ms kept ticking through 1.5 s of handshakes that never ended; a
    # blocking handshake (the standard library's TLS on an unpatched process) holds it still
    assert figures["ticks"] >= figures["seconds"] / 0.01 / 3, figures


def test_without_monkey_patching_host_names_kazoo_would_resolve_blocking_are_refused() -> None:
    script = textwrap.dedent(
        """
        from geventpool.discovery.zk import ZooKeeperConfig, make_client
        from geventpool.errors import ConfigurationError

        make_client(ZooKeeperConfig("127.0.0.1:2181,[::1]:2181/chroot"))  # addresses: fine
        try:
            make_client(ZooKeeperConfig("127.0.0.1:2181,localhost:2181"))
        except ConfigurationError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=True, text=True
    )
    assert "ZooKeeper hosts localhost are names" in result.stdout
    assert "monkey.patch_all()" in result.stdout
