"""A Locust user for Thrift services, backed by one geventpool client per process.

Subclass :class:`ThriftUser`, name your thriftpy2 service, write tasks that call
``self.client.<method>(...)``::

    from locust import task
    from geventpool.locust_user import ThriftUser

    calc_thrift = thriftpy2.load("calc.thrift", module_name="calc_thrift")

    class CalcUser(ThriftUser):
        service = calc_thrift.Calculator
        service_name = "calc"                       # <root>/calc in ZooKeeper
        zookeeper = "zk1:2181,zk2:2181"             # or $GEVENTPOOL_ZOOKEEPER

        @task
        def add(self) -> None:
            self.client.add(1, 2)

Every call is reported to Locust (``events.request``): the name is the method, the response
time the whole call through the pool, and a failure the exception's type (one failures row per
type, whatever numbers its message carries; the exception itself is on ``.error``). A failed
call returns None instead of raising, so the task goes on.

All users of a class in one process share one :class:`~geventpool.client.service.ServiceClient`,
started on first use, so every Locust worker process (``--processes``, ``--worker``) has its
own pool and ZooKeeper session. Settings come from the class attributes, or from the
``[zookeeper]`` and ``[services.<name>]`` tables of the geventpool TOML file named by
``config`` (or ``$GEVENTPOOL_CONFIG``), whose ``[alerts]`` then also start an alerter.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from locust import User, events
from locust.env import Environment

from geventpool import (  # an integration: built on the public API only
    Alerter,
    ConfigurationError,
    GeventPoolError,
    Instance,
    ServiceClient,
    ZooKeeperConfig,
    load_config,
)

REQUEST_TYPE = "thrift"


class ReportedCallError(GeventPoolError):
    """What Locust is told of a failed call: the error's type, with the error attached."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(type(error).__name__)
        self.error = error

    def __repr__(self) -> str:
        return type(self.error).__name__


class ReportingClient:
    """Calls through a :class:`ServiceClient` and reports each one to Locust."""

    def __init__(self, client: ServiceClient, environment: Environment) -> None:
        self._client = client
        self._fire: Callable[..., None] = environment.events.request.fire

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        client, fire = self._client, self._fire

        def remote(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            failure: ReportedCallError | None = None
            result = None
            try:
                result = client.call(method, *args, **kwargs)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                failure = ReportedCallError(error)
            fire(
                request_type=REQUEST_TYPE,
                name=method,
                response_time=(time.perf_counter() - started) * 1000,
                response_length=0,
                exception=failure,
                context={},
            )
            return result

        remote.__name__ = method
        self.__dict__[method] = remote  # found directly from now on
        return remote


_lock = threading.Lock()
_clients: dict[tuple[type, int], ServiceClient] = {}
_alerters: dict[int, Alerter] = {}


class ThriftUser(User):
    """A Locust user whose ``self.client`` calls a Thrift service through geventpool."""

    abstract = True
    service: ClassVar[Any] = None
    service_name: ClassVar[str | None] = None
    zookeeper: ClassVar[str | None] = None
    instances: ClassVar[list[Instance] | None] = None
    client_options: ClassVar[dict[str, Any]] = {}
    config: ClassVar[str | None] = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.client = ReportingClient(self.shared_client(), environment)

    @classmethod
    def shared_client(cls) -> ServiceClient:
        """This process's client for this user class (made and started on first use)."""
        key = (cls, os.getpid())
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = cls._make_client()
        client.start()
        return client

    @classmethod
    def _make_client(cls) -> ServiceClient:
        if cls.service is None:
            raise ConfigurationError(f"{cls.__name__}.service must name a thriftpy2 service")
        name = cls.service_name or cls.service.__name__
        options: dict[str, Any] = {}
        zookeeper: str | ZooKeeperConfig | None = cls.zookeeper or os.environ.get(
            "GEVENTPOOL_ZOOKEEPER"
        )
        path = cls.config or os.environ.get("GEVENTPOOL_CONFIG")
        if path:
            config = load_config(path)
            if config.zookeeper is not None and cls.zookeeper is None:
                zookeeper = config.zookeeper
            if name in config.services:
                options.update(config.services[name].client_options())
            if config.channels and os.getpid() not in _alerters:
                _alerters[os.getpid()] = config.alerter().start()
        options.update(cls.client_options)
        if cls.instances is not None:
            return ServiceClient(cls.service, name, instances=cls.instances, **options)
        if zookeeper is None:
            raise ConfigurationError(
                f"{cls.__name__}: set zookeeper, instances, $GEVENTPOOL_ZOOKEEPER or a config"
            )
        return ServiceClient(cls.service, name, zookeeper=zookeeper, **options)


def shared_clients() -> list[ServiceClient]:
    """The clients made in this process."""
    pid = os.getpid()
    return [client for (_, owner), client in _clients.items() if owner == pid]


def _stop_clients(environment: Environment, **_: Any) -> None:
    for client in shared_clients():
        client.stop()
    alerter = _alerters.pop(os.getpid(), None)
    if alerter is not None:
        alerter.stop(flush_timeout=5.0)


events.quitting.add_listener(_stop_clients)
