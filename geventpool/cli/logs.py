"""Where the library's own log output goes while a command runs.

A command's output is its result on standard output; the library's structured events and
kazoo's log records would only mix into it. :func:`library_logging` sends them to standard
error with ``--verbose`` (the events as JSON lines, kazoo's warnings as the standard
library's logging prints them) and drops them otherwise, then puts the previous structlog
and logging configuration back (so that ``main()`` called in a program or a test leaves no
trace).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

_QUIET = logging.CRITICAL + 1  # above every level: nothing passes


def _drop_quiet(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    raise structlog.DropEvent


@contextmanager
def library_logging(verbose: bool) -> Iterator[None]:
    """Within the block: with ``verbose``, the library's events (info and above) and kazoo's
    warnings on standard error; without, neither."""
    saved = structlog.get_config()
    kazoo = logging.getLogger("kazoo")
    kazoo_level = kazoo.level
    if verbose:
        processors: list[Any] = [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ]
        wrapper = structlog.make_filtering_bound_logger(logging.INFO)
        kazoo.setLevel(logging.WARNING)
    else:
        processors = [_drop_quiet]
        wrapper = structlog.make_filtering_bound_logger(logging.CRITICAL)
        kazoo.setLevel(_QUIET)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)
        kazoo.setLevel(kazoo_level)
