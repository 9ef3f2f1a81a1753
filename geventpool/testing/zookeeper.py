"""Real ZooKeeper servers on 127.0.0.1 for tests, demos and load runs: one, or an ensemble.

Each server is a Java process of the ZooKeeper found by :func:`find_classpath`, with its data in
a folder of its own, no admin web server, ``srvr``/``cons``/``envi`` four-letter words, and its
output kept in ``<folder>/zookeeper.log``. :meth:`ZooKeeperServer.start` returns only once
``srvr`` answers with a ``Mode:`` line (the server is serving), because a kazoo client that
connects to a port that is open but not yet serving can hang for seconds. Every process is
stopped through its own PID.

``tick_time`` (seconds) sets ZooKeeper's tick: sessions may be as short as two ticks, so a
short tick makes expiry tests fast. Sessions may be as long as 60 s whatever the tick.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from geventpool.errors import GeventPoolError

ZOOKEEPER_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
DEBIAN_JARS = (
    "/usr/share/java/zookeeper.jar",
    "/usr/share/java/slf4j-simple.jar",
    "/usr/share/java/netty-codec.jar",  # the TLS port's Netty needs it; the manifest omits it
)
FOUR_LETTER_WORDS = "srvr,stat,cons,envi,ruok,mntr"


class ZooKeeperNotFoundError(GeventPoolError):
    """No ZooKeeper installation was found; the message says how to get one."""


def find_classpath() -> str:
    """The Java class path of a ZooKeeper server.

    In order: ``$GEVENTPOOL_ZOOKEEPER_CLASSPATH``; the jars of ``$ZOOKEEPER_HOME`` (a binary
    release: ``lib/*.jar``); Debian's ``zookeeper`` package (``/usr/share/java``, whose
    ``zookeeper.jar`` names its dependencies, plus ``slf4j-simple.jar`` so that it logs).
    """
    explicit = os.environ.get("GEVENTPOOL_ZOOKEEPER_CLASSPATH")
    if explicit:
        return explicit
    home = os.environ.get("ZOOKEEPER_HOME")
    if home:
        jars = sorted(Path(home).glob("lib/*.jar")) + sorted(Path(home).glob("*.jar"))
        if not jars:
            raise ZooKeeperNotFoundError(f"ZOOKEEPER_HOME={home!r} holds no jars")
        return os.pathsep.join(str(jar) for jar in jars)
    if Path(DEBIAN_JARS[0]).exists():
        return os.pathsep.join(jar for jar in DEBIAN_JARS if Path(jar).exists())
    raise ZooKeeperNotFoundError(
        "no ZooKeeper found: run scripts/install-zookeeper.sh (Debian, as root), or set"
        " ZOOKEEPER_HOME to a ZooKeeper release, or GEVENTPOOL_ZOOKEEPER_CLASSPATH"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def four_letter_word(port: int, word: str, timeout: float = 2.0) -> str:
    """Send a four-letter word to the server on ``port``; its answer, or "" if none."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(word.encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class Peer:
    """One member of an ensemble: its id and its client, quorum and election ports."""

    server_id: int
    client_port: int
    quorum_port: int
    election_port: int


@dataclass(frozen=True)
class ZooKeeperTls:
    """What a server's ``secureClientPort`` needs (PEM files): ``key_store`` its private key
    in PKCS#8 followed by its certificate chain (:func:`write_key_store` makes one);
    ``trust_store`` the certificates that may sign a client's; ``client_auth`` ``need``
    (every client presents a certificate: mutual TLS), ``want`` or ``none``."""

    key_store: Path
    trust_store: Path
    client_auth: str = "need"


def write_key_store(path: Path, private_key_pem: bytes, chain_pem: bytes) -> Path:
    """Write a PEM key store for ZooKeeper at ``path``: the key re-encoded as PKCS#8 (Java
    reads no other PEM key form), then the chain. Needs ``cryptography`` (a test extra)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - tests only

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pkcs8 + chain_pem)
    return path


class ZooKeeperServer:
    """One ZooKeeper process; standalone unless ``peers`` lists the ensemble it belongs to.
    With ``tls`` it also serves TLS on ``secure_port`` (Netty), plaintext staying on
    ``client_port`` (for the four-letter words that tell it is ready); ``sasl_users`` (names
    and passwords) lets those users authenticate by SASL DIGEST-MD5."""

    def __init__(
        self,
        folder: Path,
        client_port: int | None = None,
        *,
        tick_time: float = 0.2,
        server_id: int | None = None,
        peers: Sequence[Peer] = (),
        java: str = "java",
        classpath: str | None = None,
        tls: ZooKeeperTls | None = None,
        sasl_users: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.client_port = client_port or free_port()
        self.tls = tls
        self.sasl_users = dict(sasl_users or {})
        self.secure_port = free_port() if tls is not None else None
        self.tick_time = tick_time
        self.server_id = server_id
        self.peers = tuple(peers)
        self._java = java
        self._classpath = classpath
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: int | None = None

    @property
    def hosts(self) -> str:
        """The connect string of this server alone."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def secure_hosts(self) -> str:
        """The connect string of this server's TLS port (it must have ``tls``)."""
        assert self.secure_port is not None, "started without tls"
        return f"127.0.0.1:{self.secure_port}"

    @property
    def log_path(self) -> Path:
        """Where the server's output goes."""
        return self.folder / "zookeeper.log"

    @property
    def pid(self) -> int | None:
        """The PID of the running process, if any."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        """Whether the process exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> Path:
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        tick_ms = max(1, int(self.tick_time * 1000))
        lines = [
            f"tickTime={tick_ms}",
            f"initLimit={max(10, int(5.0 / self.tick_time))}",
            f"syncLimit={max(5, int(2.0 / self.tick_time))}",
            f"dataDir={data}",
            f"clientPort={self.client_port}",
            "clientPortAddress=127.0.0.1",
            "maxClientCnxns=0",
            f"minSessionTimeout={2 * tick_ms}",
            "maxSessionTimeout=60000",
            "admin.enableServer=false",
            f"4lw.commands.whitelist={FOUR_LETTER_WORDS}",
            "autopurge.purgeInterval=0",
        ]
        if self.tls is not None:
            lines += [
                "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
                f"secureClientPort={self.secure_port}",
                "secureClientPortAddress=127.0.0.1",
                f"ssl.keyStore.location={self.tls.key_store}",
                "ssl.keyStore.type=PEM",
                f"ssl.trustStore.location={self.tls.trust_store}",
                "ssl.trustStore.type=PEM",
                f"ssl.clientAuth={self.tls.client_auth}",
                "authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider",
            ]
        if self.peers:
            assert self.server_id is not None, "an ensemble member needs a server_id"
            (data / "myid").write_text(f"{self.server_id}\n")
            lines += [
                f"server.{p.server_id}=127.0.0.1:{p.quorum_port}:{p.election_port}"
                for p in self.peers
            ]
        if self.sasl_users:
            lines.append(
                "authProvider.sasl=org.apache.zookeeper.server.auth.SASLAuthenticationProvider"
            )
        config = self.folder / "zoo.cfg"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 30.0, wait: bool = True) -> None:
        """Start the process (again, after a stop or kill) and, if ``wait``, wait until ready."""
        if self.running:
            return
        config = self._write_config()
        classpath = self._classpath or find_classpath()
        command = [
            self._java,
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.forceSync=no",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            *self._jaas(),
            "-cp",
            classpath,
            ZOOKEEPER_MAIN,
            str(config),
        ]
        self._log_file = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)

    def _jaas(self) -> list[str]:
        """The JVM option naming the JAAS file of ``sasl_users`` (none without them)."""
        if not self.sasl_users:
            return []
        users = "\n".join(
            f'  user_{name}="{password}"' for name, password in self.sasl_users.items()
        )
        jaas = self.folder / "jaas.conf"
        module = "org.apache.zookeeper.server.auth.DigestLoginModule"
        jaas.write_text(f"Server {{\n  {module} required\n{users};\n}};\n")
        return [f"-Djava.security.auth.login.config={jaas}"]

    def mode(self) -> str | None:
        """``standalone``, ``leader`` or ``follower`` while serving, else None."""
        for line in four_letter_word(self.client_port, "srvr").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``srvr`` reports a mode; raise ``TimeoutError`` (with the log's tail)."""
        deadline = time.monotonic() + timeout
        while self.mode() is None:
            if not self.running:
                raise RuntimeError(f"ZooKeeper exited early; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"ZooKeeper on port {self.client_port} not serving after {timeout:.1f}s;"
                    f" log:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def session_ids(self) -> set[int]:
        """Session ids of the clients connected to this server now (from ``cons``)."""
        ids = set()
        for part in four_letter_word(self.client_port, "cons").split("sid=0x")[1:]:
            digits = part.split(",", 1)[0].split(")", 1)[0]
            try:
                ids.add(int(digits, 16))
            except ValueError:
                continue
        return ids

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, signum: int) -> None:
        if self.running and self._process is not None:
            os.kill(self._process.pid, signum)

    def pause(self) -> None:
        """SIGSTOP: the process stays, answers nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data folder stays for a restart."""
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        self._reap(5.0)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the data folder stays."""
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        if not self._reap(timeout):
            self._signal(signal.SIGKILL)
            self._reap(5.0)

    def _reap(self, timeout: float) -> bool:
        process = self._process
        if process is None:
            return True
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        if self._log_file is not None:
            os.close(self._log_file)
            self._log_file = None
        return True


class ZooKeeperEnsemble:
    """``size`` ZooKeeper servers on 127.0.0.1 forming one ensemble."""

    def __init__(self, folder: Path, size: int = 3, *, tick_time: float = 0.2) -> None:
        peers = [Peer(i, free_port(), free_port(), free_port()) for i in range(1, size + 1)]
        self.members = [
            ZooKeeperServer(
                Path(folder) / f"zk{p.server_id}",
                p.client_port,
                tick_time=tick_time,
                server_id=p.server_id,
                peers=peers,
            )
            for p in peers
        ]

    @property
    def hosts(self) -> str:
        """The connect string naming every member."""
        return ",".join(member.hosts for member in self.members)

    def start(self, timeout: float = 60.0) -> None:
        """Start every member that is not running and wait until all serve."""
        for member in self.members:
            member.start(wait=False)
        deadline = time.monotonic() + timeout
        for member in self.members:
            member.wait_ready(max(0.1, deadline - time.monotonic()))

    def stop(self) -> None:
        """Stop every member."""
        for member in self.members:
            member.stop()

    def leader(self) -> ZooKeeperServer:
        """The member that says it leads; raises ``LookupError`` if none does."""
        for member in self.members:
            if member.running and member.mode() == "leader":
                return member
        raise LookupError("no member is leading")

    def serving(self, session_id: int) -> ZooKeeperServer:
        """The member the session ``session_id`` is connected to; ``LookupError`` if none."""
        for member in self.members:
            if member.running and session_id in member.session_ids():
                return member
        raise LookupError(f"no member serves session {session_id:#x}")

    def wait_quorum(self, timeout: float = 30.0) -> None:
        """Wait until every running member serves (a leader is elected)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.running:
                member.wait_ready(max(0.1, deadline - time.monotonic()))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m geventpool.testing.zookeeper``: run ZooKeeper on 127.0.0.1 until signalled.

    Prints the connect string as soon as every server is serving, then waits for SIGINT or
    SIGTERM and stops every process it started.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--size", type=int, default=1, help="1: standalone; 3: an ensemble")
    parser.add_argument("--tick", type=float, default=0.2, help="tickTime in seconds")
    parser.add_argument("--port", type=int, default=0, help="client port (standalone only)")
    parser.add_argument("--folder", type=Path, help="data and logs (default: a temporary one)")
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="geventpool-zk-"))
    servers: ZooKeeperServer | ZooKeeperEnsemble
    if args.size == 1:
        servers = ZooKeeperServer(folder, args.port or None, tick_time=args.tick)
    else:
        servers = ZooKeeperEnsemble(folder, args.size, tick_time=args.tick)
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        servers.start()
        print(f"ZooKeeper serving: {servers.hosts}  (data and logs in {folder})", flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        servers.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
