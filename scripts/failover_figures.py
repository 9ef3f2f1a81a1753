"""Failover figures: what a dying, frozen, slow or missing instance costs the callers.

Each scenario starts its own three echo servers (registered in a ZooKeeper this script starts)
and drives them through one ServiceClient with 100 greenlets making idempotent calls
(``Retry(idempotent=True, attempt_timeout=1.0)``, the default retry budget):

* **SIGKILL** one of three under load: failed calls, retries, how fast it was ejected;
* **SIGSTOP** one of three for 5 s: failed calls, ``PoolExhaustedError``, retries;
* **one instance 10x slower** (20 ms against 2 ms, static instances, 20 callers): its share
  of the calls and the p99 latency, ``peak_ewma`` against ``round_robin``;
* **flapping**: one of two instances has its connections cut every 100 ms: failed calls and
  connects per second to it;
* **total outage**: every instance SIGKILLed: retries sent per failed call (the budget
  bounds them).

``python scripts/failover_figures.py [--out docs/benchmarks/failover.md]`` prints the
figures as JSON and writes them as a Markdown table.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import structlog  # noqa: E402

from geventpool.client.pool import PoolSettings  # noqa: E402
from geventpool.client.retrying import Retry  # noqa: E402
from geventpool.client.service import ServiceClient  # noqa: E402
from geventpool.discovery.instance import Instance  # noqa: E402
from geventpool.testing.echo import echo_thrift  # noqa: E402
from geventpool.testing.faults import TcpProxy  # noqa: E402
from geventpool.testing.processes import ServerProcess  # noqa: E402
from geventpool.testing.zookeeper import ZooKeeperServer  # noqa: E402

CALLERS = 100
SLOW_CALLERS = 20


class Load:
    """``CALLERS`` greenlets calling ``whoami`` until stopped; every outcome counted."""

    def __init__(self, client: ServiceClient, callers: int = CALLERS) -> None:
        self.client = client
        self.callers = callers
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.took: list[float] = []
        self.share: Counter[str] = Counter()
        self._greenlets: list[gevent.Greenlet] = []

    def start(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self._greenlets = [gevent.spawn(self._loop, end) for _ in range(self.callers)]

    def _loop(self, end: float) -> None:
        while time.monotonic() < end:
            began = time.perf_counter()
            try:
                self.share[self.client.whoami()] += 1
                self.ok += 1
                self.took.append(time.perf_counter() - began)
            except Exception as error:  # noqa: BLE001 - every failure is a figure
                self.failed[type(error).__name__] += 1
                gevent.sleep(0.01)

    def join(self) -> None:
        gevent.joinall(self._greenlets, timeout=60)
        gevent.killall(self._greenlets)

    def p99_ms(self) -> float:
        took = sorted(self.took)
        return round(took[int(len(took) * 0.99)] * 1000, 1) if took else 0.0


def registered_client(hosts: str, **options: Any) -> ServiceClient:
    return ServiceClient(
        echo_thrift.Echo,
        "echo",
        zookeeper=hosts,
        pool=PoolSettings(max_connections=4, eject_after=3),
        retry=Retry(idempotent=True, attempt_timeout=1.0),
        call_timeout=5.0,
        **options,
    )


def fleet(stack: ExitStack, hosts: str, folder: Path, *args: str) -> list[ServerProcess]:
    servers = []
    for _ in range(3):
        process = ServerProcess(
            ["--zookeeper", hosts, "--session-timeout", "10", *args],
            log_path=folder / "servers.log",
        )
        stack.callback(process.kill)
        servers.append(process.start())
    return servers


def under_fault(hosts: str, folder: Path, fault: str) -> dict[str, Any]:
    with ExitStack() as stack:
        servers = fleet(stack, hosts, folder, "--latency", "0.005")
        client = registered_client(hosts)
        client.start()
        stack.callback(client.stop)
        assert client._membership is not None  # noqa: SLF001 - a benchmark reaches in
        client._membership.wait_for(lambda view: len(view) == 3, 10)  # noqa: SLF001
        load = Load(client)
        load.start(8.0)
        gevent.sleep(1.5)
        victim = servers[0]
        began = time.monotonic()
        ejected_after = None
        if fault == "sigkill":
            victim.kill()
        else:
            victim.signal(signal.SIGSTOP)
        while time.monotonic() - began < 5.0:
            if ejected_after is None and any(s.ejected for s in client.status().instances):
                ejected_after = time.monotonic() - began
            gevent.sleep(0.01)
        if fault == "sigstop":
            victim.signal(signal.SIGCONT)
        load.join()
        status = client.status()
        return {
            "fault": fault,
            "calls": load.ok + sum(load.failed.values()),
            "failed": dict(load.failed),
            "exhausted": status.exhausted,
            "retries": status.retries,
            "ejected_after_ms": round(ejected_after * 1000) if ejected_after else None,
            "p99_ms": load.p99_ms(),
        }


def slow_instance(folder: Path) -> list[dict[str, Any]]:
    rows = []
    with ExitStack() as stack:
        fast, slow = (
            ServerProcess(["--latency", latency], log_path=folder / "slow.log")
            for latency in ("0.002", "0.02")
        )
        for process in (fast, slow):
            stack.callback(process.kill)
            process.start()
        instances = [Instance("127.0.0.1", p.port or 0) for p in (fast, slow)]
        for balancer in ("peak_ewma", "round_robin"):
            client = ServiceClient(
                echo_thrift.Echo,
                "echo",
                instances=instances,
                pool=PoolSettings(max_connections=50),
                balancer=balancer,
            )
            client.start()
            load = Load(client, SLOW_CALLERS)  # fewer than the connections: balancing decides
            load.start(4.0)
            load.join()
            client.stop()
            total = sum(load.share.values()) or 1
            rows.append(
                {
                    "balancer": balancer,
                    "slow_share": round(load.share[slow.address] / total, 3),
                    "calls": load.ok,
                    "p99_ms": load.p99_ms(),
                }
            )
    return rows


def flapping(folder: Path) -> dict[str, Any]:
    """One of two instances has its connections cut every 100 ms for 6 s."""
    with ExitStack() as stack:
        servers = []
        for _ in range(2):
            process = ServerProcess(["--latency", "0.005"], log_path=folder / "flap.log")
            stack.callback(process.kill)
            servers.append(process.start())
        proxy = TcpProxy(("127.0.0.1", servers[0].port or 0))
        proxy.start()
        stack.callback(proxy.stop)
        client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            instances=[
                Instance("127.0.0.1", proxy.port),
                Instance("127.0.0.1", servers[1].port or 0),
            ],
            pool=PoolSettings(max_connections=50, eject_after=3),
            retry=Retry(idempotent=True),
        )
        client.start()
        stack.callback(client.stop)

        def flap() -> None:
            while True:
                gevent.sleep(0.1)
                proxy.drop()

        flapper = gevent.spawn(flap)
        stack.callback(flapper.kill)
        load = Load(client)
        load.start(6.0)
        load.join()
        status = client.status()
        return {
            "calls": load.ok + sum(load.failed.values()),
            "failed": dict(load.failed),
            "connects_per_second": round(proxy.accepted / 6.0, 1),
            "ejections": next(s.ejections for s in status.instances if s.instance == proxy.address),
            "retries": status.retries,
        }


def total_outage(hosts: str, folder: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        servers = fleet(stack, hosts, folder)
        client = registered_client(hosts, empty_protection=30.0)
        client.start()
        stack.callback(client.stop)
        assert client._membership is not None  # noqa: SLF001
        client._membership.wait_for(lambda view: len(view) == 3, 10)  # noqa: SLF001
        load = Load(client)
        load.start(4.0)
        gevent.sleep(1.0)
        ok_before, retries_before = load.ok, client.status().retries
        for server in servers:
            server.kill()
        load.join()
        status = client.status()
        failed = sum(load.failed.values())
        retries = status.retries - retries_before
        return {
            "calls_before": ok_before,
            "failed_calls": failed,
            "retries": retries,
            "retries_per_failed_call": round(retries / failed, 3) if failed else 0.0,
            "budget_refused": status.retries_refused,
            "failed_by_type": dict(load.failed),
        }


def failover_figures() -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    with tempfile.TemporaryDirectory(prefix="geventpool-failover-") as temporary:
        folder = Path(temporary)
        zookeeper = ZooKeeperServer(folder / "zk")
        zookeeper.start()
        try:
            return {
                "sigkill": under_fault(zookeeper.hosts, folder, "sigkill"),
                "sigstop": under_fault(zookeeper.hosts, folder, "sigstop"),
                "slow_instance": slow_instance(folder),
                "flapping": flapping(folder),
                "total_outage": total_outage(zookeeper.hosts, folder),
            }
        finally:
            zookeeper.stop()


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## Failover (`scripts/failover_figures.py`)",
        "",
        f"{CALLERS} greenlets making idempotent calls (`Retry(idempotent=True,"
        " attempt_timeout=1.0)`, default retry budget) through one client of three registered"
        " servers (5 ms per call), 8 s per run.",
        "",
        "| fault | calls | failed | `PoolExhaustedError` | retries | ejected after | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in (("sigkill", "SIGKILL one of three"), ("sigstop", "SIGSTOP one for 5 s")):
        row = figures[key]
        failed = sum(row["failed"].values())
        lines.append(
            f"| {label} | {row['calls']:,} | {failed} {row['failed'] or ''} | {row['exhausted']}"
            f" | {row['retries']} | {row['ejected_after_ms']} ms | {row['p99_ms']} ms |"
        )
    lines += [
        "",
        f"One instance 10x slower (20 ms against 2 ms), static instances, {SLOW_CALLERS}"
        " callers (fewer than the connections, so that the balancer decides; with more, the"
        " service-wide waiting queue hands each free connection to the oldest waiter):",
        "",
        "| balancer | slow instance's share | calls | p99 |",
        "|---|---|---|---|",
    ]
    for row in figures["slow_instance"]:
        lines.append(
            f"| `{row['balancer']}` | {row['slow_share']:.1%} | {row['calls']:,}"
            f" | {row['p99_ms']} ms |"
        )
    flap = figures["flapping"]
    lines += [
        "",
        "An instance whose connections are cut every 100 ms for 6 s (one of two, static):"
        f" {flap['calls']:,} calls, {sum(flap['failed'].values())} failed, {flap['retries']}"
        f" retried, {flap['connects_per_second']} connects/s to it, ejected"
        f" {flap['ejections']} times.",
    ]
    outage = figures["total_outage"]
    lines += [
        "",
        f"Total outage (every instance SIGKILLed under load): {outage['failed_calls']:,}"
        f" failed calls, {outage['retries']} retries sent"
        f" ({outage['retries_per_failed_call']} per failed call), {outage['budget_refused']}"
        " retries refused by the budget.",
        "",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/failover.md"))
    args = parser.parse_args()
    figures = failover_figures()
    title, *rest = markdown(figures)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = (
        f"Measured {when} on {os.cpu_count()} cores."
        " Reproduce: `.venv/bin/python scripts/failover_figures.py`."
    )
    args.out.write_text("\n".join([title.replace("## ", "# "), "", measured, *rest]))
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
