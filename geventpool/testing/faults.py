"""Real faults for tests: expire a session on the server, cut or black-hole a connection.

* :func:`expire_session` makes the ZooKeeper server itself end a client's session: a second
  client attaches to the same session id and closes it, so the server deletes the session's
  ephemeral nodes and the first client sees SESSION_EXPIRED (LOST) when it reconnects.
* :class:`TcpProxy` sits between a client and a server on 127.0.0.1; :meth:`TcpProxy.drop`
  closes every connection through it (the client sees a lost connection, SUSPENDED, and
  reconnects), :meth:`TcpProxy.blackhole` keeps new and existing connections open but silent,
  :meth:`TcpProxy.trickle` forwards one byte at a time with a pause between bytes, and
  :meth:`TcpProxy.swallow` accepts the next connections and reads them without ever answering
  (as a ZooKeeper that is starting up may do with a reconnect).
"""

from __future__ import annotations

import contextlib
import socket

import gevent
from gevent.server import StreamServer
from kazoo.client import KazooClient

from geventpool.discovery.zk import make_client


def expire_session(client: KazooClient, hosts: str, timeout: float = 10.0) -> None:
    """End ``client``'s session on the server at ``hosts`` (a connect string, no chroot)."""
    assert client.client_id is not None, "the client has no session"
    twin = make_client(hosts, client_id=client.client_id)
    twin.start_async().wait(timeout)
    if not twin.connected:
        raise TimeoutError(f"could not attach to session {client.client_id[0]:#x}")
    twin.stop()
    twin.close()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target`` until told to fail."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._sockets: set[socket.socket] = set()
        self._silent = False
        self._byte_pause = 0.0
        self._swallow = 0
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self.accepted = 0  # connections accepted since start

    @property
    def port(self) -> int:
        """The port clients connect to."""
        return int(self._server.server_port)

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start accepting."""
        self._server.start()

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._server.close()
        self.drop()

    def drop(self) -> None:
        """Cut every connection through the proxy now; new ones are accepted."""
        _cut(*self._sockets)

    def blackhole(self) -> None:
        """From now on accept connections but forward nothing either way."""
        self._silent = True

    def restore(self) -> None:
        """Forward again (connections that were silent are dropped, as a network would)."""
        self._silent = False
        self._byte_pause = 0.0
        self._swallow = 0
        self.drop()

    def trickle(self, pause: float) -> None:
        """From now on forward one byte every ``pause`` seconds (a slow or hostile peer)."""
        self._byte_pause = pause

    def swallow(self, count: int = 1) -> None:
        """Accept the next ``count`` connections and read what they send, never forwarding
        or answering anything, until the client gives up (or :meth:`drop`)."""
        self._swallow = count

    def _handle(self, downstream: socket.socket, _address: object) -> None:
        # gevent closes ``downstream`` when this returns: pump until either side ends.
        self.accepted += 1
        if self._swallow > 0:
            self._swallow -= 1
            self._sockets.add(downstream)
            try:
                while downstream.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                self._sockets.discard(downstream)
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            return
        upstream.settimeout(None)
        pair = (downstream, upstream)
        self._sockets.update(pair)
        back = gevent.spawn(self._pump, upstream, downstream)
        try:
            self._pump(downstream, upstream)
            back.join()
        finally:
            back.kill(block=False)
            self._sockets.difference_update(pair)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self._silent:
                    gevent.sleep(0.05)
                if self._byte_pause:
                    for index in range(len(data)):
                        sink.sendall(data[index : index + 1])
                        gevent.sleep(self._byte_pause)
                else:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            _cut(source, sink)


def _cut(*sockets: socket.socket) -> None:
    """Shut both directions of ``sockets``: blocked readers wake, peers see end-of-file."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
