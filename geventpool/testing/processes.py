"""Start the echo test server in its own process and control it by its PID."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import gevent
from gevent import subprocess


class ServerProcess:
    """One ``geventpool.testing.echo_server`` process (or another ``module`` that prints the
    same ready line); ``args`` are its command-line options.

    :meth:`start` returns once the server printed its ready line (so it serves and, with
    ``--zookeeper``, is registered); its JSON log goes to ``log_path``.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        log_path: Path | None = None,
        module: str = "geventpool.testing.echo_server",
    ) -> None:
        self.args = list(args)
        self.module = module
        self.log_path = log_path
        self.port: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        """The server's PID (it must have been started)."""
        assert self._process is not None, "not started"
        return int(self._process.pid)

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, the registered instance name."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the process and wait at most ``timeout`` seconds for it to serve."""
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
        if log is not subprocess.DEVNULL:
            log.close()
        try:
            with gevent.Timeout(timeout, TimeoutError(f"server not ready in {timeout}s")):
                line = self._process.stdout.readline()
        except TimeoutError:
            self.kill()
            raise
        if not line:
            code = self._process.wait()
            raise RuntimeError(f"server exited with {code} before it was ready")
        self.port = int(json.loads(line)["port"])
        return self

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signum)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful stop) and wait; returns the exit code, None if still running."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.wait(10.0)

    def wait(self, timeout: float) -> int | None:
        """The exit code once the process ends within ``timeout`` seconds, else None."""
        if self._process is None:
            return None
        try:
            return int(self._process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            return None


def start_registered_server(
    stack: ExitStack, hosts: str, log_path: Path, session_timeout: float = 10.0
) -> ServerProcess:
    """Start an echo server registered in the ZooKeeper at ``hosts`` with sessions of
    ``session_timeout`` seconds; ``stack`` kills it when it closes."""
    process = ServerProcess(
        ["--zookeeper", hosts, "--session-timeout", str(session_timeout)], log_path=log_path
    )
    stack.callback(process.kill)
    return process.start()
