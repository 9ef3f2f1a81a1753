"""The command line against a real ZooKeeper and real servers: a registry holding a registered
echo server process, a Curator and a Finagle child pointing at it, and one rejected child
(port 70000). Some tests run the CLI in a subprocess (``python -m geventpool``: the entry
point itself), the others call ``main()`` in-process."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import subprocess
from kazoo.client import KazooClient
from thriftpy2.thrift import TApplicationException

from geventpool.cli import main, services
from geventpool.cli.common import print_json, printable
from geventpool.cli.values import to_json, to_struct, to_thrift
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.discovery.zk import ZooKeeperConfig
from geventpool.errors import ConfigurationError, GeventPoolError
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import IDL, EchoHandler, echo_thrift
from geventpool.testing.processes import ServerProcess
from geventpool.testing.zookeeper import free_port
from helpers import curator, finagle

REPO = Path(__file__).resolve().parent.parent
ECHO = "/geventpool/echo"
REJECTED = "127.0.0.1:70000"
REJECTED_REASON = "port must be an integer from 1 to 65535, not 70000"
CONF = REPO / "conf" / "geventpool.toml"
CONF_SECRETS = {
    "GEVENTPOOL_SMTP_PASSWORD": "smtp-password",
    "GEVENTPOOL_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/secret",
    "GEVENTPOOL_DINGTALK_WEBHOOK_URL": "https://oapi.dingtalk.com/robot/send?access_token=t",
    "GEVENTPOOL_DINGTALK_SECRET": "dingtalk-secret",
    "GEVENTPOOL_SMS_TOKEN": "sms-token",
}


@dataclass
class Registry:
    hosts: str
    server: ServerProcess


@pytest.fixture
def registry(zk: KazooClient, zk_hosts: str, servers: Callable[..., ServerProcess]) -> Registry:
    """``echo``: one registered server process, a Curator and a Finagle child pointing at it,
    and one rejected child; ``calc``: one Finagle member."""
    server = servers("--zookeeper", zk_hosts)
    assert server.port is not None
    zk.create(f"{ECHO}/6d4e2a1c-curator", curator("127.0.0.1", server.port))
    zk.create(f"{ECHO}/member_0000000001", finagle("127.0.0.1", server.port))
    zk.create(
        f"{ECHO}/{REJECTED}",
        json.dumps({"schema_version": 1, "host": "127.0.0.1", "port": 70000}).encode(),
    )
    zk.create("/geventpool/calc/member_0000000000", finagle("127.0.0.1", 9090), makepath=True)
    return Registry(zk_hosts, server)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: its exit code, standard output and standard error."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_process(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m geventpool ARGV`` in a subprocess, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "geventpool", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def black_hole() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 that never answers: a ZooKeeper that accepts
    connections (the kernel completes them) and says nothing."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    yield hole
    hole.close()


# -- services -----------------------------------------------------------------------------------


def test_services_counts_live_instances_and_rejected_children(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "services", "--zookeeper", registry.hosts)
    assert code == 0
    assert out.splitlines() == [
        "SERVICE  INSTANCES  REJECTED",
        "calc     1          0",
        "echo     3          1",
    ]
    code, out, _ = run(capsys, "services", "--zookeeper", registry.hosts, "--json")
    assert code == 0
    assert json.loads(out) == {
        "root": "/geventpool",
        "services": [
            {"service": "calc", "path": "/geventpool/calc", "instances": 1, "rejected": 0},
            {"service": "echo", "path": ECHO, "instances": 3, "rejected": 1},
        ],
    }


def test_verbose_puts_the_librarys_events_on_stderr_and_nothing_on_stdout(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "services", "--zookeeper", registry.hosts, "-v")
    assert code == 0 and out.splitlines()[0] == "SERVICE  INSTANCES  REJECTED"
    logged = [json.loads(line) for line in err.splitlines()]
    assert {"zookeeper_state_changed", "membership_loaded", "instance_rejected"} <= {
        entry["event"] for entry in logged
    }
    code, out, err = run(capsys, "services", "--zookeeper", registry.hosts)
    assert code == 0 and err == ""


def test_services_of_a_root_that_does_not_exist_fails(
    zk_hosts: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "services", "--zookeeper", zk_hosts, "--root", "/nowhere")
    assert (code, out) == (1, "")
    assert "no /nowhere in ZooKeeper" in err


def test_an_unreachable_zookeeper_is_one_line_and_exit_code_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    hosts = f"127.0.0.1:{free_port()}"  # nothing listens there
    for command in (["services"], ["instances", "echo"], ["watch", "echo"]):
        code, out, err = run(capsys, *command, "--zookeeper", hosts, "--timeout", "0.5")
        assert (code, out) == (1, "")
        assert err == (
            f"geventpool {command[0]}: ZooKeeperUnavailableError: ZooKeeper at"
            f" '{hosts}' not reachable within 0.50s\n"
        )


def test_a_zookeeper_that_never_answers_fails_within_the_timeout(
    black_hole: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts = f"127.0.0.1:{black_hole.getsockname()[1]}"
    for command in (
        ["services"],
        ["instances", "echo"],
        ["watch", "echo"],
        ["call", str(IDL), "echo", "ping"],
    ):
        began = time.monotonic()
        code, out, err = run(capsys, *command, "--zookeeper", hosts, "--timeout", "1")
        took = time.monotonic() - began
        assert (code, out) == (1, "")
        assert err == (
            f"geventpool {command[0]}: ZooKeeperUnavailableError: ZooKeeper at"
            f" '{hosts}' not reachable within 1.00s\n"
        )
        # not kazoo's wait for its connection attempt to end (the 10 s session timeout)
        assert took < 4, f"{command[0]} took {took:.1f}s"


class Connecting:
    """A command started in a subprocess, once it is connecting to the black hole."""

    def __init__(self, hole: socket.socket, *argv: str) -> None:
        hosts = f"127.0.0.1:{hole.getsockname()[1]}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "geventpool", *argv, "--zookeeper", hosts, "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with gevent.Timeout(30, AssertionError("the command did not connect")):
            self.connection, _ = hole.accept()

    def stop(self, signum: int) -> tuple[int, float, str, str]:
        """Send ``signum``: the exit code, the seconds it took to end, its outputs."""
        self.process.send_signal(signum)
        began = time.monotonic()
        try:
            out, err = self.process.communicate(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            self.connection.close()
        return self.process.returncode, time.monotonic() - began, out, err


@pytest.mark.gevent_timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_watch_is_connecting_ends_it_at_once_with_0(
    black_hole: socket.socket, signum: int
) -> None:
    connecting = Connecting(black_hole, "watch", "echo")
    code, took, out, err = connecting.stop(signum)
    assert (code, out, err) == (0, "", "")  # ended as by a signal once watching (the docs)
    assert took < 5, f"watch took {took:.1f}s to end"  # not --timeout's 60 s


@pytest.mark.gevent_timeout(90)
def test_ctrl_c_while_connecting_is_exit_code_130_without_a_traceback(
    black_hole: socket.socket,
) -> None:
    connecting = Connecting(black_hole, "services")
    code, took, out, err = connecting.stop(signal.SIGINT)
    assert (code, out, err) == (130, "", "geventpool services: interrupted\n")
    assert took < 5, f"services took {took:.1f}s to end"


# A SIGINT the kernel gives to another thread than the main one (gevent's resolver threads):
# a Python handler would run only once the main thread wakes up (kazoo's 10 s read timeout).
SIGINT_FROM_A_THREAD = """
import os, signal, sys
from gevent import monkey
from geventpool.cli import main

def interrupt_from_this_thread():  # a real thread, not a greenlet
    os.read(0, 1)  # the test saw the connection
    signal.pthread_kill(monkey.get_original("_thread", "get_ident")(), signal.SIGINT)

monkey.get_original("_thread", "start_new_thread")(interrupt_from_this_thread, ())
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.gevent_timeout(90)
def test_ctrl_c_given_to_another_thread_still_interrupts_at_once(
    black_hole: socket.socket,
) -> None:
    hosts = f"127.0.0.1:{black_hole.getsockname()[1]}"
    argv = ["services", "--zookeeper", hosts, "--timeout", "60"]
    process = subprocess.Popen(
        [sys.executable, "-c", SIGINT_FROM_A_THREAD, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with gevent.Timeout(30, AssertionError("services did not connect")):
            connection, _ = black_hole.accept()
        began = time.monotonic()
        out, err = process.communicate("x", timeout=15)
        took = time.monotonic() - began
        connection.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert (process.returncode, out, err) == (130, "", "geventpool services: interrupted\n")
    assert took < 5, f"services took {took:.1f}s to end"


AFTER_MAIN = """
import os, signal, sys
import gevent
from geventpool.cli import main

for command in (["services"], ["watch", "echo"]):  # each handles SIGINT while it runs
    assert main([*command, "--zookeeper", sys.argv[1], "--timeout", "0.5"]) == 1
try:
    os.kill(os.getpid(), signal.SIGINT)
    gevent.sleep(5)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


def test_main_leaves_ctrl_c_to_the_program_that_called_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", AFTER_MAIN, f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "KeyboardInterrupt\n"), done.stderr


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ("host:notaport", "port must be an integer from 1 to 65535, not 'notaport'"),
        ("127.0.0.1:0", "port must be an integer from 1 to 65535, not '0'"),
        ("127.0.0.1:70000", "port must be an integer from 1 to 65535, not '70000'"),
        ("127.0.0.1:2181,", "an empty entry"),
        ("::1:2181", "an IPv6 address is written in brackets"),
        ("127.0.0.1:2181/a/../b", "the chroot must not have '.' or '..' parts"),
    ],
)
def test_a_connect_string_that_cannot_be_used_is_bad_usage(
    capsys: pytest.CaptureFixture[str], hosts: str, message: str
) -> None:
    for command in (
        ["services"],
        ["instances", "echo"],
        ["watch", "echo"],
        ["call", str(IDL), "echo", "ping"],
    ):
        code, out, err = run(capsys, *command, "--zookeeper", hosts, "--timeout", "1")
        assert (code, out) == (2, ""), command
        assert err.startswith(f"usage: geventpool {command[0]}")
        last = err.splitlines()[-1]
        assert last.startswith(f"geventpool {command[0]}: error: ZooKeeper hosts {hosts!r}: ")
        assert message in last


def test_zookeeper_config_takes_the_connect_strings_kazoo_takes_as_written() -> None:
    for hosts in (
        "h:1",
        "zk1,zk2:2182/a/b",
        "127.0.0.1:2181, 127.0.0.2:2181",
        "127.0.0.1:2181,[::1]:2181/chroot",
        "[::1]",
        "zk1:65535/",
    ):
        assert ZooKeeperConfig(hosts).hosts == hosts
    for hosts in ("h:", "h: 2181", "h:\uff12", "h1,,h2", "user@h:1", "[zz]:1", "[::1]x", "h:1/."):
        with pytest.raises(ConfigurationError, match="ZooKeeper hosts"):
            ZooKeeperConfig(hosts)


@pytest.mark.parametrize("root", ["relative", "", "/a//b", "/a/../b", "/geventpool/./x"])
def test_a_root_that_is_not_an_absolute_path_is_bad_usage(
    capsys: pytest.CaptureFixture[str], root: str
) -> None:
    hosts = f"127.0.0.1:{free_port()}"  # never reached
    for command in (["services"], ["instances", "echo"], ["watch", "echo"]):
        code, out, err = run(capsys, *command, "--zookeeper", hosts, "--root", root)
        assert (code, out) == (2, ""), command
        assert (
            f"argument --root: must be an absolute ZooKeeper path such as /geventpool, not {root!r}"
            in err
        )


# -- instances ----------------------------------------------------------------------------------


def test_instances_shows_each_instance_and_the_rejected_child_with_its_reason(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "instances", "echo", "--zookeeper", registry.hosts)
    assert (code, err) == (0, "")
    address = registry.server.address
    lines = out.splitlines()
    assert lines[0] == f"echo ({ECHO}): 3 instances, 1 rejected"
    assert lines[1].split() == [
        "NODE",
        "ADDRESS",
        "ZONE",
        "WEIGHT",
        "VERSION",
        "FORMAT",
        "TLS",
        "WIRE",
    ]
    rows = sorted(line.split() for line in lines[2:5])
    assert rows == sorted(
        [
            [address, address, "-", "1", "-", "native", "no", "buffered/binary"],
            ["6d4e2a1c-curator", address, "-", "1", "-", "curator", "no", "buffered/binary"],
            ["member_0000000001", address, "-", "1", "-", "finagle", "no", "buffered/binary"],
        ]
    )
    assert lines[5:7] == ["rejected:", "NODE             REASON"]
    assert lines[7] == f"{REJECTED}  {REJECTED_REASON}"


def test_instances_json_from_the_module_entry_point(registry: Registry) -> None:
    done = run_process("instances", "echo", "--json", env={"GEVENTPOOL_ZOOKEEPER": registry.hosts})
    assert (done.returncode, done.stderr) == (0, "")
    listing = json.loads(done.stdout)
    assert listing["service"] == "echo" and listing["path"] == ECHO
    by_node = {inst["node"]: inst for inst in listing["instances"]}
    assert {node: inst["format"] for node, inst in by_node.items()} == {
        registry.server.address: "native",
        "6d4e2a1c-curator": "curator",
        "member_0000000001": "finagle",
    }
    native = by_node[registry.server.address]
    assert native["port"] == registry.server.port and native["tls"] is False
    assert (native["zone"], native["weight"], native["version"]) == (None, 1.0, None)
    assert (native["transport"], native["protocol"]) == ("buffered", "binary")
    assert listing["rejected"] == [{"node": REJECTED, "reason": REJECTED_REASON}]


def test_instances_of_a_service_that_does_not_exist_fails(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "instances", "nosuch", "--zookeeper", registry.hosts)
    assert (code, out) == (1, "")
    assert "no service /geventpool/nosuch" in err


HOSTILE_ZONE = "\x1b]0;owned\x07\x1b[2J\x1b[31mzone"
HOSTILE_VERSION = "1.0\n2026-12-05T00:00:00.000Z left     10.9.9.9:9090 node=FORGED"
HOSTILE_NODE = "evil\u202egpj.exe"  # a right-to-left override: reads "evilexe.jpg"


@pytest.fixture
def hostile(registry: Registry, zk: KazooClient) -> Registry:
    """The registry, with one more (valid) instance whose node name, zone and version would
    drive a terminal and forge a line if printed raw."""
    payload = {
        "schema_version": 1,
        "host": "127.0.0.1",
        "port": registry.server.port,
        "zone": HOSTILE_ZONE,
        "version": HOSTILE_VERSION,
    }
    zk.create(f"{ECHO}/{HOSTILE_NODE}", json.dumps(payload).encode())
    return registry


def assert_printable_lines(out: str) -> None:
    for line in out.splitlines():
        assert line.isprintable(), line


def test_registry_text_is_printed_with_its_control_characters_escaped(
    hostile: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    zone, version, node = (
        printable(text) for text in (HOSTILE_ZONE, HOSTILE_VERSION, HOSTILE_NODE)
    )
    assert (zone, node) == ("\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mzone", "evil\\u202egpj.exe")
    code, out, err = run(capsys, "instances", "echo", "--zookeeper", hostile.hosts)
    assert (code, err) == (0, "")
    assert_printable_lines(out)
    lines = out.splitlines()
    assert lines[0] == f"echo ({ECHO}): 4 instances, 1 rejected"
    assert len(lines) == 9  # header, 4 instances, "rejected:", its header, 1 child: no forged line
    [row] = [line for line in lines if line.startswith(node)]
    assert row.split()[2:5] == [zone, "1", version.split()[0]]
    assert version in row

    code, out, err = run(capsys, "watch", "echo", "--zookeeper", hostile.hosts, "--duration", "0.5")
    assert (code, err) == (0, "")
    assert_printable_lines(out)
    lines = out.splitlines()
    assert len(lines) == 5 and sum(" present " in line for line in lines) == 4
    [line] = [line for line in lines if f"node={node} " in line]
    assert f"zone={zone} " in line and f"version={version} " in line


def test_registry_text_in_json_output_is_escaped_json(
    hostile: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "instances", "echo", "--zookeeper", hostile.hosts, "--json")
    assert code == 0 and out.count("\n") == 1 and out[:-1].isprintable()
    [record] = [i for i in json.loads(out)["instances"] if i["node"] == HOSTILE_NODE]
    assert (record["zone"], record["version"]) == (HOSTILE_ZONE, HOSTILE_VERSION)

    code, out, _ = run(
        capsys, "watch", "echo", "--zookeeper", hostile.hosts, "--duration", "0.5", "--json"
    )
    assert code == 0
    assert_printable_lines(out)
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 5
    [event] = [e for e in events if e.get("node") == HOSTILE_NODE]
    assert event["instance"]["zone"] == HOSTILE_ZONE


def test_printable_escapes_what_would_drive_a_terminal_or_break_a_line() -> None:
    kept = "h\u00e9llo w\u00f6rld \u4e16\u754c \U0001f600 \\x1b"
    assert printable(kept) == kept
    assert printable("a\x1b[2Jb\nc\rd\te\x00\x7f\x9b\u202e\u200b\u2028\u2029\ud800\U000e0001") == (
        "a\\x1b[2Jb\\nc\\rd\\te\\x00\\x7f\\x9b\\u202e\\u200b\\u2028\\u2029\\ud800\\U000e0001"
    )
    value = {"k\x9b": ["\x1b[2J\n", "\x7f\u202e\u2028\ud800\U000e0001", "h\u00e9 \U0001f600"]}
    out = io.StringIO()
    print_json(value, out)
    text = out.getvalue()
    assert text.endswith("\n") and text[:-1].isprintable()
    assert "h\u00e9 \U0001f600" in text  # printable non-ASCII text kept as is
    assert json.loads(text) == value


def test_a_failed_commands_error_is_one_printable_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(args: Any) -> int:
        raise GeventPoolError("from a peer:\x1b[2J\nforged line\u202e")

    monkeypatch.setattr(services, "run", fails)
    code, out, err = run(capsys, "services")
    assert (code, out) == (1, "")
    assert err == "geventpool services: GeventPoolError: from a peer:\\x1b[2J forged line\\u202e\n"

    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(services, "run", interrupted)
    assert run(capsys, "services") == (130, "", "geventpool services: interrupted\n")


# -- watch --------------------------------------------------------------------------------------


class LineReader:
    """The JSON lines of a watch process, read with a time limit."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> Any:
        """Read lines until one satisfies ``predicate``; that line."""
        with gevent.Timeout(timeout, AssertionError("the expected line did not come")):
            while True:
                assert self.process.stdout is not None
                line = self.process.stdout.readline()
                assert line, "watch ended early"
                event = json.loads(line)
                if predicate(event):
                    return event


def serving(server: ServerProcess) -> ServerProcess:
    """``server`` once it has answered a call. Its ready line comes before it installs its
    SIGTERM handler (``serve_forever``); a reply can only come after (nothing between the
    two yields to the hub), so a SIGTERM from then on is a graceful stop, not a kill (-15)."""
    client = ServiceClient(
        echo_thrift.Echo, "echo", instances=[Instance("127.0.0.1", server.port or 0)]
    )
    try:
        assert client.echo("ready?") == "ready?"
    finally:
        client.stop()
    return server


@pytest.fixture
def watching(registry: Registry) -> Iterator[Callable[..., LineReader]]:
    started: list[subprocess.Popen[str]] = []

    def start(*options: str) -> LineReader:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "geventpool",
                "watch",
                "echo",
                "--zookeeper",
                registry.hosts,
                *options,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return LineReader(process)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.gevent_timeout(90)
def test_watch_prints_joins_and_leaves_as_json_lines_until_sigterm(
    registry: Registry,
    servers: Callable[..., ServerProcess],
    watching: Callable[..., LineReader],
) -> None:
    watch = watching("--json", "--duration", "60")
    present = watch.until(lambda e: e["event"] == "present")
    assert present["service"] == "echo" and "time" in present
    rejected = watch.until(lambda e: e["event"] == "rejected")
    assert (rejected["node"], rejected["reason"]) == (REJECTED, REJECTED_REASON)

    newcomer = serving(servers("--zookeeper", registry.hosts))
    joined = watch.until(lambda e: e["event"] == "joined")
    assert joined["node"] == newcomer.address
    assert joined["instance"]["port"] == newcomer.port
    assert joined["instance"]["format"] == "native"

    assert newcomer.terminate() == 0  # deregisters, then drains
    left = watch.until(lambda e: e["event"] == "left")
    assert left["node"] == newcomer.address

    watch.process.send_signal(signal.SIGTERM)
    assert watch.process.wait(15) == 0


@pytest.mark.gevent_timeout(60)
def test_watch_ends_by_itself_after_its_duration(
    registry: Registry, watching: Callable[..., LineReader]
) -> None:
    watch = watching("--duration", "1")
    out, err = watch.process.communicate(timeout=30)
    assert (watch.process.returncode, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 4
    assert sorted(line.split()[1] for line in lines) == ["present"] * 3 + ["rejected"]
    assert f"rejected {REJECTED}" in " ".join(lines[-1].split())
    assert lines[-1].endswith(REJECTED_REASON)


# -- call ---------------------------------------------------------------------------------------


def call(capsys: pytest.CaptureFixture[str], hosts: str, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "call", str(IDL), "echo", *argv, "--zookeeper", hosts, "--timeout", "5")


@pytest.mark.parametrize(
    ("argv", "result"),
    [
        (["add", "[2, 3]"], 5),
        (["add", '{"b": 3, "a": 40}'], 43),
        (["echo", '["h\\u00e9llo"]'], "h\u00e9llo"),
        (["table", '[{"a": 1, "bc": 2}]'], {"1": "YQ==", "2": "YmM="}),  # binary: base64
        (["items", "[2]"], [{"id": 0, "name": "item 0"}, {"id": 1, "name": "item 1"}]),
        (["ping"], None),
    ],
)
def test_call_prints_the_result_as_json(
    registry: Registry, capsys: pytest.CaptureFixture[str], argv: list[str], result: Any
) -> None:
    code, out, err = call(capsys, registry.hosts, *argv)
    assert (code, err) == (0, "")
    assert json.loads(out) == result


def test_call_of_a_declared_exception_prints_it_and_exits_1(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(capsys, registry.hosts, "refuse", '["not today"]')
    assert (code, err) == (1, "")
    assert json.loads(out) == {
        "exception": "Refused",
        "field": "err",
        "value": {"reason": "not today"},
    }


def test_call_of_an_undeclared_server_error_is_one_line_and_exit_code_1(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(capsys, registry.hosts, "crash", '["boom"]')
    assert (code, out) == (1, "")
    assert err == "geventpool call: TApplicationException (INTERNAL_ERROR): RuntimeError in crash\n"


class HostileEcho(EchoHandler):
    def echo(self, msg: str) -> str:
        raise TApplicationException(
            TApplicationException.INTERNAL_ERROR,
            "\x1b]0;pwned\x07\x1b[2Jfine\ngeventpool call: all good",
        )


def test_call_prints_a_servers_error_message_escaped_on_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = ThriftServer(echo_thrift.Echo, HostileEcho(""), host="127.0.0.1", port=0)
    server.start()
    try:
        code, out, err = run(
            capsys,
            "call",
            str(IDL),
            "echo",
            "echo",
            '["x"]',
            "--instance",
            f"127.0.0.1:{server.port}",
        )
    finally:
        server.stop(drain_timeout=1.0)
    assert (code, out) == (1, "")
    assert err == (
        "geventpool call: TApplicationException (INTERNAL_ERROR):"
        " \\x1b]0;pwned\\x07\\x1b[2Jfine geventpool call: all good\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "[2, "], "JSON_ARGS is not valid JSON: Expecting value"),
        (["echo", "[" * 50_000 + "]" * 50_000], "JSON_ARGS nests too deeply"),
        (["echo", '{"msg": ' + "[" * 50_000 + "]" * 50_000 + "}"], "JSON_ARGS nests too deeply"),
        (
            ["echo", '["\\ud800"]'],
            "argument 'msg': '\\ud800' at index 0 is a lone surrogate, not text",
        ),
        (
            ["table", '[{"\\udfff": 1}]'],
            "argument 'counts' key '\\udfff': '\\udfff' at index 0 is a lone surrogate",
        ),
        (["add", '["2", 3]'], "argument 'a': expected an integer for i64, got the string '2'"),
        (["add", "[2]"], "add(): missing required arguments ['b']"),
        (["add", '{"a": 1, "c": 2}'], "add has no argument 'c'"),
        (["add", "[1, 2, 3]"], "add takes 2 arguments (a, b), 3 given"),
        (["add", "7"], "JSON_ARGS must be an array (positional) or an object (by name)"),
        (["table", '[{"a": "x"}]'], "argument 'counts'['a']: expected an integer for i32"),
        (["nope"], "Echo has no method 'nope' (its methods: echo, slow_echo, add,"),
        (["add", "[1, 2]", "--thrift-service", "Other"], "the IDL has no service 'Other'"),
        (["add", "[1, 2]", "--transport", "framed"], "--transport and --protocol go with"),
    ],
)
def test_call_refuses_bad_usage_with_exit_code_2_before_sending(
    registry: Registry, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = call(capsys, registry.hosts, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("usage: geventpool call")
    assert f"geventpool call: error: {message}" in err


def test_call_refuses_an_idl_it_cannot_use_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two = tmp_path / "two.thrift"
    two.write_text("service A { void a() }\nservice B { void b() }\n")
    broken = tmp_path / "broken.thrift"
    broken.write_text("service A { void a( }\n")
    latin1 = tmp_path / "latin1.thrift"
    latin1.write_bytes("// caf\u00e9\nservice A { void a() }\n".encode("latin-1"))
    folder = tmp_path / "folder.thrift"
    folder.mkdir()
    for path, message in [
        (tmp_path / "missing.thrift", "cannot read"),
        (two, "the IDL declares several services (A, B): choose one with --thrift-service"),
        (broken, "is not a valid IDL"),
        (latin1, "latin1.thrift (or a file it includes) is not UTF-8 text: byte 6 is b'\\xe9'"),
        (folder, "folder.thrift: not a regular file"),
    ]:
        code, out, err = run(capsys, "call", str(path), "svc", "a", "--zookeeper", "127.0.0.1:1")
        assert (code, out) == (2, "")
        assert message in err.splitlines()[-1]


def test_call_refuses_an_idl_that_is_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.thrift"
    os.mkfifo(fifo)
    done = run_process("call", str(fifo), "svc", "a", "--instance", "127.0.0.1:1", timeout=30)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == (
        f"geventpool call: error: cannot read {fifo}: not a regular file"
    )


@pytest.mark.parametrize(("levels", "sent"), [(63, True), (64, False), (300, False)])
def test_call_arguments_nest_at_most_64_deep_with_the_arguments_struct(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], levels: int, sent: bool
) -> None:
    import thriftpy2  # noqa: PLC0415 - only this test loads an IDL of its own

    idl = tmp_path / "tree.thrift"
    idl.write_text("struct A { 1: B b }\nstruct B { 1: A a }\nservice S { i32 f(1: A a) }\n")
    tree = thriftpy2.load(str(idl), module_name="tree_thrift")
    received: list[Any] = []

    class Handler:
        def f(self, a: Any) -> int:
            received.append(a)
            return 0

    value: dict[str, Any] = {}  # ``levels`` structs, A inside B inside A ...
    for level in range(levels - 1, 0, -1):
        value = {"b" if level % 2 else "a": value}
    server = ThriftServer(tree.S, Handler(), host="127.0.0.1", port=0)
    server.start()
    try:
        argv = [
            "call",
            str(idl),
            "S",
            "f",
            json.dumps([value]),
            "--instance",
            f"127.0.0.1:{server.port}",
        ]
        code, out, err = run(capsys, *argv)
    finally:
        server.stop(drain_timeout=1.0)
    if sent:  # the arguments' struct and 63 levels: 64, what a receiver takes by default
        assert (code, out, err) == (0, "0\n", "")
        assert len(received) == 1
    else:
        assert (code, out) == (2, "") and received == []
        assert "nest at most 64 deep" in err.splitlines()[-1]


def test_call_of_a_service_without_instances_fails_with_exit_code_1(
    zk_hosts: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(capsys, zk_hosts, "add", "[1, 2]")
    assert (code, out) == (1, "")
    assert err == "geventpool call: NoInstancesError: no instance of 'echo' available\n"


def test_call_of_a_fixed_instance_from_the_module_entry_point(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers("--transport", "framed", "--protocol", "compact")  # not registered
    idl = tmp_path / "my-echo.thrift"  # a name thriftpy2 would not take as a module name
    idl.write_text(IDL.read_text())
    argv = ["call", str(idl), "echo", "echo", '["hi"]', "--instance", server.address]
    done = run_process(*argv, "--transport", "framed", "--protocol", "compact")
    assert (done.returncode, done.stdout, done.stderr) == (0, '"hi"\n', "")
    done = run_process(*argv)  # the wrong transport: the call fails on the wire
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("geventpool call: ") and done.stderr.count("\n") == 1


# -- values: JSON to Thrift and back, every type --------------------------------------------------


@pytest.fixture(scope="module")
def types_idl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import thriftpy2  # noqa: PLC0415 - only these tests load an IDL of their own

    path = tmp_path_factory.mktemp("idl") / "kinds.thrift"
    path.write_text(
        (REPO / "tests" / "idl" / "wire_types.thrift").read_text()
        + "enum Color { RED = 1, GREEN = 2 }\n"
        "struct Paint {\n"
        "  1: required Color color,\n"
        "  2: map<Color, double> mix,\n"
        "  3: map<Inner, string> named,\n"
        "  4: set<i16> sizes,\n"
        "  5: map<bool, binary> flags,\n"
        "}\n"
    )
    return thriftpy2.load(str(path), module_name="kinds_thrift")


def round_trip(cls: Any, value: dict[str, Any]) -> Any:
    return to_json(to_struct(value, cls), 12, cls)


def test_every_thrift_type_round_trips_through_json(types_idl: Any) -> None:
    outer = {
        "table": {"1": "AAEC/w=="},
        "groups": {"g": [{"a": 1, "s": "x", "flag": True, "ids": [1, 2**62]}]},
        "inners": [{"a": -5}],
        "tags": ["b", "a"],
        "d": "NaN",
        "b": -128,
        "h": 32767,
        "on": False,
        "m": {"7": 0.5, "-1": "Infinity"},
        "ll": [[1], [], [2, 3]],
        "one": {"s": "\u00e9"},
        "bits": [True, False],
    }
    back = round_trip(types_idl.Outer, outer)
    assert back == {**outer, "tags": ["a", "b"]}  # a set comes back sorted
    struct = to_struct(outer, types_idl.Outer)
    assert struct.table == {1: b"\x00\x01\x02\xff"} and struct.m[-1] == float("inf")

    paint = {
        "color": "GREEN",
        "mix": {"RED": 0.25, "2": 1.0},
        "named": [[{"a": 1}, "one"]],
        "sizes": [3, 1],
        "flags": {"true": "eA=="},
    }
    assert round_trip(types_idl.Paint, paint) == {
        "color": "GREEN",
        "mix": {"RED": 0.25, "GREEN": 1.0},
        "named": [[{"a": 1}, "one"]],  # struct keys: [key, value] pairs
        "sizes": [1, 3],
        "flags": {"true": "eA=="},
    }
    assert to_json(9, 8, types_idl.Color) == 9  # a number the IDL has no name for


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"color": "BLUE"}, "color: Color has no value 'BLUE' (its names: RED, GREEN)"),
        ({}, "Paint needs its required field 'color'"),
        ({"color": 1, "hue": 2}, "Paint has no field 'hue'"),
        ({"color": 1, "flags": {"true": "not base64!"}}, "binary values are base64"),
        ({"color": 1, "sizes": [1.5]}, "sizes[0]: expected an integer for i16, got the number"),
        ({"color": 1, "named": {"x": "y"}}, "a map with Inner keys is given as [[key, value]"),
        ({"color": None}, "color: null is not a value of Color"),
    ],
)
def test_values_that_do_not_fit_say_where_and_why(
    types_idl: Any, value: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        to_struct(value, types_idl.Paint)
    assert message in str(raised.value)


def test_a_bare_value_converts_by_its_type() -> None:
    assert to_thrift("aGk=", 18, None) == b"hi"
    assert to_thrift(3, 4, None) == 3.0 and isinstance(to_thrift(3, 4, None), float)
    assert to_json(b"hi", 18, None) == "aGk="


# -- check-config -------------------------------------------------------------------------------


def test_check_config_describes_the_shipped_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CONF_SECRETS.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "check-config", str(CONF))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{CONF}: valid"
    assert lines[1].startswith("zookeeper: 127.0.0.1:2181; sessions of 10s")
    assert any(line.startswith("service calc: instances under /geventpool/calc;") for line in lines)
    assert any("sent again after it may have run: add;" in line for line in lines)
    assert "  channel 2: smtp:smtp.example.com:587" in lines
    assert "  channel 3: webhook:slack:https://hooks.slack.com" in lines
    for secret in CONF_SECRETS.values():
        assert secret not in out  # a channel shows its scheme and host only

    code, out, _ = run(capsys, "check-config", str(CONF), "--json")
    described = json.loads(out)
    assert code == 0 and described["valid"] is True
    calc = described["services"]["calc"]
    assert calc["pool"]["max_connections"] == 10 and calc["retry"]["idempotent"] == ["add"]
    assert len(described["channels"]) == 5 and described["assumed_env"] == []


def test_check_config_without_secrets_from_the_module_entry_point() -> None:
    env = {name: "" for name in CONF_SECRETS}  # unset (empty counts as unset)
    done = run_process("check-config", str(CONF), env=env)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"{CONF}: invalid: alerts.channels[1].password: environment variable"
        " GEVENTPOOL_SMTP_PASSWORD is not set or empty\n"
    )
    done = run_process("check-config", str(CONF), "--without-secrets", env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == (
        f"secrets assumed (not set here): {', '.join(CONF_SECRETS)}"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[services.calc.pool]\nmax_conections = 3\n",
            "unknown key services.calc.pool.max_conections",
        ),
        ('[services.calc]\nbalancer = "fastest"\n', "services.calc: balancer must be one of"),
        ("[services.calc]\ncall_timeout = -1\n", "services.calc: call_timeout must be a positive"),
        ("[zookeeper\n", "is not valid TOML"),
        (
            '[zookeeper]\nhosts = "host:notaport"\n',
            "ZooKeeper hosts 'host:notaport': port must be an integer from 1 to 65535",
        ),
        (b"\xff\xfe garbage\n", "is not valid TOML: not UTF-8 text (byte 0 is b'\\xff')"),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "is not valid TOML: it nests too deeply"),
    ],
)
def test_check_config_of_a_broken_file_prints_the_error_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, message: str
) -> None:
    path = tmp_path / "broken.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out) == (1, "")
    assert err.startswith(f"{path}: invalid: ") and message in err
    code, out, _ = run(capsys, "check-config", str(path), "--json")
    report = json.loads(out)
    assert code == 1 and report["valid"] is False and message in report["error"]


# -- help, usage and the entry points -----------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[], ["services"], ["instances"], ["watch"], ["call"], ["check-config"]]
)
def test_every_command_has_help_and_exits_0(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert out.startswith(f"usage: geventpool {' '.join(command)}".rstrip())


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys)[0] == 2  # no command
    assert run(capsys, "instances")[0] == 2  # no SERVICE
    assert run(capsys, "watch", "echo", "--duration", "-1")[0] == 2
    code, _, err = run(capsys, "instances", "bad/name")
    assert code == 2 and "service name must be" in err


def test_python_m_geventpool_and_the_console_script_run_main() -> None:
    done = run_process("--help")
    assert done.returncode == 0
    assert "services" in done.stdout and "check-config" in done.stdout
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"geventpool": "geventpool.cli:main"}
    module, _, function = scripts["geventpool"].partition(":")
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    done = subprocess.run(
        [sys.executable, "-c", script, "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "geventpool 0.1.0\n")
