"""Registry payloads: the native format round-trips; Curator and Finagle are read; anything
malformed is rejected with a reason and nothing but InvalidInstanceError."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geventpool.discovery.instance import Instance
from geventpool.discovery.payloads import DEFAULT_MAX_PAYLOAD, decode_instance, encode_instance
from geventpool.errors import InvalidInstanceError
from helpers import curator, finagle, native


def test_native_payload_round_trips_every_field() -> None:
    instance = Instance(
        host="calc-1.example.com",
        port=9090,
        weight=2.5,
        zone="eu-west-1a",
        transport="framed",
        protocol="compact",
        version="1.4.2",
        registered_at=1_700_000_000.25,
        metadata={"build": "abc123"},
    )
    decoded = decode_instance(encode_instance(instance), "calc-1.example.com:9090")
    assert decoded == dataclasses.replace(instance, id="calc-1.example.com:9090")
    assert decoded.metadata == {"build": "abc123"}
    assert json.loads(encode_instance(instance))["schema_version"] == 1


def test_curator_payload_is_read_as_an_instance() -> None:
    instance = decode_instance(curator("10.0.0.5", 8005), "6d4e")
    assert (instance.host, instance.port, instance.source) == ("10.0.0.5", 8005, "curator")
    assert instance.registered_at == pytest.approx(1610116500.446)
    assert instance.metadata["curator.name"] == "calc"


def test_curator_ssl_only_payload_is_a_tls_only_instance_on_the_ssl_port() -> None:
    instance = decode_instance(curator("10.0.0.5", None, ssl_port=8443))
    assert (instance.port, instance.tls, instance.tls_port) == (8443, True, None)


def test_curator_payload_with_both_ports_offers_tls_on_the_ssl_port() -> None:
    instance = decode_instance(curator("10.0.0.5", 8005, ssl_port=8443))
    assert (instance.port, instance.tls, instance.tls_port) == (8005, False, 8443)


def test_finagle_tls_endpoint_is_the_instances_tls_port() -> None:
    tls = {"tls": {"host": "10.0.0.3", "port": 9443}, "admin": {"host": "10.0.0.3", "port": 1}}
    instance = decode_instance(finagle("10.0.0.3", 9090, additional=tls))
    assert (instance.port, instance.tls, instance.tls_port) == (9090, False, 9443)
    elsewhere = {"tls": {"host": "10.0.0.4", "port": 9443}}
    with pytest.raises(InvalidInstanceError, match="another host"):
        decode_instance(finagle("10.0.0.3", 9090, additional=elsewhere))


def test_native_tls_fields_are_written_only_when_set_and_read_back() -> None:
    plain = Instance(host="10.0.0.5", port=9090)
    assert b"tls" not in encode_instance(plain)  # a plaintext payload is as it always was
    for instance in (
        Instance(host="10.0.0.5", port=9443, tls=True),
        Instance(host="10.0.0.5", port=9090, tls_port=9443),
    ):
        assert decode_instance(encode_instance(instance)) == instance
    with pytest.raises(InvalidInstanceError, match="plaintext"):
        Instance(host="10.0.0.5", port=9443, tls=True, tls_port=9444)
    with pytest.raises(InvalidInstanceError, match="tls must be"):
        decode_instance(native(port=9443).replace(b'"port"', b'"tls":"yes","port"'))


def test_finagle_serverset_member_is_read_as_an_instance() -> None:
    instance = decode_instance(finagle("10.0.0.3", 9090, shard=7), "member_0000000042")
    assert (instance.host, instance.port, instance.source) == ("10.0.0.3", 9090, "finagle")
    assert instance.metadata["shard"] == "7"
    assert instance.id == "member_0000000042"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty payload"),
        (b"{not json", "not strict JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (b'{"schema_version": 1, "host": "a", "host": "b", "port": 1}', "duplicate key"),
        (b'{"schema_version": 1, "host": "h", "port": 1, "weight": NaN}', "NaN"),
        (b'{"schema_version": 2, "host": "h", "port": 1}', "unknown schema_version"),
        (b'{"schema_version": 1, "host": "h", "port": 1, "colour": "red"}', "unknown keys"),
        (b'{"hello": "world"}', "unknown payload format"),
        (native(port=9090).replace(b"9090", b"70000"), "port must be an integer"),
        (native().replace(b'"port":9090', b'"port":true'), "port must be an integer"),
        (native().replace(b"127.0.0.1", b"0.0.0.0"), "unspecified"),
        (native().replace(b"127.0.0.1", b"169.254.169.254"), "link-local"),
        (native().replace(b"127.0.0.1", b"fe80::1"), "link-local"),
        (native().replace(b"127.0.0.1", b"::"), "unspecified"),
        (native().replace(b"127.0.0.1", b"fd00:ec2::254"), "metadata"),
        (native().replace(b"127.0.0.1", b"::ffff:169.254.169.254"), "link-local"),
        (native().replace(b"127.0.0.1", b"224.0.0.1"), "multicast"),
        (native().replace(b"127.0.0.1", b"255.255.255.255"), "reserved"),
        (native().replace(b"127.0.0.1", b"metadata.google.internal"), "metadata"),
        (native().replace(b"127.0.0.1", b"bad_host!"), "valid DNS name"),
        (native().replace(b"127.0.0.1", b"300.1.1.1"), "malformed IPv4"),
        (native().replace(b'"buffered"', b'"http"'), "transport"),
        (native().replace(b'"weight":1.0', b'"weight":0'), "weight"),
        (finagle("10.0.0.3", 9090, status="DEAD"), "not 'ALIVE'"),
        (curator("10.0.0.5", None), "port must be an integer"),
        (b"[" * 100_000 + b"]" * 100_000, "too"),
    ],
)
def test_malformed_payload_is_rejected_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidInstanceError) as caught:
        decode_instance(payload, "node-1", max_size=1_000_000)
    assert caught.value.node == "node-1"
    if reason != "too":
        assert reason in caught.value.reason


def test_payload_over_the_size_cap_is_rejected_before_parsing() -> None:
    huge = b'{"schema_version": 1, "host": "h", "port": 1, "zone": "' + b"x" * (1 << 20) + b'"}'
    with pytest.raises(InvalidInstanceError, match="1048"):
        decode_instance(huge, "big")
    assert len(huge) > DEFAULT_MAX_PAYLOAD


def test_loopback_and_private_addresses_are_routable() -> None:
    for host in ("127.0.0.1", "::1", "10.1.2.3", "192.168.0.7", "calc", "calc.svc.local."):
        assert Instance(host=host, port=1).host == host


hosts = st.one_of(
    st.ip_addresses(network="10.0.0.0/8"),
    st.ip_addresses(network="192.168.0.0/16"),
    st.ip_addresses(network="127.0.0.0/8"),
    st.ip_addresses(network="2001:db8::/32"),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z](\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
).map(str)


@given(
    host=hosts,
    port=st.integers(1, 65535),
    weight=st.floats(0.001, 10_000),
    zone=st.none() | st.text(min_size=1, max_size=20),
    metadata=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=30), max_size=5),
)
def test_any_valid_instance_survives_encode_and_decode(
    host: str, port: int, weight: float, zone: str | None, metadata: dict[str, str]
) -> None:
    instance = Instance(host=host, port=port, weight=weight, zone=zone, metadata=metadata)
    assert decode_instance(encode_instance(instance)) == instance


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_invalid_instance(data: bytes) -> None:
    with contextlib.suppress(InvalidInstanceError):
        decode_instance(data)
