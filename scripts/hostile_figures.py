"""Hostile-input figures for the benchmark report: what a broken or hostile peer costs.

Client side: each case runs in a fresh process (so that its peak memory is its own) against
``geventpool.testing.hostile_server``; a ticker greenlet measures the longest time the hub was
held, and the case reports how long the call took to end in a typed error and how much the
process's peak resident memory grew.

Server side: an echo server process is attacked over a raw socket while a healthy client in
this process keeps calling it; reported are the server's peak memory growth, how long until
it closed the attacking connection, and the healthy client's slowest call meanwhile.

``python scripts/hostile_figures.py`` prints the figures as JSON (the benchmark imports
:func:`hostile_figures`).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLIENT_CASES = [
    ("buffered", "claim-string:1073741824", "a string claiming 1 GiB"),
    ("buffered", "claim-string:2147483647", "a string claiming 2^31-1 bytes"),
    ("framed", "claim-frame:2147483632", "a frame claiming 2 GiB"),
    ("buffered", "unknown-list", "24 bytes: a list of an unknown type, 2^31-1 elements"),
    ("buffered", "claim-list:2147483647", "a list of i32 claiming 2^31-1 elements"),
    ("buffered", "deep:100", "lists nested 100 deep"),
    ("buffered", "claim-string:16000000", "a string of 16 MB (within the limit), half sent"),
    (
        "buffered",
        "table/next-body:0d00000b0b000000010000000461626364000000047778797a00",
        "43 bytes: map<i32, binary> sent with string keys (the decoder allocated 1.6 GB)",
    ),
    (
        "buffered",
        "items/structs-then-garbage:1000000",
        "1 MB: a million empty structs, then an unknown type code",
    ),
    (
        "buffered",
        "items/structs-then-stop:500000",
        "500 KB, valid: 500,000 empty structs (1.5 million values, decoded in a thread)",
    ),
]

CLIENT_CASE = """
from gevent import monkey; monkey.patch_all()
import json, sys, time
import gevent, structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
from geventpool import Instance, PoolSettings, ServiceClient
from geventpool.testing.echo import echo_thrift
port, transport, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
client = ServiceClient(echo_thrift.Echo, "echo", pool=PoolSettings(max_connections=1),
    instances=[Instance(host="127.0.0.1", port=port, transport=transport)])
client.echo("ok:warm up")
call = lambda: client.echo(mode, timeout=1.0)
if "/" in mode:  # METHOD/next-body:HEX: the reply to METHOD is HEX (structs-then-garbage:N)
    method, mode = mode.split("/")
    if mode.startswith("structs-then-"):  # structs-then-garbage:N or structs-then-stop:N
        count = int(mode.split(":")[1])
        end = "63" if "garbage" in mode else "00"
        mode = "next-body:0f00000c" + count.to_bytes(4, "big").hex() + "00" * count + end
    client.echo(mode)
    call = lambda: getattr(client, method)({"a": 1} if method == "table" else 1, timeout=1.0)
longest = 0.0
def tick():
    global longest
    last = time.perf_counter()
    while True:
        gevent.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last - 0.001)
        last = now
ticker = gevent.spawn(tick)
gevent.sleep(0.01)
before, started = peak(), time.perf_counter()
try:
    call()
    error = "none"
except Exception as caught:
    error = type(caught).__name__
seconds = time.perf_counter() - started
gevent.sleep(0.01)  # the ticker sees a stall at the very end of the call too
ticker.kill()
print(json.dumps({"error": error, "seconds": seconds, "max_stall_ms": longest * 1000,
                  "rss_growth_mib": (peak() - before) / 2**20}))
client.stop()
"""


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def client_figures() -> list[dict[str, Any]]:
    from geventpool.testing.processes import ServerProcess  # noqa: PLC0415

    rows = []
    servers: dict[str, ServerProcess] = {}
    try:
        for transport, mode, what in CLIENT_CASES:
            if transport not in servers:
                servers[transport] = ServerProcess(
                    ["--transport", transport], module="geventpool.testing.hostile_server"
                ).start()
            done = subprocess.run(
                [sys.executable, "-c", CLIENT_CASE, str(servers[transport].port), transport, mode],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            rows.append({"case": what, "transport": transport, **json.loads(done.stdout)})
    finally:
        for server in servers.values():
            server.kill()
    return rows


_ECHO_CALL = b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01"  # header of echo() #1
_TABLE_CALL = b"\x80\x01\x00\x01\x00\x00\x00\x05table\x00\x00\x00\x01"  # table() #1
_KEY = struct.pack("!i", 1) + b"k"
_MISREAD = _KEY + struct.pack("!i", 4) + b"\x7f\xff\xff\xf0" + _KEY + _KEY
SERVER_CASES = [
    ("framed", struct.pack("!i", 2_000_000_000), 256 << 20, "a frame claiming 2 GB, then 256 MiB"),
    (
        "buffered",
        _ECHO_CALL + b"\x0f\x00\x01\x63\x7f\xff\xff\xff\x00",
        0,
        "a 25-byte request: a list of an unknown type, 2^31-1 elements",
    ),
    (
        "buffered",
        b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01\x0b\x00\x01"
        + struct.pack("!i", 2**30),
        64 << 20,
        "a string claiming 1 GiB, then 64 MiB",
    ),
    (
        "buffered",
        _TABLE_CALL + b"\x0d\x00\x01\x0b\x0b" + struct.pack("!i", 2) + _MISREAD + b"\x00",
        0,
        "42 bytes: map<string, i32> sent with string values (the decoder allocated 2 GiB)",
    ),
    (
        "buffered",
        _TABLE_CALL
        + b"\x0d\x00\x01\x0b\x08"
        + struct.pack("!i", 1_000_000)
        + bytes(8_000_000)
        + b"\x63\x00\x02",  # a whole field header: the walk must reach it to refuse it
        0,
        "8 MB: a map of a million entries (2 million values), then an unknown type code",
    ),
]


def server_figures() -> list[dict[str, Any]]:
    import gevent  # noqa: PLC0415

    from geventpool import Instance, ServiceClient  # noqa: PLC0415
    from geventpool.testing.echo import echo_thrift  # noqa: PLC0415
    from geventpool.testing.processes import ServerProcess  # noqa: PLC0415

    rows = []
    for transport, attack, stream, what in SERVER_CASES:
        server = ServerProcess(["--transport", transport]).start()
        assert server.port is not None
        healthy = ServiceClient(
            echo_thrift.Echo,
            "echo",
            instances=[Instance(host="127.0.0.1", port=server.port, transport=transport)],
        )
        slowest = [0.0]

        def calls(client: ServiceClient = healthy, worst: list[float] = slowest) -> None:
            while True:
                began = time.perf_counter()
                client.echo("x")
                worst[0] = max(worst[0], time.perf_counter() - began)
                gevent.sleep(0.001)

        try:
            healthy.echo("warm up")
            caller = gevent.spawn(calls)
            before = _peak_rss(server.pid)
            started = time.perf_counter()
            sent = 0
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                try:
                    sock.sendall(attack)
                    chunk = bytes(1 << 20)
                    while sent < stream:
                        sock.sendall(chunk)
                        sent += len(chunk)
                    closed = sock.recv(1) == b""
                except OSError:
                    closed = True
            seconds = time.perf_counter() - started
            gevent.sleep(0.05)
            caller.kill()
            rows.append(
                {
                    "case": what,
                    "transport": transport,
                    "closed": closed,
                    "sent_mib": sent / 2**20,
                    "seconds_to_close": seconds,
                    "rss_growth_mib": (_peak_rss(server.pid) - before) / 2**20,
                    "healthy_slowest_ms": slowest[0] * 1000,
                }
            )
        finally:
            healthy.stop()
            server.kill()
    return rows


def hostile_figures() -> dict[str, list[dict[str, Any]]]:
    """Both sides' figures (see the module)."""
    return {"client": client_figures(), "server": server_figures()}


def markdown(figures: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The report's section for these figures."""
    lines = [
        "## Hostile input",
        "",
        "Client side (each case in a fresh process, against `geventpool.testing.hostile_server`,"
        " deadline 1 s; default `WireLimits`):",
        "",
        "| reply | error | time to error | longest hub stall | peak memory growth |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} ({r['transport']}) | {r['error']} | {r['seconds'] * 1000:.1f} ms"
        f" | {r['max_stall_ms']:.1f} ms | {r['rss_growth_mib']:.1f} MiB |"
        for r in figures["client"]
    ]
    lines += [
        "",
        "Server side (an echo server process; a healthy client calls it meanwhile):",
        "",
        "| request | connection closed | sent before | time | peak memory growth"
        " | healthy client's slowest call |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} ({r['transport']}) | {'yes' if r['closed'] else '**no**'}"
        f" | {r['sent_mib']:.0f} MiB | {r['seconds_to_close'] * 1000:.1f} ms"
        f" | {r['rss_growth_mib']:.1f} MiB | {r['healthy_slowest_ms']:.1f} ms |"
        for r in figures["server"]
    ]
    return lines


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    print(json.dumps(hostile_figures(), indent=1))
