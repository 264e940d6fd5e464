"""The AMQP frame receiver: deliveries assembled for channels that take them, every other
frame handed to aiormq in order, whatever the read boundaries."""

from __future__ import annotations

import asyncio
from typing import Any

import pamqp.frame
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from flowbridge.adapters._amqp_wire import FrameReceiver
from flowbridge.adapters.amqp import PublishCache, encode_publish
from flowbridge.adapters.base import Message


class FastChannel:
    def __init__(self) -> None:
        self.got: list[tuple[int, str, Any, bytes]] = []

    def fb_deliver(self, tag: int, key: str, props: Any, body: bytes) -> None:
        self.got.append((tag, key, props, body))


class PlainChannel:
    """An aiormq channel of someone else's: its deliveries go through aiormq."""


class Conn:
    def __init__(self) -> None:
        self.channels: dict[int, Any] = {1: FastChannel(), 2: PlainChannel(), 3: FastChannel()}


class Reader:
    def __init__(self, chunks: list[bytes], conn: Conn | None) -> None:
        self.chunks = list(chunks)
        self.fb_connection = conn

    async def read(self, n: int) -> bytes:
        await asyncio.sleep(0)
        return self.chunks.pop(0) if self.chunks else b""

    def at_eof(self) -> bool:
        return not self.chunks


def deliver(
    channel: int, tag: int, key: str, body: bytes, props: Any = None, split: int = 0
) -> bytes:
    out = pamqp.frame.marshal(
        spec.Basic.Deliver(
            consumer_tag="ctag", delivery_tag=tag, exchange="amq.topic", routing_key=key
        ),
        channel,
    )
    out += pamqp.frame.marshal(
        ContentHeader(body_size=len(body), properties=props or spec.Basic.Properties()), channel
    )
    parts = [body[i : i + split] for i in range(0, len(body), split)] if split else [body]
    for part in parts if body else []:
        out += pamqp.frame.marshal(ContentBody(part), channel)
    return out


HEADERS = spec.Basic.Properties(content_type="text/plain", headers={"x": "1", "y": "two"})
STREAM = (
    pamqp.frame.marshal(spec.Basic.ConsumeOk(consumer_tag="ctag"), 1)
    + deliver(1, 1, "a.b", b"hello", HEADERS)
    + deliver(2, 1, "plain.key", b"for aiormq")  # a channel without a handler
    + deliver(1, 2, "a.c", b"", HEADERS)  # no body frames at all
    + pamqp.frame.marshal(Heartbeat(), 0)
    + deliver(3, 9, "ünï.code", b"x" * 50, split=20)
    + deliver(1, 3, "a.b", b"again", HEADERS)
    + pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=5, multiple=True), 3)
)


async def receive(chunks: list[bytes]) -> tuple[Conn, list[tuple[int, Any]]]:
    conn = Conn()
    rx = FrameReceiver(Reader(chunks, conn))  # type: ignore[arg-type]
    frames: list[tuple[int, Any]] = []
    async for _, channel, frame in rx:  # ends with StopAsyncIteration at the end of the stream
        frames.append((channel, frame))
    return conn, frames


def named(frames: list[tuple[int, Any]]) -> list[tuple[int, str]]:
    """What aiormq saw, synthetic heartbeats left out (they only mark the time)."""
    return [(ch, f.name) for ch, f in frames if not isinstance(f, Heartbeat)]


async def test_whole_stream() -> None:
    conn, frames = await receive([STREAM])
    fast, other = conn.channels[1], conn.channels[3]
    assert [(t, k, b) for t, k, _, b in fast.got] == [
        (1, "a.b", b"hello"),
        (2, "a.c", b""),
        (3, "a.b", b"again"),
    ]
    props = fast.got[0][2]
    assert props.content_type == "text/plain"
    assert props.headers == {"x": "1", "y": "two"}
    assert fast.got[2][2] is props  # one property block, decoded once
    assert [(t, k, b) for t, k, _, b in other.got] == [(9, "ünï.code", b"x" * 50)]
    assert named(frames) == [
        (1, "Basic.ConsumeOk"),
        (2, "Basic.Deliver"),
        (2, "ContentHeader"),
        (2, "ContentBody"),
        (3, "Basic.Ack"),
    ]


async def test_every_split_point_gives_the_same_result() -> None:
    _, expected = await receive([STREAM])
    want = named(expected)
    for cut in range(1, len(STREAM)):
        conn, frames = await receive([STREAM[:cut], STREAM[cut:]])
        assert named(frames) == want, cut
        assert [g[3] for g in conn.channels[1].got] == [b"hello", b"", b"again"], cut
        assert [g[3] for g in conn.channels[3].got] == [b"x" * 50], cut


async def test_byte_by_byte() -> None:
    conn, frames = await receive([bytes([b]) for b in STREAM])
    assert [g[3] for g in conn.channels[1].got] == [b"hello", b"", b"again"]
    assert named(frames)[-1] == (3, "Basic.Ack")


async def test_deliveries_alone_still_show_aiormq_a_frame() -> None:
    _, frames = await receive([deliver(1, 1, "a", b"1")])
    assert [type(f) for _, f in frames] == [Heartbeat]


async def test_bad_frame_end_is_an_error() -> None:
    frame = bytearray(deliver(1, 1, "a", b"1"))
    frame[-1] = 0
    with pytest.raises(InvalidFrameError):
        await receive([bytes(frame)])


async def test_connection_closed_mid_delivery() -> None:
    with pytest.raises(AMQPConnectionError):
        await receive([deliver(1, 1, "a", b"12345")[:-6]])


async def test_other_connections_keep_aiormq_reading() -> None:
    """Without the flowbridge transport, aiormq's own receiver does the work."""
    frame = pamqp.frame.marshal(spec.Basic.ConsumeOk(consumer_tag="t"), 1)
    reader = asyncio.StreamReader()
    reader.feed_data(frame)
    reader.feed_eof()
    rx = FrameReceiver(reader)
    _, channel, got = await rx.get_frame()
    assert (channel, got.name) == (1, "Basic.ConsumeOk")


def decode_publish(data: bytes) -> list[tuple[int, Any]]:
    frames = []
    while data:
        used, channel, frame = pamqp.frame.unmarshal(data)
        frames.append((channel, frame))
        data = data[used:]
    return frames


def test_publish_frames_are_the_same_from_the_cache() -> None:
    """Encoded with a cache shared by the whole sequence, each publish decodes (pamqp) to
    what the same message encoded alone decodes to: topics, header lists shared or not,
    named properties, delivery modes and channels varied."""
    shared = [("flowbridge-via", "b t"), ("x", "1"), ("x", "2")]
    msgs = [
        Message("a.b", b"one", shared),
        Message("a.b", b"two", shared),
        Message("a.c", b"three", shared),  # one list on two topics
        Message("a.b", b"four", shared, content_type="text/plain"),
        Message("a.b", b"five", shared, correlation_id=b"\xff\x00"),
        Message("a.b", b"six", [("other", "list")]),
        Message("a.b", b"", None, reply_to="r.1", message_id="m1", timestamp=1.0),
        Message("a.b", b"seven", shared),
    ]
    cache = PublishCache()
    for mode in (1, 2, 1):
        for channel in (1, 7):
            for mandatory in (False, True):
                for m in msgs:
                    kw: dict[str, Any] = {
                        "exchange": b"\x09amq.topic",
                        "mandatory": mandatory,
                        "delivery_mode": mode,
                        "frame_body_max": 4,
                    }
                    cached = encode_publish(m, channel, cache=cache, **kw)
                    alone = encode_publish(m, channel, **kw)
                    assert cached == alone
                    got = decode_publish(cached)
                    assert {ch for ch, _ in got} == {channel}
                    publish, header = got[0][1], got[1][1]
                    assert (publish.routing_key, publish.mandatory) == (m.topic, mandatory)
                    assert header.properties.delivery_mode == mode
                    assert b"".join(f.value for _, f in got[2:]) == m.payload
