"""Apache Thrift's own Python library (PyPI ``thrift``) as a peer of geventpool, for interop tests.

``python -m geventpool.testing.apache_peer serve --gen DIR ...`` serves ``echo.thrift`` with
Apache Thrift's ``TThreadedServer`` (OS threads, no gevent) on 127.0.0.1 and prints one JSON line
``{"event": "ready", "port": N}``; ``... call --gen DIR --port N ...`` runs a fixed script of
calls with Apache Thrift's generated client and prints one JSON line of their outcomes.

``DIR`` holds the code ``thrift --gen py`` generated from ``echo.thrift`` (:func:`generate`
makes it; the compiler is Debian's ``thrift-compiler``). Needs the ``thrift`` package, which only
the ``test`` extra installs; nothing in geventpool itself imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from thrift.protocol import TBinaryProtocol, TCompactProtocol
from thrift.server import TServer
from thrift.Thrift import TApplicationException
from thrift.transport import TSocket, TTransport

from geventpool.testing.echo import IDL

#: What the ``call`` script sends, in order; the tests compare its output with this.
CALL_SCRIPT_MESSAGES = ("hello", "", "ünïcødé ✓", "x" * 70_000)


def generate(out: Path, idl: Path = IDL) -> Path:
    """Generate Apache Thrift's Python code for ``idl`` into ``out``; returns ``out``.

    Raises ``RuntimeError`` naming the package to install when the compiler is missing.
    """
    compiler = shutil.which("thrift")
    if compiler is None:
        raise RuntimeError(
            "Apache Thrift's compiler `thrift` is not installed: run scripts/setup.sh "
            "(as root it installs Debian's thrift-compiler)"
        )
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, "--gen", "py", "-out", str(out), str(idl)], check=True, timeout=60)
    return out


def _factories(protocol: str, transport: str) -> tuple[Any, Any]:
    """Apache Thrift's protocol and transport factories for geventpool's codec names."""
    protocols = {
        "binary": TBinaryProtocol.TBinaryProtocolAcceleratedFactory(),
        "binary-pure": TBinaryProtocol.TBinaryProtocolFactory(),
        "compact": TCompactProtocol.TCompactProtocolAcceleratedFactory(),
        "compact-pure": TCompactProtocol.TCompactProtocolFactory(),
    }
    transports = {
        "buffered": TTransport.TBufferedTransportFactory(),
        "framed": TTransport.TFramedTransportFactory(),
    }
    return protocols[protocol], transports[transport]


def _generated() -> tuple[Any, Any]:
    """The generated ``echo.Echo`` and ``echo.ttypes`` modules (``--gen`` is on the path)."""
    return importlib.import_module("echo.Echo"), importlib.import_module("echo.ttypes")


class _Handler:
    """``Echo`` for Apache Thrift's generated processor, with its behaviour of the echo handler."""

    def __init__(self, ttypes: Any, name: str) -> None:
        self._ttypes = ttypes
        self.name = name
        self.notified: list[str] = []

    def echo(self, msg: str) -> str:
        return msg

    def slow_echo(self, msg: str, seconds: float) -> str:
        time.sleep(seconds)
        return msg

    def add(self, a: int, b: int) -> int:
        return a + b

    def ping(self) -> None:
        return None

    def whoami(self) -> str:
        return self.name

    def refuse(self, reason: str) -> None:
        raise self._ttypes.Refused(reason=reason)

    def crash(self, message: str) -> None:
        raise RuntimeError(message)

    def table(self, counts: dict[str, int]) -> dict[int, bytes]:
        return {count: key.encode() for key, count in counts.items()}

    def items(self, count: int) -> list[Any]:
        item = self._ttypes.Item
        return [item(id=i, name=f"item {i}") for i in range(min(count, 100_000))]

    def notify(self, msg: str) -> None:
        self.notified.append(msg)


def _serve(args: argparse.Namespace) -> int:
    Echo, ttypes = _generated()
    protocol, transport = _factories(args.protocol, args.transport)
    socket = TSocket.TServerSocket(host="127.0.0.1", port=args.port)
    socket.listen()
    socket.listen = lambda: None  # serve() would listen again, on another free port
    port = socket.handle.getsockname()[1]
    handler = _Handler(ttypes, f"127.0.0.1:{port}")
    server = TServer.TThreadedServer(
        Echo.Processor(handler), socket, transport, protocol, daemon=True
    )
    print(json.dumps({"event": "ready", "port": port}), flush=True)
    server.serve()  # SIGTERM ends the process
    return 0


def _call(args: argparse.Namespace) -> int:
    Echo, ttypes = _generated()
    protocol, transport = _factories(args.protocol, args.transport)
    socket = TSocket.TSocket("127.0.0.1", args.port)
    socket.setTimeout(10_000)
    trans = transport.getTransport(socket)
    client = Echo.Client(protocol.getProtocol(trans))
    trans.open()
    out: dict[str, Any] = {}
    out["echo"] = [client.echo(message) for message in CALL_SCRIPT_MESSAGES]
    out["add"] = client.add(2**62, 2**62 - 1)
    out["add_negative"] = client.add(-(2**63), 0)
    out["ping"] = client.ping()
    client.notify("from apache")  # oneway: the next reply must still be whoami's
    out["whoami"] = client.whoami()
    out["slow_echo"] = client.slow_echo("later", 0.05)
    try:
        client.refuse("no thanks")
    except ttypes.Refused as refused:
        out["refuse"] = {"declared": True, "reason": refused.reason}
    try:
        client.crash("boom")
    except TApplicationException as error:
        out["crash"] = {"type": error.type, "message": error.message}
    table = client.table({"a": 1, "bé": 2, "": -3})
    out["table"] = {str(key): value.decode() for key, value in sorted(table.items())}
    items = client.items(1000)
    out["items"] = [len(items), items[0].id, items[-1].id, items[-1].name]
    out["echo_after"] = client.echo("still in step")
    trans.close()
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run ``serve`` or ``call``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["serve", "call"])
    parser.add_argument("--gen", required=True, help="the output of `thrift --gen py`")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--protocol", default="binary")
    parser.add_argument("--transport", default="buffered")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.gen)
    return _serve(args) if args.command == "serve" else _call(args)


if __name__ == "__main__":
    sys.exit(main())
