"""The status endpoint over real HTTP (gevent's WSGI server on 127.0.0.1), showing a real
client of real echo servers registered in the real ZooKeeper after real calls; and its page
in a real headless browser (Debian's chromium): the DOM after the page's script fetched
/status, and a screenshot."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.pywsgi import WSGIServer
from kazoo.client import KazooClient
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from geventpool.client.pool import PoolSettings
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.discovery.zk import DEFAULT_ROOT
from geventpool.errors import ConfigurationError
from geventpool.observe.prometheus import ClientMetrics, ServerMetrics
from geventpool.observe.status import PAGE, StatusApp, serve_status
from geventpool.server.thrift_server import Registration, ThriftServer
from geventpool.testing.browser import dump_dom, find_chromium, screenshot
from geventpool.testing.echo import echo_thrift

pytestmark = pytest.mark.gevent_timeout(30)

#: A name a hostile registry could hold: markup, and no "/" (so it is a valid znode name).
HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)"


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


def request(
    server: WSGIServer, path: str, method: str = "GET", headers: Mapping[str, str] | None = None
) -> Reply:
    """One HTTP request to ``server`` on its own connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


@pytest.fixture
def web() -> Iterator[Callable[..., WSGIServer]]:
    """``web(**options)`` starts ``serve_status(**options)``; all are stopped after the test."""
    started: list[WSGIServer] = []

    def start(**options: Any) -> WSGIServer:
        server = serve_status(**options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout=1)


@dataclass
class Fleet:
    client: ServiceClient
    servers: list[ThriftServer]
    calls: int

    def names(self) -> set[str]:
        return {f"127.0.0.1:{server.port}" for server in self.servers}


@pytest.fixture
def fleet(
    serve: Callable[..., ThriftServer], zk_hosts: str, zk: KazooClient
) -> Iterator[Callable[..., Fleet]]:
    """``fleet(**client_options)``: two echo servers registered as ``echo`` in the test's
    ZooKeeper chroot, a hostile child beside them (rejected), and a started client of them
    that made 10 calls; the client is stopped after the test."""
    clients: list[ServiceClient] = []

    def build(**options: Any) -> Fleet:
        servers = [
            serve(registration=Registration(zookeeper=zk_hosts, service="echo")) for _ in range(2)
        ]
        zk.create(f"{DEFAULT_ROOT}/echo/{HOSTILE}", b"<not a payload>")
        client = ServiceClient(
            echo_thrift.Echo,
            "echo",
            zookeeper=zk_hosts,
            pool=PoolSettings(max_connections=4),
            **options,
        )
        clients.append(client)
        client.start()
        membership = client.membership
        assert membership is not None
        assert membership.wait_for(lambda view: len(view) == 2, timeout=10)
        for n in range(10):
            assert client.echo(str(n)) == str(n)
        return Fleet(client, servers, calls=10)

    yield build
    for client in clients:
        client.stop()


def test_status_is_json_of_each_service_its_instances_counts_registry_view_and_servers(
    fleet: Callable[..., Fleet], web: Callable[..., WSGIServer]
) -> None:
    echo = fleet()
    server = web(clients=[echo.client], servers=echo.servers)
    with echo.client.connection() as pinned:  # one connection held while the page looks
        assert pinned.echo("held") == "held"
        reply = request(server, "/status")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["Cache-Control"] == "no-store"
    data = json.loads(reply.body)
    (entry,) = data["clients"]
    status = entry["status"]
    assert status["service"] == "echo" and status["started"] is True
    instances = {pool["instance"]: pool for pool in status["instances"]}
    assert set(instances) == echo.names()
    assert status["in_use"] == 1 == sum(pool["in_use"] for pool in instances.values())
    assert all(pool["max_connections"] == 4 for pool in instances.values())
    assert status["max_connections"] == 8
    assert sum(pool["checkouts"] for pool in instances.values()) == echo.calls + 1
    assert all(pool["state"] == "active" and not pool["ejected"] for pool in instances.values())
    view = entry["membership"]
    assert view["zookeeper"] == "CONNECTED" and view["instances"] == 2
    assert view["path"] == f"{DEFAULT_ROOT}/echo" and view["protecting"] is False
    assert [child["child"] for child in view["rejected"]] == [HOSTILE]
    assert view["rejected"][0]["reason"] and view["rejected_total"] == 1
    servers = data["servers"]
    assert [s["port"] for s in servers] == sorted(s.port for s in echo.servers)
    assert sum(s["stats"]["calls"] for s in servers) == echo.calls + 1
    assert all(s["registered"].startswith(f"{DEFAULT_ROOT}/echo/") for s in servers)


def test_metrics_is_the_registrys_scrape_in_the_format_asked_for(
    fleet: Callable[..., Fleet], web: Callable[..., WSGIServer]
) -> None:
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    echo = fleet(observers=[metrics])
    metrics.watch(echo.client)
    for server in echo.servers:
        ServerMetrics(registry).watch(server)
    web_server = web(registry=registry)
    reply = request(web_server, "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    calls = {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
        if sample.name == "geventpool_client_calls_total"
    }
    ok = {labels: n for labels, n in calls.items() if ("outcome", "ok") in labels}
    assert {dict(labels)["address"] for labels in ok} <= echo.names()
    assert sum(ok.values()) == echo.calls
    assert b"geventpool_server_calls_total" in reply.body
    open_metrics = request(
        web_server, "/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert open_metrics.body.endswith(b"# EOF\n")
    head = request(web_server, "/metrics", method="HEAD")
    assert head.status == 200 and head.body == b"" and int(head.headers["Content-Length"]) > 0


def test_without_prometheus_client_metrics_says_what_to_install_and_status_still_works(
    web: Callable[..., WSGIServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("prometheus_client", "prometheus_client.exposition"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    server = web()
    reply = request(server, "/metrics")
    assert reply.status == 501
    assert b"pip install 'geventpool[metrics]'" in reply.body
    status = request(server, "/status")
    assert status.status == 200 and json.loads(status.body) == {"clients": [], "servers": []}


def test_unknown_paths_are_404_and_methods_other_than_get_and_head_405(
    web: Callable[..., WSGIServer],
) -> None:
    server = web()
    for path in ("/nope", "/status/", "/index.html", "/metrics/x"):
        assert request(server, path).status == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/", "/status", "/metrics"):
            reply = request(server, path, method=method)
            assert reply.status == 405, (method, path)
            assert reply.headers["Allow"] == "GET, HEAD"
    page = request(server, "/")
    assert page.status == 200 and page.body == PAGE
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    head = request(server, "/", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["Content-Length"]) == len(PAGE)


def test_a_connection_left_idle_is_closed_and_bad_settings_are_refused(
    web: Callable[..., WSGIServer],
) -> None:
    server = web(idle_timeout=0.2)
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as idle:
        began = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server, saying nothing
        assert time.monotonic() - began < 3
    assert request(server, "/status").status == 200  # and it still serves
    for bad in ({"max_connections": 0}, {"max_connections": True}, {"idle_timeout": 0}):
        with pytest.raises(ConfigurationError):
            serve_status(**bad)


def test_clients_trickling_their_requests_cannot_hold_every_slot(
    web: Callable[..., WSGIServer],
) -> None:
    server = web(max_connections=2, idle_timeout=0.5)
    trickling = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(2)]

    def trickle(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for byte in b"GET /status HTTP/1.1\r\nHost: x\r\n":  # never the blank line
                sock.sendall(bytes([byte]))
                gevent.sleep(0.1)  # a byte well within the per-read timeout

    senders = [gevent.spawn(trickle, sock) for sock in trickling]
    try:
        gevent.sleep(0.2)  # both slots are taken
        began = time.monotonic()
        assert request(server, "/status").status == 200
        assert time.monotonic() - began < 2.5  # served once the tricklers' time ran out
    finally:
        gevent.killall(senders)
        for sock in trickling:
            sock.close()


def test_the_page_is_self_contained() -> None:
    page = PAGE.decode()
    for external in ("http://", "https://", " src=", "href=", "@import", "url("):
        assert external not in page, external
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page


def test_a_hostile_service_name_is_data_in_the_json(
    serve: Callable[..., ThriftServer], web: Callable[..., WSGIServer]
) -> None:
    target = serve()
    with ServiceClient(
        echo_thrift.Echo, HOSTILE, instances=[Instance(host="127.0.0.1", port=target.port)]
    ) as client:
        client.echo("x")
        reply = request(web(clients=[client]), "/status")
    (entry,) = json.loads(reply.body)["clients"]
    assert entry["status"]["service"] == HOSTILE and entry["membership"] is None
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_a_client_that_is_garbage_is_no_longer_shown(
    serve: Callable[..., ThriftServer], web: Callable[..., WSGIServer]
) -> None:
    target = serve()
    app = StatusApp()
    client = ServiceClient(
        echo_thrift.Echo, "echo", instances=[Instance(host="127.0.0.1", port=target.port)]
    )
    app.watch(client)
    app.watch_server(target)
    assert [c["status"]["service"] for c in app.status()["clients"]] == ["echo"]
    del client
    assert app.status()["clients"] == []
    assert [s["port"] for s in app.status()["servers"]] == [target.port]


# -- the page in a headless browser ------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    """Debian's chromium: missing in CI is a failure, elsewhere a skip that says why."""
    found = find_chromium()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: scripts/setup.sh installs Debian's chromium")
        pytest.skip("chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    return found


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find(self, tag: str, **attrs: str) -> list[Node]:
        return [
            node
            for node in self.walk()
            if node.tag == tag and all(node.attrs.get(k) == v for k, v in attrs.items())
        ]


class _Tree(HTMLParser):
    """The DOM chromium serialized, as a tree of :class:`Node` (text entities decoded)."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr", "wbr", "source"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {key: value or "" for key, value in attrs})
        self._open[-1].children.append(node)
        if tag not in self.VOID:
            self._open.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)


def parse(html: str) -> Node:
    tree = _Tree()
    tree.feed(html)
    tree.close()
    return tree.root


def counting(app: StatusApp, seen: list[str]) -> Callable[..., Iterable[bytes]]:
    """``app``, noting the path of every request in ``seen``."""

    def counted(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(environ["PATH_INFO"])
        return app(environ, start_response)

    return counted


@pytest.mark.gevent_timeout(90)
def test_the_page_in_a_headless_browser_shows_each_instance_with_its_numbers_live(
    chromium: str,
    fleet: Callable[..., Fleet],
    serve: Callable[..., ThriftServer],
) -> None:
    echo = fleet()
    hostile = ServiceClient(
        echo_thrift.Echo, HOSTILE, instances=[Instance(host="127.0.0.1", port=echo.servers[0].port)]
    )
    app = StatusApp([echo.client, hostile], echo.servers)
    seen: list[str] = []
    web_server = WSGIServer(("127.0.0.1", 0), counting(app, seen), log=None)
    web_server.start()
    try:
        with hostile:
            hostile.echo("x")
            with echo.client.connection() as pinned:
                assert pinned.echo("held") == "held"
                began = time.monotonic()
                dom = dump_dom(f"http://127.0.0.1:{web_server.server_port}/", budget=3.5)
                took = time.monotonic() - began
                expected = app.status()  # nothing moved while the browser looked
    finally:
        web_server.stop(timeout=1)
    print(f"chromium --dump-dom took {took:.2f}s, /status fetched {seen.count('/status')} times")
    assert seen.count("/status") >= 2, seen  # it refreshes on its own
    document = parse(dom)
    (updated,) = document.find("span", id="updated")
    assert updated.text().startswith("updated "), updated.text()
    (section,) = document.find("section", **{"data-service": "echo"})
    rows = {row.attrs["data-instance"]: row for row in section.find("tr") if row.attrs}
    assert set(rows) == echo.names()
    (status,) = (c["status"] for c in expected["clients"] if c["status"]["service"] == "echo")
    for pool in status["instances"]:
        cells = {cell.attrs["class"]: cell.text() for cell in rows[pool["instance"]].find("td")}
        assert cells["instance"] == pool["instance"]
        assert cells["state"] == "active" and cells["ejected"] == "no"
        for key in ("in_use", "idle", "opening", "max_connections", "waiters", "failures"):
            assert cells[key] == str(pool[key]), (key, cells, pool)
    in_use = sum(int(row.find("td", **{"class": "in_use"})[0].text()) for row in rows.values())
    assert in_use == 1
    assert section.find("span", **{"class": "max_connections"})[0].text() == "max 8"
    (child,) = section.find("li", **{"class": "rejected-child"})
    assert child.text().startswith(HOSTILE + ": ")
    # The hostile names are text: no element came out of them.
    (named,) = document.find("section", **{"data-service": HOSTILE})
    assert named.find("span", **{"class": "name"})[0].text() == HOSTILE
    assert document.find("img") == [] and len(document.find("script")) == 1
    ports = [row.attrs["data-port"] for row in document.find("tr") if "data-port" in row.attrs]
    assert ports == [str(p) for p in sorted(s.port for s in echo.servers)]


@pytest.mark.gevent_timeout(90)
def test_a_screenshot_of_the_page_shows_it_drawn(
    chromium: str,
    fleet: Callable[..., Fleet],
    web: Callable[..., WSGIServer],
    tmp_path: Path,
) -> None:
    echo = fleet()
    server = web(clients=[echo.client], servers=echo.servers)
    png = screenshot(f"http://127.0.0.1:{server.server_port}/", tmp_path / "status.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 10_000
    with Image.open(png) as image:
        assert image.size == (1200, 800)
        below_header = image.convert("L").crop((0, 60, 1200, 800))
        dark = sum(below_header.histogram()[:128])
    # Text and tables below the header: about 7,000 dark pixels for this service; a page
    # whose script drew nothing has about 300 (the empty "Servers" box).
    assert dark > 3_000, dark
