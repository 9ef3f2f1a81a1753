"""A status endpoint: one WSGI application, served by gevent's WSGI server.

:class:`StatusApp` is a plain WSGI callable with four routes, ``GET`` and ``HEAD`` only
(``405`` for any other method, ``404`` for any other path):

* ``/metrics``: the Prometheus registry's scrape (``prometheus_client``, the ``metrics``
  extra; without it, ``501`` saying to install ``geventpool[metrics]``);
* ``/status``: JSON of every watched client's ``status()``, its registry view when it has one
  (ZooKeeper state, rejected children and why) and every watched server's port and ``stats``;
* ``/``: a self-contained HTML page (inline CSS and JavaScript, no external asset) that
  fetches ``status`` every second and draws each service's instances and pool states.

What it promises:

* **Cheap and non-blocking**: a request reads ``status()`` and plain attributes, which take
  no lock and do no I/O, so serving it never blocks the hub; it encodes only what those give,
  bounded (texts cut at :data:`MAX_TEXT` characters, lists at :data:`MAX_ITEMS` entries, the
  registry view's rejected children at :data:`MAX_REJECTED`).
* **No script from data**: the page builds every node with ``textContent``; names come from a
  registry and are treated as hostile. Its Content-Security-Policy allows only its own inline
  script and style (by hash) and requests to itself.
* **Weak references**: watching a client or server does not keep it alive (like
  :class:`~geventpool.observe.prometheus.ClientMetrics`).
* **Bounded serving**: :func:`serve_status` binds ``127.0.0.1`` by default (the page shows
  internals: expose it only where operators are), serves at most ``max_connections``
  connections at once and closes one idle for ``idle_timeout`` seconds.

``prometheus_client`` is imported only when ``/metrics`` is asked for: ``/status`` and the
page work without the extra.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import math
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import gevent.pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from geventpool.errors import ConfigurationError
from geventpool.validation import check_seconds

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from prometheus_client import CollectorRegistry

    from geventpool.client.service import ServiceClient
    from geventpool.server.thrift_server import ThriftServer

#: The most rejected children listed per client (their total is always given).
MAX_REJECTED = 100
#: Longer texts (rejection reasons, errors) are cut to this many characters.
MAX_TEXT = 500
#: A status's lists and mappings are cut to this many entries.
MAX_ITEMS = 1000
_MAX_DEPTH = 8  # nesting of a status value; deeper parts are shown as text

_METHODS = ("GET", "HEAD")
_MISSING_METRICS = (
    b"prometheus_client is not installed: pip install 'geventpool[metrics]' to serve /metrics\n"
)


class StatusApp:
    """The WSGI application of the status endpoint (see the module's documentation).

    ``clients`` and ``servers`` are watched from the start; :meth:`watch` and
    :meth:`watch_server` add more. ``registry`` is the Prometheus registry ``/metrics``
    exposes (default: ``prometheus_client``'s process-wide one).
    """

    def __init__(
        self,
        clients: Iterable[ServiceClient] = (),
        servers: Iterable[ThriftServer] = (),
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._clients: weakref.WeakSet[ServiceClient] = weakref.WeakSet(clients)
        self._servers: weakref.WeakSet[ThriftServer] = weakref.WeakSet(servers)
        self._registry = registry

    def watch(self, client: ServiceClient) -> ServiceClient:
        """Show ``client`` on ``/status`` and the page (until it is garbage)."""
        self._clients.add(client)
        return client

    def watch_server(self, server: ThriftServer) -> ThriftServer:
        """Show ``server``'s port and numbers on ``/status`` and the page (until it is
        garbage)."""
        self._servers.add(server)
        return server

    def status(self) -> dict[str, Any]:
        """What ``/status`` answers, as plain JSON-ready values: ``clients`` (by service name,
        each with its ``status`` and its ``membership`` or None) and ``servers`` (by port)."""
        clients = sorted(self._clients, key=lambda client: client.name)
        servers = sorted(self._servers, key=lambda server: server.port)
        return {
            "clients": [
                {"status": _plain(client.status()), "membership": _membership(client)}
                for client in clients
            ],
            "servers": [_server(server) for server in servers],
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        """Answer one request (see the module's documentation for the routes)."""
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or "/"
        if method not in _METHODS:
            allow = ", ".join(_METHODS)
            status, headers = "405 Method Not Allowed", [*_TEXT, ("Allow", allow)]
            body = f"only {allow}\n".encode()
        elif path == "/":
            status, headers, body = "200 OK", _PAGE_HEADERS, PAGE
        elif path == "/status":
            body = json.dumps(self.status(), separators=(",", ":"), allow_nan=False).encode()
            status, headers = "200 OK", [("Content-Type", "application/json")]
        elif path == "/metrics":
            status, headers, body = self._metrics(environ.get("HTTP_ACCEPT", ""))
        else:
            status, headers, body = "404 Not Found", _TEXT, b"not found\n"
        start_response(
            status,
            [
                *headers,
                *_COMMON_HEADERS,
                ("Content-Length", str(len(body))),
            ],
        )
        return [] if method == "HEAD" else [body]

    def _metrics(self, accept: str) -> tuple[str, list[tuple[str, str]], bytes]:
        try:
            from prometheus_client import REGISTRY  # noqa: PLC0415 - the optional extra
            from prometheus_client.exposition import choose_encoder  # noqa: PLC0415
        except ImportError:
            return "501 Not Implemented", _TEXT, _MISSING_METRICS
        encoder, content_type = choose_encoder(accept)
        registry = self._registry if self._registry is not None else REGISTRY
        return "200 OK", [("Content-Type", content_type)], encoder(registry)


def serve_status(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    clients: Iterable[ServiceClient] = (),
    servers: Iterable[ThriftServer] = (),
    registry: CollectorRegistry | None = None,
    max_connections: int = 32,
    idle_timeout: float = 30.0,
) -> WSGIServer:
    """Start a :class:`gevent.pywsgi.WSGIServer` serving a :class:`StatusApp` of
    ``clients`` and ``servers`` on ``host`` and ``port`` (0: any free port) and return it,
    already serving: ``.server_port`` is the bound port, ``.application`` the
    :class:`StatusApp` (to watch more), ``.stop()`` ends it. At most ``max_connections``
    connections are served at once; one left idle (or stalled mid-request) for
    ``idle_timeout`` seconds is closed. No access log is written. Raises
    :class:`~geventpool.errors.ConfigurationError` for a bad ``max_connections`` or
    ``idle_timeout``."""
    whole = isinstance(max_connections, int) and not isinstance(max_connections, bool)
    if not whole or max_connections < 1:
        raise ConfigurationError(f"max_connections must be an int >= 1, not {max_connections!r}")
    check_seconds("idle_timeout", idle_timeout)
    app = StatusApp(clients, servers, registry=registry)
    server = WSGIServer(
        (host, port),
        app,
        spawn=gevent.pool.Pool(max_connections),
        handler_class=_handler_with_timeout(idle_timeout),
        log=None,
    )
    server.start()
    return server


def _handler_with_timeout(seconds: float) -> type[Any]:
    """gevent's WSGI handler that gives each request, from the first byte of its head to the
    last of its answer (or the wait for the next one on a kept-alive connection), at most
    ``seconds``: a client that trickles its head a byte at a time cannot hold a slot."""

    class Handler(WSGIHandler):  # type: ignore[misc]  # gevent is untyped
        def handle(self) -> None:
            self.socket.settimeout(seconds)
            super().handle()

        def handle_one_request(self) -> Any:
            with gevent.Timeout(seconds, False):
                return super().handle_one_request()
            return None  # over time: the connection ends

    return Handler


# -- what /status encodes ----------------------------------------------------------------------


def _plain(value: object, depth: int = 0) -> Any:
    """``value`` as JSON-ready data: a dataclass by its fields (so fields added later are
    included), mappings and sequences element by element (at most MAX_ITEMS), non-finite
    floats as None, long texts cut, anything else (or deeper than a status goes) as its
    ``str``."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if depth < _MAX_DEPTH:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                field.name: _plain(getattr(value, field.name), depth + 1)
                for field in dataclasses.fields(value)
            }
        if isinstance(value, Mapping):
            items = itertools.islice(value.items(), MAX_ITEMS)
            return {str(key)[:MAX_TEXT]: _plain(item, depth + 1) for key, item in items}
        if isinstance(value, list | tuple):
            return [_plain(item, depth + 1) for item in value[:MAX_ITEMS]]
    return str(value)[:MAX_TEXT]


def _membership(client: ServiceClient) -> dict[str, Any] | None:
    """The client's registry view: path, ZooKeeper connection state, instances in the view,
    whether empty-list protection holds it, rejected children (at most MAX_REJECTED, sorted
    by name, with their total) and the view's counters; None without a registry."""
    membership = client.membership
    if membership is None:
        return None
    rejected = membership.rejected
    return {
        "path": membership.path,
        "zookeeper": str(membership.client.state),
        "instances": len(membership.instances),
        "protecting": membership.protecting,
        "rejected": [
            {"child": name[:MAX_TEXT], "reason": str(reason)[:MAX_TEXT]}
            for name, reason in sorted(rejected.items())[:MAX_REJECTED]
        ],
        "rejected_total": len(rejected),
        "stats": _plain(membership.stats),
    }


def _server(server: ThriftServer) -> dict[str, Any]:
    """A server's port, its registration node's path (None if unregistered) and its stats."""
    registrar = server.registrar
    return {
        "port": server.port,
        "registered": registrar.path if registrar is not None else None,
        "stats": _plain(server.stats),
    }


# -- the page ----------------------------------------------------------------------------------

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>geventpool status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d232a; background: #f4f5f7; }
header { display: flex; align-items: baseline; gap: 1em; padding: 10px 20px;
  background: #22313f; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
#updated { font-size: 12px; opacity: .85; }
#updated.stale { color: #ffb3a7; opacity: 1; font-weight: 600; }
main { padding: 12px 20px; }
section.service, section.servers { background: #fff; border: 1px solid #d8dce1;
  border-radius: 6px; margin: 0 0 14px; padding: 10px 14px; }
h2 { font-size: 16px; margin: 0 0 6px; display: flex; gap: .6em; align-items: center; }
.badge { font-size: 11px; font-weight: 600; border-radius: 9px; padding: 1px 8px;
  background: #e4e7eb; color: #38424c; }
.badge.good { background: #d3f2dc; color: #17602e; }
.badge.bad { background: #fbd9d3; color: #8b1c0c; }
.totals { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 0 0 8px; font-size: 13px; }
.totals span b { font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: right; padding: 3px 8px; border-bottom: 1px solid #eceef1;
  font-variant-numeric: tabular-nums; white-space: nowrap; }
th { color: #5b6670; font-weight: 600; background: #fafbfc; }
th:first-child, td:first-child, .state, .last_error, .bar, .registered { text-align: left; }
td.last_error { white-space: normal; max-width: 260px; overflow-wrap: anywhere;
  color: #8b1c0c; }
tr.ejected td { background: #fff3f0; }
.bar { width: 140px; }
.meter { display: flex; height: 10px; background: #eef0f2; border-radius: 3px;
  overflow: hidden; width: 130px; }
.meter .in_use { background: #2f6fb3; }
.meter .opening { background: #e2a93b; }
.meter .idle { background: #9cc3e8; }
.rejected { margin: 8px 0 0; font-size: 13px; }
.rejected li { overflow-wrap: anywhere; }
.empty { color: #5b6670; font-style: italic; }
</style>
</head>
<body>
<header><h1>geventpool status</h1><span id="updated">loading</span></header>
<main>
<div id="services"></div>
<section class="servers" id="servers-section">
<h2>Servers</h2>
<div id="servers"></div>
</section>
</main>
<script>
"use strict";
const REFRESH_MS = 1000;

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) node.append(child instanceof Node ? child : text(child));
  return node;
}

function text(value) {
  return document.createTextNode(value === null || value === undefined ? "" : String(value));
}

function num(value) {
  return typeof value === "number" && isFinite(value) ? value : "-";
}

function badge(label, kind) {
  return el("span", "badge" + (kind ? " " + kind : ""), label);
}

function table(columns, rows) {
  const head = el("tr", "", ...columns.map(([key, title]) => el("th", key, title)));
  return el("table", "", el("thead", "", head), el("tbody", "", ...rows));
}

function cell(name, value) {
  return el("td", name, value);
}

function count(value) {
  return typeof value === "number" && isFinite(value) && value > 0 ? value : 0;
}

// The pool's call slots (connections times calls per connection): in use, then those of
// the connections opening, then those of the idle ones.
function meter(pool) {
  const perConnection = Math.max(count(pool.max_inflight), 1);
  const slots = Math.max(count(pool.max_connections) * perConnection, 1);
  const parts = [["in_use", count(pool.in_use)],
    ["opening", count(pool.opening) * perConnection], ["idle", count(pool.idle) * perConnection]];
  const box = el("div", "meter");
  let left = slots;
  for (const [part, used] of parts) {
    const bar = el("div", part);
    const shown = Math.min(used, left);
    left -= shown;
    bar.style.width = (100 * shown / slots) + "%";
    box.append(bar);
  }
  box.title = `${num(pool.in_use)} calls in use of ${num(pool.max_connections)} connections ` +
    `of ${perConnection}; ${num(pool.opening)} opening, ${num(pool.idle)} idle`;
  return box;
}

const INSTANCE_COLUMNS = [
  ["instance", "instance"], ["state", "state"], ["bar", "pool"], ["in_use", "in use"],
  ["idle", "idle"], ["opening", "opening"], ["max_connections", "max"],
  ["max_inflight", "per conn"], ["waiters", "waiters"], ["inflight", "inflight"],
  ["ejected", "ejected"], ["failures", "failures"], ["last_error", "last error"],
];

function instanceRow(pool) {
  const inflight = Array.isArray(pool.inflight) ? pool.inflight : [];
  const total = inflight.reduce((sum, n) => sum + (num(n) === "-" ? 0 : n), 0);
  const row = el("tr", pool.ejected ? "ejected" : "",
    cell("instance", pool.instance),
    cell("state", pool.state),
    el("td", "bar", meter(pool)),
    cell("in_use", num(pool.in_use)),
    cell("idle", num(pool.idle)),
    cell("opening", num(pool.opening)),
    cell("max_connections", num(pool.max_connections)),
    cell("max_inflight", num(pool.max_inflight)),
    cell("waiters", num(pool.waiters)),
    cell("inflight", total),
    cell("ejected", pool.ejected ? `yes (${num(pool.ejections)})` : "no"),
    cell("failures", num(pool.failures)),
    cell("last_error", pool.last_error),
  );
  row.dataset.instance = String(pool.instance);
  row.title = `${inflight.length} connections, calls on each: ${inflight.join(" ")}`;
  return row;
}

const TOTALS = [
  ["in_use", "in use"], ["idle", "idle"], ["waiters", "waiters"],
  ["max_connections", "max"], ["exhausted", "exhausted"], ["retries", "retries"],
  ["retries_refused", "retries refused"], ["retry_budget", "retry budget"],
  ["hedged", "hedged"],
];

function service(client) {
  const status = client.status || {};
  const view = client.membership;
  const title = el("h2", "", el("span", "name", status.service),
    status.started ? badge("started", "good") : badge("not started", "bad"));
  if (view) {
    title.append(badge("ZooKeeper " + view.zookeeper,
      view.zookeeper === "CONNECTED" ? "good" : "bad"));
    if (view.protecting) title.append(badge("empty-list protection", "bad"));
  }
  const totals = el("div", "totals",
    ...TOTALS.map(([key, label]) => el("span", key, label + " ", el("b", "", num(status[key])))));
  const pools = Array.isArray(status.instances) ? status.instances : [];
  const box = el("section", "service", title, totals,
    pools.length ? table(INSTANCE_COLUMNS, pools.map(instanceRow))
      : el("p", "empty", "no instance"));
  box.dataset.service = String(status.service);
  if (view && view.rejected_total) {
    const list = el("ul", "", ...view.rejected.map((child) =>
      el("li", "rejected-child", el("b", "", child.child), ": ", child.reason)));
    box.append(el("div", "rejected",
      `${view.rejected_total} rejected ${view.rejected_total === 1 ? "child" : "children"}` +
      ` in ${view.path}`, list));
  }
  return box;
}

const SERVER_COLUMNS = [
  ["port", "port"], ["registered", "registered as"], ["connections", "connections"],
  ["accepted", "accepted"], ["calls", "calls"], ["handler_errors", "handler errors"],
  ["killed", "killed"],
];

function serverRow(server) {
  const stats = server.stats || {};
  const row = el("tr", "",
    cell("port", num(server.port)),
    cell("registered", server.registered || "-"),
    ...SERVER_COLUMNS.slice(2).map(([key]) => cell(key, num(stats[key]))));
  row.dataset.port = String(server.port);
  return row;
}

function render(data) {
  const clients = Array.isArray(data.clients) ? data.clients : [];
  const servers = Array.isArray(data.servers) ? data.servers : [];
  document.getElementById("services").replaceChildren(
    ...(clients.length ? clients.map(service) : [el("p", "empty", "no client is watched")]));
  document.getElementById("servers").replaceChildren(
    servers.length ? table(SERVER_COLUMNS, servers.map(serverRow))
      : el("p", "empty", "no server is watched"));
}

function stamp(message, stale) {
  const node = document.getElementById("updated");
  node.textContent = message;
  node.className = stale ? "stale" : "";
}

async function refresh() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 5000);
  try {
    const reply = await fetch("status", {cache: "no-store", signal: abort.signal});
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    render(await reply.json());
    stamp("updated " + new Date().toLocaleTimeString(), false);
  } catch (error) {
    stamp("stale: " + error.message, true);
  } finally {
    clearTimeout(timer);
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
</script>
</body>
</html>
"""

PAGE = PAGE_HTML.encode()


def _sha256_source(tag: str) -> str:
    """The CSP source that allows the page's one inline ``tag`` (by its hash)."""
    match = re.search(f"<{tag}>(.*?)</{tag}>", PAGE_HTML, re.DOTALL)
    if match is None:
        raise RuntimeError(f"the page has no <{tag}>")
    digest = base64.b64encode(hashlib.sha256(match.group(1).encode()).digest()).decode()
    return f"'sha256-{digest}'"


_CSP = (
    f"default-src 'none'; script-src {_sha256_source('script')}; "
    f"style-src {_sha256_source('style')}; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = [("Content-Type", "text/html; charset=utf-8"), ("Content-Security-Policy", _CSP)]
_TEXT = [("Content-Type", "text/plain; charset=utf-8")]
_COMMON_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]
