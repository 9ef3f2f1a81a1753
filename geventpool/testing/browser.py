"""Debian's ``chromium``, headless, for tests and the docs' screenshots: the DOM of a page
after its scripts ran (:func:`dump_dom`) and a PNG of it (:func:`screenshot`).

Each run gets a fresh profile in a temporary folder, none of chromium's own network traffic
(no sync, no component updates, no QUIC), and a time limit: on ``timeout`` its whole process
group is killed and :class:`BrowserError` raised. The wait is cooperative (gevent's
``subprocess``), so servers in the same process keep answering the page. ``budget`` is
chromium's virtual time: how long the page's timers run (fast-forwarded) before the DOM or
the picture is taken; the page's requests are real.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

from gevent import subprocess

from geventpool.errors import GeventPoolError

#: Where Debian's ``chromium`` package puts its launcher.
CHROMIUM = "/usr/bin/chromium"
_FLAGS = (
    "--headless",
    "--no-sandbox",  # runs as root here
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


class BrowserError(GeventPoolError):
    """chromium is missing, failed, or ran past its time limit."""


def find_chromium() -> str | None:
    """The path of a ``chromium`` executable, or None when none is installed."""
    found = shutil.which("chromium")
    if found is None and os.access(CHROMIUM, os.X_OK):
        found = CHROMIUM
    return found


def run_chromium(
    url: str, *options: str, budget: float = 3.0, timeout: float = 60.0
) -> tuple[str, str]:
    """Run headless chromium on ``url`` with ``options`` (its action: ``--dump-dom``,
    ``--screenshot=...``) and ``budget`` seconds of virtual time; its standard output and
    error. Raises :class:`BrowserError` when chromium is missing, exits with an error or
    runs past ``timeout`` seconds (its process group is then killed)."""
    chromium = find_chromium()
    if chromium is None:
        raise BrowserError("chromium is not installed (scripts/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="geventpool-chromium-") as profile:
        command = [
            chromium,
            *_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={int(budget * 1000)}",
            *options,
            url,
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its helpers too are killed on timeout
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.communicate()
            raise BrowserError(f"chromium ran past {timeout:g}s on {url}") from None
        finally:
            _kill_group(process.pid)  # helpers left behind, if any
    if process.returncode != 0:
        tail = "\n".join(err.splitlines()[-15:])
        raise BrowserError(f"chromium exited with {process.returncode} on {url}:\n{tail}")
    return out, err


def _kill_group(pid: int) -> None:
    """Kill what is left of the process group ``pid`` leads (nothing, usually)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def dump_dom(url: str, *, budget: float = 3.0, timeout: float = 60.0) -> str:
    """The serialized DOM of ``url`` once its scripts ran for ``budget`` seconds."""
    out, _ = run_chromium(url, "--dump-dom", budget=budget, timeout=timeout)
    return out


def screenshot(
    url: str,
    path: Path,
    *,
    size: tuple[int, int] = (1200, 800),
    budget: float = 3.0,
    timeout: float = 60.0,
) -> Path:
    """A PNG of ``url`` (``size`` pixels wide and high) at ``path``, once its scripts ran for
    ``budget`` seconds."""
    path.unlink(missing_ok=True)
    run_chromium(
        url,
        f"--screenshot={path}",
        f"--window-size={size[0]},{size[1]}",
        budget=budget,
        timeout=timeout,
    )
    if not path.is_file():
        raise BrowserError(f"chromium wrote no screenshot of {url} at {path}")
    return path
