"""geventpool: client-side high availability for Thrift services on gevent.

The public API, importable from the top level; ``geventpool.locust_user`` (Locust) and
``geventpool.testing`` (real ZooKeeper, receivers, faults for your own tests) are separate.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from geventpool.errors import (
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    ConnectionBusyError,
    ConnectionClosedError,
    DiscoveryError,
    GeventPoolError,
    InvalidArgumentsError,
    InvalidInstanceError,
    MalformedMessageError,
    MessageLimitError,
    NoInstancesError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    ProtocolViolationError,
    RegistrationError,
    RegistryError,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
    TlsError,
    TransportError,
    ZooKeeperUnavailableError,
)

if TYPE_CHECKING:
    from geventpool.alerts.alerter import Alerter
    from geventpool.alerts.channels import (
        CallableChannel,
        LogChannel,
        SmsChannel,
        SmtpChannel,
        WebhookChannel,
    )
    from geventpool.alerts.policy import AlertSettings
    from geventpool.client.hedging import Hedge
    from geventpool.client.pool import InstanceStatus, PoolSettings
    from geventpool.client.retrying import Retry, RetryBudget
    from geventpool.client.service import ServiceClient, ServiceStatus
    from geventpool.config import Config, load_config
    from geventpool.discovery.instance import Instance
    from geventpool.discovery.membership import Membership, MembershipChange
    from geventpool.discovery.registrar import Registrar
    from geventpool.discovery.zk import ZooKeeperConfig, connect
    from geventpool.secret import Secret
    from geventpool.server.thrift_server import Registration, ThriftServer
    from geventpool.tls import ClientTls, ServerTls

# Each name is imported from its module on first use, so that a client does not load the
# server (gevent.server, the registrar) or the alerting, and a server does not load the client.
_LAZY = {
    "Alerter": "geventpool.alerts.alerter",
    "CallableChannel": "geventpool.alerts.channels",
    "LogChannel": "geventpool.alerts.channels",
    "SmsChannel": "geventpool.alerts.channels",
    "SmtpChannel": "geventpool.alerts.channels",
    "WebhookChannel": "geventpool.alerts.channels",
    "AlertSettings": "geventpool.alerts.policy",
    "InstanceStatus": "geventpool.client.pool",
    "PoolSettings": "geventpool.client.pool",
    "Hedge": "geventpool.client.hedging",
    "Retry": "geventpool.client.retrying",
    "RetryBudget": "geventpool.client.retrying",
    "ServiceClient": "geventpool.client.service",
    "ServiceStatus": "geventpool.client.service",
    "Config": "geventpool.config",
    "load_config": "geventpool.config",
    "Instance": "geventpool.discovery.instance",
    "Membership": "geventpool.discovery.membership",
    "MembershipChange": "geventpool.discovery.membership",
    "Registrar": "geventpool.discovery.registrar",
    "ZooKeeperConfig": "geventpool.discovery.zk",
    "connect": "geventpool.discovery.zk",
    "Secret": "geventpool.secret",
    "Registration": "geventpool.server.thrift_server",
    "ThriftServer": "geventpool.server.thrift_server",
    "ClientTls": "geventpool.tls",
    "ServerTls": "geventpool.tls",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geventpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "AlertSettings",
    "Alerter",
    "CallTimeoutError",
    "CallableChannel",
    "ClientTls",
    "Config",
    "ConfigurationError",
    "ConnectError",
    "ConnectionBusyError",
    "ConnectionClosedError",
    "DiscoveryError",
    "GeventPoolError",
    "Hedge",
    "Instance",
    "InstanceStatus",
    "InvalidArgumentsError",
    "InvalidInstanceError",
    "LogChannel",
    "MalformedMessageError",
    "Membership",
    "MembershipChange",
    "MessageLimitError",
    "NoInstancesError",
    "PoolClosedError",
    "PoolError",
    "PoolExhaustedError",
    "PoolSettings",
    "ProtocolViolationError",
    "Registrar",
    "Registration",
    "RegistrationError",
    "RegistryError",
    "RetriesExhaustedError",
    "Retry",
    "RetryBudget",
    "RetryBudgetExhaustedError",
    "Secret",
    "ServerTls",
    "ServiceClient",
    "ServiceStatus",
    "SmsChannel",
    "SmtpChannel",
    "ThriftServer",
    "TlsError",
    "TransportError",
    "WebhookChannel",
    "ZooKeeperConfig",
    "ZooKeeperUnavailableError",
    "__version__",
    "connect",
    "load_config",
]
