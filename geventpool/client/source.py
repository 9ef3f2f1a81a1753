"""Where a client's instances come from: a fixed list, or a watched ZooKeeper registry.

A source gives the first list of instances on :meth:`start`, feeds every later change to the
callback it was given, and owns what it opened: :class:`RegistryInstances` stops the kazoo
client it built itself (never one it was handed) and, in a forked child, disarms the inherited
one so that it never touches the parent's ZooKeeper session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kazoo.client import KazooClient

from geventpool.client import forking
from geventpool.discovery.instance import Instance
from geventpool.discovery.membership import Membership, MembershipChange, watched_path
from geventpool.discovery.zk import ZooKeeper, close, connect_or_use
from geventpool.errors import PoolClosedError


class StaticInstances:
    """A fixed list of instances: no registry, no changes."""

    membership: Membership | None = None

    def __init__(self, instances: Iterable[Instance]) -> None:
        self._instances = tuple(instances)

    def start(
        self, on_change: Callable[[MembershipChange], None], timeout: float
    ) -> Iterable[Instance]:
        """The instances."""
        return self._instances

    def stop(self) -> None:
        """Nothing to stop."""

    def after_fork_in_child(self) -> None:
        """Nothing inherited."""

    def abandon_after_fork(self, name: str) -> None:
        """Nothing to abandon."""


class RegistryInstances:
    """The instances registered under a service's path, watched through a :class:`Membership`.

    ``zookeeper`` is a connect string or a :class:`ZooKeeperConfig` (the source opens and
    stops its own kazoo client) or a started kazoo client the caller owns (used, never stopped).
    """

    def __init__(
        self,
        zookeeper: ZooKeeper,
        name: str | None,
        *,
        root: str,
        path: str | None,
        empty_protection: float,
    ) -> None:
        watched_path(name, root, path)  # a bad name fails here, before anything connects
        self._zookeeper = zookeeper
        self._name = name
        self._root = root
        self._path = path
        self._empty_protection = empty_protection
        self.membership: Membership | None = None
        self._owned: KazooClient | None = None

    def start(
        self, on_change: Callable[[MembershipChange], None], timeout: float
    ) -> Iterable[Instance]:
        """Connect (if needed), load and watch; the instances of the first read. Raises
        :class:`~geventpool.errors.ZooKeeperUnavailableError` after ``timeout`` seconds."""
        client, opened = connect_or_use(self._zookeeper, timeout)
        self._owned = client if opened else None
        try:
            membership = Membership(
                client,
                self._name,
                root=self._root,
                path=self._path,
                empty_protection=self._empty_protection,
            )
            membership.subscribe(on_change)
            membership.start(timeout)
        except BaseException:
            self._close_owned()
            raise
        self.membership = membership
        return membership.instances.values()

    def stop(self) -> None:
        """Stop watching; stop the kazoo client if this source opened it."""
        if self.membership is not None:
            self.membership.stop()
        self._close_owned()

    def _close_owned(self) -> None:
        client, self._owned = self._owned, None
        close(client)

    def after_fork_in_child(self) -> None:
        """Inside the fork: the inherited kazoo client must not use the parent's socket or
        session (see :mod:`geventpool.client.forking`)."""
        if self.membership is not None:
            forking.disarm_kazoo(self.membership.client)

    def abandon_after_fork(self, name: str) -> None:
        """In the child, before a rebuild: stop the inherited watch and abandon the parent's
        kazoo client (never stopped from here). A kazoo client the caller owns cannot be
        rebuilt: PoolClosedError."""
        if isinstance(self._zookeeper, KazooClient):
            raise PoolClosedError(
                f"client of {name!r} was forked with a kazoo client it does not own:"
                " build a new client in the child, or pass hosts instead"
            )
        if self.membership is not None:
            self.membership.stop()
        self.membership = None
        self._owned = None
