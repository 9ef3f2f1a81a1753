"""A real HTTP server for tests of webhooks and SMS gateways, on 127.0.0.1 in this process.

:class:`HttpReceiver` records every request (method, path, query, headers, body) and answers
according to :attr:`HttpReceiver.mode`: ``ok`` (200 with :attr:`HttpReceiver.reply`),
``fail`` (500), or ``hang`` (accepts, reads the request, never answers). ``GET /_requests``
returns the requests recorded so far as JSON (for a verdict in another process). Given an
``ssl_context`` it serves HTTPS.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.pywsgi import WSGIServer


@dataclass(frozen=True)
class Request:
    """One request as received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """The body as a URL-encoded form."""
        return dict(urllib.parse.parse_qsl(self.body.decode()))


class HttpReceiver:
    """Records requests and answers them as :attr:`mode` says."""

    def __init__(
        self,
        reply: bytes = b'{"errcode": 0, "errmsg": "ok"}',
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.reply = reply
        self.mode = "ok"
        self.requests: list[Request] = []
        tls: dict[str, Any] = {"ssl_context": ssl_context} if ssl_context else {}
        self._scheme = "https" if ssl_context else "http"
        self._server = WSGIServer(("127.0.0.1", 0), self._app, log=None, error_log=None, **tls)

    def start(self) -> HttpReceiver:
        """Start listening; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop, cutting requests left hanging."""
        self._server.stop(timeout=0.1)

    def url(self, path: str = "/hook") -> str:
        """The URL of ``path`` on this receiver."""
        return f"{self._scheme}://127.0.0.1:{self._server.server_port}{path}"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Request]:
        """Wait until ``count`` requests arrived; return them (AssertionError on timeout)."""
        with gevent.Timeout(timeout, AssertionError(f"{len(self.requests)} of {count} requests")):
            while len(self.requests) < count:
                gevent.sleep(0.01)
        return self.requests

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/_requests":
            start_response("200 OK", [("Content-Type", "application/json")])
            recorded = [
                {"path": r.path, "query": r.query, "body": r.body.decode(errors="replace")}
                for r in self.requests
            ]
            return [json.dumps(recorded).encode()]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        self.requests.append(
            Request(
                environ["REQUEST_METHOD"],
                environ["PATH_INFO"],
                dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""))),
                headers,
                body,
            )
        )
        if self.mode == "hang":
            gevent.sleep(3600)
        if self.mode == "fail":
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"broken"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [self.reply]
