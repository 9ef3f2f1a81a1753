"""Configuration from a TOML file (``conf/geventpool.toml`` is the documented example).

:func:`load_config` reads the file with ``tomllib`` and returns a :class:`Config` of typed,
validated settings, or raises :class:`~geventpool.errors.ConfigurationError` naming the key
(``alerts.channels[2].port``) for an unknown key, a wrong type, a bad URL, or a missing secret.

Secrets never sit in the file: a secret setting ``<name>`` is given as ``<name>_env`` (the
name of an environment variable) or ``<name>_file`` (a file holding it; surrounding white space
is stripped). A literal secret is refused. Secrets become :class:`~geventpool.secret.Secret`
values, which no ``repr``, log line or error message shows.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, cast

from geventpool.alerts.alerter import Alerter
from geventpool.alerts.channels import (
    Channel,
    LogChannel,
    SmsChannel,
    SmtpChannel,
    WebhookChannel,
)
from geventpool.alerts.policy import AlertSettings
from geventpool.client.pool import PoolSettings
from geventpool.client.retrying import Retry, RetryBudget
from geventpool.discovery.zk import DEFAULT_ROOT, ZooKeeperConfig
from geventpool.errors import ConfigurationError
from geventpool.secret import Secret
from geventpool.tls import ClientTls
from geventpool.wire.limits import WireLimits

_REQUIRED = object()


class _Table:
    """One TOML table being read: typed access, and an error for every key left unread."""

    def __init__(self, data: object, where: str, environ: Mapping[str, str], base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigurationError(f"{where} must be a table")
        self._data = data
        self._where = where
        self._environ = environ
        self._base = base
        self._read: set[str] = set()

    def path(self, key: str) -> str:
        """The dotted name of ``key`` in this table, for messages."""
        return f"{self._where}.{key}" if self._where else key

    def has(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        self._read.add(key)
        if key not in self._data:
            if default is _REQUIRED:
                raise ConfigurationError(f"{self.path(key)} is required")
            return default
        value: Any = self._data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and int not in kinds:
            kinds = (*kinds, int)  # 5 means 5.0 seconds
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigurationError(
                f"{self.path(key)} must be {names}, not {type(value).__name__} {value!r:.40}"
            )
        if kinds[0] is float:
            return float(cast(float, value))
        return value

    def file(self, key: str) -> str | None:
        """The optional path ``key``, relative to the configuration file's folder."""
        path = self.get(key, str, None)
        return None if path is None else str((self._base / path).resolve())

    def strings(self, key: str, default: Any = _REQUIRED) -> list[str]:
        values = self.get(key, list, default)
        if not all(isinstance(value, str) for value in values):
            raise ConfigurationError(f"{self.path(key)} must be a list of strings")
        return list(values)

    def secret(self, key: str, required: bool = True) -> Secret | None:
        """The secret ``key``, from ``key_env`` or ``key_file``."""
        self._read.update({key, f"{key}_env", f"{key}_file"})
        if key in self._data:
            raise ConfigurationError(
                f"{self.path(key)}: secrets are not written in the file;"
                f" use {key}_env (an environment variable) or {key}_file"
            )
        env, path = self._data.get(f"{key}_env"), self._data.get(f"{key}_file")
        if env is not None and path is not None:
            raise ConfigurationError(f"{self.path(key)}: give {key}_env or {key}_file, not both")
        if env is not None:
            if not isinstance(env, str) or not env:
                raise ConfigurationError(f"{self.path(key + '_env')} must name a variable")
            value = self._environ.get(env)
            if not value:
                raise ConfigurationError(
                    f"{self.path(key)}: environment variable {env} is not set or empty"
                )
            return Secret(value, f"${env}")
        if path is not None:
            if not isinstance(path, str):
                raise ConfigurationError(f"{self.path(key + '_file')} must be a path")
            file = (self._base / path).resolve()
            try:
                value = file.read_text().strip()
            except OSError as error:
                raise ConfigurationError(
                    f"{self.path(key)}: cannot read {file}: {error.strerror}"
                ) from None
            if not value:
                raise ConfigurationError(f"{self.path(key)}: {file} is empty")
            return Secret(value, str(file))
        if required:
            raise ConfigurationError(f"{self.path(key)} is required: set {key}_env or {key}_file")
        return None

    def table(self, key: str, default: Any = _REQUIRED) -> _Table:
        self._read.add(key)
        if key not in self._data:
            if default is _REQUIRED:
                raise ConfigurationError(f"{self.path(key)} is required")
            return _Table({}, self.path(key), self._environ, self._base)
        return _Table(self._data[key], self.path(key), self._environ, self._base)

    def tables(self, key: str) -> list[_Table]:
        self._read.add(key)
        items = self._data.get(key, [])
        if not isinstance(items, list):
            raise ConfigurationError(f"{self.path(key)} must be an array of tables")
        return [
            _Table(item, f"{self.path(key)}[{index}]", self._environ, self._base)
            for index, item in enumerate(items)
        ]

    def names(self) -> list[str]:
        return list(self._data)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise ConfigurationError(f"unknown key {self.path(unknown[0])}")


def _settings(table: _Table, cls: Any) -> dict[str, Any]:
    """The fields of the settings dataclass ``cls`` present in ``table``, typed by default."""
    values: dict[str, Any] = {}
    for spec in fields(cls):
        if table.has(spec.name) and not is_dataclass(spec.default):  # a sub-table: read apart
            values[spec.name] = table.get(spec.name, _kind(spec))
    return values


def _kind(spec: Any) -> type:
    """The TOML type of a settings field: its default's, or for an optional field (default
    None) the type its annotation names (``int | None``: int)."""
    if spec.default is not None:
        return type(spec.default)
    annotation = str(spec.type)
    for kind in (int, float):
        if annotation.startswith(kind.__name__):
            return kind
    return str


@dataclass(frozen=True)
class ServiceConfig:
    """How to reach and call one service (the arguments of a ServiceClient)."""

    name: str
    root: str = DEFAULT_ROOT
    path: str | None = None
    pool: PoolSettings = field(default_factory=PoolSettings)
    balancer: str = "peak_ewma"
    zone: str | None = None
    call_timeout: float = 5.0
    retry: Retry = field(default_factory=Retry)
    retry_budget: Mapping[str, float] = field(default_factory=dict)  # RetryBudget's settings
    empty_protection: float = 30.0

    @property
    def retries(self) -> int:
        """Further attempts of a failed call (``retry.retries``)."""
        return self.retry.retries

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~geventpool.client.service.ServiceClient` (each call
        gives a fresh retry budget: a budget counts one client's calls)."""
        return {
            "root": self.root,
            "path": self.path,
            "pool": self.pool,
            "balancer": self.balancer,
            "zone": self.zone,
            "call_timeout": self.call_timeout,
            "retry": self.retry,
            "retry_budget": _budget(self.retry_budget),
            "empty_protection": self.empty_protection,
        }


@dataclass(frozen=True)
class Config:
    """A whole configuration: ZooKeeper, services, alerting."""

    zookeeper: ZooKeeperConfig | None
    services: Mapping[str, ServiceConfig]
    alerts: AlertSettings
    channels: tuple[Channel, ...]

    def alerter(self) -> Alerter:
        """An (unstarted) :class:`Alerter` with the configured settings and channels."""
        return Alerter(self.channels, self.alerts)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at ``path``; secrets come from ``environ`` (default:
    the process environment) or from files named relative to the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8
    except OSError as error:
        raise ConfigurationError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigurationError(
            f"{path} is not valid TOML: not UTF-8 text (byte {error.start} is"
            f" {error.object[error.start : error.start + 1]!r})"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"{path} is not valid TOML: {error}") from None
    except RecursionError:  # arrays or inline tables nested thousands deep
        raise ConfigurationError(f"{path} is not valid TOML: it nests too deeply") from None
    return parse_config(data, os.environ if environ is None else environ, path.parent)


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str], base: Path) -> Config:
    """Validate already parsed TOML ``data`` (see :func:`load_config`)."""
    top = _Table(dict(data), "", environ, base)
    zookeeper = _zookeeper(top.table("zookeeper")) if top.has("zookeeper") else None
    services_table = top.table("services", None)
    services = {name: _service(name, services_table.table(name)) for name in services_table.names()}
    services_table.done()
    alerts_table = top.table("alerts", None)
    channels = tuple(_channel(table) for table in alerts_table.tables("channels"))
    alerts = AlertSettings(**_settings(alerts_table, AlertSettings))
    alerts_table.done()
    top.done()
    return Config(zookeeper, services, alerts, channels)


def _zookeeper(table: _Table) -> ZooKeeperConfig:
    auth: tuple[tuple[str, str], ...] = ()
    credential = table.secret("auth", required=False)
    if credential is not None:
        auth = ((table.get("auth_scheme", str, "digest"), credential.reveal()),)
    config = ZooKeeperConfig(
        hosts=table.get("hosts", str),
        session_timeout=table.get("session_timeout", float, 10.0),
        connect_timeout=table.get("connect_timeout", float, 10.0),
        max_retry_delay=table.get("max_retry_delay", float, 2.0),
        auth=auth,
        sasl=_sasl(table.table("sasl")) if table.has("sasl") else None,
        protect=table.get("protect", bool, True),
        tls=_client_tls(table.table("tls")) if table.has("tls") else None,
    )
    table.done()
    return config


def _service(name: str, table: _Table) -> ServiceConfig:
    pool_table = table.table("pool", None)
    limits_table = pool_table.table("limits", None)
    limits = WireLimits(**_settings(limits_table, WireLimits))
    limits_table.done()
    tls = _client_tls(table.table("tls")) if table.has("tls") else None
    pool = PoolSettings(**_settings(pool_table, PoolSettings), limits=limits, tls=tls)
    pool_table.done()
    retry = _retry(table)
    budget_table = table.table("retry_budget", None)
    budget = {
        key: budget_table.get(key, float)
        for key in ("percent", "min_per_second", "window")
        if budget_table.has(key)
    }
    budget_table.done()
    _budget(budget)  # checked here, not at the first call
    service = ServiceConfig(
        name=name,
        root=table.get("root", str, DEFAULT_ROOT),
        path=table.get("path", str, None),
        pool=pool,
        balancer=table.get("balancer", str, "peak_ewma"),
        zone=table.get("zone", str, None),
        call_timeout=table.get("call_timeout", float, 5.0),
        retry=retry,
        retry_budget=budget,
        empty_protection=table.get("empty_protection", float, 30.0),
    )
    table.done()
    return service


def _sasl(table: _Table) -> dict[str, str]:
    """``[zookeeper.sasl]``: kazoo's ``sasl_options``, the password a secret."""
    options = {"mechanism": table.get("mechanism", str, "DIGEST-MD5")}
    for key in ("username", "service", "principal"):
        if table.has(key):
            options[key] = table.get(key, str)
    password = table.secret("password", required=False)
    if password is not None:
        options["password"] = password.reveal()
    table.done()
    return options


def _client_tls(table: _Table) -> ClientTls:
    """``[services.NAME.tls]`` or ``[zookeeper.tls]``: :class:`ClientTls`'s settings, files
    relative to the configuration's folder, the key's password a secret."""
    tls = ClientTls(
        ca_file=table.file("ca_file"),
        cert_file=table.file("cert_file"),
        key_file=table.file("key_file"),
        key_password=table.secret("key_password", required=False),
        verify=table.get("verify", bool, True),
        check_hostname=table.get("check_hostname", bool, True),
        server_name=table.get("server_name", str, None),
        plaintext=table.get("plaintext", bool, False),
    )
    table.done()
    return tls


def _budget(settings: Mapping[str, float]) -> RetryBudget:
    defaults = RetryBudget(clock=lambda: 0.0)
    return RetryBudget(
        percent=settings.get("percent", defaults.percent),
        min_per_second=settings.get("min_per_second", defaults.min_per_second),
        window=settings.get("window", defaults.window),
    )


def _retry(table: _Table) -> Retry:
    """``[services.NAME.retry]``, or the ``retries`` shorthand (not both)."""
    if not table.has("retry"):
        return Retry(retries=table.get("retries", int, 2))
    if table.has("retries"):
        raise ConfigurationError(
            f"{table.path('retries')}: give retries in the retry table, not both"
        )
    retry_table = table.table("retry")
    options: dict[str, Any] = {}
    if retry_table.has("idempotent"):
        idempotent = retry_table.get("idempotent", (bool, list))
        if isinstance(idempotent, list):
            idempotent = frozenset(retry_table.strings("idempotent"))
        options["idempotent"] = idempotent
    if retry_table.has("retry_on"):
        options["retry_on"] = frozenset(retry_table.strings("retry_on"))
    for key, kind in (("retries", int), ("backoff", float), ("max_backoff", float)):
        if retry_table.has(key):
            options[key] = retry_table.get(key, kind)
    if retry_table.has("attempt_timeout"):
        options["attempt_timeout"] = retry_table.get("attempt_timeout", float)
    retry_table.done()
    return Retry(**options)


def _headers(table: _Table) -> dict[str, str | Secret]:
    headers: dict[str, str | Secret] = {}
    plain = table.table("headers", None)
    for key in plain.names():
        headers[key] = plain.get(key, str)
    plain.done()
    secret_headers = table.table("secret_headers", None)
    for key in secret_headers.names():
        value = secret_headers.secret(key.removesuffix("_env").removesuffix("_file"))
        assert value is not None
        headers[key.removesuffix("_env").removesuffix("_file")] = value
    secret_headers.done()
    return headers


def _channel(table: _Table) -> Channel:
    kind = table.get("type", str)
    tls = {"ca_file": table.get("ca_file", str, None), "verify": table.get("verify", bool, True)}
    channel: Channel
    if kind == "log":
        channel = LogChannel()
    elif kind == "smtp":
        channel = SmtpChannel(
            table.get("host", str),
            table.get("port", int),
            table.get("sender", str),
            table.strings("recipients"),
            security=table.get("security", str, "starttls"),
            username=table.get("username", str, None),
            password=table.secret("password", required=table.has("username")),
            **tls,
        )
    elif kind == "webhook":
        channel = WebhookChannel(
            _url(table),
            table.get("preset", str, "json"),
            headers=_headers(table),
            sign_secret=table.secret("sign_secret", required=False),
            **tls,
        )
    elif kind == "sms":
        channel = SmsChannel(
            _url(table),
            table.strings("recipients"),
            table.get("template", str),
            content_type=table.get("content_type", str, "application/json"),
            headers=_headers(table),
            method=table.get("method", str, "POST"),
            **tls,
        )
    else:
        raise ConfigurationError(
            f"{table.path('type')} must be log, smtp, webhook or sms, not {kind!r}"
        )
    table.done()
    return channel


def _url(table: _Table) -> Secret:
    """A channel's URL: a literal ``url`` (no token in it), or ``url_env`` / ``url_file``
    (chat robot URLs carry their token and are secrets)."""
    if table.has("url"):
        return Secret(table.get("url", str), "the configuration file")
    secret = table.secret("url")
    assert secret is not None
    return secret
