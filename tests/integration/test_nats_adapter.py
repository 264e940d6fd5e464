"""NATS adapter against a real nats-server, with nats-py (or the raw protocol) on the other side."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from flowbridge.adapters import _nats_wire as wire
from flowbridge.adapters.base import Backoff, ConnState, Delivery, Message, Subscription
from flowbridge.adapters.nats import (
    JetStreamSource,
    NatsAdapter,
    NatsBrokerOptions,
    NatsSourceOptions,
    NatsTargetOptions,
)
from flowbridge.errors import ConnectError, PublishError
from tests.support.brokers import NatsServer, free_port

FAST = Backoff(initial=0.05, maximum=0.5, attempts=3)


async def make_adapter(url: str, **opts: Any) -> NatsAdapter:
    adapter = NatsAdapter("test", url, NatsBrokerOptions(**opts), FAST)
    await adapter.connect()
    return adapter


@pytest.fixture
async def adapter(nats_url: str) -> AsyncIterator[NatsAdapter]:
    a = await make_adapter(nats_url)
    yield a
    await a.close()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def collect(it: AsyncIterator[list[Delivery]], n: int, within: float = 5.0) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(within):
        while len(got) < n:
            got.extend(await anext(it))
    return got


async def started(
    adapter: NatsAdapter, sub: Subscription, nc: Client, probe: str
) -> tuple[AsyncIterator[list[Delivery]], list[Delivery]]:
    """Start iterating and return once the subscription provably receives (probe published
    by nats-py until it arrives)."""
    it = adapter.subscribe(sub)
    first = asyncio.ensure_future(anext(it))
    async with asyncio.timeout(5):
        while not first.done():
            await nc.publish(probe, b"probe")
            await nc.flush()
            await asyncio.sleep(0.02)
    batch = first.result()
    return it, batch


async def raw_block(nc: Client, stream: str, seq: int) -> tuple[bytes, bytes]:
    """Header block and payload exactly as the server stored them."""
    resp = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode())
    msg = json.loads(resp.data)["message"]
    return base64.b64decode(msg.get("hdrs", "")), base64.b64decode(msg.get("data", ""))


@pytest.fixture
async def stream(nc: Client, unique: str) -> AsyncIterator[str]:
    js = nc.jetstream()
    name = f"S{unique}"
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"js.{unique}.>"], storage=StorageType.MEMORY)
    )
    yield name
    await js.delete_stream(name)


# ---- wire helpers --------------------------------------------------------------------


def test_timestamp_format_round_trip() -> None:
    assert wire.format_timestamp(1700000000.123) == "2023-11-14T22:13:20.123Z"
    assert wire.parse_timestamp("2023-11-14T22:13:20.123Z") == 1700000000.123
    assert wire.parse_timestamp("2023-11-14T22:13:20") is None  # no zone: not a timestamp


def test_header_block_keeps_repeats_and_lifts_named_fields() -> None:
    m = Message("a", b"", headers=[("X", "1"), ("X", "2"), ("Y", "")], correlation_id=b"\xff\x00")
    block = wire.encode_headers(m)
    assert block is not None
    back = Message("a", b"")
    wire.decode_headers(block, back)
    assert back.headers == [("X", "1"), ("X", "2"), ("Y", "")]
    assert back.correlation_id == b"\xff\x00"
    assert wire.encode_headers(Message("a", b"x")) is None  # no headers: plain PUB


def test_subject_rules() -> None:
    assert wire.subject_problem("a.b", publish=True) is None
    assert wire.subject_problem("a.*", publish=False) is None
    for bad in ("", "a b", "a..b", ".a", "a.", "a.>", "a.*.b", "a\tb"):
        assert wire.subject_problem(bad, publish=True), bad


def test_check_source_refuses_durable_core() -> None:
    msg = NatsAdapter.check_source(NatsSourceOptions(), durable=True)
    assert msg is not None
    assert "cannot acknowledge" in msg
    assert NatsAdapter.check_source(NatsSourceOptions(), durable=False) is None
    js = NatsSourceOptions(jetstream=JetStreamSource())
    assert NatsAdapter.check_source(js, durable=True) is None


# ---- connection ----------------------------------------------------------------------


async def test_connect_error_names_broker_after_attempts() -> None:
    port = free_port()
    a = NatsAdapter(
        "edge",
        f"nats://u:secret@127.0.0.1:{port}",
        NatsBrokerOptions(connect_timeout=0.5),
        Backoff(initial=0.01, maximum=0.02, attempts=2),
    )
    with pytest.raises(ConnectError) as info:
        await a.connect()
    text = str(info.value)
    assert text.startswith(f"broker edge (nats://u:***@127.0.0.1:{port}):")
    assert "secret" not in text


async def test_health_and_max_payload(adapter: NatsAdapter, nc: Client) -> None:
    h = adapter.health()
    assert h.ok
    assert h.state is ConnState.CONNECTED
    assert adapter.max_payload() == nc.max_payload > 0
    await adapter.close()
    await adapter.close()  # idempotent
    assert adapter.health().state is ConnState.CLOSED


# ---- core target ---------------------------------------------------------------------


async def test_publish_headers_repeats_and_named_fields(
    adapter: NatsAdapter, nc: Client, stream: str, unique: str
) -> None:
    subject = f"js.{unique}.hdr"
    sub = await nc.subscribe(subject)
    await nc.flush()  # SUB processed before another connection publishes
    m = Message(
        subject,
        b"body",
        headers=[("X-Rep", "one"), ("Other", "v"), ("X-Rep", "two")],
        content_type="application/json",
        correlation_id=b"corr-1",
        message_id="mid-1",
        timestamp=1700000000.5,
        reply_to=f"reply.{unique}",
    )
    assert await adapter.publish([m], confirm=True) is None
    got = await sub.next_msg(timeout=2)
    assert got.data == b"body"
    assert got.reply == f"reply.{unique}"
    assert got.headers is not None
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["Correlation-Id"] == "corr-1"
    assert got.headers["Nats-Msg-Id"] == "mid-1"
    assert got.headers["Timestamp"] == "2023-11-14T22:13:20.500Z"
    # nats-py keeps one value per name; the stored raw block shows both repeats in order.
    block, data = await raw_block(nc, stream, 1)
    assert data == b"body"
    lines = block.split(b"\r\n")
    assert lines[0] == b"NATS/1.0"
    assert [ln for ln in lines if ln.startswith(b"X-Rep")] == [b"X-Rep: one", b"X-Rep: two"]


async def test_publish_refuses_bad_messages_per_message(
    adapter: NatsAdapter, nc: Client, unique: str
) -> None:
    subject = f"core.{unique}"
    sub = await nc.subscribe(subject)
    await nc.flush()  # SUB processed before another connection publishes
    batch = [
        Message(subject, b"1"),
        Message(subject, b"2", headers=[("Bad", "a\r\nInjected: yes")]),
        Message(f"core.{unique} space", b"3"),
        Message(subject, b"4", headers=[("Bad Name", "x")]),
        Message(subject, b"x" * (nc.max_payload + 1)),
        Message(f"core.{unique}.*", b"6"),
        Message(subject, b"7"),
    ]
    outcome = await adapter.publish(batch, confirm=True)
    assert outcome is not None
    refused = [i for i, r in enumerate(outcome) if r is not None]
    assert refused == [1, 2, 3, 4, 5]
    assert all(isinstance(r, PublishError) and not r.retriable for r in outcome if r is not None)
    assert "CR or LF" in str(outcome[1])
    assert (await sub.next_msg(timeout=2)).data == b"1"
    assert (await sub.next_msg(timeout=2)).data == b"7"
    assert adapter.health().ok  # the connection survived


async def test_shared_header_lists_are_framed_right(
    adapter: NatsAdapter, nc: Client, unique: str
) -> None:
    """One header list shared by many messages (as routes publish) is encoded once and
    reused; other topics, other fields and oversize bodies on the same list still come out
    exactly as for a fresh list."""
    sub = await nc.subscribe(f"shared.{unique}.>")
    await nc.flush()  # SUB processed before another connection publishes
    shared = [("X-Via", "b one"), ("X-Via", "b two")]
    a, b = f"shared.{unique}.a", f"shared.{unique}.b"
    batch = [
        Message(a, b"1", shared),
        Message(a, b"22", shared),
        Message(b, b"3", shared),  # same list, another subject: not the cached frame
        Message(a, b"4", shared, message_id="m-4"),  # a named field joins the block
        Message(a, b"x" * nc.max_payload, shared),  # fits without headers only: refused
        Message(a, b"", shared),
        Message(a, b"7", shared, reply_to=f"shared.{unique}.reply"),
    ]
    outcome = await adapter.publish(batch, confirm=True)
    assert outcome is not None
    assert [i for i, r in enumerate(outcome) if r is not None] == [4]
    assert "exceeds max_payload" in str(outcome[4])
    got = [await sub.next_msg(timeout=2) for _ in range(6)]
    assert [(m.subject, m.data) for m in got] == [
        (a, b"1"),
        (a, b"22"),
        (b, b"3"),
        (a, b"4"),
        (a, b""),
        (a, b"7"),
    ]
    for m in got:
        # nats-py keeps the last of repeated names; the raw block is checked elsewhere.
        assert m.headers is not None
        assert m.headers["X-Via"] == "b two"
    assert got[3].headers is not None
    assert got[3].headers["Nats-Msg-Id"] == "m-4"
    assert "Nats-Msg-Id" not in (got[4].headers or {})
    assert got[5].reply == f"shared.{unique}.reply"
    assert shared == [("X-Via", "b one"), ("X-Via", "b two")]  # never changed in place


async def test_confirmed_large_batches_keep_frames_whole(
    adapter: NatsAdapter, nc: Client, unique: str
) -> None:
    """Large payloads are written as they are (not copied into a frame block) and a confirm
    PING follows every frame it confirms: the server never sees a PING inside a frame (it
    would cut the connection) and nothing is confirmed before it was written."""
    subject = f"big.{unique}"
    sub = await nc.subscribe(subject, pending_msgs_limit=10_000, pending_bytes_limit=256 << 20)
    await nc.flush()  # SUB processed before another connection publishes
    shared = [("X-Route", "big")]
    body = bytes(range(256)) * 40  # 10 KiB
    n, per = 4000, 1000  # a batch over nats-py's 8 MiB pending limit: flushed in the middle
    for start in range(0, n, per):
        batch = [Message(subject, b"%06d" % i + body, shared) for i in range(start, start + per)]
        assert await adapter.publish(batch, confirm=True) is None
    got = [await sub.next_msg(timeout=5) for _ in range(n)]
    assert [m.data[:6] for m in got] == [b"%06d" % i for i in range(n)]
    assert all(m.data[6:] == body for m in got)
    assert adapter.stats["reconnects"] == 0
    assert adapter.health().ok


async def test_publish_order_and_volume(adapter: NatsAdapter, nc: Client, unique: str) -> None:
    subject = f"core.{unique}.vol"
    sub = await nc.subscribe(subject, pending_msgs_limit=100_000)
    await nc.flush()  # SUB processed before another connection publishes
    n = 20_000
    msgs = [Message(subject, b"%d" % i) for i in range(n)]
    for i in range(0, n, 1000):
        assert await adapter.publish(msgs[i : i + 1000], confirm=False) is None
    assert await adapter.publish([], confirm=True) is None
    got = [int((await sub.next_msg(timeout=2)).data) for _ in range(n)]
    assert got == list(range(n))


async def test_no_echo_by_default(nats_url: str, nc: Client, unique: str) -> None:
    subject = f"core.{unique}.echo"
    a = await make_adapter(nats_url)
    try:
        it, _ = await started(a, Subscription("r", (subject,), durable=False), nc, subject)
        await a.publish([Message(subject, b"own")], confirm=True)
        await nc.publish(subject, b"foreign")
        got = await collect(it, 1)
        assert [d.message.payload for d in got] == [b"foreign"]  # never its own publish
    finally:
        await a.close()


async def test_publish_when_disconnected_is_retriable(nats_url: str) -> None:
    a = await make_adapter(nats_url)
    await a.close()
    with pytest.raises(PublishError) as info:
        await a.publish([Message("x", b"")], confirm=False)
    assert info.value.retriable


# ---- core source ---------------------------------------------------------------------


async def test_subscription_receives_native_publishes(
    adapter: NatsAdapter, nc: Client, unique: str
) -> None:
    subject = f"core.{unique}.in"
    it, _ = await started(adapter, Subscription("r", (subject,), durable=False), nc, subject)
    await nc.publish(
        subject,
        b"payload",
        reply="inbox.x",
        headers={
            "Content-Type": "text/plain",
            "Correlation-Id": base64.b64encode(b"\x00\x01").decode(),
            "Correlation-Id-Encoding": "base64",
            "Nats-Msg-Id": "m-9",
            "Timestamp": "2024-01-02T03:04:05.678Z",
            "Plain": "kept",
        },
    )
    # Repeated names cannot be sent through nats-py's dict: write the HPUB frame itself.
    frame = bytearray()
    block = b"NATS/1.0\r\nA: 1\r\nB: x\r\nA: 2\r\n\r\n"
    wire.pub_frame(frame, subject.encode(), b"", block, b"rep")
    await nc._send_command(bytes(frame))
    await nc.flush()
    got = await collect(it, 2)
    first, second = got[0].message, got[1].message
    assert first.payload == b"payload"
    assert first.topic == subject
    assert first.reply_to == "inbox.x"
    assert first.content_type == "text/plain"
    assert first.correlation_id == b"\x00\x01"
    assert first.message_id == "m-9"
    assert first.timestamp == pytest.approx(1704164645.678)
    assert first.headers == [("Plain", "kept")]  # named fields lifted, not repeated
    assert second.headers == [("A", "1"), ("B", "x"), ("A", "2")]
    assert got[0].settler is None  # core NATS cannot acknowledge


async def test_wildcard_filters(adapter: NatsAdapter, nc: Client, unique: str) -> None:
    sub = Subscription("r", (f"w.{unique}.*.c", f"v.{unique}.>"), durable=False)
    it, first = await started(adapter, sub, nc, f"v.{unique}.probe")
    for s in (
        f"w.{unique}.x.c",
        f"w.{unique}.x.d",
        f"v.{unique}",
        f"v.{unique}.y.z",
        f"w.{unique}.c",
    ):
        await nc.publish(s, s.encode())
    await nc.publish(f"v.{unique}.end", b"end")
    await nc.flush()
    got = [d.message.topic for d in first]
    async with asyncio.timeout(3):
        while f"v.{unique}.end" not in got:
            got.extend(d.message.topic for d in await anext(it))
    got = [t for t in got if not t.endswith(".probe")]
    assert got == [f"w.{unique}.x.c", f"v.{unique}.y.z", f"v.{unique}.end"]


async def test_queue_group_shares_with_native_member(
    adapter: NatsAdapter, nc: Client, unique: str
) -> None:
    subject = f"q.{unique}"
    native = await nc.subscribe(subject, queue="workers")
    sub = Subscription("r", (subject,), durable=False, group="workers")
    it, _ = await started(adapter, sub, nc, subject)
    ours: list[bytes] = []

    async def pump() -> None:
        while True:
            ours.extend(d.message.payload for d in await anext(it))

    task = asyncio.create_task(pump())
    n = 400
    for i in range(n):
        await nc.publish(subject, b"%d" % i)
    await nc.flush()
    theirs: list[bytes] = []
    try:
        async with asyncio.timeout(5):
            while len([p for p in ours + theirs if p != b"probe"]) < n:
                with contextlib.suppress(nats.errors.TimeoutError):
                    theirs.append((await native.next_msg(timeout=0.05)).data)
    finally:
        task.cancel()
    ours = [p for p in ours if p != b"probe"]
    theirs = [p for p in theirs if p != b"probe"]
    assert ours
    assert theirs
    assert sorted(ours + theirs, key=int) == [b"%d" % i for i in range(n)]  # each exactly once


async def test_core_messages_never_taken_are_counted_when_the_route_stops(
    nats_url: str, nc: Client, unique: str
) -> None:
    """What a core NATS route received and never took is gone with it: counted, not silent."""
    subject = f"stopping.{unique}"
    a = await make_adapter(nats_url)
    drops: collections.Counter[str] = collections.Counter()
    try:
        sub = Subscription("r", (subject,), durable=False, drops=drops)
        it, _ = await started(a, sub, nc, subject)
        await nc.publish(subject, b"sync")
        async with asyncio.timeout(5):  # the route takes everything up to the sync message
            while b"sync" not in [d.message.payload for d in await anext(it)]:
                pass
        for i in range(50):
            await nc.publish(subject, b"%d" % i)
        await nc.flush()
        assert a._nc is not None
        await a._nc.flush()  # its PONG comes after every message the server sent before it
        await it.aclose()
        assert drops == {"route stopped": 50}
    finally:
        await a.close()


async def test_slow_consumer_drops_are_counted(nats_url: str, nc: Client, unique: str) -> None:
    subject = f"slow.{unique}"
    a = await make_adapter(nats_url, max_pending_msgs=10)
    drops: collections.Counter[str] = collections.Counter()
    try:
        sub = Subscription("r", (subject,), durable=False, drops=drops)
        it, _ = await started(a, sub, nc, subject)
        before = a.stats["dropped_slow_consumer"]
        for i in range(100):
            await nc.publish(subject, b"%d" % i)
        await nc.flush()
        await nc.publish(f"{subject}.sync", b"")
        # Let the adapter read everything without the route taking any of it.
        async with asyncio.timeout(3):
            while a.stats["dropped_slow_consumer"] - before < 90:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.01)
        batch = await anext(it)
        assert [d.message.payload for d in batch] == [b"%d" % i for i in range(10)]
        assert a.stats["dropped_slow_consumer"] - before == 90
        assert drops == {"source buffer full": 90}  # the route's own counters see each one
        # ... and the broker's events (flowbridge_broker_events_total) as well.
        assert a.counters()["dropped_slow_consumer"] - before == 90
        # After the route caught up, delivery resumes.
        await nc.publish(subject, b"after")
        assert [d.message.payload for d in await collect(it, 1)] == [b"after"]
    finally:
        await a.close()


# ---- JetStream -----------------------------------------------------------------------


async def test_jetstream_target_dedup_and_refusals(
    adapter: NatsAdapter, nc: Client, stream: str, unique: str
) -> None:
    js_opts = NatsTargetOptions(jetstream=True)
    subject = f"js.{unique}.t"
    msgs = [
        Message(subject, b"a", message_id="id-1"),
        Message(subject, b"a-again", message_id="id-1"),
        Message(subject, b"b", message_id="id-2"),
        Message(f"nostream.{unique}", b"c"),
        Message(subject, b"d", headers=[("H", "x\ny")]),
    ]
    outcome = await adapter.publish(msgs, confirm=True, options=js_opts)
    assert outcome is not None
    assert outcome[0] is None
    assert outcome[1] is None
    assert outcome[2] is None
    assert isinstance(outcome[3], PublishError)
    assert not outcome[3].retriable
    assert "no responders" in outcome[3].reason
    assert isinstance(outcome[4], PublishError)
    assert not outcome[4].retriable
    assert adapter.stats["js_duplicates"] == 1
    info = await nc.jetstream().stream_info(stream)
    assert info.state.messages == 2
    _, data = await raw_block(nc, stream, 1)
    assert data == b"a"
    wrong = NatsTargetOptions(jetstream=True, expect_stream="other")
    outcome = await adapter.publish([Message(subject, b"e")], confirm=True, options=wrong)
    assert outcome is not None
    assert isinstance(outcome[0], PublishError)
    assert "expected stream" in outcome[0].reason.lower()


async def test_jetstream_target_pipelines_many(
    nats_url: str, nc: Client, stream: str, unique: str
) -> None:
    a = await make_adapter(nats_url, js_max_outstanding=64)
    try:
        subject = f"js.{unique}.many"
        msgs = [Message(subject, b"%d" % i) for i in range(2000)]
        assert (
            await a.publish(msgs, confirm=True, options=NatsTargetOptions(jetstream=True)) is None
        )
        info = await nc.jetstream().stream_info(stream)
        assert info.state.messages == 2000
        _, last = await raw_block(nc, stream, 2000)
        assert last == b"1999"
    finally:
        await a.close()


def js_sub(route: str, filters: tuple[str, ...], **kw: Any) -> Subscription:
    opts = NatsSourceOptions(jetstream=JetStreamSource(**kw))
    return Subscription(route, filters, durable=True, max_in_flight=100, options=opts)


async def test_jetstream_source_redelivers_unacked_after_reopen(
    nats_url: str, nc: Client, stream: str, unique: str
) -> None:
    js = nc.jetstream()
    subject = f"js.{unique}.src"
    for i in range(10):
        await js.publish(subject, b"%d" % i, headers={"K": f"{i}"})
    sub = js_sub(f"r{unique}", (subject,), ack_wait=1.0)
    a = await make_adapter(nats_url)
    it = a.subscribe(sub)
    got = await collect(it, 10)
    assert [d.message.payload for d in got] == [b"%d" % i for i in range(10)]
    assert got[3].message.headers == [("K", "3")]
    for d in got[:5]:
        d.ack()
    await a.close()
    a = await make_adapter(nats_url)
    try:
        it = a.subscribe(sub)
        again = await collect(it, 5, within=6)
        assert sorted(d.message.payload for d in again) == [b"%d" % i for i in range(5, 10)]
        for d in again:
            d.ack()
        await asyncio.sleep(0.2)
        info = await js.consumer_info(stream, f"flowbridge-r{unique}")
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
    finally:
        await a.close()


async def test_jetstream_source_drains_what_the_route_never_took(
    nats_url: str, nc: Client, stream: str, unique: str
) -> None:
    """A stopping route (restart, reload) gets what was pulled but not yet taken, in stream
    order, and nothing more arrives for it; left in the buffer, those would come back only
    after ack_wait, behind newer messages."""
    js = nc.jetstream()
    subject = f"js.{unique}.src"
    sub = js_sub(f"h{unique}", (subject,), ack_wait=30.0)
    a = await make_adapter(nats_url)
    it = a.subscribe(sub)
    try:
        for i in range(5):
            await js.publish(subject, b"%d" % i)
        for d in await collect(it, 5):
            d.ack()
        for i in range(5, 15):
            await js.publish(subject, b"%d" % i)
        buffered = a._batches[0]
        async with asyncio.timeout(5):  # pulled into the buffer; the route has not taken them
            while len(buffered.items) < 10:  # noqa: ASYNC110 - a buffer, no event
                await asyncio.sleep(0.02)
        rest = await a.drain(sub.route)
        assert [d.message.payload for d in rest] == [b"%d" % i for i in range(5, 15)]
        for d in rest:
            d.ack()
        await js.publish(subject, b"late")
        await asyncio.sleep(0.3)
        assert not buffered.items  # the pull inbox is closed
        await it.aclose()
        it = a.subscribe(sub)
        again = await collect(it, 1, within=5)  # far less than ack_wait: nothing is held
        assert [d.message.payload for d in again] == [b"late"]
        again[0].ack()
    finally:
        await it.aclose()
        await a.close()


async def test_jetstream_source_bounds_in_flight_and_multi_filter(
    adapter: NatsAdapter, nc: Client, stream: str, unique: str
) -> None:
    js = nc.jetstream()
    for i in range(30):
        await js.publish(f"js.{unique}.{'a' if i % 2 else 'b'}", b"%d" % i)
    await js.publish(f"js.{unique}.c", b"other")
    sub = Subscription(
        f"m{unique}",
        (f"js.{unique}.a", f"js.{unique}.b"),
        durable=True,
        max_in_flight=8,
        options=NatsSourceOptions(jetstream=JetStreamSource(ack_wait=30)),
    )
    it = adapter.subscribe(sub)
    held = await collect(it, 8)
    # Nothing beyond max_in_flight arrives while those are unacked.
    extra = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.5)
    assert not extra.done()
    for d in held:
        d.ack()
    seen = [d.message.payload for d in held]
    async with asyncio.timeout(5):
        batch = await extra
        while True:
            for d in batch:
                seen.append(d.message.payload)
                d.ack()
            if len(seen) >= 30:
                break
            batch = await anext(it)
    assert sorted(seen, key=int) == [b"%d" % i for i in range(30)]  # not "other"


async def test_jetstream_source_without_acks_pulls_only_what_the_route_takes(
    adapter: NatsAdapter, nc: Client, stream: str, unique: str
) -> None:
    """At-most-once over JetStream: a route slower than the stream must leave the rest in the
    stream, not have the bridge pull it and drop what overflows its buffer."""
    subject = f"js.{unique}.amo"
    for i in range(300):
        await nc.publish(subject, b"%d" % i)
    await nc.flush()
    drops: collections.Counter[str] = collections.Counter()
    sub = Subscription(
        f"amo{unique}",
        (subject,),
        durable=False,
        max_in_flight=50,
        options=NatsSourceOptions(jetstream=JetStreamSource()),
        drops=drops,
    )
    it = adapter.subscribe(sub)
    seen = [d.message.payload for d in await anext(it)]
    # The route holds its batch: the consumer may refill the buffer once, never more.
    await asyncio.sleep(0.5)
    assert adapter.stats["dropped_slow_consumer"] == 0
    async with asyncio.timeout(5):
        while len(seen) < 300:
            batch = await anext(it)
            assert len(batch) <= 50
            seen.extend(d.message.payload for d in batch)
    assert seen == [b"%d" % i for i in range(300)]
    assert not drops
    assert adapter.stats["dropped_slow_consumer"] == 0


async def test_jetstream_source_survives_server_restart(unique: str) -> None:
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="R", subjects=["r.>"], storage=StorageType.FILE))
        n = 300
        for i in range(n):
            await js.publish(f"r.{'x' if i % 3 else 'y'}", b"%d" % i)
        await nc.close()
        a = NatsAdapter("own", server.url, NatsBrokerOptions(), Backoff(0.05, 0.2))
        await a.connect()
        try:
            src = a.subscribe(
                Subscription(
                    "restart",
                    ("r.x", "r.y"),
                    durable=True,
                    max_in_flight=50,
                    options=NatsSourceOptions(jetstream=JetStreamSource(ack_wait=2.0)),
                )
            )
            core_sub = Subscription("core", (f"c.{unique}",), durable=False)
            core = a.subscribe(core_sub)
            core_first = asyncio.ensure_future(anext(core))
            first = await collect(src, 50)
            for d in first[:20]:
                d.ack()  # the rest stays unacked across the restart
            await asyncio.sleep(0.2)
            server.stop()
            await asyncio.sleep(0.3)
            assert not a.health().ok
            for d in first[20:]:
                d.ack()  # acks of a dead connection: must not break anything
            server.start()
            assert await a.wait_connected(10)
            seen = {int(d.message.payload) for d in first}
            async with asyncio.timeout(20):
                while len(seen) < n:
                    for d in await anext(src):
                        seen.add(int(d.message.payload))
                        d.ack()
            assert seen == set(range(n))
            assert a.health().reconnects >= 1
            assert a.health().ok
            # The core subscription was restored as well.
            nc = await nats.connect(server.url)
            async with asyncio.timeout(5):
                while not core_first.done():
                    await nc.publish(f"c.{unique}", b"after")
                    await nc.flush()
                    await asyncio.sleep(0.05)
            assert core_first.result()[0].message.payload == b"after"
            await nc.close()
        finally:
            await a.close()
