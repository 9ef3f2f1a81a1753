"""TLS to Thrift servers over real sockets, with certificates made for each test run: calls
verify the server (and, with mutual TLS, the server verifies the client), in exclusive and
pipelined modes; the registry says which instances speak TLS and the client follows it (never
plaintext to a TLS-only instance); each failed handshake is a typed error that names the
instance and the reason, counted towards ejection only when the instance is at fault."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import gevent.ssl
import pytest
import trustme
from gevent import monkey
from kazoo.client import KazooClient

from geventpool import events
from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import ConfigurationError, RetriesExhaustedError, TlsError, TransportError
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import echo_thrift
from geventpool.testing.processes import ServerProcess
from geventpool.tls import ClientTls, ServerTls, handshake
from helpers import curator, events_named, wait_until

pytestmark = pytest.mark.gevent_timeout(60)


@dataclass
class Pki:
    """Files of one test's authorities: ``ca`` signed ``server`` (for 127.0.0.1 and
    localhost) and ``client``; ``other_ca`` signed ``stranger`` (a server nobody trusts)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path
    wrong_name_cert: Path
    wrong_name_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()

    def write(name: str, cert: trustme.LeafCert) -> tuple[Path, Path]:
        chain, key = folder / f"{name}.pem", folder / f"{name}.key"
        cert.private_key_pem.write_to_path(str(key))
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        return chain, key

    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    server = write("server", ca.issue_cert("127.0.0.1", "localhost"))
    client = write("client", ca.issue_cert("client@geventpool.test"))
    stranger = write("stranger", other.issue_cert("127.0.0.1"))
    wrong_name = write("wrong-name", ca.issue_cert("elsewhere.example"))
    return Pki(folder / "ca.pem", *server, *client, folder / "other-ca.pem", *stranger, *wrong_name)


@pytest.fixture
def make_client() -> Iterator[Callable[..., ServiceClient]]:
    """``make_client(*instances, tls=..., **pool)``: a client of static instances, stopped after."""
    made: list[ServiceClient] = []

    def make(*instances: Instance, tls: ClientTls | None = None, **pool: Any) -> ServiceClient:
        options = {"max_connections": 2, **pool}
        client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            instances=list(instances),
            pool=PoolSettings(**options),
            tls=tls,
            call_timeout=5.0,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


def tls_instance(server: ThriftServer | ServerProcess, **fields: Any) -> Instance:
    return Instance(host="127.0.0.1", port=int(server.port or 0), tls=True, **fields)


def last_attempt(error: BaseException) -> BaseException:
    """The error of the last attempt of a call that failed with ``error``."""
    return error.attempts[-1] if isinstance(error, RetriesExhaustedError) else error


def call_concurrently(client: ServiceClient, callers: int, calls: int) -> dict[str, str]:
    got: dict[str, str] = {}

    def caller(index: int) -> None:
        for call in range(calls):
            message = f"caller {index} call {call}"
            got[message] = client.echo(message)

    gevent.joinall([gevent.spawn(caller, index) for index in range(callers)], raise_error=True)
    return got


@pytest.mark.parametrize("max_inflight", [1, 16], ids=["exclusive", "pipelined"])
@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_calls_over_tls_reach_a_verified_server_each_reply_to_its_own_caller(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    pki: Pki,
    max_inflight: int,
    transport: str,
) -> None:
    server = serve(
        tls=ServerTls(cert_file=str(pki.server_cert), key_file=str(pki.server_key)),
        transport=transport,
    )
    client = make_client(
        tls_instance(server, transport=transport),
        tls=ClientTls(ca_file=str(pki.ca)),
        max_inflight=max_inflight,
    )
    got = call_concurrently(client, callers=20, calls=10)
    assert len(got) == 200
    assert all(reply == message for message, reply in got.items())
    status = client.status().instances[0]
    assert status.opened <= 2  # the connections were kept and reused, not one per call
    assert status.failures == 0


def test_idle_tls_connections_stay_usable_after_the_servers_session_tickets(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    # a TLS 1.3 server sends session tickets after the handshake: bytes waiting on an idle
    # connection that are not data, and must not make the pool throw the connection away
    server = serve(tls=ServerTls(cert_file=str(pki.server_cert), key_file=str(pki.server_key)))
    client = make_client(tls_instance(server), tls=ClientTls(ca_file=str(pki.ca)), min_idle=2)
    client.start()
    wait_until(lambda: client.status().instances[0].idle == 2, 5.0)
    gevent.sleep(0.2)  # the tickets arrive
    for index in range(6):
        assert client.echo(f"call {index}") == f"call {index}"
    status = client.status().instances[0]
    assert (status.opened, status.closed) == (2, 0)


def test_a_plaintext_client_gets_nothing_from_a_tls_server(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    server = serve(tls=ServerTls(cert_file=str(pki.server_cert), key_file=str(pki.server_key)))
    # listed without TLS: the client speaks plaintext, and the server answers none of it
    client = make_client(Instance(host="127.0.0.1", port=server.port), eject_after=100)
    with pytest.raises((TransportError, RetriesExhaustedError)):  # reset by the server
        client.echo("in the clear", timeout=2.0)


def test_mutual_tls_calls_with_the_clients_certificate(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    server = serve(
        tls=ServerTls(
            cert_file=str(pki.server_cert), key_file=str(pki.server_key), ca_file=str(pki.ca)
        )
    )
    tls = ClientTls(
        ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )
    client = make_client(tls_instance(server), tls=tls, max_inflight=8)
    assert client.echo("mutual") == "mutual"
    assert len(call_concurrently(client, callers=8, calls=5)) == 40


@pytest.mark.parametrize("max_inflight", [1, 8], ids=["exclusive", "pipelined"])
def test_a_server_refusing_our_missing_certificate_is_a_tls_error_that_ejects_nothing(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    pki: Pki,
    max_inflight: int,
) -> None:
    server = serve(
        tls=ServerTls(
            cert_file=str(pki.server_cert), key_file=str(pki.server_key), ca_file=str(pki.ca)
        )
    )
    client = make_client(
        tls_instance(server),
        tls=ClientTls(ca_file=str(pki.ca)),
        eject_after=2,
        max_inflight=max_inflight,
    )
    for _ in range(5):
        with pytest.raises((TlsError, RetriesExhaustedError)) as caught:
            client.echo("no certificate", timeout=2.0)
        error = last_attempt(caught.value)
        assert isinstance(error, TlsError)
        assert not error.peer_at_fault
        assert "refused this side's certificate" in str(error)
        assert str(server.port) in str(error)
    assert client.status().instances[0].ejected is False


def test_a_certificate_from_an_unknown_authority_is_refused_naming_the_instance(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    server = serve(tls=ServerTls(cert_file=str(pki.stranger_cert), key_file=str(pki.stranger_key)))
    client = make_client(tls_instance(server), tls=ClientTls(ca_file=str(pki.ca)), eject_after=100)
    with pytest.raises((TlsError, RetriesExhaustedError)) as caught:
        client.echo("to a stranger", timeout=2.0)
    error = last_attempt(caught.value)
    assert isinstance(error, TlsError)
    assert error.peer_at_fault
    assert f"127.0.0.1:{server.port}" in str(error)
    assert "certificate" in str(error)


def test_a_certificate_for_another_host_name_is_refused_unless_server_name_says_so(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    server = serve(
        tls=ServerTls(cert_file=str(pki.wrong_name_cert), key_file=str(pki.wrong_name_key))
    )
    strict = make_client(tls_instance(server), tls=ClientTls(ca_file=str(pki.ca)), eject_after=100)
    with pytest.raises((TlsError, RetriesExhaustedError)) as caught:
        strict.echo("wrong name", timeout=2.0)
    assert "hostname mismatch" in str(caught.value) or "match" in str(caught.value)
    named = make_client(
        tls_instance(server),
        tls=ClientTls(ca_file=str(pki.ca), server_name="elsewhere.example"),
    )
    assert named.echo("named") == "named"


def test_an_instance_listed_as_tls_only_is_never_sent_plaintext(
    make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    received: list[bytes] = []

    def plaintext_server() -> None:  # records what each client sends first, answers nothing
        while True:
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(1.0)
                try:
                    received.append(peer.recv(65536))
                except OSError:
                    received.append(b"")

    accepting = gevent.spawn(plaintext_server)
    try:
        client = make_client(
            Instance(host="127.0.0.1", port=listener.getsockname()[1], tls=True),
            eject_after=100,
        )  # no tls given: the registry's word is enough
        with pytest.raises((TlsError, RetriesExhaustedError)) as caught:
            client.echo("secret", timeout=2.0)
        error = last_attempt(caught.value)
        assert isinstance(error, TlsError)
        assert received
        assert all(data[:1] in (b"\x16", b"") for data in received)  # TLS handshake records
        assert not any(b"secret" in data or b"echo" in data for data in received)
    finally:
        accepting.kill()
        listener.close()


def test_a_handshake_that_never_ends_is_bounded_by_the_connect_timeout(
    make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does) and never answers the client's hello
    try:
        client = make_client(
            Instance(host="127.0.0.1", port=silent.getsockname()[1], tls=True),
            tls=ClientTls(ca_file=str(pki.ca)),
            connect_timeout=0.3,
            eject_after=100,
        )
        began = gevent.get_hub().loop.now()
        with pytest.raises((TlsError, RetriesExhaustedError)) as caught:
            client.echo("hello?", timeout=5.0)
        assert "no handshake within 0.29" in str(caught.value) or "within 0.3" in str(caught.value)
        assert gevent.get_hub().loop.now() - began < 4.0
    finally:
        silent.close()


def test_a_client_whose_tls_refuses_plaintext_leaves_plaintext_instances_out(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    pki: Pki,
    captured: list[Any],
) -> None:
    secure = serve(tls=ServerTls(cert_file=str(pki.server_cert), key_file=str(pki.server_key)))
    plain = serve()
    client = make_client(
        tls_instance(secure),
        Instance(host="127.0.0.1", port=plain.port),
        tls=ClientTls(ca_file=str(pki.ca)),
    )
    assert {client.whoami() for _ in range(20)} == {f"127.0.0.1:{secure.port}"}
    rejected = events_named(captured, events.INSTANCE_REJECTED)
    assert [event["path"] for event in rejected] == [f"127.0.0.1:{plain.port}"]
    assert "refuses plaintext" in rejected[0]["reason"]
    allowing = make_client(
        tls_instance(secure),
        Instance(host="127.0.0.1", port=plain.port),
        tls=ClientTls(ca_file=str(pki.ca), plaintext=True),
    )
    assert {allowing.whoami() for _ in range(40)} == {
        f"127.0.0.1:{secure.port}",
        f"127.0.0.1:{plain.port}",
    }


def test_a_tls_server_process_registers_as_tls_and_is_called_over_tls_through_zookeeper(
    servers: Callable[..., ServerProcess],
    zk_hosts: str,
    zk: KazooClient,
    pki: Pki,
) -> None:
    process = servers(
        "--zookeeper",
        zk_hosts,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-ca",
        str(pki.ca),
    )
    (child,) = zk.get_children("/geventpool/echo")
    payload = json.loads(zk.get(f"/geventpool/echo/{child}")[0])
    assert payload["tls"] is True
    tls = ClientTls(
        ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )
    with ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts, tls=tls) as client:
        assert client.whoami() == process.address
    # a client told nothing about TLS still speaks TLS to it (verified against the system's
    # authorities, which do not know this test's: refused, never sent in plaintext)
    with ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts) as untold:
        with pytest.raises((TlsError, RetriesExhaustedError)) as caught:
            untold.whoami(timeout=2.0)
        assert "certificate" in str(caught.value)


def test_a_curator_instance_with_an_ssl_port_is_called_on_it(
    serve: Callable[..., ThriftServer],
    zk_hosts: str,
    zk: KazooClient,
    pki: Pki,
) -> None:
    secure = serve(tls=ServerTls(cert_file=str(pki.server_cert), key_file=str(pki.server_key)))
    plain = serve()
    zk.create(
        "/geventpool/echo/a", curator("127.0.0.1", plain.port, ssl_port=secure.port), makepath=True
    )
    tls = ClientTls(ca_file=str(pki.ca))
    with ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts, tls=tls) as client:
        assert client.whoami() == f"127.0.0.1:{secure.port}"
    with ServiceClient(echo_thrift.Echo, "echo", zookeeper=zk_hosts) as untold:
        assert untold.whoami() == f"127.0.0.1:{plain.port}"  # plaintext is what it asked for


def test_a_server_handshake_failure_is_an_event_and_costs_no_other_connection(
    serve: Callable[..., ThriftServer],
    make_client: Callable[..., ServiceClient],
    pki: Pki,
    captured: list[Any],
) -> None:
    server = serve(
        tls=ServerTls(
            cert_file=str(pki.server_cert), key_file=str(pki.server_key), handshake_timeout=0.3
        )
    )
    client = make_client(tls_instance(server), tls=ClientTls(ca_file=str(pki.ca)))
    assert client.echo("before") == "before"
    garbage = socket.create_connection(("127.0.0.1", server.port))
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
    mute = socket.create_connection(("127.0.0.1", server.port))  # says nothing at all
    try:
        wait_until(lambda: len(events_named(captured, events.SERVER_CONNECTION_ERROR)) >= 2, 5.0)
        reasons = [
            event["error"] for event in events_named(captured, events.SERVER_CONNECTION_ERROR)
        ]
        assert any("no handshake within 0.3" in reason for reason in reasons)
        assert client.echo("after") == "after"
    finally:
        garbage.close()
        mute.close()


def test_handshake_wraps_a_standard_library_context_cooperatively(pki: Pki) -> None:
    server = ThriftServer(
        echo_thrift.Echo,
        object(),
        tls=ServerTls(cert_file=str(pki.server_cert), key_file=str(pki.server_key)),
    )
    server.start()
    try:
        # the standard library's own context (not gevent's, which monkey-patching installs);
        # the server runs in this process, so a handshake that blocked the hub would never end
        context = monkey.get_original("ssl", "SSLContext")(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(pki.ca))
        assert not isinstance(context, gevent.ssl.SSLContext)
        sock = gevent.socket.create_connection(("127.0.0.1", server.port))
        secured = handshake(sock, context, "server", 5.0, server_hostname="127.0.0.1")
        assert isinstance(secured, gevent.ssl.SSLSocket)
        assert secured.version() in ("TLSv1.2", "TLSv1.3")
        secured.close()
    finally:
        server.stop(drain_timeout=0.5)


def test_tls_files_that_cannot_be_used_are_configuration_errors(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="ca_file"):
        ClientTls(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match="key_file needs cert_file"):
        ClientTls(key_file=str(pki.client_key))
    with pytest.raises(ConfigurationError, match="check_hostname needs verify"):
        ClientTls(verify=False)
    with pytest.raises(ConfigurationError, match="cannot load"):
        ClientTls(cert_file=str(pki.client_cert), key_file=str(pki.server_key))
    with pytest.raises(ConfigurationError, match="needs cert_file"):
        ServerTls()
    with pytest.raises(ConfigurationError, match="require_client_cert needs ca_file"):
        ServerTls(
            cert_file=str(pki.server_cert), key_file=str(pki.server_key), require_client_cert=True
        )
    with pytest.raises(ConfigurationError, match="tls must be a ClientTls"):
        PoolSettings(tls="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="tls must be a ServerTls"):
        ThriftServer(echo_thrift.Echo, object(), tls=True)  # type: ignore[arg-type]


def client_hello() -> bytes:
    """A real TLS ClientHello, as the first bytes a client sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = monkey.get_original("ssl", "SSLContext")(ssl.PROTOCOL_TLS_CLIENT)
    hello = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    return outgoing.read()


def trickle(sock: socket.socket, data: bytes, every: float) -> None:
    """Send ``data`` one byte every ``every`` seconds, until done or the peer closes."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        gevent.sleep(every)


def test_a_client_trickling_its_handshake_holds_a_server_slot_no_longer_than_the_timeout(
    serve: Callable[..., ThriftServer], pki: Pki
) -> None:
    server = serve(
        tls=ServerTls(
            cert_file=str(pki.server_cert), key_file=str(pki.server_key), handshake_timeout=0.5
        )
    )
    slow = socket.create_connection(("127.0.0.1", server.port))
    began = time.monotonic()
    sender = gevent.spawn(trickle, slow, client_hello(), 0.05)  # ~26 s for the whole hello
    try:
        slow.settimeout(10.0)
        assert slow.recv(1024) == b""  # the server gave up and closed it
        assert time.monotonic() - began < 3.0  # a socket timeout would reset at every byte
    finally:
        sender.kill()
        slow.close()


def test_a_server_trickling_its_handshake_is_given_up_at_the_connect_timeout(
    make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    # a handshake record header claiming 16,000 bytes, then its body a byte at a time
    record = b"\x16\x03\x03\x3e\x80" + b"\x02" * 400

    def trickling_server() -> None:
        while True:
            peer, _ = listener.accept()
            gevent.spawn(trickle, peer, record, 0.02)

    accepting = gevent.spawn(trickling_server)
    try:
        client = make_client(
            Instance(host="127.0.0.1", port=listener.getsockname()[1], tls=True),
            tls=ClientTls(ca_file=str(pki.ca)),
            connect_timeout=0.3,
            eject_after=100,
        )
        began = time.monotonic()
        with pytest.raises((TlsError, RetriesExhaustedError)) as caught:
            client.echo("hello?", timeout=5.0)
        assert "no handshake within" in str(caught.value)
        assert time.monotonic() - began < 2.0  # 8 s of trickle if each byte reset the clock
    finally:
        accepting.kill()
        listener.close()


def test_an_idle_connection_holding_part_of_a_record_is_not_handed_to_the_next_caller(
    serve: Callable[..., ThriftServer], make_client: Callable[..., ServiceClient], pki: Pki
) -> None:
    upstream = serve()  # plaintext; the proxy below speaks TLS to the client
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def proxy(raw: socket.socket) -> None:
        secured = context.wrap_socket(raw, server_side=True)
        beneath = socket.socket(fileno=os.dup(secured.fileno()))  # the TCP stream itself
        with beneath, socket.create_connection(("127.0.0.1", upstream.port)) as plain:
            plain.sendall(secured.recv(65536))  # the first call, and its reply
            secured.sendall(plain.recv(65536))
            gevent.sleep(0.05)
            # an application-data record header claiming 16,384 bytes, and 100 of them
            beneath.sendall(b"\x17\x03\x03\x40\x00" + b"z" * 100)
            gevent.sleep(5)

    def accepting() -> None:
        while True:
            gevent.spawn(proxy, listener.accept()[0])

    acceptor = gevent.spawn(accepting)
    try:
        client = make_client(
            Instance(host="127.0.0.1", port=listener.getsockname()[1], tls=True),
            tls=ClientTls(ca_file=str(pki.ca)),
            max_connections=1,
            eject_after=100,
        )
        assert client.echo("first") == "first"
        gevent.sleep(0.3)  # the part of a record arrives on the idle connection
        assert client.echo("second", timeout=1.5) == "second"  # on a new connection
    finally:
        acceptor.kill()
        listener.close()
