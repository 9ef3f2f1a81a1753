"""Server side of discovery: keep one instance registered as an ephemeral znode.

The node is ``<root>/<service>/<host>:<port>`` (or a name you choose) holding the native JSON
payload (:func:`geventpool.discovery.payloads.encode_instance`). Its name is fixed, never
sequential, so re-registering is idempotent and can never leave a duplicate behind.

The registrar keeps the node alive on its own:

* across a lost connection (SUSPENDED, then CONNECTED): the session survived, the node is
  checked and left as it is;
* after a session expiry (LOST): the node died with the session and is re-created;
* when a node of that name is owned by another session (left over from an expired session of
  ours, or a misconfigured twin), it is deleted and re-created, as Curator does, and
  ``registration_node_replaced`` says whose it was;
* when the node is deleted or changed by someone else, it is put back.

:meth:`Registrar.stop` deletes the node (only if it is ours); a server calls it **before** it
stops accepting, so clients stop choosing it while it still answers.
"""

from __future__ import annotations

import dataclasses
import time

import gevent
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    AuthFailedError,
    KazooException,
    NoAuthError,
    NoChildrenForEphemeralsError,
    NodeExistsError,
    NoNodeError,
)
from kazoo.protocol.states import WatchedEvent
from kazoo.security import Permissions

from geventpool import events
from geventpool.discovery.instance import Instance
from geventpool.discovery.payloads import encode_instance
from geventpool.discovery.reconcile import CONNECTION_ERRORS, ReconcileLoop
from geventpool.discovery.zk import DEFAULT_ROOT, describe_hosts, service_path
from geventpool.errors import RegistrationError, ZooKeeperUnavailableError


class Registrar:
    """Registers ``instance`` under ``<root>/<service>`` on ``client`` and keeps it there.

    ``client`` is a kazoo client on the gevent handler (see
    :func:`geventpool.discovery.zk.connect`); the registrar uses it but never starts or stops
    it. ``node_name`` defaults to ``str(instance)`` (``host:port``). ``stop_timeout`` bounds,
    in seconds, how long :meth:`stop` tries to delete the node.
    """

    def __init__(
        self,
        client: KazooClient,
        service: str,
        instance: Instance,
        *,
        root: str = DEFAULT_ROOT,
        node_name: str | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        name = node_name if node_name is not None else str(instance)
        if not name or "/" in name or name in (".", ".."):
            raise RegistrationError(name, "node name must be a non-empty znode name")
        self._client = client
        self._service = service
        self._instance = instance
        self._path = f"{service_path(service, root)}/{name}"
        self._payload = b""
        self._lost = False
        self._started = False
        self._stop_timeout = stop_timeout
        self._loop = ReconcileLoop(
            self._ensure,
            is_connected=lambda: bool(self._client.connected),
            on_error=self._on_error,
        )

    @property
    def path(self) -> str:
        """The full path of the registration node."""
        return self._path

    @property
    def instance(self) -> Instance:
        """The instance as registered (with ``registered_at`` set once started)."""
        return self._instance

    def start(self, timeout: float = 10.0) -> None:
        """Create the node, waiting at most ``timeout`` seconds for ZooKeeper.

        Raises :class:`ZooKeeperUnavailableError` if ZooKeeper does not answer in time and
        :class:`RegistrationError` if the node cannot be created (no permission, parent is
        ephemeral, ...). On return the node exists and is owned by this client's session.
        """
        if self._started:
            return
        self._instance = dataclasses.replace(self._instance, registered_at=time.time())
        self._payload = encode_instance(self._instance)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._client.connected and self._ensure():
                    break
            except NoAuthError:
                raise RegistrationError(self._path, "no permission (ZooKeeper ACL)") from None
            except AuthFailedError:
                raise RegistrationError(
                    self._path, "authentication failed (ZooKeeper refused the credential)"
                ) from None
            except NoChildrenForEphemeralsError:
                raise RegistrationError(self._path, "a parent node is ephemeral") from None
            except CONNECTION_ERRORS:
                pass
            except KazooException as error:
                raise RegistrationError(self._path, f"{type(error).__name__}: {error}") from None
            if time.monotonic() >= deadline:
                raise ZooKeeperUnavailableError(
                    describe_hosts(self._client), timeout, f"registering {self._path}"
                )
            gevent.sleep(0.05)
        self._started = True
        self._client.add_listener(self._on_state)
        self._loop.start()
        events.emit(
            events.INSTANCE_REGISTERED,
            service=self._service,
            instance=str(self._instance),
            path=self._path,
        )
        self._check_protection()

    def _check_protection(self) -> None:
        """With protection asked for (the client creates nodes with an ACL), tell when the
        service path was made before with one that lets anyone register or delete under it
        (ZooKeeper's ACLs are per node, and an existing node keeps its own)."""
        if not self._client.default_acl:
            return
        parent = self._path.rsplit("/", 1)[0]
        try:
            acls, _ = self._client.get_acls(parent)
        except (KazooException, *CONNECTION_ERRORS):
            return  # the next start tells
        open_to = [
            f"{acl.id.scheme}:{acl.id.id}"
            for acl in acls
            if acl.id.scheme == "world" and acl.perms & (Permissions.CREATE | Permissions.DELETE)
        ]
        if open_to:
            events.emit(
                events.REGISTRY_UNPROTECTED,
                "warning",
                service=self._service,
                path=parent,
                open_to=open_to,
                advice="anyone may register or delete instances here: set its ACL"
                " (zkCli setAcl) or create the path anew with protection",
            )

    def stop(self) -> None:
        """Delete the node if this session owns it, and stop maintaining it. Idempotent.

        Returns within ``stop_timeout`` seconds even if ZooKeeper does not answer (kazoo
        queues requests while it reconnects). Failures are logged, not raised: the ephemeral
        node dies with the session anyway.
        """
        if not self._started:
            return
        self._started = False
        self._client.remove_listener(self._on_state)
        self._loop.stop()
        failure: str | None = f"no answer within {self._stop_timeout:g}s"
        with gevent.Timeout(self._stop_timeout, False):
            try:
                _, stat = self._client.get(self._path)
                if stat.ephemeralOwner == self._session_id():
                    self._client.delete(self._path, version=stat.version)
                failure = None
            except NoNodeError:
                failure = None
            except (KazooException, *CONNECTION_ERRORS) as error:
                failure = repr(error)
        if failure is not None:
            events.emit(
                events.REGISTRATION_FAILED,
                "warning",
                service=self._service,
                path=self._path,
                error=failure,
                during="deregister",
            )
        events.emit(
            events.INSTANCE_DEREGISTERED,
            service=self._service,
            instance=str(self._instance),
            path=self._path,
        )

    def _session_id(self) -> int | None:
        client_id = self._client.client_id
        return client_id[0] if client_id else None

    def _ensure(self) -> bool:
        """Make the node exist, hold our payload and belong to our session (idempotent).

        Returns whether it does now; False means "look again" (not connected, or a race).
        """
        if not self._client.connected:
            return False
        session_id = self._session_id()
        try:
            data, stat = self._client.get(self._path, watch=self._on_node_event)
        except NoNodeError:
            pass
        else:
            if stat.ephemeralOwner == session_id:
                if data != self._payload:
                    self._client.set(self._path, self._payload, version=stat.version)
                return True
            self._client.delete(self._path, version=stat.version)
            events.emit(
                events.REGISTRATION_NODE_REPLACED,
                "warning",
                service=self._service,
                path=self._path,
                previous_owner=hex(stat.ephemeralOwner),
            )
        try:
            self._client.create(self._path, self._payload, ephemeral=True, makepath=True)
        except NodeExistsError:
            self._loop.poke()  # someone raced us: look again
            return False
        self._client.exists(self._path, watch=self._on_node_event)
        if self._lost:
            self._lost = False
            events.emit(
                events.INSTANCE_REREGISTERED,
                service=self._service,
                instance=str(self._instance),
                path=self._path,
            )
        return True

    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            self._lost = True
        elif state == KazooState.CONNECTED:
            self._loop.poke()

    def _on_node_event(self, event: WatchedEvent) -> None:
        self._loop.poke()

    def _on_error(self, error: Exception) -> None:
        events.emit(
            events.REGISTRATION_FAILED,
            "error",
            service=self._service,
            path=self._path,
            error=repr(error),
        )
