"""Client side of discovery: a validated, always-available view of a service's live instances.

:class:`Membership` reads the children of ``<root>/<service>`` (or any path, e.g. a Curator or
Finagle ServerSet path), keeps a cache of immutable :class:`~geventpool.discovery.instance.Instance`
values, and tells subscribers what joined, left or changed. It promises:

* **One bad child never hides the others.** Each child is parsed and validated on its own; a
  rejected one is counted, logged (``instance_rejected``) and left out.
* **The watch never stops.** Watch callbacks and state listeners only poke a
  :class:`~geventpool.discovery.reconcile.ReconcileLoop`; every read happens in that loop,
  whose errors are logged and retried. A missing service path is watched until it is created.
* **Payloads are read once, and again when they change.** Only children not seen before are
  fetched (all at once, pipelined), each with a data watch: a child whose data changed, or
  that was deleted and re-created under the same name (a server restarted on the same host
  and port), is read again at once and seen as updated if its payload differs. A full re-read
  happens after every reconnect and after a session loss.
* **The cache outlives ZooKeeper.** While SUSPENDED or LOST the last view keeps serving.
* **Empty-list protection.** When every instance vanishes at once the last view is kept for
  ``empty_protection`` seconds (``empty_protection_engaged``), since a wiped registry or a
  broken deployment is likelier than every server dying together; then, if nothing came back,
  the view empties (``empty_protection_expired``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import gevent
import gevent.event
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NoNodeError
from kazoo.protocol.states import WatchedEvent

from geventpool import events
from geventpool.discovery.instance import Instance
from geventpool.discovery.payloads import DEFAULT_MAX_PAYLOAD, decode_instance
from geventpool.discovery.reconcile import ReconcileLoop
from geventpool.discovery.zk import DEFAULT_ROOT, describe_hosts, service_path
from geventpool.errors import ConfigurationError, InvalidInstanceError, ZooKeeperUnavailableError
from geventpool.validation import check_seconds

Instances = Mapping[str, Instance]
"""A read-only mapping of znode name to instance."""

_EMPTY: Instances = MappingProxyType({})


def watched_path(service: str | None, root: str, path: str | None) -> str:
    """The ZooKeeper path a membership of ``service`` (or of an explicit ``path``) watches,
    checked: raises :class:`ConfigurationError` for a bad name, root or path."""
    if path is None:
        if service is None:
            raise ConfigurationError("Membership needs a service name or a path")
        return service_path(service, root)
    if not path.startswith("/") or path.endswith("/"):
        raise ConfigurationError(f"path must be an absolute ZooKeeper path, not {path!r}")
    return path


@dataclass(frozen=True)
class MembershipChange:
    """What one refresh changed: instances that ``joined``, ``left`` or were ``updated``
    (same znode, new payload), and the ``instances`` now in the view."""

    joined: tuple[Instance, ...]
    left: tuple[Instance, ...]
    updated: tuple[Instance, ...]
    instances: Instances


@dataclass
class MembershipStats:
    """Counters since start: children ``reads``, payload ``fetches``, ``rejected`` payloads
    (a rejected node counts once per read of its payload), ``refresh_errors`` with the
    ``last_error``, and how often empty-list protection engaged."""

    reads: int = 0
    fetches: int = 0
    rejected: int = 0
    refresh_errors: int = 0
    last_error: str | None = None
    protection_engaged: int = 0


Subscriber = Callable[[MembershipChange], None]


class Membership:
    """The live instances of one service, read from ``client`` and kept up to date.

    Give either ``service`` (the path is ``<root>/<service>``) or an explicit ``path``.
    ``max_payload`` caps a child's payload in bytes; ``empty_protection`` is how long, in
    seconds, the last view is kept when every child vanishes at once (0 disables it).
    """

    def __init__(
        self,
        client: KazooClient,
        service: str | None = None,
        *,
        root: str = DEFAULT_ROOT,
        path: str | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        empty_protection: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        path = watched_path(service, root, path)
        check_seconds("empty_protection", empty_protection, zero=True)
        self._client = client
        self._service = service or path.rsplit("/", 1)[-1]
        self._path = path
        self._max_payload = max_payload
        self._empty_protection = float(empty_protection)
        self._clock = clock
        self._instances: Instances = _EMPTY
        self._rejected: dict[str, str] = {}
        self._dirty: set[str] = set()  # children whose data watch fired: read them again
        self._full_refresh = True
        self._protected_until: float | None = None
        self._protection_timer: gevent.Greenlet | None = None
        self._subscribers: list[Subscriber] = []
        self._changed = gevent.event.Event()
        self._loaded = gevent.event.Event()
        self._started = False
        self.stats = MembershipStats()
        self._loop = ReconcileLoop(
            self._refresh,
            is_connected=lambda: bool(self._client.connected),
            on_error=self._on_error,
        )

    @property
    def client(self) -> KazooClient:
        """The kazoo client the membership reads through."""
        return self._client

    @property
    def service(self) -> str:
        """The service name (the last element of the path when a path was given)."""
        return self._service

    @property
    def path(self) -> str:
        """The ZooKeeper path whose children are the instances."""
        return self._path

    @property
    def instances(self) -> Instances:
        """The current view: znode name to :class:`Instance`; an immutable snapshot."""
        return self._instances

    @property
    def rejected(self) -> Mapping[str, str]:
        """Children present but rejected now: znode name to the reason."""
        return MappingProxyType(dict(self._rejected))

    @property
    def protecting(self) -> bool:
        """Whether empty-list protection is holding the last view right now."""
        return self._protected_until is not None

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(change)`` after every change of the view; returns an unsubscribe.

        Subscribers run in the membership's greenlet, one at a time; one that raises is logged
        (``membership_subscriber_failed``) and kept. They must not block for long.
        """
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def start(self, timeout: float = 10.0) -> None:
        """Load the instances and start watching; returns once the first read is done.

        Raises :class:`ZooKeeperUnavailableError` if no read succeeded within ``timeout``
        seconds (the membership is stopped again). An empty or missing path is not an error.
        """
        if self._started:
            return
        self._started = True
        self._client.add_listener(self._on_state)
        self._loop.start()
        self._loop.poke()
        if not self._loaded.wait(timeout):
            self.stop()
            raise ZooKeeperUnavailableError(
                describe_hosts(self._client), timeout, f"loading {self._path}"
            )
        events.emit(
            events.MEMBERSHIP_LOADED,
            service=self._service,
            path=self._path,
            instances=len(self._instances),
            rejected=len(self._rejected),
        )
        if not self._instances:
            events.emit(events.SERVICE_UNAVAILABLE, "error", service=self._service, path=self._path)

    def stop(self) -> None:
        """Stop watching; the last view stays readable. Idempotent."""
        if not self._started:
            return
        self._started = False
        self._client.remove_listener(self._on_state)
        self._loop.stop()
        if self._protection_timer is not None:
            self._protection_timer.kill(block=False)

    def wait_for(self, predicate: Callable[[Instances], bool], timeout: float) -> bool:
        """Wait until ``predicate(instances)`` is true; False if ``timeout`` seconds pass first."""
        deadline = self._clock() + timeout
        while not predicate(self._instances):
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            self._changed.wait(remaining)
        return True

    # -- reading ZooKeeper (runs only in the loop's greenlet) ----------------------------------

    def _refresh(self) -> None:
        if not self._client.connected:
            return
        full, self._full_refresh = self._full_refresh, False
        dirty, self._dirty = self._dirty, set()
        try:
            names = self._read_children()
            known = set(self._instances) | set(self._rejected)
            fresh = names if full else (names - known) | (dirty & names)
            parsed = self._fetch(sorted(fresh))
        except BaseException:
            self._full_refresh |= full
            self._dirty |= dirty
            raise
        current: dict[str, Instance] = {}
        rejected: dict[str, str] = {}
        for name in sorted(names):
            outcome = parsed.get(name)
            if outcome is None:  # known, not re-read
                if name in self._instances:
                    current[name] = self._instances[name]
                elif name in self._rejected:
                    rejected[name] = self._rejected[name]
            elif isinstance(outcome, Instance):
                current[name] = outcome
            else:
                rejected[name] = outcome
        self._rejected = rejected
        self._publish(current, reloaded=full)
        # A dirty child absent from this read but still in the view (empty protection held
        # it) is read again when it comes back: it was deleted, to be re-created.
        self._dirty |= {name for name in dirty - names if name in self._instances}
        self._loaded.set()

    def _read_children(self) -> set[str]:
        self.stats.reads += 1
        try:
            return set(self._client.get_children(self._path, watch=self._on_watch))
        except NoNodeError:
            # Watch for the path to appear; if it appeared meanwhile, read again.
            if self._client.exists(self._path, watch=self._on_watch) is not None:
                self._loop.poke()
            return set()

    def _fetch(self, names: Iterable[str]) -> dict[str, Instance | str]:
        """Read and validate the payloads of ``names``, pipelined; absent nodes are skipped."""
        watch = self._on_child_watch
        pending = [
            (name, self._client.get_async(f"{self._path}/{name}", watch=watch)) for name in names
        ]
        parsed: dict[str, Instance | str] = {}
        for name, result in pending:
            self.stats.fetches += 1
            try:
                data, _ = result.get()
            except NoNodeError:  # gone between the list and the read: no data watch is set,
                self._dirty.add(name)  # so read it again if it is re-created
                continue
            try:
                parsed[name] = decode_instance(data, name, max_size=self._max_payload)
            except InvalidInstanceError as error:
                parsed[name] = error.reason
                self.stats.rejected += 1
                events.emit(
                    events.INSTANCE_REJECTED,
                    "warning",
                    service=self._service,
                    path=f"{self._path}/{name}",
                    reason=error.reason,
                )
        return parsed

    # -- publishing the view --------------------------------------------------------------------

    def _publish(self, current: dict[str, Instance], *, reloaded: bool) -> None:
        previous = self._instances
        if not current and previous and self._hold_empty():
            return
        if current and self._protected_until is not None:
            self._protected_until = None
            events.emit(
                events.EMPTY_PROTECTION_CLEARED,
                service=self._service,
                instances=len(current),
            )
        joined = tuple(inst for name, inst in current.items() if name not in previous)
        left = tuple(inst for name, inst in previous.items() if name not in current)
        updated = tuple(
            inst for name, inst in current.items() if name in previous and previous[name] != inst
        )
        if reloaded and self._loaded.is_set():
            events.emit(
                events.MEMBERSHIP_REFRESHED,
                service=self._service,
                instances=len(current),
                joined=len(joined),
                left=len(left),
            )
        if not (joined or left or updated):
            return
        self._instances = MappingProxyType(current)
        for name, items in (
            (events.INSTANCE_JOINED, joined),
            (events.INSTANCE_LEFT, left),
            (events.INSTANCE_UPDATED, updated),
        ):
            for inst in items:
                events.emit(name, service=self._service, instance=str(inst), node=inst.id)
        if previous and not current:
            events.emit(events.SERVICE_UNAVAILABLE, "error", service=self._service, path=self._path)
        elif current and not previous and self._loaded.is_set():
            events.emit(events.SERVICE_AVAILABLE, service=self._service, instances=len(current))
        changed, self._changed = self._changed, gevent.event.Event()
        changed.set()
        change = MembershipChange(joined, left, updated, self._instances)
        for subscriber in list(self._subscribers):
            try:
                subscriber(change)
            except Exception as error:  # noqa: BLE001 - a subscriber must not stop the watch
                events.emit(
                    events.MEMBERSHIP_SUBSCRIBER_FAILED,
                    "error",
                    service=self._service,
                    subscriber=repr(subscriber),
                    error=repr(error),
                )

    def _hold_empty(self) -> bool:
        """Whether to keep the last view although no instance is left (empty protection)."""
        if self._empty_protection <= 0:
            return False
        now = self._clock()
        if self._protected_until is None:
            self._protected_until = now + self._empty_protection
            self.stats.protection_engaged += 1
            self._protection_timer = gevent.spawn_later(self._empty_protection, self._loop.poke)
            events.emit(
                events.EMPTY_PROTECTION_ENGAGED,
                "warning",
                service=self._service,
                kept=len(self._instances),
                seconds=self._empty_protection,
            )
            return True
        if now < self._protected_until:
            return True
        self._protected_until = None
        events.emit(
            events.EMPTY_PROTECTION_EXPIRED,
            "error",
            service=self._service,
            dropped=len(self._instances),
        )
        return False

    # -- callbacks from kazoo's greenlet: never block ------------------------------------------

    def _on_watch(self, event: WatchedEvent) -> None:
        self._loop.poke()

    def _on_child_watch(self, event: WatchedEvent) -> None:
        """A child's data changed or it was deleted (perhaps to be re-created at once)."""
        if event.path:
            self._dirty.add(event.path.rsplit("/", 1)[-1])
        self._loop.poke()

    def _on_state(self, state: str) -> None:
        if state == KazooState.SUSPENDED:
            events.emit(
                events.MEMBERSHIP_SUSPENDED,
                "warning",
                service=self._service,
                serving=len(self._instances),
            )
        elif state == KazooState.LOST:
            events.emit(
                events.MEMBERSHIP_SESSION_LOST,
                "warning",
                service=self._service,
                serving=len(self._instances),
            )
        else:  # CONNECTED: changes may have been missed; read everything again
            self._full_refresh = True
            self._loop.poke()

    def _on_error(self, error: Exception) -> None:
        self.stats.refresh_errors += 1
        self.stats.last_error = repr(error)
        events.emit(
            events.MEMBERSHIP_REFRESH_FAILED,
            "error",
            service=self._service,
            path=self._path,
            error=repr(error),
        )


__all__ = ["Instances", "Membership", "MembershipChange", "MembershipStats"]
