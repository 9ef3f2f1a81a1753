"""geventpool: client-side high availability for Thrift services on gevent.

The public API, importable from the top level; ``geventpool.locust_user`` (Locust) and
``geventpool.testing`` (real ZooKeeper, receivers, faults for your own tests) are separate.
"""

from __future__ import annotations

from geventpool.alerts.alerter import Alerter
from geventpool.alerts.channels import (
    CallableChannel,
    LogChannel,
    SmsChannel,
    SmtpChannel,
    WebhookChannel,
)
from geventpool.alerts.policy import AlertSettings
from geventpool.client.pool import InstanceStatus, PoolSettings
from geventpool.client.service import ServiceClient, ServiceStatus
from geventpool.config import Config, load_config
from geventpool.discovery.instance import Instance
from geventpool.discovery.membership import Membership, MembershipChange
from geventpool.discovery.registrar import Registrar
from geventpool.discovery.zk import ZooKeeperConfig, connect
from geventpool.errors import (
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    DiscoveryError,
    GeventPoolError,
    InvalidArgumentsError,
    InvalidInstanceError,
    NoInstancesError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    RegistrationError,
    RegistryError,
    RetriesExhaustedError,
    TransportError,
    ZooKeeperUnavailableError,
)
from geventpool.secret import Secret
from geventpool.server.thrift_server import Registration, ThriftServer

__version__ = "0.1.0"

__all__ = [
    "AlertSettings",
    "Alerter",
    "CallTimeoutError",
    "CallableChannel",
    "Config",
    "ConfigurationError",
    "ConnectError",
    "DiscoveryError",
    "GeventPoolError",
    "Instance",
    "InstanceStatus",
    "InvalidArgumentsError",
    "InvalidInstanceError",
    "LogChannel",
    "Membership",
    "MembershipChange",
    "NoInstancesError",
    "PoolClosedError",
    "PoolError",
    "PoolExhaustedError",
    "PoolSettings",
    "Registrar",
    "Registration",
    "RegistrationError",
    "RegistryError",
    "RetriesExhaustedError",
    "Secret",
    "ServiceClient",
    "ServiceStatus",
    "SmsChannel",
    "SmtpChannel",
    "ThriftServer",
    "TransportError",
    "WebhookChannel",
    "ZooKeeperConfig",
    "ZooKeeperUnavailableError",
    "__version__",
    "connect",
    "load_config",
]
