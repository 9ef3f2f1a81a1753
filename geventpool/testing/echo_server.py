"""The echo test service in a process of its own: ``python -m geventpool.testing.echo_server``.

Starts a :class:`~geventpool.server.thrift_server.ThriftServer` for ``echo.thrift`` on 127.0.0.1,
registers it when ``--zookeeper`` is given, prints one JSON line
``{"event": "ready", "port": N}`` on standard output once it serves, logs JSON events on
standard error, and stops gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import structlog  # noqa: E402

from geventpool.discovery.zk import DEFAULT_ROOT, ZooKeeperConfig  # noqa: E402
from geventpool.server.thrift_server import Registration, ThriftServer  # noqa: E402
from geventpool.testing.echo import EchoHandler, echo_thrift  # noqa: E402
from geventpool.tls import ServerTls  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, serve until signalled, return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--zookeeper", help="connect string; omit to serve unregistered")
    parser.add_argument("--service", default="echo")
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--session-timeout", type=float, default=10.0)
    parser.add_argument("--max-connections", type=int, default=1000)
    parser.add_argument("--idle-timeout", type=float, default=900.0)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--deregister-grace", type=float, default=0.5)
    parser.add_argument("--transport", default="buffered")
    parser.add_argument("--protocol", default="binary")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds echo() and whoami() take"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="calls of one connection at once (1: in order)"
    )
    parser.add_argument("--tls-cert", help="serve TLS only, with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    parser.add_argument("--tls-ca", help="require client certificates signed by these (mutual TLS)")
    args = parser.parse_args(argv)

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    registration = None
    if args.zookeeper:
        registration = Registration(
            zookeeper=ZooKeeperConfig(args.zookeeper, session_timeout=args.session_timeout),
            service=args.service,
            root=args.root,
        )
    tls = None
    if args.tls_cert:
        tls = ServerTls(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca)
    handler = EchoHandler("", latency=args.latency)
    server = ThriftServer(
        echo_thrift.Echo,
        handler,
        port=args.port,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        drain_timeout=args.drain_timeout,
        deregister_grace=args.deregister_grace,
        transport=args.transport,
        protocol=args.protocol,
        registration=registration,
        concurrency=args.concurrency,
        tls=tls,
    )
    server.start()
    handler.name = f"127.0.0.1:{server.port}"
    print(json.dumps({"event": "ready", "port": server.port}), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
