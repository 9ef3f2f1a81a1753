"""The status page's screenshot in the docs (docs/status-page.png), taken by headless chromium.

In one process, beside a ZooKeeper of its own (a temporary folder): echo servers on 127.0.0.1,
two clients and greenlets calling them without pause, and the status endpoint
(``serve_status``). ``echo`` comes from the registry: two servers registered themselves, a
third znode names a port where nothing listens any more (a crashed server whose session has
not ended yet: the client ejects it, with its last error) and a fourth holds no valid payload
(rejected, with the reason). ``search`` has fixed instances, pipelines 4 calls per connection
and is busy enough to have waiters. Once the numbers settle, chromium takes the page at
1200x800.

``python scripts/status_screenshot.py [--out docs/status-page.png]``; needs what
``scripts/setup.sh`` installs (ZooKeeper, Debian's ``chromium``, the ``metrics`` extra).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import structlog  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from geventpool.client.pool import PoolSettings  # noqa: E402
from geventpool.client.retrying import Retry  # noqa: E402
from geventpool.client.service import ServiceClient  # noqa: E402
from geventpool.discovery.instance import Instance  # noqa: E402
from geventpool.discovery.payloads import encode_instance  # noqa: E402
from geventpool.discovery.zk import DEFAULT_ROOT, connect  # noqa: E402
from geventpool.errors import GeventPoolError  # noqa: E402
from geventpool.observe.prometheus import ClientMetrics, ServerMetrics  # noqa: E402
from geventpool.observe.status import serve_status  # noqa: E402
from geventpool.server.thrift_server import Registration, ThriftServer  # noqa: E402
from geventpool.testing.browser import screenshot  # noqa: E402
from geventpool.testing.echo import EchoHandler, echo_thrift  # noqa: E402
from geventpool.testing.zookeeper import ZooKeeperServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def start_server(registration: Registration | None = None) -> ThriftServer:
    """An echo server on a free port of 127.0.0.1."""
    server = ThriftServer(
        echo_thrift.Echo, EchoHandler(""), deregister_grace=0.0, registration=registration
    )
    server.start()
    return server


def caller(client: ServiceClient, seconds: float) -> None:
    """Call ``client`` without pause, each call taking ``seconds`` on the server."""
    while True:
        try:
            client.call("slow_echo", "x", seconds)
        except GeventPoolError:
            gevent.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    parser.add_argument("--warm-up", type=float, default=3.0, help="seconds before the picture")
    options = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    with tempfile.TemporaryDirectory(prefix="geventpool-screenshot-") as folder:
        zookeeper = ZooKeeperServer(Path(folder))
        zookeeper.start()
        try:
            return picture(zookeeper.hosts, options.out.resolve(), options.warm_up)
        finally:
            zookeeper.stop()


def picture(hosts: str, out: Path, warm_up: float) -> int:
    """Start the servers, clients and callers on ZooKeeper ``hosts``; take the picture."""
    registration = Registration(zookeeper=hosts, service="echo")
    servers = [start_server(registration) for _ in range(2)]
    servers += [start_server() for _ in range(2)]
    admin = connect(hosts)
    gone = Instance(host="127.0.0.1", port=free_port())  # nothing listens there
    admin.create(f"{DEFAULT_ROOT}/echo/{gone}", encode_instance(gone))
    admin.create(f"{DEFAULT_ROOT}/echo/10.0.0.7:9090", b"{not json")
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    echo = ServiceClient(
        echo_thrift.Echo,
        "echo",
        zookeeper=hosts,
        pool=PoolSettings(max_connections=6, max_inflight=1, eject_backoff=30.0),
        retry=Retry(idempotent=True, retries=2),
        observers=[metrics],
    )
    search = ServiceClient(
        echo_thrift.Echo,
        "search",
        instances=[Instance(host="127.0.0.1", port=server.port) for server in servers[2:]],
        pool=PoolSettings(max_connections=3, max_inflight=4, pool_timeout=0.5),
        observers=[metrics],
    )
    server_metrics = ServerMetrics(registry)
    for server in servers:
        server_metrics.watch(server)
    web = serve_status(clients=[echo, search], servers=servers, registry=registry)
    callers = [gevent.spawn(caller, echo, 0.02) for _ in range(10)]
    callers += [gevent.spawn(caller, search, 0.05) for _ in range(30)]
    try:
        gevent.sleep(warm_up)
        url = f"http://127.0.0.1:{web.server_port}/"
        path = screenshot(url, out, size=(1200, 800), budget=1.5)
    finally:
        gevent.killall(callers, timeout=2)
        web.stop(timeout=1)
        for client in (echo, search):
            client.stop()
        for server in servers:
            server.stop(drain_timeout=0.5)
        admin.stop()
        admin.close()
    print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
