"""TLS figures: what TLS costs per call and per connection, measured side by side.

Two echo server processes run the same code on this machine, one in plaintext and one TLS
only (a certificate made for the run, TLS 1.3); the client drives both from this process,
round after round, interleaved, so that the noise of a shared machine falls on both alike:

* **per call**: 100 greenlets through one ``ServiceClient``, exclusive (10 connections) and
  pipelined (2 connections, 32 calls in flight each), and one caller alone (latency): calls
  per second, client CPU per call, TLS against plaintext (median of the rounds' ratios);
* **per connection**: opening one connection (connect, plus the handshake with TLS, plus
  mutual TLS with a client certificate) and closing it: wall time and client CPU.

``python scripts/tls_figures.py [--rounds 5] [--out docs/benchmarks/tls.md]`` prints the
figures as JSON and writes them as a Markdown table. Every loop is bounded by its count.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
import structlog  # noqa: E402
import trustme  # noqa: E402

from geventpool.client.connection import open_connection  # noqa: E402
from geventpool.client.pool import PoolSettings  # noqa: E402
from geventpool.client.service import ServiceClient  # noqa: E402
from geventpool.discovery.instance import Instance  # noqa: E402
from geventpool.testing.echo import echo_thrift  # noqa: E402
from geventpool.testing.processes import ServerProcess  # noqa: E402
from geventpool.tls import ClientTls, handshake  # noqa: E402

CALLERS = 100
MODES = {
    "exclusive, 10 connections": PoolSettings(max_connections=10, max_inflight=1),
    "pipelined, 2 connections": PoolSettings(max_connections=2, max_inflight=32),
}


def write_pki(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as files."""
    authority = trustme.CA()
    files = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key", "ccert", "ckey")}
    authority.cert_pem.write_to_path(files["ca"])
    for cert, chain, key in (
        (authority.issue_cert("127.0.0.1"), "cert", "key"),
        (authority.issue_cert("client.bench"), "ccert", "ckey"),
    ):
        cert.private_key_pem.write_to_path(files[key])
        Path(files[chain]).write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files


def run_load(client: ServiceClient, calls: int, callers: int) -> tuple[float, float]:
    """``calls`` echo calls by ``callers`` greenlets: (calls per second, CPU us per call)."""
    each = calls // callers

    def caller() -> None:
        for _ in range(each):
            client.echo("x" * 64)

    cpu, began = time.process_time(), time.perf_counter()
    gevent.joinall([gevent.spawn(caller) for _ in range(callers)], raise_error=True)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    done = each * callers
    return done / wall, cpu / done * 1e6


def per_call(
    clients: dict[str, ServiceClient], rounds: int, calls: int, callers: int
) -> dict[str, Any]:
    """Interleaved rounds against both servers; medians and the median ratio."""
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    for client in clients.values():
        run_load(client, calls // 5, callers)  # warm: connections open, code paths hot
    for _ in range(rounds):
        for name, client in clients.items():
            seen[name].append(run_load(client, calls, callers))
    ratios = [tls[0] / plain[0] for plain, tls in zip(seen["plaintext"], seen["tls"], strict=True)]
    return {
        name: {
            "calls_per_second": round(statistics.median(r[0] for r in rows)),
            "cpu_us_per_call": round(statistics.median(r[1] for r in rows), 1),
        }
        for name, rows in seen.items()
    } | {"tls_vs_plaintext": round(statistics.median(ratios), 3)}


def per_connection(
    instances: dict[str, tuple[Instance, ClientTls | None]], count: int
) -> dict[str, Any]:
    """Open and close ``count`` connections to each, interleaved: median wall ms, CPU ms."""
    walls: dict[str, list[float]] = {name: [] for name in instances}
    cpus: dict[str, float] = dict.fromkeys(instances, 0.0)
    for _ in range(count):
        for name, (instance, tls) in instances.items():
            cpu, began = time.process_time(), time.perf_counter()
            connection = open_connection(
                instance,
                echo_thrift.Echo,
                connect_timeout=5.0,
                deadline=time.monotonic() + 5.0,
                lifetime=60.0,
                tls=tls,
            )
            walls[name].append(time.perf_counter() - began)
            connection.close()
            cpus[name] += time.process_time() - cpu
    return {
        name: {
            "median_ms": round(statistics.median(walls[name]) * 1e3, 3),
            "cpu_ms": round(cpus[name] / count * 1e3, 3),
        }
        for name in instances
    }


def tls_figures(rounds: int, calls: int, connections: int) -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tls-figures-")))
        files = write_pki(folder)
        tls_args = ["--tls-cert", files["cert"], "--tls-key", files["key"]]
        mutual_args = [*tls_args, "--tls-ca", files["ca"]]
        started: dict[str, ServerProcess] = {
            "plaintext": ServerProcess([]).start(),
            "tls": ServerProcess(tls_args).start(),
            "mutual": ServerProcess(mutual_args).start(),
        }
        for process in started.values():
            stack.callback(process.kill)
        verify = ClientTls(ca_file=files["ca"])
        mutual = ClientTls(ca_file=files["ca"], cert_file=files["ccert"], key_file=files["ckey"])

        def instance(name: str) -> Instance:
            return Instance(
                host="127.0.0.1", port=int(started[name].port or 0), tls=name != "plaintext"
            )

        figures: dict[str, Any] = {"calls": calls, "rounds": rounds, "callers": CALLERS}

        def make(name: str, pool: PoolSettings) -> ServiceClient:
            client = ServiceClient(
                echo_thrift.Echo,
                "echo",
                instances=[instance(name)],
                pool=pool,
                tls=verify if name != "plaintext" else None,
                call_timeout=10.0,
            )
            stack.callback(client.stop)
            return client

        for mode, pool in MODES.items():
            clients = {name: make(name, pool) for name in ("plaintext", "tls")}
            figures[mode] = per_call(clients, rounds, calls, CALLERS)
        alone = {name: make(name, PoolSettings(max_connections=1)) for name in ("plaintext", "tls")}
        figures["one caller"] = per_call(alone, rounds, calls // 10, 1)
        figures["per_connection"] = per_connection(
            {
                "plaintext": (instance("plaintext"), None),
                "tls": (instance("tls"), verify),
                "mutual": (instance("mutual"), mutual),
            },
            connections,
        )
        figures["tls_version"] = tls_version(instance("tls"), verify)
    return figures


def tls_version(instance: Instance, tls: ClientTls) -> str:
    """The TLS version the servers speak with this client."""
    sock = gevent.socket.create_connection(instance.address, timeout=5.0)
    secured = handshake(sock, tls.ssl_context(), str(instance), 5.0, server_hostname=instance.host)
    version = str(secured.version())
    secured.close()
    return version


def markdown(figures: dict[str, Any]) -> list[str]:
    lines = [
        "## TLS: the cost per call and per connection",
        "",
        f"{figures['tls_version']}, a certificate verified against a CA with host name check;"
        f" {figures['rounds']} interleaved rounds of {figures['calls']:,} echo calls (64 bytes)"
        f" per server ({figures['calls'] // 10:,} for one caller); servers in their own"
        " processes (same code, plaintext and TLS only).",
        "",
        "| load | plaintext calls/s | TLS calls/s | TLS vs plaintext | client CPU us/call"
        " plaintext | TLS |",
        "|---|---|---|---|---|---|",
    ]
    for mode in (*MODES, "one caller"):
        row = figures[mode]
        load = f"{CALLERS} callers, {mode}" if mode != "one caller" else "one caller, 1 connection"
        lines.append(
            f"| {load} | {row['plaintext']['calls_per_second']:,}"
            f" | {row['tls']['calls_per_second']:,} | {row['tls_vs_plaintext']:.2f}"
            f" | {row['plaintext']['cpu_us_per_call']} | {row['tls']['cpu_us_per_call']} |"
        )
    lines += [
        "",
        "Opening a connection (and closing it), median of the interleaved attempts:",
        "",
        "| connection | wall ms | client CPU ms |",
        "|---|---|---|",
    ]
    names = {
        "plaintext": "plaintext (TCP connect)",
        "tls": "TLS (connect + handshake)",
        "mutual": "mutual TLS (client certificate)",
    }
    for name, row in figures["per_connection"].items():
        lines.append(f"| {names[name]} | {row['median_ms']} | {row['cpu_ms']} |")
    lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/tls.md"))
    args = parser.parse_args()
    figures = tls_figures(args.rounds, args.calls, args.connections)
    title, *rest = markdown(figures)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = (
        f"Measured {when} on {os.cpu_count()} cores."
        " Reproduce: `.venv/bin/python scripts/tls_figures.py`."
    )
    args.out.write_text("\n".join([title.replace("## ", "# "), "", measured, *rest]))
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
