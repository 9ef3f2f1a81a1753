"""The one exception hierarchy of geventpool.

Every error the library raises on purpose derives from :class:`GeventPoolError`, so an
application can catch the library's failures in one clause. Errors carry their context as
attributes (the path, the timeout, the reason) as well as in their message, so handlers and log
processors never have to parse text.
"""

from __future__ import annotations


class GeventPoolError(Exception):
    """Root of every error raised by geventpool."""


class ConfigurationError(GeventPoolError):
    """A setting or argument is invalid; raised before anything is started."""


class RegistryError(GeventPoolError):
    """Something went wrong between us and the ZooKeeper registry."""


class ZooKeeperUnavailableError(RegistryError):
    """ZooKeeper could not be reached (or did not answer) within a bounded time.

    ``hosts`` is the connect string and ``timeout`` the time waited, in seconds.
    """

    def __init__(self, hosts: str, timeout: float, detail: str = "") -> None:
        self.hosts = hosts
        self.timeout = timeout
        self.detail = detail
        message = f"ZooKeeper at {hosts!r} not reachable within {timeout:.2f}s"
        super().__init__(f"{message}: {detail}" if detail else message)


class RegistrationError(RegistryError):
    """An instance could not be registered at ``path`` (no permission, bad path, ...)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot register {path!r}: {reason}")


class DiscoveryError(RegistryError):
    """The instances of a service could not be discovered."""


class InvalidInstanceError(DiscoveryError):
    """A registry entry was rejected; ``node`` names it and ``reason`` says why."""

    def __init__(self, reason: str, node: str = "") -> None:
        self.node = node
        self.reason = reason
        super().__init__(f"rejected instance {node!r}: {reason}" if node else reason)
