"""Locust scenarios for geventpool: steady load, exhaustion and alerting, failover, scale-up,
a ZooKeeper restart, and a distributed run; run them with ``loadtests/run.py``.

The scenario is ``$GEVENTPOOL_SCENARIO``; ``loadtests/run.py`` starts what it needs (ZooKeeper,
echo servers, alert receivers), acts on it mid-run (kills a server, adds one, restarts
ZooKeeper) and records what it did in ``$GEVENTPOOL_RUN/actions.jsonl``. At the end this file
judges the run: it writes ``verdict.json`` beside the actions and sets the exit code.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gevent
from locust import LoadTestShape, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from geventpool import events as geventpool_events
from geventpool.locust_user import ThriftUser, shared_clients
from geventpool.testing.echo import echo_thrift

SCENARIO = os.environ.get("GEVENTPOOL_SCENARIO", "steady")
RUN = Path(os.environ.get("GEVENTPOOL_RUN", "results/run"))
DELAY = float(os.environ.get("GEVENTPOOL_CALL_SECONDS", "0.01"))
PEAK_USERS = int(os.environ.get("GEVENTPOOL_PEAK_USERS", "40"))
PEAK_SECONDS = float(os.environ.get("GEVENTPOOL_PEAK_SECONDS", "5"))
TOTAL_SECONDS = float(os.environ.get("GEVENTPOOL_SECONDS", "12"))


class EchoUser(ThriftUser):
    """Calls ``slow_echo`` back to back (it sleeps ``$GEVENTPOOL_CALL_SECONDS`` server side)."""

    service = echo_thrift.Echo
    service_name = "echo"
    wait_time = constant(0)

    @task
    def slow_echo(self) -> None:
        self.client.slow_echo("x", DELAY)


if SCENARIO == "exhaustion":

    class PeakThenQuiet(LoadTestShape):
        """``PEAK_USERS`` users for ``PEAK_SECONDS``, then one user until the end."""

        def tick(self) -> tuple[int, float] | None:
            elapsed = self.get_run_time()  # type: ignore[no-untyped-call]
            if elapsed < PEAK_SECONDS:
                return PEAK_USERS, float(PEAK_USERS)
            if elapsed < TOTAL_SECONDS:
                return 1, float(PEAK_USERS)
            return None


# -- what this process sees (the processes that run users) -------------------------------------

seen: dict[str, Any] = {"first_seen": {}, "first_call": {}, "zookeeper": [], "exhausted": []}


def _record_event(event: str, level: str, fields: Mapping[str, Any]) -> None:
    if event == geventpool_events.ZOOKEEPER_STATE_CHANGED:
        seen["zookeeper"].append((time.time(), fields.get("state")))
    elif event == geventpool_events.POOL_EXHAUSTED:
        seen["exhausted"].append(time.time())


def _monitor() -> None:
    while True:
        now = time.time()
        for client in shared_clients():
            for instance in client.status().instances:
                seen["first_seen"].setdefault(instance.instance, now)
                if instance.checkouts:
                    seen["first_call"].setdefault(instance.instance, now)
        gevent.sleep(0.02)


geventpool_events.add_listener(_record_event)
reports: dict[str, dict[str, Any]] = {}


def _report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    """Each worker adds what its own client saw to every stats report it sends."""
    clients = shared_clients()
    data["geventpool"] = {
        "pid": os.getpid(),
        "sessions": [client.zookeeper_session for client in clients],
        "checkouts": sum(s.checkouts for c in clients for s in c.status().instances),
    }


def _collect(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if "geventpool" in data:
        reports[client_id] = data["geventpool"]  # the latest report of each worker


def _on_test_start(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        gevent.spawn(_monitor)
    if not isinstance(environment.runner, WorkerRunner):
        RUN.mkdir(parents=True, exist_ok=True)
        (RUN / "started").write_text(str(time.time()))


# -- the verdict (in the process that reports: the master, or the only one) --------------------


def _actions() -> list[dict[str, Any]]:
    path = RUN / "actions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _failures(environment: Environment) -> dict[str, int]:
    counts: dict[str, int] = {}
    for error in environment.stats.errors.values():
        counts[str(error.error)] = counts.get(str(error.error), 0) + error.occurrences
    return counts


def _final_view() -> set[str]:
    return {s.instance for c in shared_clients() for s in c.status().instances}


def _shares() -> dict[str, int]:
    return {s.instance: s.checkouts for c in shared_clients() for s in c.status().instances}


def _alerts_received() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with urllib.request.urlopen(os.environ["GEVENTPOOL_WEBHOOK_RECORDS"], timeout=5) as answer:
        hooks = [json.loads(r["body"]) for r in json.loads(answer.read())]
    folder = Path(os.environ["GEVENTPOOL_SMTP_FOLDER"])
    mails = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return hooks, mails


def judge_steady(environment: Environment) -> list[tuple[str, bool, str]]:
    shares = _shares()
    balance = max(shares.values()) / max(1, min(shares.values())) if shares else 0.0
    return [
        ("no failed call", not _failures(environment), str(_failures(environment))),
        ("three instances share the calls", len(shares) == 3 and balance < 1.5, f"{shares}"),
    ]


def judge_exhaustion(environment: Environment) -> list[tuple[str, bool, str]]:
    refused = _failures(environment).get("PoolExhaustedError", 0)
    hooks, mails = _alerts_received()
    told = [(h["status"], h["condition"]) for h in hooks]
    first_exhaustion = min(seen["exhausted"], default=float("inf"))
    firing = [h for h in hooks if h["condition"] == "pool_exhausted" and h["status"] == "firing"]
    delay = firing[0]["at_unix"] - first_exhaustion if firing else float("inf")
    subjects = [m["subject"] for m in mails]
    return [
        ("callers were refused with PoolExhaustedError", refused > 0, f"{refused} refused"),
        (
            "the webhook was told, then told it resolved",
            ("firing", "pool_exhausted") in told and ("resolved", "pool_exhausted") in told,
            f"{told}",
        ),
        ("the alert arrived within 5 s of the first exhaustion", delay <= 5.0, f"{delay:.1f} s"),
        (
            "the emails arrived: firing and resolved",
            "[geventpool] CRITICAL pool_exhausted: echo" in subjects
            and "[geventpool] RESOLVED pool_exhausted: echo" in subjects,
            f"{subjects}",
        ),
    ]


def judge_failover(environment: Environment) -> list[tuple[str, bool, str]]:
    killed = [a["instance"] for a in _actions() if a["action"] == "kill"]
    total = environment.stats.total
    ratio = total.num_failures / max(1, total.num_requests)
    view = _final_view()
    return [
        ("a server was killed mid-run", len(killed) == 1, f"{killed}"),
        (
            "no call failed (idempotent: those in flight were made again elsewhere)",
            total.num_failures == 0 and ratio == 0.0,
            f"{total.num_failures} of {total.num_requests}",
        ),
        (
            "the killed instance left the client's view",
            not set(killed) & view,
            f"view {sorted(view)}",
        ),
    ]


def judge_scale_up(environment: Environment) -> list[tuple[str, bool, str]]:
    added = [a["instance"] for a in _actions() if a["action"] == "add"]
    first_seen, first_call = seen["first_seen"], seen["first_call"]
    delays = [first_call.get(i, float("inf")) - first_seen.get(i, float("inf")) for i in added]
    return [
        ("a server was added mid-run", len(added) == 1, f"{added}"),
        (
            "it got calls within 1 s of joining the view",
            bool(delays) and max(delays) <= 1.0,
            f"{[round(d, 3) for d in delays]} s",
        ),
        ("no failed call", not _failures(environment), str(_failures(environment))),
    ]


def judge_zookeeper_restart(environment: Environment) -> list[tuple[str, bool, str]]:
    states = [state for _, state in seen["zookeeper"]]
    restarted = "SUSPENDED" in states and states[-1] == "CONNECTED"
    return [
        ("the client lost ZooKeeper and got it back", restarted, f"{states}"),
        ("no failed call", not _failures(environment), str(_failures(environment))),
    ]


def judge_distributed(environment: Environment) -> list[tuple[str, bool, str]]:
    workers = list(reports.values())
    pids = {w["pid"] for w in workers}
    sessions = {s for w in workers for s in w["sessions"]}
    return [
        ("two workers reported", len(workers) == 2, f"{workers}"),
        (
            "each worker had its own process, ZooKeeper session and calls",
            len(pids) == 2 and len(sessions) == 2 and all(w["checkouts"] for w in workers),
            "",
        ),
        ("no failed call", not _failures(environment), str(_failures(environment))),
    ]


JUDGES: dict[str, Callable[[Environment], list[tuple[str, bool, str]]]] = {
    "steady": judge_steady,
    "exhaustion": judge_exhaustion,
    "failover": judge_failover,
    "scale_up": judge_scale_up,
    "zookeeper_restart": judge_zookeeper_restart,
    "distributed": judge_distributed,
}


def _verdict(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    checks = [("calls were made", total.num_requests > 0, f"{total.num_requests} calls")]
    try:
        checks += JUDGES[SCENARIO](environment)
    except Exception as error:  # noqa: BLE001 - a broken judge fails the run, visibly
        checks.append(("the verdict could be computed", False, repr(error)))
    passed = all(ok for _, ok, _ in checks)
    RUN.mkdir(parents=True, exist_ok=True)
    (RUN / "verdict.json").write_text(
        json.dumps(
            {
                "scenario": SCENARIO,
                "passed": passed,
                "calls": total.num_requests,
                "failures": _failures(environment),
                "calls_per_second": round(total.total_rps, 1),
                "median_ms": total.median_response_time,
                "p99_ms": total.get_response_time_percentile(0.99),
                "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in checks],
            },
            indent=2,
        )
    )
    environment.process_exit_code = 0 if passed else 1


events.report_to_master.add_listener(_report)
events.worker_report.add_listener(_collect)
events.test_start.add_listener(_on_test_start)
events.quitting.add_listener(_verdict)
