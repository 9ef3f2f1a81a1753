"""How long alert delivery can hold the hub, in a process that is NOT monkey-patched.

The channels' network I/O is gevent's own (sockets, TLS, name lookups), so a delivery that
waits for an endpoint lets every other greenlet run. This script shows it with real endpoints
on 127.0.0.1 while a greenlet ticks every millisecond and records the longest gap between its
ticks (the hub stall):

* **working**: an HTTPS webhook, an SMS gateway and an SMTP server with STARTTLS and login (a
  real ``aiosmtpd`` server process) each receive the alert;
* **black-holed**: five endpoints that never answer: a webhook whose connect never completes
  (a full accept queue), an HTTPS webhook and an SMTPS server that accept but never finish the
  TLS handshake, an SMS gateway and an SMTP server that accept and never say a word. Each
  attempt ends at ``delivery_timeout``; the alert is dropped after its retries.

``python scripts/alert_stall.py [--delivery-timeout 1.0] [--out docs/benchmarks/alert_stall.md]``
prints the figures as JSON (and writes them as Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import gevent
import structlog
import trustme
from gevent import monkey

from geventpool import events
from geventpool.alerts.alerter import Alerter
from geventpool.alerts.channels import Channel, SmsChannel, SmtpChannel, WebhookChannel
from geventpool.alerts.policy import AlertSettings
from geventpool.secret import Secret
from geventpool.testing.http_receiver import HttpReceiver
from geventpool.testing.processes import ServerProcess
from geventpool.tls import cooperative_context

SMTP_USER, SMTP_PASSWORD = "alerts", "stall-probe-password"


class StallMeter:
    """The longest gap between ticks of a greenlet that asks to run every millisecond: its
    wall time (``longest``, which includes any time the OS did not run this process) and the
    CPU time this thread spent within the longest-working gap (``longest_work``: code that
    held the hub)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_work = 0.0
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while True:
            gevent.sleep(0.001)
            now, cpu = time.perf_counter(), time.thread_time()
            self.longest = max(self.longest, now - last - 0.001)
            self.longest_work = max(self.longest_work, cpu - last_cpu)
            last, last_cpu = now, cpu

    @contextmanager
    def measuring(self) -> Iterator[StallMeter]:
        """Reset, then measure until the block ends."""
        gevent.sleep(0.01)
        self.longest = self.longest_work = 0.0
        yield self

    def figures(self, seconds: float) -> dict[str, float]:
        return {
            "seconds": round(seconds, 3),
            "longest_stall_ms": round(self.longest * 1000, 2),
            "longest_work_ms": round(self.longest_work * 1000, 2),
        }

    def stop(self) -> None:
        self._greenlet.kill()


def black_hole() -> socket.socket:
    """A listening socket that never accepts: a connect completes (the kernel queues it), and
    then nothing is ever read or written."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


def full_queue() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a new connect never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # fills the queue (its length is the backlog + 1)
        filler = socket.socket()
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.05)
    return listener, fillers


def port(listener: socket.socket) -> int:
    return int(listener.getsockname()[1])


def certificates(folder: Path) -> dict[str, str]:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    files = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key")}
    authority.cert_pem.write_to_path(files["ca"])
    certificate.cert_chain_pems[0].write_to_path(files["cert"])
    certificate.private_key_pem.write_to_path(files["key"])
    return files


def deliver(channels: list[Channel], settings: AlertSettings, timeout: float) -> Alerter:
    """Start an alerter on ``channels``, raise one alert, and return once every channel has
    delivered or dropped it (at most ``timeout`` seconds)."""
    alerter = Alerter(channels, settings).start()
    events.emit(events.SERVICE_UNAVAILABLE, "error", service="calc")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(w.stats.delivered + w.stats.dropped >= 1 for w in alerter.workers):
            break
        gevent.sleep(0.01)
    alerter.stop(flush_timeout=0.0)
    return alerter


def outcome(alerter: Alerter) -> dict[str, Any]:
    return {
        worker.channel.name: {
            "delivered": worker.stats.delivered,
            "dropped": worker.stats.dropped,
            "attempts": worker.stats.delivered + worker.stats.failed_attempts,
            "last_error": worker.stats.last_error,
        }
        for worker in alerter.workers
    }


def measure(delivery_timeout: float) -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    settings = AlertSettings(
        tick=0.05,
        retry_backoff=0.05,
        delivery_timeout=delivery_timeout,
        retries=1,
        repeat_interval=0,
        resolve_after=60,
    )
    meter = StallMeter()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        tls = certificates(folder)
        (folder / "password").write_text(SMTP_PASSWORD)
        server_context = cooperative_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(tls["cert"], tls["key"])
        https = HttpReceiver(ssl_context=server_context).start()
        stack.callback(https.stop)
        http = HttpReceiver().start()
        stack.callback(http.stop)
        smtp = ServerProcess(
            [
                "--folder", str(folder / "mail"), "--security", "starttls",
                "--cert", tls["cert"], "--key", tls["key"],
                "--user", SMTP_USER, "--password-file", str(folder / "password"),
            ],
            module="geventpool.testing.smtp_receiver",
        )  # fmt: skip
        stack.callback(smtp.kill)
        smtp.start()
        sms_template = '{"to": "$to", "text": "$message"}'
        channels: list[Channel] = [
            WebhookChannel(Secret(https.url()), "json", ca_file=tls["ca"]),
            SmsChannel(Secret(http.url("/sms")), ["+15550100"], sms_template),
            SmtpChannel(
                "127.0.0.1",
                int(smtp.port or 0),
                "geventpool@test.invalid",
                ["oncall@test.invalid"],
                username=SMTP_USER,
                password=Secret(SMTP_PASSWORD),
                ca_file=tls["ca"],
            ),
        ]
        with meter.measuring():
            started = time.perf_counter()
            gevent.sleep(2 * delivery_timeout)
            idle = meter.figures(time.perf_counter() - started)
        with meter.measuring():
            started = time.perf_counter()
            delivered = deliver(channels, settings, timeout=30)
            working = meter.figures(time.perf_counter() - started)
        holes = [black_hole() for _ in range(4)]
        queue, fillers = full_queue()
        for sock in (*holes, queue, *fillers):
            stack.callback(sock.close)
        holed: list[Channel] = [
            WebhookChannel(Secret(f"http://127.0.0.1:{port(queue)}/hook"), "json"),
            WebhookChannel(Secret(f"https://127.0.0.1:{port(holes[0])}/hook"), "slack"),
            SmsChannel(Secret(f"http://127.0.0.1:{port(holes[1])}/sms"), ["+1555"], sms_template),
            SmtpChannel("127.0.0.1", port(holes[2]), "a@test.invalid", ["b@test.invalid"]),
            SmtpChannel(
                "127.0.0.1", port(holes[3]), "a@test.invalid", ["b@test.invalid"], security="ssl"
            ),
        ]
        with meter.measuring():
            started = time.perf_counter()
            dropped = deliver(holed, settings, timeout=10 * delivery_timeout + 10)
            black_holed = meter.figures(time.perf_counter() - started)
    meter.stop()
    return {
        "monkey_patched": monkey.is_module_patched("socket"),
        "delivery_timeout": delivery_timeout,
        "retries": settings.retries,
        "idle": idle,
        "working": {
            **working,
            "channels": outcome(delivered),
            "received": {"webhook": len(https.requests), "sms": len(http.requests)},
        },
        "black_holed": {**black_holed, "channels": outcome(dropped)},
    }


def markdown(figures: dict[str, Any]) -> str:
    lines = [
        "# Alert delivery and the hub (`scripts/alert_stall.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()}"
        " cores, in a process that is not monkey-patched"
        f" (`monkey_patched`: {figures['monkey_patched']}). Reproduce:"
        " `.venv/bin/python scripts/alert_stall.py`.",
        "",
        "The longest hub stall is the longest time a greenlet that asks to run every"
        " millisecond waited beyond that millisecond; it includes the times the OS did not"
        " run this process at all (the idle row: nothing but the ticking greenlet). The work"
        " column is the CPU time this process spent within a gap, the longest: code that held"
        " the hub.",
        "",
        "| endpoints | channels | outcome | took | longest hub stall | longest work in a gap |",
        "|---|---|---|---|---|---|",
        f"| none (idle) | 0 | | {figures['idle']['seconds']:.2f} s"
        f" | {figures['idle']['longest_stall_ms']:.2f} ms"
        f" | {figures['idle']['longest_work_ms']:.2f} ms |",
    ]
    for label, key in (("working", "working"), ("black-holed", "black_holed")):
        part = figures[key]
        channels = part["channels"]
        delivered = sum(c["delivered"] for c in channels.values())
        dropped = sum(c["dropped"] for c in channels.values())
        attempts = sum(c["attempts"] for c in channels.values())
        lines.append(
            f"| {label} | {len(channels)} | {delivered} delivered, {dropped} dropped after"
            f" {attempts} attempts | {part['seconds']:.2f} s | {part['longest_stall_ms']:.2f} ms"
            f" | {part['longest_work_ms']:.2f} ms |"
        )
    lines += [
        "",
        f"Black-holed attempts end at `delivery_timeout` ({figures['delivery_timeout']:g} s),"
        f" {figures['retries'] + 1} attempts per channel; the last error of each:",
        "",
    ]
    for name, channel in figures["black_holed"]["channels"].items():
        lines.append(f"- `{name}`: {channel['last_error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delivery-timeout", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="write the figures as Markdown here")
    args = parser.parse_args(argv)
    if monkey.is_module_patched("socket"):
        parser.error("this measurement is of a process that is not monkey-patched")
    figures = measure(args.delivery_timeout)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
