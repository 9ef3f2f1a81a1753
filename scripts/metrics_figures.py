"""What watching calls costs, and a scrape of every metric family during a load run.

Usage: ``.venv/bin/python scripts/metrics_figures.py [--quick] [--out docs/benchmarks]``

1. **Cost per call** of the observer hook and the Prometheus metrics, on the client and on
   the server, with no network: the client's whole call path (checkout, the hook, release)
   around a connection that answers at once, and the server's dispatch of a decoded request
   to a handler that returns at once. Each variant (no observer, a no-op observer, the
   metrics) runs in turn, interleaved A B C A B C ..., timed by this thread's CPU time (other
   processes' noise mostly stays out of it), and the figure is the median over the rounds of
   (variant - no observer) per call, in microseconds, with the smallest.
2. **A scrape during a load run**: a ZooKeeper of its own, two registered echo servers
   watched by ``ServerMetrics``, one registered child with a bad payload, a client watched by
   ``ClientMetrics``, bounded caller greenlets making calls (some slow, some refused, some
   timing out) while ``/metrics`` of the status endpoint is read over HTTP; the scrape is kept
   in ``<out>/metrics_scrape.txt`` and every family named in docs/operations.md is checked
   present.

Results go to ``<out>/metrics.md``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import structlog  # noqa: E402
from benchmark import fake_connections  # noqa: E402 - beside this script
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from geventpool.client.connection import Connection  # noqa: E402
from geventpool.client.pool import PoolSettings  # noqa: E402
from geventpool.client.retrying import Retry  # noqa: E402
from geventpool.client.service import ServiceClient  # noqa: E402
from geventpool.discovery.instance import Instance  # noqa: E402
from geventpool.discovery.zk import connect  # noqa: E402
from geventpool.observe.prometheus import ClientMetrics, ServerMetrics  # noqa: E402
from geventpool.observe.status import serve_status  # noqa: E402
from geventpool.server.thrift_server import Registration, ThriftServer, _Connection  # noqa: E402
from geventpool.testing.echo import EchoHandler, echo_thrift  # noqa: E402
from geventpool.testing.zookeeper import ZooKeeperServer  # noqa: E402
from geventpool.wire.messages import CALL, MessageCodec  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


class Nothing:
    """An observer that records nothing: the hook's own cost."""

    observes_starts = False

    def attempt_started(self, *args: Any) -> None:
        pass

    def attempt_ended(self, *args: Any) -> None:
        pass

    call_started = attempt_started
    call_ended = attempt_ended


def _answered(
    connection: Any, method: str, args: Any, kwargs: Any, deadline: float, *, started: Any = None
) -> Any:
    """A call answered at once: its first argument."""
    return args[0]


def client_variant(
    observers: list[Any], connect: Callable[..., Connection]
) -> Callable[[int], float]:
    """A client whose every pool answers at once (on connections from ``connect``):
    ``run(n)`` makes n calls and returns the seconds they took."""
    client = ServiceClient(
        echo_thrift.Echo,
        "bench",
        instances=[Instance("127.0.0.1", 1 + n) for n in range(3)],
        pool=PoolSettings(max_connections=4, pool_timeout=600.0, reap_interval=600.0),
        observers=observers,
    )
    client.start()
    for pool in client._pools.values():  # noqa: SLF001 - a benchmark reaches in on purpose
        pool.call = _answered  # type: ignore[method-assign]
        pool._connect = connect  # noqa: SLF001
    echo = client.echo

    def run(calls: int) -> float:
        began = time.thread_time()
        for _ in range(calls):
            echo("x")
        return time.thread_time() - began

    run(100)  # open the connections
    return run


def server_variant(observers: list[Any]) -> Callable[[int], float]:
    """A server's dispatch of one decoded echo request: ``run(n)`` answers it n times."""
    server = ThriftServer(echo_thrift.Echo, EchoHandler("bench"), observers=observers)
    dispatcher = server._dispatcher  # noqa: SLF001
    codec = MessageCodec("buffered", "binary")
    request = codec.encode("echo", CALL, 1, echo_thrift.Echo.echo_args(msg="x"))
    name, _, seqid, body, _, values = codec.split(
        bytearray(request), dispatcher.expect, lambda n: 0, lambda: None
    )
    connection = _Connection(None)  # type: ignore[arg-type]

    def run(calls: int) -> float:
        began = time.thread_time()
        for _ in range(calls):
            dispatcher.answer(codec, name, seqid, body, values, connection)
        return time.thread_time() - began

    return run


def interleaved(
    variants: dict[str, Callable[[int], float]], calls: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Per variant: the median and the smallest (variant - first variant) per call, in us."""
    spent: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            spent[name].append(run(calls) / calls * 1e6)
    base = next(iter(variants))
    report = {}
    for name in variants:
        extra = [a - b for a, b in zip(spent[name], spent[base], strict=True)]
        report[name] = {
            "per_call_us": statistics.median(spent[name]),
            "extra_median_us": statistics.median(extra),
            "extra_min_us": min(extra),
        }
    return report


def costs(quick: bool) -> dict[str, dict[str, dict[str, float]]]:
    calls, rounds = (20_000, 5) if quick else (100_000, 15)
    with fake_connections() as connect:  # the benchmark's: socket pairs, never written
        client = interleaved(
            {
                "no observer": client_variant([], connect),
                "a no-op observer": client_variant([Nothing()], connect),
                "ClientMetrics": client_variant([ClientMetrics(CollectorRegistry())], connect),
            },
            calls,
            rounds,
        )
    server = interleaved(
        {
            "no observer": server_variant([]),
            "a no-op observer": server_variant([Nothing()]),
            "ServerMetrics": server_variant([ServerMetrics(CollectorRegistry())]),
        },
        calls,
        rounds,
    )
    return {"client": client, "server": server}


#: Every metric family a scrape must show (the module docstring of observe/prometheus.py).
FAMILIES = (
    "geventpool_client_calls",
    "geventpool_client_call_duration_seconds",
    "geventpool_client_pool_wait_seconds",
    "geventpool_client_connections_in_use",
    "geventpool_client_connections_idle",
    "geventpool_client_connections_opening",
    "geventpool_client_connections_max",
    "geventpool_client_waiters",
    "geventpool_client_calls_in_flight",
    "geventpool_client_instance_ejected",
    "geventpool_client_connect_failures",
    "geventpool_client_ejections",
    "geventpool_client_connections_opened",
    "geventpool_client_retries",
    "geventpool_client_retries_refused",
    "geventpool_client_retry_budget",
    "geventpool_client_exhausted",
    "geventpool_client_hedged",
    "geventpool_client_instances",
    "geventpool_client_rejected_children",
    "geventpool_client_zookeeper_state",
    "geventpool_server_calls",
    "geventpool_server_call_duration_seconds",
    "geventpool_server_connections",
    "geventpool_server_accepted",
    "geventpool_server_handler_errors",
    "geventpool_server_killed",
    "geventpool_server_at_capacity",
    "geventpool_server_refused",
)


def scrape_during_load(folder: Path, seconds: float, callers: int) -> dict[str, Any]:
    """Two registered servers, a rejected child, a client under load; ``/metrics`` read
    over HTTP halfway through the run. Returns the scrape and the load's numbers."""
    registry = CollectorRegistry()
    client_metrics, server_metrics = ClientMetrics(registry), ServerMetrics(registry)
    with ExitStack() as stack:
        zookeeper = ZooKeeperServer(folder / "zk")
        stack.callback(zookeeper.stop)
        zookeeper.start()
        servers = []
        for _ in range(2):
            server = ThriftServer(
                echo_thrift.Echo,
                EchoHandler("load"),
                registration=Registration(zookeeper.hosts, "echo"),
                deregister_grace=0.0,
            )
            server.start()
            stack.callback(server.stop, 1.0)
            servers.append(server_metrics.watch(server))
        writer = connect(zookeeper.hosts)
        stack.callback(writer.stop)
        writer.create("/geventpool/echo/bad-child", b"{not json", makepath=True)
        client = client_metrics.watch(
            ServiceClient(
                echo_thrift.Echo,
                "echo",
                zookeeper=zookeeper.hosts,
                pool=PoolSettings(max_connections=4),
                retry=Retry(retries=1, idempotent=True),
            )
        )
        client.start()
        stack.callback(client.stop)
        status = serve_status(clients=[client], servers=servers, registry=registry)
        stack.callback(status.stop)
        calls = {"ok": 0, "failed": 0}
        ends = time.monotonic() + seconds

        def caller(index: int) -> None:
            turn = 0
            while time.monotonic() < ends:
                turn += 1
                try:
                    if turn % 50 == 0:
                        client.refuse("no")
                    elif turn % 97 == 0:
                        client.slow_echo("late", 0.2, timeout=0.01)
                    else:
                        client.echo("x")
                    calls["ok"] += 1
                except Exception:  # noqa: BLE001 - counted: the load goes on
                    calls["failed"] += 1

        load = [gevent.spawn(caller, index) for index in range(callers)]
        gevent.sleep(seconds / 2)
        url = f"http://127.0.0.1:{status.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        gevent.joinall(load, timeout=seconds + 10)
    found = {family.name for family in text_string_to_metric_families(text)}
    return {
        "scrape": text,
        "missing": [name for name in FAMILIES if name not in found],
        "calls": calls,
        "seconds": seconds,
        "callers": callers,
    }


def cost_markdown(figures: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "| side | variant | per call (us, median) | added per call (us, median)"
        " | added (us, smallest) |",
        "|---|---|---|---|---|",
    ]
    for side, variants in figures.items():
        for name, row in variants.items():
            lines.append(
                f"| {side} | {name} | {row['per_call_us']:.2f} | {row['extra_median_us']:.2f}"
                f" | {row['extra_min_us']:.2f} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        load = scrape_during_load(Path(folder), 4.0 if args.quick else 10.0, 20)
    figures = costs(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics_scrape.txt").write_text(load["scrape"])
    report = [
        "# What watching calls costs, and a scrape during a load run",
        "",
        f"Made by `scripts/metrics_figures.py{' --quick' if args.quick else ''}` on"
        f" {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores, noisy: read the medians"
        " and the spread together).",
        "",
        "## Cost per call",
        "",
        *cost_markdown(figures),
        "",
        "## A scrape during a load run",
        "",
        f"{load['callers']} callers for {load['seconds']:g} s against two registered echo"
        f" servers and one rejected child: {load['calls']['ok']:,} calls answered,"
        f" {load['calls']['failed']:,} failed (refused or timed out on purpose). `/metrics`"
        " of the status endpoint, read over HTTP halfway through, is in"
        " [metrics_scrape.txt](metrics_scrape.txt); families missing from it:"
        f" {', '.join(load['missing']) or 'none'} (of {len(FAMILIES)}).",
        "",
    ]
    (args.out / "metrics.md").write_text("\n".join(report))
    print("\n".join(report))
    return 1 if load["missing"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
