"""``geventpool check-config FILE``: validate a TOML configuration and say what it would do.

The file is read by :func:`geventpool.config.load_config`, exactly as an application reads
it (unknown keys, wrong types, bad URLs and missing secrets are errors), and what a program
builds from it is built, unstarted (each service's client, the alerter), so that the checks
made only there count too (a balancer's name, say). A valid file is
described section by section: ZooKeeper, each service (its path, balancer, deadline, pool,
ejection, retries and budget, TLS, reply limits), the alerting settings and channels; exit
code 0. An invalid one prints the error and exits with 1. Nothing is connected to.

Secrets are read as at run time: from the environment (``*_env``) and from files
(``*_file``). ``--without-secrets`` checks a file where its environment secrets are not
set (a CI job, a laptop): each unset variable is taken as a placeholder (an https URL,
which also passes as a ``user:password`` credential) and listed; secret files must still
exist. No secret value is ever printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from geventpool.cli.common import (
    DEFAULT_ZOOKEEPER,
    FAILED,
    OK,
    add_json_option,
    print_json,
    printable,
)
from geventpool.client.pool import PIPELINED_INFLIGHT
from geventpool.client.service import ServiceClient
from geventpool.config import Config, ServiceConfig, load_config
from geventpool.discovery.membership import watched_path
from geventpool.discovery.zk import ZooKeeperConfig
from geventpool.errors import ConfigurationError
from geventpool.tls import ClientTls

HELP = "validate a TOML configuration and say what it would do"
PLACEHOLDER = "https://placeholder.invalid/"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check-config`` to the command line."""
    parser = commands.add_parser("check-config", help=HELP, description=__doc__)
    parser.add_argument("file", metavar="FILE", help="the TOML file (e.g. conf/geventpool.toml)")
    parser.add_argument(
        "--without-secrets",
        action="store_true",
        help="take unset *_env secrets as placeholders (listed) instead of failing",
    )
    add_json_option(parser, "the description (or the error)")
    parser.set_defaults(run=run, command_parser=parser)


class AssumedEnvironment(Mapping[str, str]):
    """The process environment, where every variable asked for but unset reads as
    :data:`PLACEHOLDER`; :attr:`assumed` lists those, in the order asked."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.assumed: list[str] = []

    def __getitem__(self, name: str) -> str:
        value = self._environ.get(name)
        if value:
            return value
        if name not in self.assumed:
            self.assumed.append(name)
        return PLACEHOLDER

    def __iter__(self) -> Iterator[str]:
        return iter(self._environ)

    def __len__(self) -> int:
        return len(self._environ)


def run(args: argparse.Namespace) -> int:
    """Describe the configuration (0), or print why it is invalid (1)."""
    environ: Mapping[str, str] = (
        AssumedEnvironment(os.environ) if args.without_secrets else os.environ
    )
    try:
        config = load_config(args.file, environ)
        build(config)
    except ConfigurationError as error:
        if args.json:
            print_json({"file": args.file, "valid": False, "error": str(error)})
        else:
            sys.stderr.write(f"{args.file}: invalid: {printable(error)}\n")
        return FAILED
    assumed = environ.assumed if isinstance(environ, AssumedEnvironment) else []
    if args.json:
        print_json({"file": args.file, "valid": True, **describe(config), "assumed_env": assumed})
        return OK
    print(f"{args.file}: valid")
    for line in summary(config):
        print(printable(line))  # a value of the file holding a new line stays on its line
    if assumed:
        print(f"secrets assumed (not set here): {', '.join(assumed)}")
    return OK


class _NoMethods:
    """A thriftpy2-like service without methods: what :func:`build` builds clients of."""

    thrift_services: tuple[str, ...] = ()


def build(config: Config) -> None:
    """Build, without starting them, what a program builds from ``config``: a
    :class:`~geventpool.client.service.ServiceClient` per service and the alerter, so that
    the checks made only there (the balancer's name, the deadline, the path) are made too.
    Raises :class:`ConfigurationError`, naming the service."""
    for name, service in config.services.items():
        try:
            client = ServiceClient(
                _NoMethods,
                name,
                zookeeper=config.zookeeper or DEFAULT_ZOOKEEPER,
                **service.client_options(),
            )
        except ConfigurationError as error:
            raise ConfigurationError(f"services.{name}: {error}") from None
        client.stop()
    config.alerter()


# -- JSON -------------------------------------------------------------------------------------


def describe(config: Config) -> dict[str, Any]:
    """Every setting of ``config`` as JSON values (secrets by where they come from only)."""
    return {
        "zookeeper": None if config.zookeeper is None else _zookeeper_json(config.zookeeper),
        "services": {name: _service_json(service) for name, service in config.services.items()},
        "alerts": dataclasses.asdict(config.alerts),
        "channels": [channel.name for channel in config.channels],
    }


def _zookeeper_json(zookeeper: ZooKeeperConfig) -> dict[str, Any]:
    return {
        "hosts": zookeeper.hosts,
        "session_timeout": zookeeper.session_timeout,
        "connect_timeout": zookeeper.connect_timeout,
        "max_retry_delay": zookeeper.max_retry_delay,
        "auth": [scheme for scheme, _ in zookeeper.auth],
        "sasl": None if zookeeper.sasl is None else zookeeper.sasl.get("mechanism"),
        "protect": zookeeper.protect,
        "tls": None if zookeeper.tls is None else _tls_json(zookeeper.tls),
    }


def _service_json(service: ServiceConfig) -> dict[str, Any]:
    pool = {
        spec.name: getattr(service.pool, spec.name)
        for spec in dataclasses.fields(service.pool)
        if spec.name not in ("limits", "tls")
    }
    retry = service.retry
    idempotent = retry.idempotent
    return {
        "path": watched_path(service.name, service.root, service.path),
        "balancer": service.balancer,
        "zone": service.zone,
        "call_timeout": service.call_timeout,
        "empty_protection": service.empty_protection,
        "pool": pool,
        "limits": dataclasses.asdict(service.pool.limits),
        "tls": None if service.pool.tls is None else _tls_json(service.pool.tls),
        "retry": {
            "retries": retry.retries,
            "idempotent": (
                idempotent
                if isinstance(idempotent, bool)
                else "predicate"
                if callable(idempotent)
                else sorted(idempotent)
            ),
            "retry_on": sorted(str(name) for name in retry.retry_on),
            "backoff": retry.backoff,
            "max_backoff": retry.max_backoff,
            "attempt_timeout": retry.attempt_timeout,
        },
        "retry_budget": dict(service.retry_budget),
    }


def _tls_json(tls: ClientTls) -> dict[str, Any]:
    return {
        "ca_file": tls.ca_file,
        "cert_file": tls.cert_file,
        "key_file": tls.key_file,
        "verify": tls.verify,
        "check_hostname": tls.check_hostname,
        "server_name": tls.server_name,
        "plaintext": tls.plaintext,
    }


# -- text -------------------------------------------------------------------------------------


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:g}s"


def summary(config: Config) -> Iterator[str]:
    """What ``config`` makes a program do, in readable lines."""
    yield from _zookeeper_lines(config.zookeeper)
    if not config.services:
        yield "services: none"
    for name, service in config.services.items():
        yield from _service_lines(name, service)
    yield from _alert_lines(config)


def _zookeeper_lines(zookeeper: ZooKeeperConfig | None) -> Iterator[str]:
    if zookeeper is None:
        yield "zookeeper: not configured (each client is given its own)"
        return
    yield (
        f"zookeeper: {zookeeper.hosts}; sessions of {_s(zookeeper.session_timeout)}, connected"
        f" within {_s(zookeeper.connect_timeout)}, reconnect pauses up to"
        f" {_s(zookeeper.max_retry_delay)}"
    )
    schemes = [scheme for scheme, _ in zookeeper.auth]
    if zookeeper.sasl is not None:
        schemes.append(f"sasl ({zookeeper.sasl.get('mechanism')})")
    if schemes:
        protect = (
            "created nodes writable by this identity only, readable by all"
            if zookeeper.node_acl() is not None
            else "created nodes open to all"
        )
        yield f"  authentication: {', '.join(schemes)}; {protect}"
    else:
        yield "  authentication: none (created nodes open to all)"
    yield f"  transport: {_tls_text(zookeeper.tls, 'ZooKeeper')}"


def _service_lines(name: str, service: ServiceConfig) -> Iterator[str]:
    pool, retry = service.pool, service.retry
    path = watched_path(name, service.root, service.path)
    zone = f", preferring zone {service.zone}" if service.zone else ""
    yield (
        f"service {name}: instances under {path}; balancer {service.balancer}{zone}; calls"
        f" within {_s(service.call_timeout)}; empty-list protection"
        f" {_s(service.empty_protection)}"
    )
    if pool.max_inflight is None:
        inflight = (
            f"{PIPELINED_INFLIGHT} calls per connection with servers that advertise"
            " out-of-order replies, else one"
        )
    else:
        inflight = f"{pool.max_inflight} calls per connection"
    yield (
        f"  pool: at most {pool.max_connections} connections per instance ({inflight}),"
        f" {pool.min_idle} kept idle; a caller waits at most {_s(pool.pool_timeout)} for one;"
        f" connect within {_s(pool.connect_timeout)}; idle ones closed after"
        f" {_s(pool.idle_timeout)}, every one retired after {_s(pool.max_lifetime)}"
        + (f"; pre-ping {pool.pre_ping}()" if pool.pre_ping else "")
    )
    success = (
        f" or below {pool.min_success_rate:.0%} success over {_s(pool.success_window)}"
        f" (once {pool.success_min_calls} calls were made)"
        if pool.min_success_rate is not None
        else ""
    )
    yield (
        f"  ejection: after {pool.eject_after} failures in a row{success}, for"
        f" {_s(pool.eject_backoff)} doubling up to {_s(pool.max_eject_backoff)}; at most"
        f" {pool.max_ejected_share:.0%} of the instances at once; below"
        f" {pool.panic_threshold:.0%} in rotation every instance takes calls; new instances"
        f" ramp up over {_s(pool.slow_start)}"
    )
    idempotent = retry.idempotent
    if isinstance(idempotent, bool):
        resend = "every method" if idempotent else "no method"
    elif callable(idempotent):
        resend = "the methods a predicate names"
    else:
        resend = ", ".join(sorted(idempotent)) or "no method"
    retry_on = ", ".join(sorted(str(name) for name in retry.retry_on)) or "none"
    attempt = (
        f"; each attempt cut after {_s(retry.attempt_timeout)}"
        if retry.attempt_timeout is not None
        else ""
    )
    yield (
        f"  retries: up to {retry.retries} more attempts, on other instances; sent again after"
        f" it may have run: {resend}; declared exceptions meaning not run: {retry_on}; backoff"
        f" {_s(retry.backoff)} doubling up to {_s(retry.max_backoff)}{attempt}"
    )
    budget = service.client_options()["retry_budget"]
    yield (
        f"  retry budget: {budget.percent:.0%} of the calls plus {budget.min_per_second:g}"
        f" a second, over {_s(budget.window)}"
    )
    yield f"  tls: {_tls_text(pool.tls, 'instances')}"
    limits = pool.limits
    yield (
        f"  reply limits: frame {limits.max_frame_size:,} bytes, message"
        f" {limits.max_message_size:,} bytes, string {limits.max_string_size:,} bytes,"
        f" container {limits.max_container_size:,} elements, depth {limits.max_depth},"
        f" {limits.max_values:,} values"
    )


def _tls_text(tls: ClientTls | None, peers: str) -> str:
    if tls is None:
        if peers == "ZooKeeper":
            return "plaintext"
        return "plaintext, TLS only to instances the registry lists as TLS-only (system CAs)"
    trusted = _relative(tls.ca_file) if tls.ca_file else "the system CAs"
    parts = [f"TLS to {peers}, trusting {trusted}"]
    if tls.cert_file:
        parts.append(f"client certificate {_relative(tls.cert_file)}")
    if not tls.verify:
        parts.append("certificates NOT verified")
    elif tls.server_name:
        parts.append(f"certificates must name {tls.server_name}")
    elif not tls.check_hostname:
        parts.append("host names not checked")
    if peers != "ZooKeeper":
        parts.append(
            "plaintext instances called in plaintext"
            if tls.plaintext
            else "plaintext instances left out"
        )
    return "; ".join(parts)


def _alert_lines(config: Config) -> Iterator[str]:
    alerts = config.alerts
    yield (
        f"alerts: at most {alerts.rate_limit} notices per {_s(alerts.rate_window)}, repeated"
        f" every {_s(alerts.repeat_interval) if alerts.repeat_interval else 'never'} while a"
        f" condition lasts; ZooKeeper unreachable {_s(alerts.zookeeper_grace)} before anyone"
        f" is told; each delivery within {_s(alerts.delivery_timeout)}, {alerts.retries}"
        f" retries from {_s(alerts.retry_backoff)}"
    )
    if not config.channels:
        yield "  channels: none (alerts go nowhere)"
    for number, channel in enumerate(config.channels, 1):
        yield f"  channel {number}: {channel.name}"


def _relative(path: str) -> str:
    """``path`` relative to the working folder when it is below it (for shorter lines)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path
