"""What every command shares: the registry options, exit codes, usage errors and output.

The registry options are ``--zookeeper HOSTS`` (default ``$GEVENTPOOL_ZOOKEEPER``, else
``127.0.0.1:2181``), ``--root`` (default the library's
:data:`~geventpool.discovery.zk.DEFAULT_ROOT`) and ``--timeout`` (seconds any one wait may
take: the connection to ZooKeeper, its first read and, for ``call``, the call's deadline).

Text that comes from elsewhere (the registry's payloads and node names, a server's error
messages) is printed through :func:`printable` (or, as JSON, :func:`print_json`): its control
characters are escaped, so that it can neither drive the terminal nor begin a line of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import gevent
import gevent.event
from kazoo.client import KazooClient

from geventpool.discovery.instance import Instance
from geventpool.discovery.zk import (
    DEFAULT_ROOT,
    ZooKeeperConfig,
    close,
    make_client,
    watch_state,
)
from geventpool.errors import GeventPoolError, ZooKeeperUnavailableError

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
"""Exit codes: success; a failed check, call or connection; bad usage (argparse's own);
interrupted by SIGINT (Ctrl-C; 128 + the signal's number, as shells report it)."""

ENV_ZOOKEEPER = "GEVENTPOOL_ZOOKEEPER"
DEFAULT_ZOOKEEPER = "127.0.0.1:2181"
DEFAULT_TIMEOUT = 10.0

Command = Callable[[argparse.Namespace], int]
"""A command: its parsed arguments to an exit code."""


class UsageError(GeventPoolError):
    """What was typed cannot be run (exit code 2); nothing was sent anywhere."""


class CommandInterruptedError(GeventPoolError):
    """A command was told to stop (a signal) before ZooKeeper answered."""


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def registry_root(text: str) -> str:
    """An argparse type: an absolute ZooKeeper path (``/geventpool``; ``/`` for the top)."""
    parts = text.split("/")[1:]
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash: "/geventpool/" is "/geventpool"
    if not text.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise argparse.ArgumentTypeError(
            f"must be an absolute ZooKeeper path such as {DEFAULT_ROOT}, not {text!r}"
        )
    return text


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
        type=registry_root,
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
def zookeeper(
    args: argparse.Namespace, interrupted: gevent.event.Event | None = None
) -> Iterator[KazooClient]:
    """A connected kazoo client for the registry options, stopped and closed at the end.

    Raises :class:`~geventpool.errors.ZooKeeperUnavailableError` (exit code 1) when
    ZooKeeper does not answer within ``--timeout``, :class:`CommandInterruptedError` as soon as
    ``interrupted`` is set while it has not yet.
    """
    client = connect_within(zookeeper_config(args), interrupted)
    try:
        yield client
    finally:
        close(client)


def connect_within(
    config: ZooKeeperConfig, interrupted: gevent.event.Event | None = None
) -> KazooClient:
    """A client connected within ``config.connect_timeout`` seconds, as
    :func:`geventpool.discovery.zk.connect` makes it, except that it gives up at once: at the
    deadline, when ``interrupted`` is set, or when the wait itself is interrupted (SIGINT's
    ``KeyboardInterrupt``). A client that gave up is stopped in the background: kazoo's
    ``stop()`` waits for its connection attempt to end (up to the session timeout against a
    ZooKeeper that accepts but does not answer), which the command does not wait for."""
    client = make_client(config)
    watch_state(client, config.hosts)
    try:
        started = client.start_async()
        gevent.wait(
            [started] if interrupted is None else [started, interrupted],
            timeout=config.connect_timeout,
            count=1,
        )
    except BaseException:
        _stop_in_background(client)
        raise
    if interrupted is not None and interrupted.is_set():
        _stop_in_background(client)
        raise CommandInterruptedError("interrupted while connecting to ZooKeeper")
    if not client.connected:
        _stop_in_background(client)
        raise ZooKeeperUnavailableError(config.hosts, config.connect_timeout)
    return client


def _stop_in_background(client: KazooClient) -> None:
    def stop() -> None:
        # kazoo's "writer not closed" after its wait: nobody is left to tell
        with contextlib.suppress(Exception):
            close(client)

    gevent.spawn(stop)


@contextmanager
def on_signals(callback: Callable[[], object], *signums: int) -> Iterator[None]:
    """Within the block, ``callback()`` runs in a greenlet of its own on each of ``signums``.

    gevent's handlers (libev's) wake the hub whichever thread the kernel gives the signal to;
    a Python handler runs only once the main thread runs Python code again, which can be the
    next event the hub waits for (kazoo's 10 s read timeout against a silent ZooKeeper). The
    previous handlers are put back at the end: libev would leave the default action (a
    SIGINT would then kill a program that called ``main()`` instead of raising
    ``KeyboardInterrupt``)."""
    previous = {signum: signal.getsignal(signum) for signum in signums}
    handlers = [gevent.signal_handler(signum, callback) for signum in signums]
    try:
        yield
    finally:
        for handler in handlers:
            handler.cancel()
        for signum, action in previous.items():
            if action is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, action)


def printable(text: object) -> str:
    """``text`` (as ``str()`` makes it) safe to print on one line of a terminal: control
    characters (C0 and C1, DEL), format characters (bidirectional overrides, zero-width),
    line and paragraph separators and lone surrogates are written as Python escapes
    (``\\x1b``, ``\\n``, ``\\u202e``); everything else is kept as it is."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(_escaped(char) for char in value)


def one_line(text: object) -> str:
    """``text`` (an error, say) on one line: runs of white space (new lines included) made
    one space, then :func:`printable`."""
    return printable(" ".join(str(text).split()))


_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escaped(char: str) -> str:
    if unicodedata.category(char) in _UNPRINTABLE:
        return repr(char)[1:-1]
    return char


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
    """Write ``rows`` under ``header`` in left-aligned columns two spaces apart, each cell
    :func:`printable`."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


def print_json(value: Any, out: TextIO | None = None) -> None:
    """Write ``value`` as one line of JSON and flush: printable non-ASCII text kept as is,
    every character :func:`printable` would escape written as a JSON ``\\u`` escape (the
    C0 controls ``json`` escapes itself; DEL, C1 controls, format characters, separators and
    lone surrogates it would write raw)."""
    out = out or sys.stdout
    text = json.dumps(value, ensure_ascii=False)
    if not text.isprintable():
        text = "".join(_json_escaped(char) for char in text)
    out.write(text + "\n")
    out.flush()


def _json_escaped(char: str) -> str:
    if unicodedata.category(char) in _UNPRINTABLE:
        return json.dumps(char)[1:-1]  # ensure_ascii: \u007f, or a surrogate pair
    return char


def timestamp() -> str:
    """Now, in UTC, ISO 8601 with milliseconds: ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
