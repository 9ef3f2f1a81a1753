"""The ``geventpool`` command: its parser, and the one place errors become exit codes.

Exit codes: 0 on success; 1 when a check fails, a call fails, or ZooKeeper cannot be
reached (one line on standard error names the error); 2 on bad usage: argparse's own, and
anything a command finds wrong with what was typed before it sends anything (a
:class:`~geventpool.cli.common.UsageError` or a
:class:`~geventpool.errors.ConfigurationError` from the options).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from thriftpy2.thrift import TException

from geventpool import __version__
from geventpool.cli import call, check_config, instances, services, watch
from geventpool.cli.common import FAILED, USAGE, UsageError
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
            code: int = args.run(args)
        except (UsageError, ConfigurationError) as error:
            command.print_usage(sys.stderr)
            sys.stderr.write(f"{command.prog}: error: {error}\n")
            return USAGE
        except (GeventPoolError, TException) as error:
            sys.stderr.write(f"{command.prog}: {type(error).__name__}: {_one_line(error)}\n")
            return FAILED
    return code


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or repr(error)
