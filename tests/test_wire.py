"""The message layer's walk against thriftpy2's decoders (pure logic, in memory): a message is
walked the way the decoder will read it (by the IDL), a message the decoder would misread is
refused, the decoder reads exactly the walked bytes, a message arriving in pieces is walked
once, and the walk pauses while it works through a large one."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import gevent
import pytest
import thriftpy2
from thriftpy2.protocol import TCompactProtocol, TCyBinaryProtocol
from thriftpy2.transport import TCyMemoryBuffer, TMemoryBuffer

from geventpool.errors import InvalidArgumentsError, MalformedMessageError, MessageLimitError
from geventpool.testing.echo import echo_thrift
from geventpool.testing.hostile_server import mutate
from geventpool.wire.arguments import method_spec
from geventpool.wire.limits import WireLimits
from geventpool.wire.messages import OFF_HUB_BYTES, OFF_HUB_VALUES, REPLY, MessageCodec
from geventpool.wire.scan import PAUSE_EVERY, UTF8_CHUNK, IncompleteMessageError

types_thrift = thriftpy2.load(
    str(Path(__file__).with_name("idl") / "wire_types.thrift"), module_name="wire_types_thrift"
)
Outer, Inner = types_thrift.Outer, types_thrift.Inner
PROTOCOLS = ["binary", "compact"]
PAD = b"\xaa" * 64


def expect(spec: Any) -> Any:
    return lambda name, message_type, seqid: spec


def random_inner(rng: random.Random) -> Any:
    return Inner(
        a=rng.randint(-(2**31), 2**31 - 1),
        s=rng.choice(["", "x", "ünïcode", "a" * rng.randint(0, 40)]),
        flag=rng.random() < 0.5,
        ids=[rng.randint(-(2**63), 2**63 - 1) for _ in range(rng.randint(0, 4))],
    )


def random_outer(rng: random.Random) -> Any:
    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.7 else None

    return Outer(
        table=maybe({rng.randint(-5, 5): rng.randbytes(rng.randint(0, 8)) for _ in range(3)}),
        groups=maybe({f"g{i}": [random_inner(rng) for _ in range(2)] for i in range(2)}),
        inners=maybe([random_inner(rng) for _ in range(rng.randint(0, 3))]),
        tags=maybe(["a", "b"]),  # thriftpy2 decodes a set as a list
        d=maybe(rng.random()),
        b=maybe(rng.randint(-128, 127)),
        h=maybe(rng.randint(-(2**15), 2**15 - 1)),
        on=maybe(rng.random() < 0.5),
        m=maybe({rng.randint(0, 9): rng.random() for _ in range(2)}),
        ll=maybe([[1, 2], [], [rng.randint(0, 99)]]),
        one=maybe(random_inner(rng)),
        bits=maybe([rng.random() < 0.5 for _ in range(rng.randint(0, 20))]),
    )


def decoded_exactly(protocol: str, body: bytes) -> bool:
    """Decode ``body`` followed by padding: whether the decoder read exactly ``body``."""
    if protocol == "binary":
        buffer: Any = TCyMemoryBuffer(body + PAD)
        TCyBinaryProtocol(buffer, strict_decode=True, max_depth=65).read_struct(Outer())
    else:
        buffer = TMemoryBuffer(body + PAD)
        TCompactProtocol(buffer, strict_decode=True).read_struct(Outer())
    return bool(buffer.read(len(PAD) + 1) == PAD)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_valid_messages_of_every_type_are_walked_to_their_end_and_decoded_back(
    protocol: str,
) -> None:
    codec = MessageCodec("buffered", protocol)
    rng = random.Random(protocol)
    for seqid in range(300):
        value = random_outer(rng)
        data = codec.encode("m", REPLY, seqid, value)
        name, _, got_seqid, body, size, _ = codec.split(data + b"next", expect(Outer.thrift_spec))
        assert (name, got_seqid, size) == ("m", seqid, len(data))
        assert codec.decode(body, Outer()) == value


@pytest.mark.gevent_timeout(120)
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_whatever_the_walk_accepts_the_decoder_reads_exactly_and_without_untyped_errors(
    transport: str, protocol: str
) -> None:
    """5,000 random mutations of valid messages per codec: each is refused with a typed error,
    or incomplete, or accepted; an accepted one is decoded from exactly the walked bytes
    (never a byte past them: the decoder would read another message or uninitialised
    memory), and decoding fails, if at all, only as MalformedMessageError (a bad UTF-8)."""
    codec = MessageCodec(transport, protocol)
    rng = random.Random(f"{transport}-{protocol}")
    outcomes: dict[str, int] = {}
    for seqid in range(5000):
        data = mutate(codec.encode("m", REPLY, seqid, random_outer(rng)), rng)
        try:
            body = codec.split(data, expect(Outer.thrift_spec))[3]
        except IncompleteMessageError:
            outcome = "incomplete"
        except MalformedMessageError as error:
            outcome = type(error).__name__
        else:
            try:
                codec.decode(body, Outer())
            except MalformedMessageError as error:
                assert error.reason.startswith("a string field is not UTF-8"), error.reason
                outcome = "not UTF-8"
            else:
                assert decoded_exactly(protocol, body), data.hex()
                outcome = "accepted"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(transport, protocol, outcomes)
    assert outcomes.get("accepted", 0) > 200  # many mutated messages are still valid
    assert outcomes.get("MalformedMessageError", 0) > 200


# -- where the decoder reads by the IDL, not the wire ---------------------------------------


def message(protocol: str, body: bytes) -> bytes:
    """A REPLY header for "m" #1 in ``protocol`` followed by ``body`` as its struct."""
    header = MessageCodec("buffered", protocol).encode(
        "m", REPLY, 1, echo_thrift.Echo.ping_result()
    )
    return header[:-1] + body


MISREAD = [
    pytest.param(  # map<i32, binary> sent with string keys: the decoder would read an i32
        "binary",
        "0d0001 0b0b00000001 00000004 61626364 00000004 7778797a 00",
        "a map of string where the IDL declares i32",
        id="binary-map-key",
    ),
    pytest.param(
        "compact",
        "1b 01 88 04 61626364 04 7778797a 00",
        "a map of binary where the IDL declares i32",
        id="compact-map-key",
    ),
    pytest.param(
        "binary",
        "0d0009 0b0b 00000001 00000001 61 00000001 62 00",
        "a map of string where the IDL declares i64",
        id="binary-map-of-numbers",
    ),
    pytest.param(  # list<Inner> sent as a list of i32: the compact decoder reads structs
        "compact",
        "39 25 01 02 00",
        "a list of i32 where the IDL declares struct",
        id="compact-list-element",
    ),
]


@pytest.mark.parametrize(("protocol", "body", "seen"), MISREAD)
def test_a_container_the_decoder_would_read_as_another_type_is_refused(
    protocol: str, body: str, seen: str
) -> None:
    codec = MessageCodec("buffered", protocol)
    data = message(protocol, bytes.fromhex(body.replace(" ", "")))
    with pytest.raises(MalformedMessageError, match=seen):
        codec.split(data, expect(Outer.thrift_spec))


@pytest.mark.parametrize(
    ("protocol", "body"),
    [
        ("binary", "0f0001 08 00000002 00000001 00000002 00"),  # field 1 (a map) as a list
        ("compact", "19 25 02 04 00"),  # the same, compact
        ("binary", "0f0003 08 00000002 00000001 00000002 00"),  # list<Inner> as list<i32>
        ("binary", "0d0009 0804 00000001 00000005 3ff0000000000000 00"),  # map<i64,double>
    ],
)
def test_a_field_or_list_typed_otherwise_than_the_idl_is_walked_as_the_decoder_skips_it(
    protocol: str, body: str
) -> None:
    codec = MessageCodec("buffered", protocol)
    raw = bytes.fromhex(body.replace(" ", ""))
    data = message(protocol, raw)
    got = codec.split(data, expect(Outer.thrift_spec))
    assert got[4] == len(data)
    assert decoded_exactly(protocol, got[3])


# -- limits and pacing ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_message_arriving_byte_by_byte_is_walked_once(protocol: str) -> None:
    """``split`` asks ``more`` for each missing byte and finishes in one call: no walk
    starts over (which made a trickled message cost its size squared)."""
    codec = MessageCodec("buffered", protocol)
    data = codec.encode("m", REPLY, 1, Outer(inners=[Inner(a=i, s="x" * i) for i in range(50)]))
    buffer = bytearray(data[:1])
    asked: list[int] = []

    def more(needed: int) -> int:
        asked.append(needed)
        while len(buffer) < min(needed, len(data)):
            buffer.append(data[len(buffer)])
        if len(buffer) < needed:
            raise AssertionError("asked past the end of the message")
        return len(buffer)

    size = codec.split(buffer, expect(Outer.thrift_spec), more)[4]
    assert size == len(data)
    assert asked == sorted(asked)  # never asked for bytes it was given before
    assert len(asked) < len(data)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_message_received_in_pieces_asks_once_per_piece(protocol: str) -> None:
    """Containers of many small values: the walk once asked ``more`` for every value past the
    end its container had seen (575,000 calls for a 2 MB compact map, received 64 KB at a
    time), so that a trickled message cost three times one received whole."""
    codec = MessageCodec("buffered", protocol)
    outer = Outer(
        table={i: b"v" for i in range(20_000)},
        groups={f"g{g}": [Inner(a=i, ids=[i, -i]) for i in range(200)] for g in range(20)},
        tags={f"tag{i}" for i in range(20_000)},
        ll=[list(range(30))] * 500,
    )
    data = codec.encode("m", REPLY, 1, outer)
    piece = 4096
    buffer = bytearray(data[:piece])
    asked: list[int] = []

    def more(needed: int) -> int:
        asked.append(needed)
        while len(buffer) < needed:
            buffer.extend(data[len(buffer) : len(buffer) + piece])
        return len(buffer)

    size = codec.split(buffer, expect(Outer.thrift_spec), more)[4]
    assert size == len(data)
    assert len(asked) <= len(data) // piece + 1, (len(asked), len(data) // piece)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_walk_pauses_every_few_thousand_values(protocol: str) -> None:
    codec = MessageCodec("buffered", protocol)
    data = codec.encode("m", REPLY, 1, Outer(inners=[Inner()] * 100_000))
    pauses: list[int] = []
    codec.split(data, expect(Outer.thrift_spec), pause=lambda: pauses.append(1))
    assert len(pauses) >= 100_000 // PAUSE_EVERY


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_long_string_is_checked_for_utf8_piece_by_piece_with_pauses(protocol: str) -> None:
    """16 MB of text not UTF-8 at its end held the hub 51-55 ms in one decode: it is checked
    UTF8_CHUNK bytes at a time, pausing between two pieces."""
    codec = MessageCodec("buffered", protocol)
    data = bytearray(codec.encode("m", REPLY, 1, Outer(inners=[Inner(s="é" * 2_000_000)])))
    last = data.rfind("é".encode())
    data[last : last + 2] = b"\xff\xff"  # the string's last character, broken
    pauses: list[int] = []
    with pytest.raises(MalformedMessageError, match="not UTF-8"):
        codec.split(data, expect(Outer.thrift_spec), pause=lambda: pauses.append(1))
    assert len(pauses) >= 4_000_000 // UTF8_CHUNK - 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_struct_of_few_values_but_many_bytes_is_decoded_off_the_hub(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = MessageCodec("buffered", protocol)
    data = codec.encode("m", REPLY, 1, Outer(inners=[Inner(s="é" * 600_000)]))
    *_, body, _, values = codec.split(data, expect(Outer.thrift_spec))
    assert values < OFF_HUB_VALUES and len(body) > OFF_HUB_BYTES
    apart: list[int] = []
    decode_apart = codec._decode_apart

    def counted(*args: Any) -> Any:
        apart.append(1)
        return decode_apart(*args)

    monkeypatch.setattr(codec, "_decode_apart", counted)
    assert codec.decode(body, Outer(), values).inners[0].s == "é" * 600_000
    assert apart == [1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_decode_failing_off_the_hub_is_raised_to_its_caller_alone(
    protocol: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """What the decoder still objects to (a key the compact decoder decodes while skipping)
    is raised in the caller's greenlet, not printed by gevent's thread pool."""
    codec = MessageCodec("buffered", protocol)
    data = bytearray(codec.encode("m", REPLY, 1, Outer(inners=[Inner(s="é" * 600_000)])))
    *_, body, _, values = codec.split(bytes(data), expect(Outer.thrift_spec))
    broken = bytearray(body)
    last = broken.rfind("é".encode())
    broken[last : last + 2] = b"\xff\xff"  # past the walk's check: the decoder finds it
    capfd.readouterr()
    with pytest.raises(MalformedMessageError, match="not UTF-8"):
        codec.decode(bytes(broken), Outer(), values)
    gevent.sleep(0.05)  # whatever the pool would print, it has printed
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_other_greenlets_run_while_a_large_struct_is_decoded(protocol: str) -> None:
    """The decoder is one call that cannot pause: inline, 2,000,000 values held the hub for
    0.4-1.7 s. A struct of more than OFF_HUB_VALUES values is decoded in a thread, so that
    the hub (here: a ticker) keeps running; a small one is decoded inline."""
    codec = MessageCodec("buffered", protocol)
    inners = [Inner(a=i, s="s", ids=[i]) for i in range(60_000)]
    data = codec.encode("m", REPLY, 1, Outer(inners=inners, d=0.5))
    *_, body, _, values = codec.split(data, expect(Outer.thrift_spec))
    assert values > OFF_HUB_VALUES
    ticks: list[float] = []

    def ticker() -> None:
        while True:
            gevent.sleep(0.001)
            ticks.append(1)

    running = gevent.spawn(ticker)
    try:
        gevent.sleep(0.01)
        ticks.clear()
        decoded = codec.decode(body, Outer(), values)
        during = len(ticks)
        ticks.clear()
        small = codec.split(codec.encode("m", REPLY, 2, Outer(d=1.5)), expect(Outer.thrift_spec))
        assert codec.decode(small[3], Outer(), small[5]).d == 1.5
        assert not ticks  # decoded inline: no switch
    finally:
        running.kill()
    assert decoded.d == 0.5 and len(decoded.inners) == 60_000 and decoded.inners[-1].a == 59_999
    assert during >= 3, during


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_values_beyond_max_values_are_refused_while_walking(protocol: str) -> None:
    codec = MessageCodec("buffered", protocol, WireLimits(max_values=10_000))
    data = codec.encode("m", REPLY, 1, Outer(inners=[Inner()] * 10_000))
    with pytest.raises(MessageLimitError, match="max_values exceeded"):
        codec.split(data, expect(Outer.thrift_spec))
    fits = codec.encode("m", REPLY, 1, Outer(inners=[Inner()] * 1_500))
    assert codec.split(fits, expect(Outer.thrift_spec))[4] == len(fits)


def test_an_unwanted_header_is_refused_before_the_body_is_walked() -> None:
    codec = MessageCodec("buffered", "binary")
    data = message("binary", b"\x0f\x00\x03\x63\x7f\xff\xff\xff")  # an unknown type code

    def refuse(name: str, message_type: int, seqid: int) -> None:
        raise MalformedMessageError(f"not waiting for {name} #{seqid}")

    with pytest.raises(MalformedMessageError, match="not waiting for m #1"):
        codec.split(data, refuse)


# -- arguments and results checked against the IDL --------------------------------------------


def test_a_cyclic_or_too_deep_argument_is_an_argument_error_not_a_recursion_error() -> None:
    spec = method_spec(types_thrift.Types, "put")
    cyclic = types_thrift.Node(children=[])
    cyclic.children.append(cyclic)
    with pytest.raises(InvalidArgumentsError, match="nested deeper than 64"):
        spec.arguments((None, cyclic), {})
    deep = types_thrift.Node()
    for _ in range(200):
        deep = types_thrift.Node(children=[deep])
    with pytest.raises(InvalidArgumentsError, match=r"argument 'node'\.children\[0\]\.children"):
        spec.arguments((None, deep), {})
    shallow = types_thrift.Node()
    for _ in range(30):
        shallow = types_thrift.Node(children=[shallow])
    assert spec.arguments((None, shallow), {}).node is shallow


def test_an_argument_error_says_where_without_the_value() -> None:
    spec = method_spec(types_thrift.Types, "put")
    bad = Outer(inners=[Inner(a=1)] * 100_000 + [Inner(a=2**40)])
    with pytest.raises(InvalidArgumentsError) as caught:
        spec.arguments((bad, None), {})
    assert str(caught.value).endswith(
        "argument 'outer'.inners[100000].a: 1099511627776 is out of range for i32"
        " (-2147483648 .. 2147483647)"
    )
    table = Outer(groups={"g": [Inner(s=b"\xff")]}, table={1: bytearray(b"x")})
    with pytest.raises(InvalidArgumentsError, match=r"'outer'\.table\[1\]: expected binary"):
        spec.arguments((table, None), {})
    with pytest.raises(InvalidArgumentsError, match="bytes that are not UTF-8"):
        spec.arguments((Outer(groups={"g": [Inner(s=b"\xff")]}), None), {})
    assert spec.arguments((Outer(tags=["ü".encode()]), None), {}).outer.tags == [b"\xc3\xbc"]


def test_a_result_is_checked_as_arguments_are() -> None:
    spec = method_spec(echo_thrift.Echo, "add")
    assert spec.result_problem(3) is None
    assert spec.result_problem(3.7) == "add() returned: expected i64 (an int), got float 3.7"
    items = method_spec(echo_thrift.Echo, "items")
    assert items.result_problem([echo_thrift.Item(id=1)]) is None
    assert items.result_problem([echo_thrift.Item(id="1")]) == (
        "items() returned[0].id: expected i32 (an int), got str '1'"
    )


# -- found by review: what the first walk missed --------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_struct_counts_every_field_the_decoder_makes_for_it(protocol: str) -> None:
    """The decoder makes each struct with all its declared fields (four for Inner): a list of
    empty structs costs that much, whatever the bytes say."""
    codec = MessageCodec("buffered", protocol, WireLimits(max_values=40_000))
    data = codec.encode("m", REPLY, 1, Outer(inners=[Inner()] * 10_000))
    with pytest.raises(MessageLimitError, match="max_values exceeded"):
        codec.split(data, expect(Outer.thrift_spec))


def test_the_compact_walk_pauses_inside_a_list_of_varints() -> None:
    codec = MessageCodec("buffered", "compact")
    data = codec.encode("m", REPLY, 1, Outer(one=Inner(ids=list(range(100_000)))))
    pauses: list[int] = []
    codec.split(data, expect(Outer.thrift_spec), pause=lambda: pauses.append(1))
    assert len(pauses) >= 100_000 // PAUSE_EVERY


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_string_that_is_not_utf8_is_refused_by_the_walk_before_decoding(protocol: str) -> None:
    codec = MessageCodec("buffered", protocol)
    data = codec.encode("m", REPLY, 1, Outer(inners=[Inner()] * 1000 + [Inner(s=b"\xff")]))
    with pytest.raises(MalformedMessageError, match="a string field is not UTF-8"):
        codec.split(data, expect(Outer.thrift_spec))
    skipped = codec.encode("m", REPLY, 1, Outer(inners=[Inner(s=b"\xff")]))
    assert codec.split(skipped, expect(None))[4] == len(skipped)  # not decoded: not checked


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_buffered_message_over_max_message_size_is_refused_even_when_received_whole(
    protocol: str,
) -> None:
    codec = MessageCodec("buffered", protocol, WireLimits(max_message_size=1000))
    data = codec.encode("m", REPLY, 1, Outer(inners=[Inner(s="x" * 100)] * 100))
    with pytest.raises(MessageLimitError, match="max_message_size exceeded"):
        codec.split(data, expect(Outer.thrift_spec))


def test_a_compact_varint_out_of_its_type_s_range_is_refused() -> None:
    codec = MessageCodec("buffered", "compact")
    # Inner.a (an i32) with a zigzag value of 2**33
    data = message("compact", b"\xbc" + b"\x15" + b"\x80\x80\x80\x80\x20" + b"\x00\x00")
    with pytest.raises(MalformedMessageError, match="out of range for i32"):
        codec.split(data, expect(Outer.thrift_spec))


def test_a_compact_sequence_id_is_written_unsigned_and_read_back_signed() -> None:
    codec = MessageCodec("buffered", "compact")
    data = codec.encode("m", REPLY, -1, echo_thrift.Echo.ping_result())  # looped for ever
    assert codec.split(data)[2] == -1
    with pytest.raises(MalformedMessageError, match="sequence id out of range"):
        codec.split(bytes.fromhex("8241ffffffff1f016d00"))
