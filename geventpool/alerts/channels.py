"""Where notifications go: the log, SMTP email, webhooks (generic JSON, Slack-compatible,
DingTalk and WeCom robots), SMS through an HTTP gateway, or a Python callable.

Every channel's :meth:`send` delivers one notification or raises; it is called by the
alerter's delivery greenlet for that channel, never by a caller, with a time limit, retries and
back-off around it. Their network I/O is gevent's own (sockets, TLS and name lookups), so a
delivery waiting on an endpoint never holds the hub, with or without monkey-patching.
Secrets (passwords, tokens, webhook URLs, which carry tokens) are
:class:`~geventpool.secret.Secret` values: ``name`` and ``repr`` show only a URL's scheme and
host, and :meth:`secrets` lets the alerter redact them from any error it logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import smtplib
import socket
import ssl
import string
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from email import policy as _email_policy  # noqa: F401 - imported now, not at the first alert
from email.message import EmailMessage
from typing import Any, Protocol

import gevent.socket

from geventpool import events
from geventpool.alerts.notification import RESOLVED, Notification
from geventpool.errors import ConfigurationError, GeventPoolError
from geventpool.secret import Secret
from geventpool.tls import cooperative_context

WEBHOOK_PRESETS = ("json", "slack", "dingtalk", "wecom")
SMTP_SECURITY = ("starttls", "ssl", "none")


class DeliveryError(GeventPoolError):
    """A channel's endpoint refused or failed a notification."""


class Channel(Protocol):
    """What the alerter needs of a channel."""

    @property
    def name(self) -> str: ...

    def send(self, notification: Notification, timeout: float) -> None: ...

    def secrets(self) -> tuple[Secret | None, ...]: ...


def tls_context(ca_file: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client TLS context: the system's CAs (or ``ca_file``), hostname checked unless
    ``verify`` is False; its sockets are gevent's, so a handshake never blocks the hub."""
    context = cooperative_context(ssl.Purpose.SERVER_AUTH, ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _SMTP(smtplib.SMTP):
    """``smtplib.SMTP`` on a gevent socket: it waits without blocking the hub, with or
    without monkey-patching (STARTTLS is cooperative through :func:`tls_context`)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = gevent.socket.create_connection((host, port), timeout)
        return sock


class _SMTPS(smtplib.SMTP_SSL):
    """``smtplib.SMTP_SSL`` on a gevent socket (see :class:`_SMTP`)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = gevent.socket.create_connection((host, port), timeout)
        wrapped: socket.socket = self.context.wrap_socket(sock, server_hostname=host)
        return wrapped


class _HTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` on a gevent socket (cooperative without
    monkey-patching)."""

    def __init__(self, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._create_connection = gevent.socket.create_connection


class _HTTPSConnection(http.client.HTTPSConnection):
    """``http.client.HTTPSConnection`` on a gevent socket, with a context from
    :func:`tls_context` (so its handshake is cooperative too)."""

    def __init__(
        self, host: str, port: int | None, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._create_connection = gevent.socket.create_connection


def public_url(url: str) -> str:
    """The part of a URL that is safe to show: scheme and host."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}"


def check_url(url: str, what: str) -> str:
    """``url`` if it is an absolute http(s) URL, else :class:`ConfigurationError` (which names
    only the scheme and host, never the whole URL)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{what} must be an http(s) URL, not {public_url(url)!r}")
    return url


class LogChannel:
    """Notifications as ``alert`` events in the structured log (error when firing, info when
    resolved), with the condition, service, subject and the whole text."""

    name = "log"

    def send(self, notification: Notification, timeout: float) -> None:
        level = "info" if notification.status == RESOLVED else "error"
        events.emit(
            events.ALERT,
            level,
            status=notification.status,
            condition=notification.condition,
            service=notification.service,
            subject=notification.subject,
            summary=notification.summary,
            text=notification.text,
        )

    def secrets(self) -> tuple[Secret | None, ...]:
        return ()


class SmtpChannel:
    """Email through an SMTP server: ``security`` is ``starttls`` (default), ``ssl`` (SMTPS)
    or ``none``; ``username`` and ``password`` log in when given."""

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        *,
        security: str = "starttls",
        username: str | None = None,
        password: Secret | None = None,
        ca_file: str | None = None,
        verify: bool = True,
    ) -> None:
        if security not in SMTP_SECURITY:
            raise ConfigurationError(f"smtp security must be one of {SMTP_SECURITY}")
        if not recipients:
            raise ConfigurationError("smtp needs at least one recipient")
        if (username is None) != (password is None):
            raise ConfigurationError("smtp username and password go together")
        self._host, self._port, self._sender = host, port, sender
        self._recipients = list(recipients)
        self._security = security
        self._username, self._password = username, password
        self._context = tls_context(ca_file, verify) if security != "none" else None
        self.name = f"smtp:{host}:{port}"

    def send(self, notification: Notification, timeout: float) -> None:
        message = EmailMessage()
        message["Subject"] = notification.summary
        message["From"] = self._sender
        message["To"] = ", ".join(self._recipients)
        message.set_content(notification.text)
        smtp: smtplib.SMTP
        if self._security == "ssl":
            smtp = _SMTPS(self._host, self._port, timeout=timeout, context=self._context)
        else:
            smtp = _SMTP(self._host, self._port, timeout=timeout)
        with smtp:
            if self._security == "starttls":
                smtp.starttls(context=self._context)
            if self._username is not None and self._password is not None:
                smtp.login(self._username, self._password.reveal())
            smtp.send_message(message)

    def secrets(self) -> tuple[Secret | None, ...]:
        return (self._password,)

    def __repr__(self) -> str:
        return f"SmtpChannel({self.name}, security={self._security}, to={self._recipients})"


def _post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    context: ssl.SSLContext | None,
    method: str = "POST",
) -> bytes:
    """One HTTP request on a gevent socket; the answer's first 64 KiB, or
    :class:`DeliveryError` for a status outside 2xx (redirects are not followed: a webhook
    that moved is a configuration to fix, not a request to resend elsewhere)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = _HTTPSConnection(host, parts.port, timeout, context)
    else:
        connection = _HTTPConnection(host, parts.port, timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, target, body=body, headers=dict(headers))
        response = connection.getresponse()
        data = response.read(65536)
    finally:
        connection.close()
    if not 200 <= response.status < 300:
        raise DeliveryError(f"HTTP {response.status} {response.reason}".rstrip())
    return data


def _json_string_body(value: str) -> str:
    """``value`` escaped to stand inside a JSON string (without the quotes)."""
    return json.dumps(value)[1:-1]


def _revealed(headers: Mapping[str, str | Secret], content_type: str) -> dict[str, str]:
    """The request headers, secrets revealed, with ``Content-Type``."""
    plain = {"Content-Type": content_type}
    for key, value in headers.items():
        plain[key] = value.reveal() if isinstance(value, Secret) else value
    return plain


def _secrets_of(headers: Mapping[str, str | Secret]) -> list[Secret]:
    return [value for value in headers.values() if isinstance(value, Secret)]


def _chat_markdown(notification: Notification) -> str:
    return f"**{notification.summary}**\n\n" + notification.text.split("\n", 2)[-1].replace(
        "\n", "\n\n"
    )


def _body(preset: str, notification: Notification) -> dict[str, Any]:
    if preset == "slack":
        return {"text": f"{notification.summary}\n```\n{notification.text}\n```"}
    if preset == "dingtalk":
        markdown = {"title": notification.summary, "text": _chat_markdown(notification)}
        return {"msgtype": "markdown", "markdown": markdown}
    if preset == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": _chat_markdown(notification)}}
    return notification.as_dict()


class WebhookChannel:
    """A JSON POST to ``url`` in one of :data:`WEBHOOK_PRESETS`: ``json`` (the notification
    as a JSON object), ``slack`` (``{"text": ...}``, which Slack-compatible chats accept),
    ``dingtalk`` or ``wecom`` (their robots' markdown messages; their ``errcode`` answers
    are checked). ``sign_secret`` signs DingTalk requests (timestamp and HMAC-SHA256)."""

    def __init__(
        self,
        url: Secret,
        preset: str = "json",
        *,
        headers: Mapping[str, str | Secret] | None = None,
        sign_secret: Secret | None = None,
        ca_file: str | None = None,
        verify: bool = True,
    ) -> None:
        if preset not in WEBHOOK_PRESETS:
            raise ConfigurationError(f"webhook preset must be one of {WEBHOOK_PRESETS}")
        check_url(url.reveal(), "webhook url")
        self._url = url
        self._preset = preset
        self._headers = dict(headers or {})
        self._sign_secret = sign_secret
        self._context = tls_context(ca_file, verify)
        self.name = f"webhook:{preset}:{public_url(url.reveal())}"

    def send(self, notification: Notification, timeout: float) -> None:
        body = json.dumps(_body(self._preset, notification)).encode()
        headers = _revealed(self._headers, "application/json; charset=utf-8")
        answer = _post(self._signed_url(), body, headers, timeout=timeout, context=self._context)
        if self._preset in ("dingtalk", "wecom"):
            try:
                reply = json.loads(answer or b"{}")
            except ValueError:
                raise DeliveryError(f"{self._preset} answered something that is not JSON") from None
            if reply.get("errcode", 0) != 0:
                raise DeliveryError(
                    f"{self._preset} errcode {reply.get('errcode')}: {reply.get('errmsg')}"
                )

    def _signed_url(self) -> str:
        url = self._url.reveal()
        if self._sign_secret is None:
            return url
        timestamp = str(int(time.time() * 1000))
        secret = self._sign_secret.reveal()
        digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256)
        sign = urllib.parse.quote_plus(base64.b64encode(digest.digest()))
        return f"{url}{'&' if '?' in url else '?'}timestamp={timestamp}&sign={sign}"

    def secrets(self) -> tuple[Secret | None, ...]:
        return (self._url, self._sign_secret, *_secrets_of(self._headers))

    def __repr__(self) -> str:
        return f"WebhookChannel({self.name})"


class SmsChannel:
    """Text messages through an HTTP SMS gateway: one request per recipient, whose body is
    ``template`` (``string.Template``) with ``$to``, ``$message`` (one short line), ``$subject``
    and ``$text``; the values are JSON-escaped for a JSON ``content_type`` and URL-encoded for
    a form."""

    def __init__(
        self,
        url: Secret,
        recipients: Sequence[str],
        template: str,
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str | Secret] | None = None,
        method: str = "POST",
        ca_file: str | None = None,
        verify: bool = True,
    ) -> None:
        check_url(url.reveal(), "sms url")
        if not recipients:
            raise ConfigurationError("sms needs at least one recipient")
        try:
            string.Template(template).substitute(to="", message="", subject="", text="")
        except (KeyError, ValueError) as error:
            raise ConfigurationError(
                f"sms template: {error!r}; use $to, $message, $subject, $text"
            ) from None
        self._url, self._recipients, self._template = url, list(recipients), template
        self._content_type, self._method = content_type, method
        self._headers = dict(headers or {})
        self._context = tls_context(ca_file, verify)
        self.name = f"sms:{public_url(url.reveal())}"

    def send(self, notification: Notification, timeout: float) -> None:
        quote: Callable[[str], str] = (
            _json_string_body if "json" in self._content_type else urllib.parse.quote_plus
        )
        headers = _revealed(self._headers, self._content_type)
        for recipient in self._recipients:
            body = string.Template(self._template).substitute(
                to=quote(recipient),
                message=quote(notification.short),
                subject=quote(notification.summary),
                text=quote(notification.text),
            )
            _post(
                self._url.reveal(),
                body.encode(),
                headers,
                timeout=timeout,
                context=self._context,
                method=self._method,
            )

    def secrets(self) -> tuple[Secret | None, ...]:
        return (self._url, *_secrets_of(self._headers))

    def __repr__(self) -> str:
        return f"SmsChannel({self.name}, to={len(self._recipients)} recipients)"


class CallableChannel:
    """Any Python callable, given the notification (it runs in the channel's greenlet)."""

    def __init__(self, function: Callable[[Notification], object], name: str | None = None) -> None:
        self._function = function
        self.name = name or f"callable:{getattr(function, '__name__', 'function')}"

    def send(self, notification: Notification, timeout: float) -> None:
        self._function(notification)

    def secrets(self) -> tuple[Secret | None, ...]:
        return ()
