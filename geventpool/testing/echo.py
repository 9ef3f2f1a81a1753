"""The echo test service: its IDL (``echo.thrift``) loaded with thriftpy2, and a handler.

Importing this module has no side effects beyond loading the IDL (no monkey-patching), so
locustfiles and tests can use it; ``geventpool.testing.echo_server`` runs it in a process.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import gevent
import thriftpy2

IDL = Path(__file__).with_name("echo.thrift")


def load_echo() -> Any:
    """The thriftpy2 module of ``echo.thrift``."""
    return thriftpy2.load(str(IDL), module_name="echo_thrift")


echo_thrift = load_echo()


class EchoHandler:
    """Implements ``Echo``; ``name`` is what :meth:`whoami` answers; ``latency`` seconds are
    slept (cooperatively) by :meth:`echo` and :meth:`whoami`, to make a slow instance."""

    def __init__(self, name: str, latency: float = 0.0) -> None:
        self.name = name
        self.latency = latency
        self.notified: collections.deque[str] = collections.deque(maxlen=1000)

    def echo(self, msg: str) -> str:
        if self.latency:
            gevent.sleep(self.latency)
        return msg

    def slow_echo(self, msg: str, seconds: float) -> str:
        gevent.sleep(seconds)
        return msg

    def ping(self) -> None:
        return None

    def add(self, a: int, b: int) -> int:
        return a + b

    def whoami(self) -> str:
        if self.latency:
            gevent.sleep(self.latency)
        return self.name

    def refuse(self, reason: str) -> None:
        raise echo_thrift.Refused(reason=reason)

    def crash(self, message: str) -> None:
        raise RuntimeError(message)

    def table(self, counts: dict[str, int]) -> dict[int, bytes]:
        return {count: key.encode() for key, count in counts.items()}

    def items(self, count: int) -> list[Any]:
        return [echo_thrift.Item(id=i, name=f"item {i}") for i in range(min(count, 100_000))]

    def notify(self, msg: str) -> None:
        self.notified.append(msg)
