"""Configuration: the example file loads; every mistake is a ConfigurationError naming the key;
secrets come from the environment or files and never show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from geventpool.alerts.channels import LogChannel, SmsChannel, SmtpChannel, WebhookChannel
from geventpool.config import load_config, parse_config
from geventpool.errors import ConfigurationError

EXAMPLE = Path(__file__).parent.parent / "conf" / "geventpool.toml"
SECRETS = {
    "GEVENTPOOL_SMTP_PASSWORD": "smtp-pass-5f3a9",
    "GEVENTPOOL_SLACK_WEBHOOK_URL": "https://hooks.slack.example/services/T0/B0/tok3n9e8",
    "GEVENTPOOL_DINGTALK_WEBHOOK_URL": "https://oapi.dingtalk.example/robot/send?access_token=dt4k7",
    "GEVENTPOOL_DINGTALK_SECRET": "SECdingsign77",
    "GEVENTPOOL_SMS_TOKEN": "Bearer sms-t0ken-91",
}


def test_the_example_configuration_loads_with_every_channel() -> None:
    config = load_config(EXAMPLE, SECRETS)
    assert config.zookeeper is not None and config.zookeeper.hosts == "127.0.0.1:2181"
    calc = config.services["calc"]
    assert (calc.pool.max_connections, calc.pool.min_idle, calc.balancer) == (10, 2, "peak_ewma")
    assert (calc.pool.limits.max_frame_size, calc.pool.limits.max_depth) == (16_384_000, 64)
    assert config.alerts.rate_limit == 20
    kinds = [type(channel) for channel in config.channels]
    assert kinds == [LogChannel, SmtpChannel, WebhookChannel, WebhookChannel, SmsChannel]
    assert config.alerter().workers[1].channel is config.channels[1]


def test_no_secret_shows_in_the_repr_of_the_configuration() -> None:
    shown = repr(load_config(EXAMPLE, SECRETS))
    shown += "".join(repr(c) + c.name for c in load_config(EXAMPLE, SECRETS).channels)
    for secret in SECRETS.values():
        assert secret not in shown
    assert "hooks.slack.example" in shown  # the host is fine to show


def base(**alerts: Any) -> dict[str, Any]:
    return {"alerts": {"channels": [{"type": "log"}], **alerts}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"zookeeper": {"hosts": "h:1", "colour": "red"}}, "unknown key zookeeper.colour"),
        (
            {"services": {"calc": {"pool": {"max_conections": 5}}}},
            "unknown key services.calc.pool.max_conections",
        ),
        (
            {"services": {"calc": {"pool": {"max_connections": "ten"}}}},
            "services.calc.pool.max_connections must be int",
        ),
        (
            {"services": {"calc": {"call_timeout": True}}},
            "services.calc.call_timeout must be float",
        ),
        ({"zookeeper": {}}, "zookeeper.hosts is required"),
        (base(rate_limit=0), "rate_limit must be an integer >= 1"),
        (
            {"alerts": {"channels": [{"type": "pager"}]}},
            "alerts.channels[0].type must be log, smtp",
        ),
        (
            {"alerts": {"channels": [{"type": "webhook", "url": "ftp://x/y"}]}},
            "webhook url must be an http(s) URL",
        ),
        (
            {"alerts": {"channels": [{"type": "webhook", "url_env": "NOPE"}]}},
            "environment variable NOPE is not set",
        ),
        ({"alerts": {"channels": [{"type": "webhook"}]}}, "alerts.channels[0].url is required"),
        (
            {
                "alerts": {
                    "channels": [
                        {
                            "type": "smtp",
                            "host": "h",
                            "port": 25,
                            "sender": "a@b",
                            "recipients": ["c@d"],
                            "username": "u",
                            "password": "hunter22",
                        }
                    ]
                }
            },
            "secrets are not written in the file",
        ),
        (
            {"alerts": {"channels": [{"type": "webhook", "url": "http://h/x", "preset": "teams"}]}},
            "preset must be one of",
        ),
        (
            {
                "alerts": {
                    "channels": [
                        {
                            "type": "sms",
                            "url": "http://h/x",
                            "recipients": ["1"],
                            "template": "$who",
                        }
                    ]
                }
            },
            "sms template",
        ),
    ],
)
def test_each_mistake_is_a_configuration_error_naming_the_key(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_config(data, {}, Path("."))
    assert message in str(caught.value)
    assert "hunter22" not in str(caught.value)


def test_secrets_are_read_from_files_relative_to_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  https://chat.example/hook?token=f1lesecret\n")
    (tmp_path / "geventpool.toml").write_text(
        '[[alerts.channels]]\ntype = "webhook"\npreset = "wecom"\nurl_file = "token"\n'
    )
    [channel] = load_config(tmp_path / "geventpool.toml", {}).channels
    assert isinstance(channel, WebhookChannel)
    url = channel.secrets()[0]
    assert url is not None and url.reveal() == "https://chat.example/hook?token=f1lesecret"
    assert "f1lesecret" not in repr(channel)


def test_an_unreadable_or_invalid_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[alerts\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_wire_limits_are_read_from_the_pool_limits_table() -> None:
    data = {"services": {"calc": {"pool": {"max_connections": 3, "limits": {"max_depth": 8}}}}}
    pool = parse_config(data, {}, Path(".")).services["calc"].pool
    assert (pool.max_connections, pool.limits.max_depth, pool.limits.max_frame_size) == (
        3,
        8,
        16_384_000,
    )
    with pytest.raises(ConfigurationError, match="max_dept"):
        parse_config({"services": {"calc": {"pool": {"limits": {"max_dept": 8}}}}}, {}, Path("."))
    with pytest.raises(ConfigurationError, match=r"max_depth must be an int of 1 \.\. 64"):
        parse_config({"services": {"calc": {"pool": {"limits": {"max_depth": 99}}}}}, {}, Path("."))


def test_pipelining_settings_are_read_from_the_pool_table() -> None:
    data = {"services": {"calc": {"pool": {"max_inflight": 8, "stuck_after": 2}}}}
    pool = parse_config(data, {}, Path(".")).services["calc"].pool
    assert (pool.max_inflight, pool.stuck_after) == (8, 2.0)
    assert (
        parse_config({"services": {"calc": {}}}, {}, Path(".")).services["calc"].pool.max_inflight
        is None
    )
    with pytest.raises(ConfigurationError, match="max_inflight must be int"):
        parse_config({"services": {"calc": {"pool": {"max_inflight": "8"}}}}, {}, Path("."))
    with pytest.raises(ConfigurationError, match="max_inflight must be None or an integer >= 1"):
        parse_config({"services": {"calc": {"pool": {"max_inflight": 0}}}}, {}, Path("."))


def test_tls_is_read_from_the_service_tls_table_with_files_relative_to_it(tmp_path: Path) -> None:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "geventpool.toml").write_text(
        '[services.calc.tls]\nca_file = "ca.pem"\nserver_name = "calc.internal"\n'
    )
    tls = load_config(tmp_path / "geventpool.toml", {}).services["calc"].pool.tls
    assert tls is not None
    assert (tls.ca_file, tls.server_name, tls.plaintext) == (
        str(tmp_path / "ca.pem"),
        "calc.internal",
        False,
    )
    assert tls.hostname_for("10.0.0.7") == "calc.internal"
    assert parse_config({"services": {"calc": {}}}, {}, Path(".")).services["calc"].pool.tls is None
    for table, message in [
        ({"ca_file": "missing.pem"}, "is not a readable file"),
        ({"ca_fille": "ca.pem"}, "unknown key services.calc.tls.ca_fille"),
        ({"key_password": "hunter22"}, "secrets are not written in the file"),
        ({"verify": "no"}, "services.calc.tls.verify must be bool"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            parse_config({"services": {"calc": {"tls": table}}}, {}, tmp_path)


def test_zookeeper_security_is_read_from_the_zookeeper_table(tmp_path: Path) -> None:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "zk-ca.pem"))
    (tmp_path / "geventpool.toml").write_text(
        '[zookeeper]\nhosts = "127.0.0.1:2281"\nauth_env = "ZK_AUTH"\n'
        '[zookeeper.tls]\nca_file = "zk-ca.pem"\n'
    )
    config = load_config(tmp_path / "geventpool.toml", {"ZK_AUTH": "registrar:pw"}).zookeeper
    assert config is not None and config.tls is not None
    assert config.tls.ca_file == str(tmp_path / "zk-ca.pem")
    assert [acl.id.scheme for acl in config.node_acl() or []] == ["digest", "world"]
    sasl = {"hosts": "h:1", "sasl": {"username": "registrar", "password_env": "ZK_SASL"}}
    with_sasl = parse_config({"zookeeper": sasl}, {"ZK_SASL": "pw"}, tmp_path).zookeeper
    assert with_sasl is not None and with_sasl.sasl == {
        "mechanism": "DIGEST-MD5",
        "username": "registrar",
        "password": "pw",
    }
    assert "pw" not in repr(with_sasl)
    unprotected = {"zookeeper": {"hosts": "h:1", "auth_env": "ZK_AUTH", "protect": False}}
    assert parse_config(unprotected, {"ZK_AUTH": "u:p"}, tmp_path).zookeeper.node_acl() is None  # type: ignore[union-attr]
