"""The ``geventpool`` command: its parser, and the one place errors become exit codes.

Exit codes: 0 on success; 1 when a check fails, a call fails, or ZooKeeper cannot be
reached (one line on standard error names the error); 2 on bad usage: argparse's own, and
anything a command finds wrong with what was typed before it sends anything (a
:class:`~geventpool.cli.common.UsageError` or a
:class:`~geventpool.errors.ConfigurationError` from the options); 130 when SIGINT (Ctrl-C)
interrupts a command (``watch`` excepted: a signal is how it is meant to end, with 0). Error
messages are printed on one line, their control characters escaped
(:func:`~geventpool.cli.common.printable`): they may quote a server or the registry.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import gevent
from thriftpy2.thrift import TException

from geventpool import __version__
from geventpool.cli import call, check_config, instances, services, watch
from geventpool.cli.common import (
    FAILED,
    INTERRUPTED,
    USAGE,
    UsageError,
    on_signals,
    one_line,
)
from geventpool.cli.logs import library_logging
from geventpool.errors import ConfigurationError, GeventPoolError

PROG = "geventpool"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each with its own ``--help``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Look at and call Thrift services registered in ZooKeeper; check a"
        " geventpool configuration. Exit codes: 0 success, 1 a failed check, call or"
        " connection, 2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (services, instances, watch, call, check_config):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's) and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or argparse's own usage error
        return done.code if isinstance(done.code, int) else (0 if done.code is None else USAGE)
    command: argparse.ArgumentParser = args.command_parser
    with library_logging(getattr(args, "verbose", False)):
        try:
            with _interrupts_where_the_command_waits(args):
                code: int = args.run(args)
        except (UsageError, ConfigurationError) as error:
            command.print_usage(sys.stderr)
            sys.stderr.write(f"{command.prog}: error: {_one_line(error)}\n")
            return USAGE
        except (GeventPoolError, TException) as error:
            sys.stderr.write(f"{command.prog}: {type(error).__name__}: {_one_line(error)}\n")
            return FAILED
        except KeyboardInterrupt:
            sys.stderr.write(f"{command.prog}: interrupted\n")
            return INTERRUPTED
    return code


@contextmanager
def _interrupts_where_the_command_waits(args: argparse.Namespace) -> Iterator[None]:
    """Within the block, SIGINT raises ``KeyboardInterrupt`` in this greenlet (the command's)
    wherever it waits, at once, rather than in whichever greenlet runs when Python gets to
    its handler (kazoo's connection loop, say, which would die with a traceback and leave the
    command waiting). Not for a command that handles its signals itself (``watch``), where
    SIGINT is ignored (a background job of a script), or off the main thread."""
    if (
        getattr(args, "handles_signals", False)
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    command = gevent.getcurrent()
    with on_signals(lambda: gevent.kill(command, KeyboardInterrupt), signal.SIGINT):
        yield


def _one_line(error: BaseException) -> str:
    return one_line(error) or repr(error)
