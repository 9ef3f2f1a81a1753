"""Fork safety: a child process must never touch the sockets it inherited from its parent.

After ``fork()`` the child holds copies of the parent's file descriptors and of every greenlet,
which gevent resumes. Left alone, the child's copy of kazoo's connection greenlet would ping on
the parent's ZooKeeper socket (or reconnect with the parent's session id and steal it), and a
call that was in flight would read the parent's reply. So, in the child, inside the fork
itself and before any greenlet runs, :func:`after_fork_in_child` makes every inherited socket of
every started client a dead one: ``dup2`` of a closed socket pair over the descriptor (reads see
end-of-file, writes fail; the parent's descriptors are untouched, nothing is sent) and stops
kazoo from reconnecting. Each client then rebuilds itself on its next use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref
from collections.abc import Iterable
from typing import Any, Protocol


class ForkAware(Protocol):
    """What a client does in the child, right after the fork (syscalls only, no switches)."""

    def after_fork_in_child(self) -> None: ...


_TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()


def track(owner: ForkAware) -> None:
    """Call ``owner.after_fork_in_child()`` in every child forked from now on."""
    _TRACKED.add(owner)


def untrack(owner: ForkAware) -> None:
    """Undo :func:`track`."""
    _TRACKED.discard(owner)


def _after_fork_in_child() -> None:
    for owner in list(_TRACKED):
        owner.after_fork_in_child()
    _TRACKED.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def kill_descriptors(fds: Iterable[int]) -> None:
    """Make each descriptor a dead socket in this process only (no FIN reaches any peer)."""
    dead, other = socket.socketpair()
    other.close()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.dup2(dead.fileno(), fd)
    dead.close()


def disarm_kazoo(client: Any) -> None:
    """Stop an inherited kazoo client from using its parent's connection or session.

    Uses kazoo's private connection attributes; kept here, in one place, on purpose.
    """
    connection = getattr(client, "_connection", None)
    fds = []
    for name in ("_socket", "_read_sock", "_write_sock"):
        sock = getattr(connection, name, None)
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                fds.append(sock.fileno())
    kill_descriptors(fd for fd in fds if fd >= 0)
    stopped = client.handler.event_object()  # a new, already set event: nothing waits on it
    stopped.set()
    client._stopped = stopped  # noqa: SLF001 - no public way to stop a forked copy quietly
