"""What every command shares: the registry options, exit codes, usage errors and output.

The registry options are ``--zookeeper HOSTS`` (default ``$GEVENTPOOL_ZOOKEEPER``, else
``127.0.0.1:2181``), ``--root`` (default the library's
:data:`~geventpool.discovery.zk.DEFAULT_ROOT`) and ``--timeout`` (seconds any one wait may
take: the connection to ZooKeeper, its first read and, for ``call``, the call's deadline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from kazoo.client import KazooClient

from geventpool.discovery.instance import Instance
from geventpool.discovery.zk import DEFAULT_ROOT, ZooKeeperConfig, close, connect
from geventpool.errors import GeventPoolError

OK, FAILED, USAGE = 0, 1, 2
"""Exit codes: success; a failed check, call or connection; bad usage (argparse's own)."""

ENV_ZOOKEEPER = "GEVENTPOOL_ZOOKEEPER"
DEFAULT_ZOOKEEPER = "127.0.0.1:2181"
DEFAULT_TIMEOUT = 10.0

Command = Callable[[argparse.Namespace], int]
"""A command: its parsed arguments to an exit code."""


class UsageError(GeventPoolError):
    """What was typed cannot be run (exit code 2); nothing was sent anywhere."""


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    """``--zookeeper``, ``--root``, ``--timeout`` and ``--verbose`` (see the module)."""
    group = parser.add_argument_group("registry")
    group.add_argument(
        "--zookeeper",
        metavar="HOSTS",
        default=os.environ.get(ENV_ZOOKEEPER) or DEFAULT_ZOOKEEPER,
        help=f"ZooKeeper connect string, e.g. zk1:2181,zk2:2181/chroot (default:"
        f" ${ENV_ZOOKEEPER}, else {DEFAULT_ZOOKEEPER})",
    )
    group.add_argument(
        "--root",
        default=DEFAULT_ROOT,
        help=f"the path services live under (default: {DEFAULT_ROOT})",
    )
    group.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for ZooKeeper, and a call's deadline (default: {DEFAULT_TIMEOUT:g})",
    )
    add_verbose_option(parser)


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """``-v``/``--verbose``: the library's own events on standard error."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log the library's events (JSON lines) on standard error",
    )


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json``: machine-readable output."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def zookeeper_config(args: argparse.Namespace) -> ZooKeeperConfig:
    """The ZooKeeper settings the registry options ask for (raises
    :class:`~geventpool.errors.ConfigurationError` for a bad connect string)."""
    return ZooKeeperConfig(args.zookeeper, connect_timeout=args.timeout)


@contextmanager
def zookeeper(args: argparse.Namespace) -> Iterator[KazooClient]:
    """A connected kazoo client for the registry options, stopped and closed at the end.

    Raises :class:`~geventpool.errors.ZooKeeperUnavailableError` (exit code 1) when
    ZooKeeper does not answer within ``--timeout``.
    """
    client = connect(zookeeper_config(args))
    try:
        yield client
    finally:
        close(client)


def instance_record(instance: Instance) -> dict[str, Any]:
    """The JSON description of one instance: where it is, how it is called, where it came
    from. The same keys in ``instances --json`` and ``watch --json``."""
    return {
        "node": instance.id,
        "address": str(instance),
        "host": instance.host,
        "port": instance.port,
        "zone": instance.zone,
        "weight": instance.weight,
        "version": instance.version,
        "format": instance.source,
        "tls": instance.tls,
        "tls_port": instance.tls_port,
        "transport": instance.transport,
        "protocol": instance.protocol,
        "registered_at": instance.registered_at,
        "metadata": dict(instance.metadata),
    }


def tls_text(instance: Instance) -> str:
    """``only`` (the port speaks only TLS), ``port N`` (a second, TLS port) or ``no``."""
    if instance.tls:
        return "only"
    if instance.tls_port is not None:
        return f"port {instance.tls_port}"
    return "no"


def or_dash(value: object) -> str:
    """``value`` as text, ``-`` for None."""
    return "-" if value is None else str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Write ``rows`` under ``header`` in left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


def print_json(value: Any, out: TextIO | None = None) -> None:
    """Write ``value`` as one line of JSON (non-ASCII text kept as is) and flush."""
    out = out or sys.stdout
    out.write(json.dumps(value, ensure_ascii=False) + "\n")
    out.flush()


def timestamp() -> str:
    """Now, in UTC, ISO 8601 with milliseconds: ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
