"""Run geventpool's Locust scenarios, each on its own ZooKeeper, servers and receivers.

Usage: ``.venv/bin/python loadtests/run.py [--long] [--results DIR] [SCENARIO ...]``
(default: every scenario, short: about two minutes in all; ``--long`` runs each five times as
long). For each scenario it starts a ZooKeeper and three registered echo servers (and, for
exhaustion, a webhook receiver and an SMTP server), writes the geventpool configuration, runs
``locust --headless`` on ``loadtests/locustfile.py``, acts mid-run (kills a server, adds one,
restarts ZooKeeper) and stops everything. Locust's HTML report, CSV statistics and log, the
actions taken and the verdict land in ``results/<scenario>/``. Exits 0 only if every scenario
passed.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from geventpool.testing.http_receiver import HttpReceiver  # noqa: E402
from geventpool.testing.processes import (  # noqa: E402
    ServerProcess,
    start_registered_server,
)
from geventpool.testing.zookeeper import ZooKeeperServer  # noqa: E402

HERE = Path(__file__).resolve().parent
LOCUST = Path(sys.executable).with_name("locust")


@dataclass(frozen=True)
class Scenario:
    """One run: ``users`` for ``seconds``, ``actions`` at times after the test started."""

    name: str
    seconds: float
    users: int = 30
    actions: tuple[tuple[float, str], ...] = ()
    processes: int = 0
    server_session_timeout: float = 10.0
    env: dict[str, str] = field(default_factory=dict)
    pool: str = "max_connections = 10"
    retry: str = ""  # the [services.echo.retry] table's lines


SCENARIOS = (
    Scenario("steady", seconds=5),
    Scenario(
        "exhaustion",
        seconds=10,
        users=40,
        env={
            "GEVENTPOOL_CALL_SECONDS": "0.3",
            "GEVENTPOOL_PEAK_USERS": "40",
            "GEVENTPOOL_PEAK_SECONDS": "4",
        },
        pool="max_connections = 2\nmax_inflight = 4\npool_timeout = 0.1",  # 8 calls each
    ),
    # The users' calls are idempotent: those in flight on the killed server are made again.
    Scenario(
        "failover",
        seconds=9,
        actions=((2.0, "kill"),),
        server_session_timeout=2.0,
        retry="idempotent = true",
    ),
    Scenario("scale_up", seconds=6, actions=((2.0, "add"),)),
    # ZooKeeper (a JVM) may take several seconds to start again on a loaded machine: leave the
    # client time to reconnect after it is back (its reconnect back-off is at most 2 s).
    Scenario("zookeeper_restart", seconds=14, actions=((2.0, "restart_zookeeper"),)),
    Scenario("distributed", seconds=6, processes=2),
)


def config_toml(scenario: Scenario, hosts: str, webhook: str | None, smtp_port: int | None) -> str:
    """The geventpool configuration of one run."""
    text = f"""
[zookeeper]
hosts = "{hosts}"
session_timeout = 10.0

[services.echo]
call_timeout = 5.0
empty_protection = 0

[services.echo.pool]
{scenario.pool}
eject_after = 3
"""
    if scenario.retry:
        text += f"""
[services.echo.retry]
{scenario.retry}
"""
    if webhook and smtp_port:
        text += f"""
[alerts]
resolve_after = 2.0
repeat_interval = 0
tick = 0.1

[[alerts.channels]]
type = "log"

[[alerts.channels]]
type = "webhook"
preset = "json"
url = "{webhook}"

[[alerts.channels]]
type = "smtp"
host = "127.0.0.1"
port = {smtp_port}
security = "none"
sender = "geventpool@loadtest.invalid"
recipients = ["oncall@loadtest.invalid"]
"""
    return text


def run(scenario: Scenario, results: Path, scale: float) -> dict[str, Any]:
    """Run one scenario; its verdict (with ``passed``) as the locustfile wrote it."""
    folder = results / scenario.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    seconds = scenario.seconds * scale
    with ExitStack() as stack:
        zookeeper = ZooKeeperServer(folder / "zookeeper")
        stack.callback(zookeeper.stop)
        zookeeper.start()

        def start_server() -> ServerProcess:
            return start_registered_server(
                stack, zookeeper.hosts, folder / "servers.log", scenario.server_session_timeout
            )

        servers = [start_server() for _ in range(3)]
        env = {
            **os.environ,
            **scenario.env,
            "GEVENTPOOL_SCENARIO": scenario.name,
            "GEVENTPOOL_RUN": str(folder),
            "GEVENTPOOL_SECONDS": str(seconds),
            "GEVENTPOOL_CONFIG": str(folder / "geventpool.toml"),
        }
        webhook = smtp_port = None
        if scenario.name == "exhaustion":
            receiver = HttpReceiver().start()
            stack.callback(receiver.stop)
            webhook = receiver.url("/alerts")
            smtp_port, mail = start_smtp(folder / "mail", stack)
            env |= {
                "GEVENTPOOL_WEBHOOK_RECORDS": receiver.url("/_requests"),
                "GEVENTPOOL_SMTP_FOLDER": str(mail),
            }
            peak = float(scenario.env["GEVENTPOOL_PEAK_SECONDS"]) * scale
            env["GEVENTPOOL_PEAK_SECONDS"] = str(peak)
        (folder / "geventpool.toml").write_text(
            config_toml(scenario, zookeeper.hosts, webhook, smtp_port)
        )

        command = [
            str(LOCUST),
            "-f",
            str(HERE / "locustfile.py"),
            "--headless",
            "--only-summary",
            "--csv",
            str(folder / "stats"),
            "--html",
            str(folder / "report.html"),
            "--stop-timeout",
            "3",
            "--loglevel",
            "WARNING",
            "--run-time",
            f"{seconds:g}s",
        ]
        if scenario.name != "exhaustion":
            command += ["--users", str(scenario.users), "--spawn-rate", str(scenario.users)]
        if scenario.processes:
            command += ["--processes", str(scenario.processes)]
        log = (folder / "locust.log").open("wb")
        stack.callback(log.close)
        locust = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
        stack.callback(stop_process, locust)

        started = wait_started(folder / "started", locust)
        for at, action in scenario.actions:
            gevent.sleep(max(0.0, started + at * scale - time.time()))
            record = act(action, servers, zookeeper, start_server)
            with (folder / "actions.jsonl").open("a") as actions:
                actions.write(json.dumps({"at": time.time(), "action": action, **record}) + "\n")
        try:
            code = locust.wait(timeout=seconds + 90)
        except subprocess.TimeoutExpired:
            code = -1
    verdict_file = folder / "verdict.json"
    verdict: dict[str, Any] = (
        json.loads(verdict_file.read_text())
        if verdict_file.exists()
        else {"passed": False, "checks": []}
    )
    verdict["exit_code"] = code
    verdict["passed"] = bool(verdict.get("passed")) and code == 0
    return verdict


def start_smtp(folder: Path, stack: ExitStack) -> tuple[int, Path]:
    process = subprocess.Popen(
        [sys.executable, "-m", "geventpool.testing.smtp_receiver", "--folder", str(folder)],
        stdout=subprocess.PIPE,
    )
    stack.callback(stop_process, process)
    assert process.stdout is not None
    with gevent.Timeout(20):
        port = int(json.loads(process.stdout.readline())["port"])
    return port, folder


def wait_started(marker: Path, locust: subprocess.Popen[bytes]) -> float:
    with gevent.Timeout(60, RuntimeError("locust did not start its test in 60 s")):
        while not marker.exists():
            if locust.poll() is not None:
                raise RuntimeError(f"locust exited early with {locust.returncode}")
            gevent.sleep(0.05)
    return float(marker.read_text())


def act(
    action: str, servers: list[ServerProcess], zookeeper: ZooKeeperServer, start_server: Any
) -> dict[str, Any]:
    if action == "kill":
        servers[0].kill()
        return {"instance": servers[0].address}
    if action == "add":
        server = start_server()
        servers.append(server)
        return {"instance": server.address}
    if action == "restart_zookeeper":
        zookeeper.stop()
        zookeeper.start()
        return {"hosts": zookeeper.hosts}
    raise ValueError(action)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenarios", nargs="*", choices=[[]] + [s.name for s in SCENARIOS], default=[]
    )
    parser.add_argument("--long", action="store_true", help="five times as long")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if not args.scenarios or s.name in args.scenarios]
    outcomes = []
    for scenario in chosen:
        started = time.monotonic()
        verdict = run(scenario, args.results.resolve(), 5.0 if args.long else 1.0)
        outcomes.append(verdict)
        mark = "PASS" if verdict["passed"] else "FAIL"
        took = time.monotonic() - started
        median = round(float(verdict.get("median_ms") or 0), 1)
        print(
            f"{mark} {scenario.name:18s} {took:5.1f}s  calls {verdict.get('calls', 0):6d}"
            f"  {verdict.get('calls_per_second', 0):7.1f}/s  median {median} ms"
            f"  p99 {verdict.get('p99_ms')} ms  failures {verdict.get('failures', {})}",
            flush=True,
        )
        for check in verdict.get("checks", []):
            print(
                f"     {'ok ' if check['ok'] else 'NO '} {check['check']}: {check['detail']}",
                flush=True,
            )
    passed = sum(1 for o in outcomes if o["passed"])
    print(f"scenarios: {passed} passed, {len(outcomes) - passed} failed")
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
