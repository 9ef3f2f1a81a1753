"""Structured events: the stable names operators' log queries depend on, and how they are sent.

Every event geventpool emits goes through :func:`emit`, is named by one of the constants below
and carries bound keys (``service``, ``instance``, ``path``, ...). ``docs/events.md`` lists each
event with its level and keys. Names never change within a major version.

The library never configures structlog: the application does (``structlog.configure``). The
logger is looked up at every emit, not cached at construction, so a configuration made after a
client was built still applies, and ``structlog.testing.capture_logs`` sees every event.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import structlog

LOGGER_NAME = "geventpool"

# ZooKeeper connection (one per client the library owns or watches)
ZOOKEEPER_STATE_CHANGED = "zookeeper_state_changed"
ZOOKEEPER_TLS_FAILED = "zookeeper_tls_failed"

# Registrar (server side)
INSTANCE_REGISTERED = "instance_registered"
INSTANCE_REREGISTERED = "instance_reregistered"
INSTANCE_DEREGISTERED = "instance_deregistered"
REGISTRATION_NODE_REPLACED = "registration_node_replaced"
REGISTRATION_FAILED = "registration_failed"
REGISTRY_UNPROTECTED = "registry_unprotected"

# Membership (client side)
MEMBERSHIP_LOADED = "membership_loaded"
MEMBERSHIP_REFRESHED = "membership_refreshed"
MEMBERSHIP_SUSPENDED = "membership_suspended"
MEMBERSHIP_SESSION_LOST = "membership_session_lost"
MEMBERSHIP_REFRESH_FAILED = "membership_refresh_failed"
MEMBERSHIP_SUBSCRIBER_FAILED = "membership_subscriber_failed"
INSTANCE_JOINED = "instance_joined"
INSTANCE_LEFT = "instance_left"
INSTANCE_UPDATED = "instance_updated"
INSTANCE_REJECTED = "instance_rejected"
EMPTY_PROTECTION_ENGAGED = "empty_protection_engaged"
EMPTY_PROTECTION_CLEARED = "empty_protection_cleared"
EMPTY_PROTECTION_EXPIRED = "empty_protection_expired"
SERVICE_UNAVAILABLE = "service_unavailable"
SERVICE_AVAILABLE = "service_available"

# Pool and client
POOL_EXHAUSTED = "pool_exhausted"
INSTANCE_EJECTED = "instance_ejected"
INSTANCE_RESTORED = "instance_restored"
INSTANCE_UNRESPONSIVE = "instance_unresponsive"
CONNECTION_REAPED = "connection_reaped"
PROTOCOL_VIOLATION = "protocol_violation"
CALL_RETRIED = "call_retried"
CALL_HEDGED = "call_hedged"
CALL_OBSERVER_FAILED = "call_observer_failed"
RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
CLIENT_STARTED = "client_started"
CLIENT_STOPPED = "client_stopped"
CLIENT_REBUILT_AFTER_FORK = "client_rebuilt_after_fork"

# Alerting
ALERT = "alert"
ALERT_SUPPRESSED = "alert_suppressed"
ALERT_QUEUE_FULL = "alert_queue_full"
ALERT_DELIVERY_FAILED = "alert_delivery_failed"
ALERT_DROPPED = "alert_dropped"

# Thrift server
SERVER_STARTED = "server_started"
SERVER_STOPPING = "server_stopping"
SERVER_STOPPED = "server_stopped"
SERVER_CONNECTION_LIMIT_REACHED = "server_connection_limit_reached"
SERVER_HANDLER_FAILED = "server_handler_failed"
SERVER_CONNECTION_ERROR = "server_connection_error"
SERVER_DRAIN_TIMEOUT = "server_drain_timeout"


Listener = Callable[[str, str, Mapping[str, Any]], None]
_listeners: list[Listener] = []


def add_listener(listener: Listener) -> Callable[[], None]:
    """Call ``listener(event, level, fields)`` for every event from now on; returns a remover.

    Listeners run in the emitting greenlet, often a caller's: they must only record or
    enqueue, never block (the alerter puts the event in a bounded queue and returns).
    """
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def emit(event: str, level: str = "info", **fields: Any) -> None:
    """Log ``event`` at ``level`` (``debug``, ``info``, ``warning``, ``error``) with ``fields``,
    then pass it to every listener.

    Never raises: a broken log configuration or listener must not break a watcher or a call.
    """
    try:
        logger = structlog.get_logger(LOGGER_NAME)
        getattr(logger, level)(event, **fields)
    except Exception as error:  # noqa: BLE001 - logging must never take the runtime down
        sys.stderr.write(f"geventpool: could not log {event!r}: {error!r}\n")
    for listener in _listeners:
        try:
            listener(event, level, fields)
        except Exception as error:  # noqa: BLE001
            sys.stderr.write(f"geventpool: event listener failed on {event!r}: {error!r}\n")
