"""The command line against a real ZooKeeper and real servers: a registry holding a registered
echo server process, a Curator and a Finagle child pointing at it, and one rejected child
(port 70000). Some tests run the CLI in a subprocess (``python -m geventpool``: the entry
point itself), the others call ``main()`` in-process."""

from __future__ import annotations

import json
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import subprocess
from kazoo.client import KazooClient

from geventpool.cli import main
from geventpool.cli.values import to_json, to_struct, to_thrift
from geventpool.testing.echo import IDL
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


def run_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m geventpool ARGV`` in a subprocess, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "geventpool", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


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

    newcomer = servers("--zookeeper", registry.hosts)
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "[2, "], "JSON_ARGS is not valid JSON: Expecting value"),
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
    for path, message in [
        (tmp_path / "missing.thrift", "cannot read"),
        (two, "the IDL declares several services (A, B): choose one with --thrift-service"),
        (broken, "is not a valid IDL"),
    ]:
        code, out, err = run(capsys, "call", str(path), "svc", "a", "--zookeeper", "127.0.0.1:1")
        assert (code, out) == (2, "")
        assert message in err.splitlines()[-1]


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
    ],
)
def test_check_config_of_a_broken_file_prints_the_error_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
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
