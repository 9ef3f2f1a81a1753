"""Alerting end to end, with real receivers on 127.0.0.1: an SMTP server in its own process
(STARTTLS or SSL, with AUTH) and an HTTP server for webhooks and SMS gateways."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
import trustme
from kazoo.client import KazooClient

from geventpool import events
from geventpool.alerts.alerter import Alerter
from geventpool.alerts.channels import (
    CallableChannel,
    Channel,
    LogChannel,
    SmsChannel,
    SmtpChannel,
    WebhookChannel,
)
from geventpool.alerts.notification import Notification
from geventpool.alerts.policy import AlertSettings
from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.errors import PoolExhaustedError
from geventpool.secret import Secret
from geventpool.server.thrift_server import ThriftServer
from geventpool.testing.echo import echo_thrift
from geventpool.testing.faults import TcpProxy
from geventpool.testing.http_receiver import HttpReceiver
from geventpool.testing.zookeeper import free_port
from helpers import events_named, wait_until

SMTP_PASSWORD = "smtp-Pa55-word-7731"


@dataclass
class Mailbox:
    port: int
    folder: Path

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.messages()) >= count, timeout)
        return self.messages()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    files = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key")}
    authority.cert_pem.write_to_path(files["ca"])
    certificate.cert_chain_pems[0].write_to_path(files["cert"])
    certificate.private_key_pem.write_to_path(files["key"])
    return files


@pytest.fixture
def smtp_server(tmp_path: Path, tls: dict[str, str]) -> Iterator[Callable[[str], Mailbox]]:
    """``smtp_server(security)`` runs a real SMTP server (user ``alerts``) in a process."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(security: str) -> Mailbox:
        folder = tmp_path / f"mail-{len(processes)}"
        password = tmp_path / "smtp-password"
        password.write_text(SMTP_PASSWORD)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "geventpool.testing.smtp_receiver",
                "--folder",
                str(folder),
                "--security",
                security,
                "--cert",
                tls["cert"],
                "--key",
                tls["key"],
                "--user",
                "alerts",
                "--password-file",
                str(password),
            ],
            stdout=subprocess.PIPE,
        )
        processes.append(process)
        assert process.stdout is not None
        with gevent.Timeout(20):
            line = process.stdout.readline()
        return Mailbox(json.loads(line)["port"], folder)

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    http = HttpReceiver().start()
    yield http
    http.stop()


@pytest.fixture
def alerter() -> Iterator[Callable[..., Alerter]]:
    """``alerter(*channels, **settings)``: a started Alerter with fast test settings."""
    started: list[Alerter] = []

    def start(*channels: Channel, **settings: Any) -> Alerter:
        options: dict[str, Any] = {
            "tick": 0.05,
            "retry_backoff": 0.05,
            "delivery_timeout": 5.0,
            "repeat_interval": 0,
            "resolve_after": 0.5,
            **settings,
        }
        started.append(Alerter(channels, AlertSettings(**options)).start())
        return started[-1]

    yield start
    for item in started:
        item.stop(flush_timeout=0.5)


def smtp_channel(
    mailbox: Mailbox, tls: dict[str, str], security: str, password: str = SMTP_PASSWORD
) -> SmtpChannel:
    return SmtpChannel(
        "127.0.0.1",
        mailbox.port,
        "geventpool@test.invalid",
        ["oncall@test.invalid"],
        security=security,
        username="alerts",
        password=Secret(password),
        ca_file=tls["ca"],
    )


def exhaust(client: ServiceClient, seconds: float) -> int:
    """Keep the client's only connection busy and call past it for ``seconds``."""
    busy = gevent.spawn(client.slow_echo, "busy", seconds + 0.2)
    gevent.sleep(0.05)
    refused = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.echo("more")
        except PoolExhaustedError:
            refused += 1
        gevent.sleep(0.05)
    busy.get(timeout=5)
    return refused


@pytest.fixture
def tiny_client(serve: Callable[..., ThriftServer]) -> Iterator[ServiceClient]:
    server = serve()
    client = ServiceClient(
        echo_thrift.Echo,
        "echo",
        instances=[Instance(host="127.0.0.1", port=server.port)],
        pool=PoolSettings(max_connections=1, pool_timeout=0.05),
    )
    client.start()
    yield client
    client.stop()


@pytest.mark.gevent_timeout(60)
def test_exhaustion_is_emailed_with_its_numbers_then_resolved_over_starttls_with_auth(
    smtp_server: Callable[[str], Mailbox],
    tls: dict[str, str],
    alerter: Callable[..., Alerter],
    tiny_client: ServiceClient,
) -> None:
    mailbox = smtp_server("starttls")
    alerter(smtp_channel(mailbox, tls, "starttls"), resolve_after=1.5)  # > 1 report a second
    assert exhaust(tiny_client, 2.5) > 10

    [firing] = mailbox.wait_for(1)
    assert firing["subject"] == "[geventpool] CRITICAL pool_exhausted: echo"
    assert firing["tls"] and firing["authenticated"]
    body = firing["body"]
    for expected in (
        "service: echo",
        "1 of 1 in use",
        "callers waiting",
        "in use 1/1",
        "add server instances",
        "since: ",
    ):
        assert expected in body, body
    _, resolved = mailbox.wait_for(2)
    assert resolved["subject"] == "[geventpool] RESOLVED pool_exhausted: echo"
    gevent.sleep(0.5)
    assert len(mailbox.messages()) == 2  # one firing, one resolved: deduplicated


def test_email_goes_over_smtps(
    smtp_server: Callable[[str], Mailbox], tls: dict[str, str], alerter: Callable[..., Alerter]
) -> None:
    mailbox = smtp_server("ssl")
    alerter(smtp_channel(mailbox, tls, "ssl"))
    events.emit(events.SERVICE_UNAVAILABLE, "error", service="calc", path="/geventpool/calc")
    [message] = mailbox.wait_for(1)
    assert message["subject"] == "[geventpool] CRITICAL no_instances: calc" and message["tls"]


@pytest.mark.parametrize("preset", ["json", "slack", "dingtalk", "wecom"])
def test_each_webhook_preset_arrives_in_its_format(
    preset: str, receiver: HttpReceiver, alerter: Callable[..., Alerter]
) -> None:
    sign = Secret("SECsign-key-42") if preset == "dingtalk" else None
    url = Secret(receiver.url("/robot/send") + "?access_token=t0k3n")
    alerter(WebhookChannel(url, preset, sign_secret=sign, headers={"X-Team": "infra"}))
    events.emit(
        events.INSTANCE_EJECTED, "warning", service="calc", instance="10.0.0.5:9090", failures=3
    )
    [request] = receiver.wait_for(1)
    body = request.json()
    assert request.headers["X-Team"] == "infra" and request.query["access_token"] == "t0k3n"
    if preset == "json":
        assert body["status"] == "firing" and body["condition"] == "instance_ejected"
        assert body["service"] == "calc" and body["subject"] == "calc 10.0.0.5:9090"
        assert body["details"]["failures"] == 3
    elif preset == "slack":
        assert body["text"].startswith("[geventpool] WARNING instance_ejected: calc 10.0.0.5:9090")
    elif preset == "dingtalk":
        assert body["msgtype"] == "markdown" and "instance_ejected" in body["markdown"]["title"]
        timestamp = request.query["timestamp"]
        digest = hmac.new(
            b"SECsign-key-42", f"{timestamp}\nSECsign-key-42".encode(), hashlib.sha256
        )
        assert request.query["sign"] == base64.b64encode(digest.digest()).decode()
    else:
        assert body["msgtype"] == "markdown" and "10.0.0.5:9090" in body["markdown"]["content"]


def test_a_robot_errcode_is_a_failed_delivery_retried_then_dropped(
    receiver: HttpReceiver,
    alerter: Callable[..., Alerter],
    captured: list[MutableMapping[str, Any]],
) -> None:
    receiver.reply = b'{"errcode": 310000, "errmsg": "keywords not in content"}'
    alerter(WebhookChannel(Secret(receiver.url()), "dingtalk"), retries=2)
    events.emit(events.SERVICE_UNAVAILABLE, "error", service="calc")
    receiver.wait_for(3)
    wait_until(lambda: events_named(captured, events.ALERT_DROPPED), 5)
    failures = events_named(captured, events.ALERT_DELIVERY_FAILED)
    assert [f["attempt"] for f in failures] == [1, 2, 3]
    assert "errcode 310000" in events_named(captured, events.ALERT_DROPPED)[0]["reason"]


@pytest.mark.parametrize(
    ("content_type", "template"),
    [
        ("application/json", '{"to": "$to", "text": "$message"}'),
        ("application/x-www-form-urlencoded", "to=$to&text=$message"),
    ],
)
def test_sms_gateway_gets_one_request_per_recipient_from_the_template(
    content_type: str, template: str, receiver: HttpReceiver, alerter: Callable[..., Alerter]
) -> None:
    channel = SmsChannel(
        Secret(receiver.url("/sms")),
        ["+15550100", "+15550101"],
        template,
        content_type=content_type,
        headers={"Authorization": Secret("Bearer sms-key-1")},
    )
    alerter(channel)
    events.emit(events.SERVICE_UNAVAILABLE, "error", service='calc "quoted"')
    requests = receiver.wait_for(2)
    bodies = [r.json() if "json" in content_type else r.form() for r in requests]
    assert [b["to"] for b in bodies] == ["+15550100", "+15550101"]
    assert bodies[0]["text"].startswith('[geventpool] CRITICAL no_instances: calc "quoted" since ')
    assert requests[0].headers["Authorization"] == "Bearer sms-key-1"


def test_a_callable_channel_gets_the_notification(alerter: Callable[..., Alerter]) -> None:
    received: list[Notification] = []
    alerter(CallableChannel(received.append))
    events.emit(events.EMPTY_PROTECTION_ENGAGED, "warning", service="calc", kept=3, seconds=30.0)
    wait_until(lambda: received, 5)
    assert received[0].condition == "empty_protection" and received[0].details["kept"] == 3
    events.emit(events.EMPTY_PROTECTION_CLEARED, service="calc", instances=3)
    wait_until(lambda: len(received) == 2, 5)
    assert received[1].status == "resolved"


class WatchedWebhook(WebhookChannel):
    """A webhook channel that counts its delivery attempts and says whether one is under way."""

    attempts = 0
    delivering = False

    def send(self, notification: Notification, timeout: float) -> None:
        self.attempts += 1
        self.delivering = True
        try:
            super().send(notification, timeout)
        finally:
            self.delivering = False


def test_black_holed_and_refusing_endpoints_never_slow_a_call_and_are_retried_then_dropped(
    receiver: HttpReceiver,
    alerter: Callable[..., Alerter],
    serve: Callable[..., ThriftServer],
    captured: list[MutableMapping[str, Any]],
) -> None:
    """Calls keep completing while a delivery attempt hangs. Counted, not timed: a call counts
    when it starts and ends within one hanging attempt, which is impossible if the delivery
    blocks the hub. (This process is monkey-patched; without it, see the next test.)"""
    receiver.mode = "hang"  # accepts, never answers
    refused = Secret(f"http://127.0.0.1:{free_port()}/hook")
    log = LogChannel()
    hanging = WatchedWebhook(Secret(receiver.url()), "json")
    alerter(
        hanging,
        WebhookChannel(refused, "json"),
        log,
        delivery_timeout=0.3,
        retries=2,
    )
    server = serve()
    client = ServiceClient(
        echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=server.port)]
    )
    within_attempt: Counter[int] = Counter()
    try:
        client.echo("warm up")
        events.emit(events.SERVICE_UNAVAILABLE, "error", service="calc")
        for _ in range(100_000):  # bounded: ends when the three attempts are over
            attempt, during = hanging.attempts, hanging.delivering
            client.echo("during delivery")
            if during and hanging.delivering and hanging.attempts == attempt:
                within_attempt[attempt] += 1
            if hanging.attempts == 3 and not hanging.delivering:
                break
    finally:
        client.stop()
    assert hanging.attempts == 3 and not hanging.delivering
    assert set(within_attempt) == {1, 2, 3}, within_attempt  # calls went on during each attempt
    assert min(within_attempt.values()) >= 10, within_attempt
    assert events_named(captured, events.ALERT)  # the log channel was not held up either
    wait_until(lambda: len(events_named(captured, events.ALERT_DROPPED)) == 2, 10)
    reasons = {e["channel"]: e["reason"] for e in events_named(captured, events.ALERT_DROPPED)}
    hung = next(
        reason
        for channel, reason in reasons.items()
        if str(receiver.url()).rsplit("/", 1)[0] in channel
    )
    assert "3 attempts failed" in hung and "no answer within 0.3s" in hung
    assert any("Connection refused" in reason for reason in reasons.values())
    print(f"calls completed within each hanging attempt: {dict(within_attempt)}")


@pytest.mark.gevent_timeout(90)
def test_without_monkey_patching_delivery_to_black_holed_endpoints_never_holds_the_hub() -> None:
    """In a process that is not monkey-patched, real webhook (HTTPS), SMS and SMTP (STARTTLS
    and login) endpoints receive an alert, and five black-holed ones (connect never completes;
    TLS handshake, HTTP answer, SMTP greeting never come) are given up after their attempts,
    while a greenlet ticking every millisecond is never held up for long. With the standard
    library's blocking clients the hub stalled for whole attempts (2.0 s working, 5.0 s
    black-holed, measured)."""
    script = Path(__file__).parent.parent / "scripts" / "alert_stall.py"
    result = subprocess.run(
        [sys.executable, str(script), "--delivery-timeout", "0.5"],
        capture_output=True,
        timeout=80,
        check=True,
    )
    figures = json.loads(result.stdout)
    assert figures["monkey_patched"] is False
    working, holes = figures["working"], figures["black_holed"]
    assert [c["delivered"] for c in working["channels"].values()] == [1, 1, 1], working
    assert working["received"] == {"webhook": 1, "sms": 1}
    assert len(holes["channels"]) == 5
    for name, channel in holes["channels"].items():
        assert (channel["dropped"], channel["attempts"]) == (1, 2), (name, channel)
        assert channel["last_error"] == "no answer within 0.5s", (name, channel)
    # one blocking attempt would hold the hub for its whole 0.5 s
    assert holes["longest_stall_ms"] < 250, holes
    assert working["longest_stall_ms"] < 250, working


def test_no_secret_appears_in_any_log_line_or_error(
    smtp_server: Callable[[str], Mailbox],
    tls: dict[str, str],
    receiver: HttpReceiver,
    alerter: Callable[..., Alerter],
    captured: list[MutableMapping[str, Any]],
) -> None:
    mailbox = smtp_server("starttls")
    wrong_password = "wr0ng-Pa55-word-0042"
    secrets = [wrong_password, "t0ken-in-path-99", "t0ken-in-query-98", "SECsign-9911"]
    receiver.mode = "fail"
    channels: list[Channel] = [
        smtp_channel(mailbox, tls, "starttls", password=wrong_password),  # refused login
        WebhookChannel(Secret(f"http://127.0.0.1:{free_port()}/t0ken-in-path-99"), "slack"),
        WebhookChannel(
            Secret(receiver.url() + "?access_token=t0ken-in-query-98"),
            "dingtalk",
            sign_secret=Secret("SECsign-9911"),
        ),
    ]
    alerter(*channels, retries=1)
    events.emit(events.SERVICE_UNAVAILABLE, "error", service="calc")
    wait_until(lambda: len(events_named(captured, events.ALERT_DROPPED)) == 3, 15)
    logged = json.dumps([dict(entry) for entry in captured], default=repr)
    logged += "".join(repr(channel) + channel.name for channel in channels)
    assert "authentication" in logged.lower() or "535" in logged  # the SMTP refusal is logged
    for secret in secrets:
        assert secret not in logged


@pytest.mark.gevent_timeout(60)
def test_zookeeper_unreachable_past_its_grace_is_told_then_resolved_on_reconnect(
    zk_proxy: TcpProxy,
    chroot: str,
    clients: Callable[..., KazooClient],
    alerter: Callable[..., Alerter],
) -> None:
    received: list[Notification] = []
    alerter(CallableChannel(received.append), zookeeper_grace=0.5)
    client = clients(zk_proxy.address + chroot, session_timeout=3.0)
    zk_proxy.blackhole()
    wait_until(lambda: not client.connected, 10)
    lost_at = time.monotonic()
    wait_until(lambda: received, 10)
    assert received[0].condition == "zookeeper_unreachable" and received[0].status == "firing"
    assert time.monotonic() - lost_at >= 0.4  # not before its grace
    zk_proxy.restore()
    wait_until(lambda: len(received) == 2, 15)
    assert received[1].status == "resolved"


def test_an_overflowing_queue_drops_and_counts_and_never_blocks_the_emitter(
    alerter: Callable[..., Alerter], captured: list[MutableMapping[str, Any]]
) -> None:
    received: list[Notification] = []
    alerts = alerter(CallableChannel(received.append), queue_size=5)
    for number in range(50):  # no yield in between: the alerter cannot drain meanwhile
        events.emit(events.SERVICE_UNAVAILABLE, "error", service=f"s{number}")
    assert alerts.dropped_events == 45
    assert len(events_named(captured, events.ALERT_QUEUE_FULL)) == 1  # one line a second
    wait_until(lambda: len(received) == 5, 5)  # the five queued ones are delivered
