"""MQTT codec: round trips of every packet and property, partial reads, malformed input."""

from __future__ import annotations

import asyncio

import pytest

from flowbridge.adapters import _mqtt_wire as w
from flowbridge.adapters.base import Backoff, Subscription
from flowbridge.adapters.mqtt import (
    MqttAdapter,
    MqttBrokerOptions,
    format_timestamp,
    parse_timestamp,
)
from flowbridge.errors import FlowbridgeError

ALL_PROPS: w.Props = {
    w.PAYLOAD_FORMAT: 1,
    w.MESSAGE_EXPIRY: 3600,
    w.CONTENT_TYPE: "application/json",
    w.RESPONSE_TOPIC: "reply/here",
    w.CORRELATION_DATA: b"\x00\xffcorr",
    w.SUBSCRIPTION_ID: [7, 268_435_455],
    w.SESSION_EXPIRY: 0xFFFFFFFF,
    w.ASSIGNED_CLIENT_ID: "auto-1",
    w.SERVER_KEEP_ALIVE: 120,
    0x15: "SCRAM",
    0x16: b"authdata",
    0x17: 1,
    0x18: 30,
    0x19: 0,
    0x1A: "resp-info",
    0x1C: "other:1883",
    w.REASON_STRING: "because",
    w.RECEIVE_MAXIMUM: 10,
    w.TOPIC_ALIAS_MAXIMUM: 5,
    w.TOPIC_ALIAS: 3,
    w.MAXIMUM_QOS: 1,
    0x25: 0,
    w.USER_PROPERTY: [("k", "1"), ("k", "2"), ("ü", "ß")],
    w.MAXIMUM_PACKET_SIZE: 1 << 20,
    0x28: 1,
    0x29: 1,
    0x2A: 0,
}

PACKETS_5: list[w.Packet] = [
    w.Connect("c1", w.V5, True, 30, "user", b"pw", {w.SESSION_EXPIRY: 60}),
    w.Connect(
        "c2",
        w.V5,
        False,
        0,
        will_topic="will/t",
        will_payload=b"bye",
        will_qos=1,
        will_retain=True,
        will_properties={w.CONTENT_TYPE: "text/plain"},
    ),
    w.Connack(True, 0, {w.RECEIVE_MAXIMUM: 20, w.MAXIMUM_PACKET_SIZE: 1000}),
    w.Connack(False, 0x86),
    w.Publish("a/b", b"payload", 0, False, False, 0, {}),
    w.Publish("a/b", b"", 1, True, True, 65535, ALL_PROPS),
    w.Publish("ü/€", b"\x00" * 300, 2, False, False, 1, {w.USER_PROPERTY: [("x", "y")]}),
    w.PubAck(1),
    w.PubAck(2, 0x10),
    w.PubAck(3, 0x87, {w.REASON_STRING: "no"}),
    w.PubRec(4),
    w.PubRec(5, 0x80),
    w.PubRel(6),
    w.PubRel(7, 0x92),
    w.PubComp(8),
    w.PubComp(9, 0x92, {w.USER_PROPERTY: [("a", "b")]}),
    w.Subscribe(
        10,
        [w.SubTopic("a/#", 1, True, True, 1), w.SubTopic("$share/g/b/+", 2, False, False, 2)],
        {w.SUBSCRIPTION_ID: [42]},
    ),
    w.Suback(10, [1, 0x8F], {w.REASON_STRING: "bad filter"}),
    w.Unsubscribe(11, ["a/#", "b"], {w.USER_PROPERTY: [("u", "v")]}),
    w.Unsuback(11, [0, 0x11]),
    w.PingReq(),
    w.PingResp(),
    w.Disconnect(),
    w.Disconnect(0x8E, {w.REASON_STRING: "taken over", w.SESSION_EXPIRY: 0}),
    w.Auth(0x18, {0x15: "SCRAM", 0x16: b"x"}),
]

PACKETS_311: list[w.Packet] = [
    w.Connect("c1", w.V311, True, 60, "u", b"p"),
    w.Connect("c2", w.V311, False, 10, will_topic="w", will_payload=b"x", will_qos=2),
    w.Connack(True, 0),
    w.Connack(False, 5),
    w.Publish("a/b", b"x", 0, True, False, 0, None),
    w.Publish("a/b", b"y" * 200, 1, False, True, 9, None),
    w.Publish("a/b", b"z", 2, False, False, 10, None),
    w.PubAck(1),
    w.PubRec(2),
    w.PubRel(3),
    w.PubComp(4),
    w.Subscribe(5, [w.SubTopic("a/+", 1), w.SubTopic("#", 2)]),
    w.Suback(5, [1, 0x80]),
    w.Unsubscribe(6, ["a/+"]),
    w.Unsuback(6),
    w.PingReq(),
    w.PingResp(),
    w.Disconnect(),
]


@pytest.mark.parametrize("packet", PACKETS_5, ids=lambda p: type(p).__name__)
def test_round_trip_v5(packet: w.Packet) -> None:
    data = w.encode(packet, w.V5)
    assert w.Parser(w.V5).feed(data) == [packet]


@pytest.mark.parametrize("sub_id", [1, 127, 128, 16_383, 16_384, 2_097_152, 268_435_455])
@pytest.mark.parametrize("more", [False, True])
def test_publish_subscription_id_any_length(sub_id: int, more: bool) -> None:
    """A subscription identifier of any length, alone or with other properties, decodes the
    same (the parser has a short cut for it alone)."""
    props: w.Props = {w.SUBSCRIPTION_ID: [sub_id]}
    if more:
        props[w.CONTENT_TYPE] = "text/plain"
    pkt = w.Publish("a/b", b"body", 1, False, False, 5, props)
    data = w.encode(pkt, w.V5)
    assert w.Parser(w.V5).feed(data) == [pkt]
    parser = w.Parser(w.V5)
    assert [p for i in range(len(data)) for p in parser.feed(data[i : i + 1])] == [pkt]


def test_publish_subscription_id_overrunning_its_properties_is_malformed() -> None:
    # Property length 2 (id byte + one varint byte) but the varint says "more follows".
    body = b"\x00\x03a/b" + b"\x02\x0b\x81\x01" + b"x"
    data = bytes([0x30, len(body)]) + body
    with pytest.raises(w.MalformedPacket):
        w.Parser(w.V5).feed(data)


@pytest.mark.parametrize("packet", PACKETS_311, ids=lambda p: type(p).__name__)
def test_round_trip_v311(packet: w.Packet) -> None:
    data = w.encode(packet, w.V311)
    assert w.Parser(w.V311).feed(data) == [packet]


def test_v311_has_no_properties_on_the_wire() -> None:
    plain = w.encode(w.Publish("t", b"p", 1, packet_id=1), w.V311)
    assert plain == b"\x32\x06\x00\x01t\x00\x01p"
    assert w.encode(w.PubAck(1), w.V311) == b"\x40\x02\x00\x01"


@pytest.mark.parametrize("version", [w.V311, w.V5])
def test_byte_at_a_time(version: int) -> None:
    packets = PACKETS_5 if version == w.V5 else PACKETS_311
    stream = b"".join(w.encode(p, version) for p in packets if not isinstance(p, w.Connect))
    parser = w.Parser(version)
    got: list[w.Packet] = []
    for i in range(len(stream)):
        got.extend(parser.feed(stream[i : i + 1]))
    assert got == [p for p in packets if not isinstance(p, w.Connect)]
    assert parser.buffered == 0


def test_many_packets_in_one_chunk_and_split_remaining_length() -> None:
    big = w.Publish("t", b"x" * 20_000, 1, packet_id=3, properties={})
    data = w.encode(big) * 3
    parser = w.Parser()
    # Split inside the multi-byte remaining length of the second packet.
    first_len = len(data) // 3
    assert parser.feed(data[: first_len + 2]) == [big]
    assert parser.feed(data[first_len + 2 :]) == [big, big]


def test_large_packet_in_many_chunks_then_more() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    big = w.Publish("big/one", body, 1, packet_id=7, properties={})
    small = w.Publish("after", b"z", 0, properties={})
    data = w.encode(big) + w.encode(small)
    parser = w.Parser()
    got: list[w.Packet] = []
    for i in range(0, len(data), 32768):
        got.extend(parser.feed(data[i : i + 32768]))
        assert parser.buffered < len(data)
    assert got == [big, small]
    assert parser.buffered == 0


def test_repeated_topics_and_property_blocks_decode_the_same() -> None:
    props: w.Props = {w.SUBSCRIPTION_ID: [9]}
    a = w.Publish("a/b", b"1", 0, properties=props)
    b = w.Publish("a/b", b"2", 0, properties={w.SUBSCRIPTION_ID: [9], w.CONTENT_TYPE: "t/p"})
    c = w.Publish("c", b"3", 0, properties={})
    parser = w.Parser()
    stream = b"".join(w.encode(p) for p in (a, b, c, a, c))
    assert parser.feed(stream) == [a, b, c, a, c]
    assert parser.feed(w.encode(b)) == [b]


@pytest.mark.parametrize("version", [w.V5, w.V311])
def test_packets_repeating_a_head_split_anywhere(version: int) -> None:
    """Runs of QoS 0 packets with the same topic and size share their head (the parser's
    short cut); packets that differ only after it, or in flags, QoS or size, or that are
    cut anywhere, decode as each one alone does."""
    props: w.Props | None = {w.SUBSCRIPTION_ID: [3]} if version == w.V5 else None
    long: w.Props | None = {w.USER_PROPERTY: [("k", "v" * 40)]} if version == w.V5 else None
    packets = [
        w.Publish("s/1", b"aaaa", 0, properties=props),
        w.Publish("s/1", b"bbbb", 0, properties=props),
        w.Publish("s/1", b"cccc", 0, retain=True, properties=props),
        w.Publish("s/1", b"cccd", 0, retain=True, properties=props),
        w.Publish("s/1", b"dddd", 0, properties=props),
        w.Publish("s/1", b"eeeee", 0, properties=props),  # one byte longer
        w.Publish("s/2", b"ffff", 0, properties=props),
        w.Publish("s/1", b"gggg", 1, packet_id=7, properties=props),
        w.Publish("s/1", b"hhhh", 0, properties=props),
        w.Publish("s/1", b"iiii", 0, properties=long),
        w.Publish("s/1", b"jjjj", 0, properties=long),
        w.Publish("s/1", b"", 0, properties=props),
    ]
    if version == w.V311:
        packets = [
            w.Publish(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id) for p in packets
        ]
    wire = [w.encode(p, version) for p in packets]
    alone = [w.Parser(version).feed(b)[0] for b in wire]
    stream = b"".join(wire)
    assert w.Parser(version).feed(stream) == alone
    for cut in range(1, len(stream)):
        parser = w.Parser(version)
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == alone, cut
    parser = w.Parser(version)
    assert [q for k in range(len(stream)) for q in parser.feed(stream[k : k + 1])] == alone


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint(n: int, encoded: bytes) -> None:
    assert w.encode_varint(n) == encoded
    assert w._Reader(encoded).varint() == n


def test_varint_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        w.encode_varint(268_435_456)


def test_user_properties_keep_order_and_repeats() -> None:
    props = {w.USER_PROPERTY: [("b", "1"), ("a", "2"), ("b", "3")]}
    encoded = w.encode_props(props)
    assert w._Reader(encoded).props() == props


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
        (b"\x36\x03\x00\x01t", "QoS 3"),
        (b"\x32\x03\x00\x01t", "without packet identifier"),
        (b"\x32\x05\x00\x01t\x00\x00", "packet identifier 0"),
        (b"\x30\x03\x00\x05t", "topic overruns"),
        (b"\x30\x04\x00\x02\xff\xfe", "not valid UTF-8"),
        (b"\x30\x04\x00\x01t\x05", "shorter than its fields"),  # v5 properties overrun
        (b"\x30\x05\x00\x01t\x01\x7f", "unknown property"),
        (b"\x30\x08\x00\x01t\x04\x01\x01\x01\x01", "given twice"),
        (b"\x41\x02\x00\x01", "reserved flags"),
        (b"\x00\x00", "reserved packet type"),
        (b"\x40\x05\x00\x01\x00\x00\x00", "trailing bytes"),
        (b"\x20\x02\x02\x00", "CONNACK with reserved flags"),
        (b"\x90\x02\x00\x01", "shorter than its fields"),  # v5 SUBACK without properties length
        (b"\x10\x07\x00\x04MQTX\x05", "protocol name"),
        (b"\x10\x0a\x00\x04MQTT\x03\x02\x00\x3c\x00", "protocol level 3"),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(w.MalformedPacket, match=match):
        w.Parser(w.V5).feed(data)


def test_malformed_is_a_flowbridge_error() -> None:
    assert issubclass(w.MalformedPacket, FlowbridgeError)


def test_max_packet_size_bounds_the_buffer() -> None:
    parser = w.Parser(w.V5, max_packet_size=100)
    with pytest.raises(w.MalformedPacket, match="exceeds maximum 100"):
        parser.feed(b"\x30\xc8\x01")  # claims 200 bytes: refused before they arrive


def test_subscribe_options_byte() -> None:
    sub = w.Subscribe(1, [w.SubTopic("a", 2, True, True, 2)])
    assert w.encode(sub, w.V5)[-1] == 0b101110
    assert w.encode(sub, w.V311)[-1] == 2  # 3.1.1 carries QoS only


def test_encode_publish_flags() -> None:
    data = w.encode_publish("t", b"", 2, True, dup=True, packet_id=5, props=b"\x00")
    assert data[0] == 0x30 | 0x08 | 0x04 | 0x01


@pytest.mark.parametrize(
    ("flt", "topic", "ok"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+", "/x", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$share/g/a/+", "a/b", True),
        ("$share/g/a/+", "b/b", False),
        ("a/b", "a/c", False),
    ],
)
def test_topic_matches(flt: str, topic: str, ok: bool) -> None:
    assert w.topic_matches(flt, topic) is ok


def test_timestamp_text() -> None:
    assert format_timestamp(1_700_000_000.123) == "2023-11-14T22:13:20.123Z"
    assert parse_timestamp("2023-11-14T22:13:20.123Z") == pytest.approx(1_700_000_000.123)
    assert parse_timestamp("not a time") is None


class _Transport:
    """Records what the connection writes, one entry per write call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writelines(self, data: list[bytes]) -> None:
        self.writes.append(b"".join(data))

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    abort = close


async def test_acks_go_out_in_arrival_order_in_one_write() -> None:
    adapter = MqttAdapter("t", "mqtt://127.0.0.1:1", MqttBrokerOptions(), Backoff())
    conn = w.MqttConnection(version=w.V5, on_publish=adapter._on_publish, on_lost=adapter._on_lost)
    transport = _Transport()
    conn.transport = transport  # type: ignore[assignment]
    it = adapter.subscribe(Subscription("r", ("a/#",), durable=True))
    first = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0)  # the route registers; not connected, so no SUBSCRIBE yet
    stream = b"".join(
        w.encode(w.Publish("a/x", str(i).encode(), qos, packet_id=i + 1, properties={}))
        for i, qos in enumerate([1, 2, 1, 0])
    )
    conn.data_received(stream)
    batch = await first
    assert [d.message.payload for d in batch] == [b"0", b"1", b"2", b"3"]
    batch[2].ack()
    batch[3].ack()  # QoS 0: nothing to send
    await asyncio.sleep(0)
    assert transport.writes == []  # the first has not been acked: nothing may go out
    batch[0].ack()
    await asyncio.sleep(0)
    assert transport.writes == [w.encode(w.PubAck(1))]
    batch[1].ack()
    await asyncio.sleep(0)
    # PUBREC for the QoS 2 message, then the already-acked third, in one write.
    assert transport.writes[1:] == [w.encode(w.PubRec(2)) + w.encode(w.PubAck(3))]
    first_gen_delivery = batch[0]
    adapter._adopt(conn)  # as after a reconnect: old acks are void
    first_gen_delivery.ack()
    await asyncio.sleep(0)
    assert len(transport.writes) == 2
    await adapter.close()
    assert await anext(it, None) is None  # the route ends once the adapter is closed


async def test_qos0_publishes_with_cached_heads_parse_back_the_same() -> None:
    """QoS 0 heads are reused per topic, flags, properties and size: a stream of sizes,
    retain flags and property blocks reads back exactly as published."""
    conn = w.MqttConnection(version=w.V5, on_publish=lambda *_: None, on_lost=lambda *_: None)
    transport = _Transport()
    conn.transport = transport  # type: ignore[assignment]
    props = w.encode_props({w.CONTENT_TYPE: "text/plain"})
    items = [
        (topic, payload, 0, retain, p)
        for topic in ("a/b", "c")
        for payload in (b"", b"x", b"y" * 127, b"z" * 128, b"w" * 20_000, b"x")
        for retain in (False, True)
        for p in (b"\x00", props)
    ]
    assert await conn.publish(items * 2) == [None] * (2 * len(items))
    conn.flush()
    got = w.Parser(w.V5).feed(b"".join(transport.writes))
    want = [
        w.Publish(t, b, 0, r, properties={} if p == b"\x00" else {w.CONTENT_TYPE: "text/plain"})
        for t, b, _, r, p in items * 2
    ]
    assert got == want
