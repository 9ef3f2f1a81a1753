"""The geventpool demo: one client, many greenlets, servers dying and joining, live.

Run through ``scripts/demo.sh`` (which sets everything up first). It starts its own ZooKeeper
and three echo servers that register themselves, then drives them through one ServiceClient
with 60 greenlets for about 12 seconds while it:

* SIGKILLs a server (its calls in flight are made again elsewhere: they are idempotent; it is
  ejected at once, long before ZooKeeper's session timeout removes it),
* starts a new server (it gets calls as soon as it registers, ramping up over slow start),
* SIGSTOPs a server for 3 s (its calls are cut by the attempt timeout and made again
  elsewhere, callers waiting for it are served by the others, it is ejected as unresponsive
  and an alert says so; SIGCONT brings it back),
* floods the client with 200 slow callers (the pools are exhausted: PoolExhaustedError, a
  pool_exhausted event, and an alert to the operators' webhook, resolved once the flood ends),

printing once a second the calls per second and the connections they share (the client
pipelines: the servers advertise out-of-order replies), errors by type, each instance's share
and pool state; its status page (live instances and pools, Prometheus metrics) is served on
127.0.0.1 while it runs, and the summary reads the metrics from it. Everything it started is
stopped at the end, also on Ctrl-C or failure, and a summary is printed. Exits 0 when the run
behaved as designed: no call of the steady callers failed through the kill and the freeze
(only the flood may be refused), and the alerts fired and resolved.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections import Counter  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import structlog  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from geventpool.alerts.alerter import Alerter  # noqa: E402
from geventpool.alerts.channels import WebhookChannel  # noqa: E402
from geventpool.alerts.policy import AlertSettings  # noqa: E402
from geventpool.client.pool import PoolSettings  # noqa: E402
from geventpool.client.retrying import Retry  # noqa: E402
from geventpool.client.service import ServiceClient  # noqa: E402
from geventpool.errors import GeventPoolError  # noqa: E402
from geventpool.observe.prometheus import ClientMetrics  # noqa: E402
from geventpool.observe.status import serve_status  # noqa: E402
from geventpool.secret import Secret  # noqa: E402
from geventpool.testing.echo import echo_thrift  # noqa: E402
from geventpool.testing.http_receiver import HttpReceiver  # noqa: E402
from geventpool.testing.processes import ServerProcess  # noqa: E402
from geventpool.testing.zookeeper import ZooKeeperServer  # noqa: E402

SESSION_TIMEOUT = 6.0
CALLERS = 60
FLOOD = 200
STARTED = time.monotonic()


def clock() -> float:
    return time.monotonic() - STARTED


def say(message: str) -> None:
    print(f"[{clock():5.1f}s] {message}", flush=True)


class Tally:
    """Calls and errors, per second and in all."""

    def __init__(self) -> None:
        self.ok = 0
        self.total_ok = 0
        self.errors: Counter[str] = Counter()
        self.total_errors: Counter[str] = Counter()
        self.share: Counter[str] = Counter()
        self.first_call: dict[str, float] = {}
        self.steady_failures: Counter[str] = Counter()  # of the steady callers, by type

    def success(self, instance: str) -> None:
        self.ok += 1
        self.share[instance] += 1
        self.first_call.setdefault(instance, clock())

    def failure(self, error: Exception) -> None:
        self.errors[type(error).__name__] += 1

    def roll(self) -> tuple[int, Counter[str], Counter[str]]:
        ok, errors, share = self.ok, self.errors, self.share
        self.total_ok += ok
        self.total_errors += errors
        self.ok, self.errors, self.share = 0, Counter(), Counter()
        return ok, errors, share


def one_call(client: ServiceClient, tally: Tally, seconds: float) -> None:
    """One of the flood's slow calls, on a borrowed connection (never retried)."""
    try:
        with client.connection() as connection:
            connection.slow_echo("x", seconds)
            tally.success(str(connection.instance))
    except GeventPoolError as error:
        tally.failure(error)


def caller(client: ServiceClient, tally: Tally) -> None:
    """A steady caller: idempotent calls (whoami takes 10 ms on these servers), retried by
    the client's Retry when an instance dies or freezes under them."""
    while True:
        try:
            tally.success(client.whoami())
        except GeventPoolError as error:
            tally.failure(error)
            tally.steady_failures[type(error).__name__] += 1
            gevent.sleep(0.01)


def report(client: ServiceClient, tally: Tally) -> None:
    while True:
        gevent.sleep(1.0)
        ok, errors, share = tally.roll()
        total = sum(share.values()) or 1
        shares = " ".join(
            f"{name.rsplit(':', 1)[1]}:{100 * n // total}%" for name, n in sorted(share.items())
        )
        status = client.status().instances
        pools = " ".join(
            f"{s.instance.rsplit(':', 1)[1]}[{s.in_use} calls on {s.held + s.idle} conns {s.state}]"
            for s in status
        )
        connections = sum(s.held + s.idle for s in status)
        failed = ", ".join(f"{name} {n}" for name, n in errors.items()) or "none"
        say(
            f"{ok:5d} calls/s on {connections} connections | errors: {failed}"
            f" | share {shares} | pools {pools}"
        )


def show_alerts(webhook: HttpReceiver) -> None:
    seen = 0
    while True:
        gevent.sleep(0.05)
        for request in webhook.requests[seen:]:
            say(f"ALERT delivered: {request.json()['summary']}")
        seen = len(webhook.requests)


def metric_totals(text: str) -> dict[str, Any]:
    """From a scrape: attempts by outcome, ejections and exhausted calls, summed."""
    totals: dict[str, Any] = {"calls": Counter()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "geventpool_client_calls_total":
                totals["calls"][sample.labels["outcome"]] += int(sample.value)
            elif sample.name in (
                "geventpool_client_ejections_total",
                "geventpool_client_exhausted_total",
            ):
                key = sample.name.split("_")[2]
                totals[key] = totals.get(key, 0.0) + sample.value
    totals["calls"] = dict(totals["calls"])
    return totals


def main() -> int:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(30),  # warnings and errors only
    )
    tally = Tally()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="geventpool-demo-")))
        zookeeper = ZooKeeperServer(folder / "zookeeper")
        stack.callback(zookeeper.stop)
        zookeeper.start()
        say(f"ZooKeeper serving on {zookeeper.hosts}")

        def start_server() -> ServerProcess:
            process = ServerProcess(
                [
                    "--zookeeper",
                    zookeeper.hosts,
                    "--session-timeout",
                    str(SESSION_TIMEOUT),
                    "--latency",
                    "0.01",
                ],
                log_path=folder / "servers.log",
            )
            stack.callback(process.kill)
            return process.start()

        servers = [start_server() for _ in range(3)]
        say(f"three echo servers registered: {', '.join(s.address for s in servers)}")

        webhook = HttpReceiver().start()  # stands in for the operators' chat or pager
        stack.callback(webhook.stop)
        alerter = Alerter(
            [WebhookChannel(Secret(webhook.url("/alerts")), "json")],
            AlertSettings(resolve_after=2.0, tick=0.1),
        ).start()
        stack.callback(alerter.stop)
        workers_alerts = gevent.spawn(show_alerts, webhook)
        stack.callback(workers_alerts.kill)
        say(f"alerts go to a webhook at {webhook.url('/alerts')}")

        client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            zookeeper=zookeeper.hosts,
            # Pipelined (the servers advertise out-of-order replies): 2 connections per
            # instance carry 16 calls each, so the flood below exhausts them.
            pool=PoolSettings(max_connections=2, max_inflight=16, pool_timeout=0.2, eject_after=3),
            # whoami() is idempotent: made again elsewhere if an instance dies or freezes
            # under it, an attempt cut after 0.5 s.
            retry=Retry(idempotent={"whoami"}, attempt_timeout=0.5),
        )
        client.start()
        stack.callback(client.stop)
        registry = CollectorRegistry()
        ClientMetrics(registry).watch(client)
        status_page = serve_status(clients=[client], registry=registry)
        stack.callback(status_page.stop)
        page = f"http://127.0.0.1:{status_page.server_port}"
        say(f"status page at {page}/ (JSON at /status, Prometheus metrics at /metrics)")
        say(f"client sees {len(client.status().instances)} instances; {CALLERS} callers start")
        workers = [gevent.spawn(caller, client, tally) for _ in range(CALLERS)]
        workers.append(gevent.spawn(report, client, tally))
        stack.callback(gevent.killall, workers)

        gevent.sleep(2.5)
        victim = servers[0]
        killed_at = clock()
        victim.kill()
        say(
            f"SIGKILL {victim.address}"
            f" (its znode stays until its {SESSION_TIMEOUT:.0f}s session ends)"
        )
        while not any(s.ejected for s in client.status().instances) and clock() < killed_at + 5:
            gevent.sleep(0.01)
        ejected_after = clock() - killed_at
        say(f"{victim.address} ejected by the client {ejected_after * 1000:.0f} ms after the kill")

        gevent.sleep(2.0)
        newcomer = start_server()
        joined_at = clock()
        say(f"new server {newcomer.address} registered")

        gevent.sleep(2.0)
        frozen = servers[1]
        frozen.signal(signal.SIGSTOP)
        say(f"SIGSTOP {frozen.address}: it takes connections and answers nothing for 3 s")
        gevent.sleep(3.0)
        frozen.signal(signal.SIGCONT)
        say(f"SIGCONT {frozen.address}")
        gevent.sleep(2.0)
        steady_failures = dict(tally.steady_failures)  # through the kill and the freeze
        slots = sum(s.max_connections * s.max_inflight for s in client.status().instances)
        say(
            f"{FLOOD} slow callers arrive: more than the {slots} call slots"
            " (connections times max_inflight)"
        )
        flood = [gevent.spawn(one_call, client, tally, 0.3) for _ in range(FLOOD)]
        gevent.joinall(flood)
        say("the flood is over")
        gevent.sleep(3.0)
        gevent.killall(workers)  # callers first, so that stopping servers fails no call
        final = client.status()
        alerts = [request.json() for request in webhook.requests]
        with urllib.request.urlopen(f"{page}/metrics", timeout=10) as answer:
            scraped = metric_totals(answer.read().decode())

    print("\nsummary")
    print(f"  successful calls: {tally.total_ok}")
    print(
        "  failed calls of the steady callers through the SIGKILL and the SIGSTOP:"
        f" {steady_failures or 'none'}"
    )
    print(f"  failed calls by type, the flood included: {dict(tally.total_errors) or 'none'}")
    print(f"  killed server ejected after: {ejected_after * 1000:.0f} ms")
    first = tally.first_call.get(newcomer.address)
    print(
        f"  new server's first call: {(first - joined_at) * 1000:.0f} ms after it registered"
        if first
        else "  new server got no call"
    )
    print(f"  calls refused as exhausted: {final.exhausted}")
    told = [(a["status"], a["condition"]) for a in alerts]
    print(f"  alerts delivered to the webhook: {told}")
    print(
        "  scraped from the status endpoint: attempts by outcome (instances still in view)"
        f" {scraped.get('calls', {})}, ejections {scraped.get('ejections', 0):.0f},"
        f" exhausted {scraped.get('exhausted', 0):.0f}"
    )
    print("  everything the demo started is stopped")
    behaved = (
        tally.total_ok > 0
        and first is not None
        and final.exhausted > 0
        and ejected_after < 5
        and not steady_failures
        and set(tally.total_errors) <= {"PoolExhaustedError"}
        and ("firing", "pool_exhausted") in told
        and ("resolved", "pool_exhausted") in told
        and ("firing", "instance_unresponsive") in told
        and scraped.get("exhausted") == final.exhausted
    )
    print(f"  verdict: {'as designed' if behaved else 'NOT as designed'}")
    return 0 if behaved else 1


if __name__ == "__main__":
    sys.exit(main())
