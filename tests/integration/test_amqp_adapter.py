"""AMQP adapter against the shared RabbitMQ, with aio-pika on the other side."""

from __future__ import annotations

import asyncio
import datetime
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from decimal import Decimal

import aio_pika
import pytest

from flowbridge.adapters.amqp import (
    _CHUNK_BYTES,
    AmqpAdapter,
    AmqpBrokerOptions,
    AmqpSourceOptions,
    AmqpTargetOptions,
    _Acks,
    header_text,
)
from flowbridge.adapters.base import Backoff, ConnState, Delivery, Message, Subscription
from flowbridge.errors import ConnectError, PublishError
from tests.support.brokers import free_port, host_port
from tests.support.proxy import TcpProxy

MakeAdapter = Callable[..., Awaitable[AmqpAdapter]]


@pytest.fixture
async def make_adapter(amqp_url: str, unique: str) -> AsyncIterator[MakeAdapter]:
    made: list[AmqpAdapter] = []

    async def make(**options: object) -> AmqpAdapter:
        options.setdefault("connection_name", f"fbtest-{unique}")
        adapter = AmqpAdapter(
            f"rabbit-{unique}",
            amqp_url,
            AmqpBrokerOptions.model_validate(options),
            Backoff(initial=0.05, maximum=0.5, attempts=20),
        )
        await adapter.connect()
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.close()


@pytest.fixture
async def pika(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel()
    yield channel
    await conn.close()


async def bound_queue(
    channel: aio_pika.abc.AbstractChannel, *keys: str
) -> aio_pika.abc.AbstractQueue:
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    for key in keys:
        await queue.bind("amq.topic", key)
    return queue


async def get_one(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message of ``queue``, waiting for it (basic.get does not wait)."""
    for _ in range(250):
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.02)
    pytest.fail(f"nothing arrived in queue {queue.name} within 5 s")


async def take(batches: AsyncGenerator[list[Delivery], None], count: int) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(5):
        while len(got) < count:
            got.extend(await anext(batches))
    return got


async def nothing_more(batches: AsyncGenerator[list[Delivery], None]) -> None:
    extra: list[Delivery] = []
    try:
        async with asyncio.timeout(0.3):
            extra = await anext(batches)
    except TimeoutError:
        return
    pytest.fail(f"unexpected deliveries: {[d.message.topic for d in extra]}")


async def publish_native(
    channel: aio_pika.abc.AbstractChannel, key: str, body: bytes, **props: object
) -> None:
    exchange = await channel.get_exchange("amq.topic")
    props.setdefault("message_id", None)
    await exchange.publish(aio_pika.Message(body, **props), routing_key=key)  # type: ignore[arg-type]


async def test_publish_reaches_native_consumer_with_fields_and_repeated_headers(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    queue = await bound_queue(pika, f"{unique}.#")
    messages = [
        Message(
            f"{unique}.a",
            b"one",
            headers=[("x", "1"), ("y", "only"), ("x", "2"), ("x", "3"), ("under_score", "u")],
            content_type="application/json",
            correlation_id=b"corr-1",
            reply_to="replies.here",
            message_id="mid-1",
            timestamp=1_700_000_000.75,
        ),
        # Not UTF-8, so it travels as a byte array header.
        Message(f"{unique}.b", b"\x00\xff" * 100, correlation_id=b"\xff\xfe\x00"),
        Message(f"{unique}.c", b""),
    ]
    assert await adapter.publish(messages, confirm=True) is None

    first = await queue.get(timeout=5)
    assert first.routing_key == f"{unique}.a"
    assert first.body == b"one"
    assert first.headers == {"x": ["1", "2", "3"], "y": "only", "under_score": "u"}
    assert first.content_type == "application/json"
    assert first.correlation_id == "corr-1"
    assert first.reply_to == "replies.here"
    assert first.message_id == "mid-1"
    assert first.timestamp == datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC)
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT  # confirm => persistent
    second = await queue.get(timeout=5)
    assert second.body == b"\x00\xff" * 100
    assert second.correlation_id is None
    assert bytes(second.headers["x-correlation-id"]) == b"\xff\xfe\x00"  # type: ignore[arg-type]
    third = await queue.get(timeout=5)
    assert third.body == b""
    assert third.headers == {}
    for m in (first, second, third):
        await m.ack()


async def test_unconfirmed_publish_is_transient_and_ordered(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    queue = await bound_queue(pika, f"{unique}.*")
    batch = [Message(f"{unique}.n", str(i).encode()) for i in range(500)]
    assert await adapter.publish(batch, confirm=False) is None
    bodies = []
    async with queue.iterator() as it:
        async for m in it:
            assert m.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
            bodies.append(int(m.body))
            await m.ack()
            if len(bodies) == 500:
                break
    assert bodies == list(range(500))


async def test_native_publish_reaches_source_with_headers_as_text(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    batches = adapter.subscribe(Subscription("native-in", (f"{unique}.#",), durable=False))
    start = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)  # let the queue bind
    assert adapter.health().subscribed
    when = datetime.datetime(2024, 1, 31, 12, 0, tzinfo=datetime.UTC)
    await publish_native(
        pika,
        f"{unique}.x.y",
        b"payload",
        headers={
            "rep": ["a", "b", 3],
            "int": 42,
            "flag": True,
            "dec": Decimal("1.50"),
            "when": when,
            "table": {"k": "v", "n": 1},
            "raw": bytearray(b"\xff\x01"),
            "x-correlation-id": bytearray(b"\x00\x01binary"),
        },
        content_type="text/plain",
        reply_to="back",
        message_id="native-1",
        timestamp=when,
    )
    await publish_native(pika, f"{unique}.z", b"second", correlation_id="text-corr")
    got = (await start)[:]
    if len(got) < 2:
        got += await take(batches, 2 - len(got))
    first, second = got[0].message, got[1].message
    assert first.topic == f"{unique}.x.y"
    assert first.payload == b"payload"
    assert first.content_type == "text/plain"
    assert first.reply_to == "back"
    assert first.message_id == "native-1"
    assert first.timestamp == when.timestamp()
    assert first.correlation_id == b"\x00\x01binary"  # lifted, not left in headers
    assert sorted(first.headers or []) == sorted(
        [
            ("rep", "a"),
            ("rep", "b"),
            ("rep", "3"),
            ("int", "42"),
            ("flag", "true"),
            ("dec", "1.50"),
            ("when", "2024-01-31T12:00:00Z"),
            ("table", '{"k":"v","n":1}'),
            ("raw", "/wE="),
        ]
    )
    assert second.correlation_id == b"text-corr"
    assert second.headers is None
    await batches.aclose()


async def test_binding_wildcards(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    filters = (f"{unique}.*.temp", f"{unique}.alarm.#")
    batches = adapter.subscribe(Subscription("wild", filters, durable=False))
    pending = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)
    keys = {
        f"{unique}.kitchen.temp": True,
        f"{unique}.kitchen.oven.temp": False,  # * is exactly one word
        f"{unique}.temp": False,
        f"{unique}.alarm": True,  # # matches zero words
        f"{unique}.alarm.fire.floor1": True,
        f"{unique}.other": False,
    }
    for key in keys:
        await publish_native(pika, key, key.encode())
    want = sorted(k for k, ok in keys.items() if ok)
    got = await pending
    if len(got) < len(want):
        got += await take(batches, len(want) - len(got))
    assert sorted(d.message.topic for d in got) == want
    await nothing_more(batches)
    await batches.aclose()


async def test_deliveries_come_in_batches(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    sub = Subscription("batches", (f"{unique}.b",), durable=True, max_in_flight=500)
    batches = adapter.subscribe(sub)
    pending = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)
    exchange = await pika.get_exchange("amq.topic")
    for i in range(300):
        await exchange.publish(aio_pika.Message(str(i).encode()), routing_key=f"{unique}.b")
    first = await pending
    for d in first:
        d.ack()
    await asyncio.sleep(0.2)  # the rest arrives while nobody asks: one list of all of it
    second = await anext(batches)
    assert len(second) > 1
    rest = second + await take(batches, 300 - len(first) - len(second))
    for d in rest:
        d.ack()
    assert [int(d.message.payload) for d in first + rest] == list(range(300))
    await batches.aclose()
    await pika.queue_delete(f"flowbridge.{sub.route}")


async def test_durable_queue_redelivers_unacked_after_reopen(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    route = f"durable-{unique}"
    sub = Subscription(route, (f"{unique}.d.#",), durable=True, max_in_flight=100)
    adapter = await make_adapter()
    batches = adapter.subscribe(sub)
    pending = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)
    for i in range(20):
        await publish_native(pika, f"{unique}.d.{i}", str(i).encode())
    got = await pending
    if len(got) < 20:
        got += await take(batches, 20 - len(got))
    # Ack out of order, leaving 5..9 and 15..19 unacked.
    for d in reversed(got[:5] + got[10:15]):
        d.ack()
    await adapter.close()
    await batches.aclose()

    again = await make_adapter()
    batches = again.subscribe(sub)
    redelivered = await take(batches, 10)
    assert sorted(int(d.message.payload) for d in redelivered) == [*range(5, 10), *range(15, 20)]
    for d in redelivered:
        d.ack()
    await nothing_more(batches)
    await again.close()
    await batches.aclose()
    queue = await pika.declare_queue(f"flowbridge.{route}", durable=True, passive=True)
    assert queue.declaration_result.message_count == 0
    await pika.queue_delete(f"flowbridge.{route}")


async def test_durable_queue_name_option_and_source_exchange(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    # Durable topic: what the adapter itself would declare.
    exchange = await pika.declare_exchange(
        f"fb-{unique}", aio_pika.ExchangeType.TOPIC, durable=True
    )
    adapter = await make_adapter()
    options = AmqpSourceOptions(exchange=f"fb-{unique}", queue=f"q-{unique}")
    batches = adapter.subscribe(Subscription("named", ("k.*",), durable=True, options=options))
    pending = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)
    await exchange.publish(aio_pika.Message(b"v"), routing_key="k.1")
    (delivery,) = await asyncio.wait_for(pending, 5)
    delivery.ack()
    queue = await pika.declare_queue(f"q-{unique}", durable=True, passive=True)
    assert queue.name == f"q-{unique}"
    await batches.aclose()
    await pika.queue_delete(f"q-{unique}")
    await exchange.delete()


async def test_confirmed_publish_of_many(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    queue = await bound_queue(pika, f"{unique}.many")
    batch = [Message(f"{unique}.many", i.to_bytes(4, "big") * 64) for i in range(3000)]
    assert await adapter.publish(batch, confirm=True) is None
    declared = await pika.declare_queue(queue.name, passive=True)
    assert declared.declaration_result.message_count == 3000


async def test_mandatory_unroutable_is_that_messages_error(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    queue = await bound_queue(pika, f"{unique}.routed")
    opts = AmqpTargetOptions(mandatory=True)
    batch = [
        Message(f"{unique}.routed", b"0"),
        Message(f"{unique}.nobody", b"1"),
        Message(f"{unique}.routed", b"2"),
        Message(f"{unique}.nobody", b"3"),
    ]
    outcome = await adapter.publish(batch, confirm=True, options=opts)
    assert outcome is not None
    assert [r is None for r in outcome] == [True, False, True, False]
    for r in (outcome[1], outcome[3]):
        assert isinstance(r, PublishError)
        assert not r.retriable
        assert "unroutable" in r.reason
    assert [(await queue.get(timeout=5)).body for _ in range(2)] == [b"0", b"2"]
    # Without mandatory the broker drops unroutable messages, as AMQP defines.
    assert await adapter.publish(batch, confirm=True) is None
    assert AmqpAdapter.check_target(opts, confirm=False) is not None
    assert AmqpAdapter.check_target(opts, confirm=True) is None


async def test_oversized_and_uncarriable_messages_refused_per_message(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter(max_message_size=1000)
    assert adapter.max_payload() == 1000
    queue = await bound_queue(pika, f"{unique}.#")
    batch = [
        Message(f"{unique}.ok", b"a" * 1000),
        Message(f"{unique}.big", b"b" * 1001),
        Message(f"{unique}." + "k" * 300, b"c"),  # routing key over 255 bytes
        Message(f"{unique}.hdr", b"d", headers=[("h" * 200, "v")]),  # name over 128 bytes
        Message(f"{unique}.ok2", b"e"),
    ]
    for confirm in (True, False):
        outcome = await adapter.publish(batch, confirm=confirm)
        assert outcome is not None
        assert [r is None for r in outcome] == [True, False, False, False, True]
        assert all(r is None or not r.retriable for r in outcome)
        assert "max_message_size" in str(outcome[1])
        bodies = [(await get_one(queue)).body for _ in range(2)]
        assert bodies == [b"a" * 1000, b"e"]


async def test_unknown_exchange_refused_then_channel_recovers(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    queue = await bound_queue(pika, f"{unique}.after")
    missing = AmqpTargetOptions(exchange=f"amq.missing-{unique}")
    outcome = await adapter.publish([Message("k", b"1")] * 3, confirm=True, options=missing)
    assert outcome is not None
    assert all(isinstance(r, PublishError) and not r.retriable for r in outcome)
    assert await adapter.publish([Message(f"{unique}.after", b"ok")], confirm=True) is None
    assert (await queue.get(timeout=5)).body == b"ok"


async def test_declares_its_own_exchange(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter(exchange=f"fb.x.{unique}")
    assert await adapter.publish([Message("k", b"1")], confirm=True) is None
    exchange = await pika.get_exchange(f"fb.x.{unique}", ensure=True)
    await exchange.delete()


async def test_connect_error_names_broker_without_password(unique: str) -> None:
    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    adapter = AmqpAdapter(
        f"down-{unique}", url, AmqpBrokerOptions(), Backoff(initial=0.01, attempts=3)
    )
    with pytest.raises(ConnectError) as info:
        await adapter.connect()
    text = str(info.value)
    assert f"broker down-{unique} (" in text
    assert "secret" not in text
    assert adapter.health().state is ConnState.DISCONNECTED
    with pytest.raises(PublishError) as pub:
        await adapter.publish([Message("k", b"1")], confirm=True)
    assert pub.value.retriable


async def _rabbitmqctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def close_from_broker(connection_name: str) -> None:
    listing = await _rabbitmqctl("list_connections", "-q", "pid", "client_properties")
    pids = [line.split("\t")[0] for line in listing.splitlines() if connection_name in line]
    assert pids, f"no connection named {connection_name!r} in:\n{listing}"
    for pid in pids:
        await _rabbitmqctl("close_connection", pid, "flowbridge test: forced close")


async def test_reconnects_after_broker_closes_connection_and_loses_nothing(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    route = f"loss-{unique}"
    sub = Subscription(route, (f"{unique}.loss",), durable=True, max_in_flight=50)
    batches = adapter.subscribe(sub)
    first = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)
    exchange = await pika.get_exchange("amq.topic")
    total = 400
    received: set[int] = set()

    async def consume() -> None:
        pending: list[Delivery] = await first
        while True:
            for d in pending:
                received.add(int(d.message.payload))
                d.ack()
            if len(received) == total:
                return
            pending = await anext(batches)

    consumer = asyncio.ensure_future(consume())
    for i in range(total // 2):
        await exchange.publish(aio_pika.Message(str(i).encode()), routing_key=f"{unique}.loss")
    await close_from_broker(f"fbtest-{unique}")
    for i in range(total // 2, total):
        await exchange.publish(aio_pika.Message(str(i).encode()), routing_key=f"{unique}.loss")
    await asyncio.wait_for(consumer, 20)
    assert received == set(range(total))
    health = adapter.health()
    assert health.reconnects == 1
    assert health.ok
    # The target side works on the new connection too.
    queue = await bound_queue(pika, f"{unique}.after")
    assert await adapter.publish([Message(f"{unique}.after", b"x")], confirm=True) is None
    assert (await queue.get(timeout=5)).body == b"x"
    await batches.aclose()
    await pika.queue_delete(f"flowbridge.{route}")


async def test_connection_loss_during_confirmed_publish_is_retriable(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    await bound_queue(pika, f"{unique}.inflight")
    batch = [Message(f"{unique}.inflight", b"p" * 2000) for _ in range(20000)]
    publishing = asyncio.ensure_future(adapter.publish(batch, confirm=True))
    await asyncio.sleep(0.05)
    conn = adapter._conn
    assert conn is not None
    await conn.close(ConnectionResetError("test cut the connection"))
    with pytest.raises(PublishError) as info:
        await asyncio.wait_for(publishing, 10)
    assert info.value.retriable
    assert await adapter.wait_connected(10)
    assert adapter.health().reconnects == 1


class StallingProxy(TcpProxy):
    """Can stop reading what the client sends, as a broker under a resource alarm does, so
    the client's socket backs up."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.reading = asyncio.Event()
        self.reading.set()
        self.forwarded = 0  # bytes passed on to the broker

    async def before_read(self, *, to_broker: bool) -> None:
        if to_broker:
            await self.reading.wait()

    async def relay(self, data: bytes, *, to_broker: bool) -> bytes:
        if to_broker:
            self.forwarded += len(data)
        return data


async def test_unconfirmed_publish_to_a_broker_that_stops_reading_waits_with_bounded_buffer(
    amqp_url: str, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    """Frames go straight to the socket when nothing is queued for aiormq's writer; a broker
    that stops reading must still hold the publisher back, not grow its send buffer by a
    whole batch (40 MB here), and what waited goes out complete and in order after."""
    proxy = StallingProxy(host_port(amqp_url, 5672))
    adapter = AmqpAdapter(
        f"rabbit-{unique}",
        f"amqp://guest:guest@127.0.0.1:{await proxy.start()}/",
        AmqpBrokerOptions(connection_name=f"fbtest-{unique}"),
        Backoff(initial=0.05, maximum=0.5, attempts=20),
    )
    await adapter.connect()
    try:
        queue = await bound_queue(pika, f"{unique}.stall")
        assert await adapter.publish([Message(f"{unique}.stall", b"first")], confirm=False) is None
        proxy.reading.clear()
        body = b"p" * 100_000
        batch = [Message(f"{unique}.stall", str(i).encode() + b":" + body) for i in range(400)]
        publishing = asyncio.ensure_future(adapter.publish(batch, confirm=False))
        await asyncio.sleep(1.5)
        assert not publishing.done(), "the publish finished while the broker read nothing"
        conn = adapter._conn
        assert conn is not None
        writer = adapter._writer[1] if adapter._writer else None
        assert writer is not None
        assert writer.transport.get_write_buffer_size() <= 2 * _CHUNK_BYTES + len(body) + 1000
        proxy.reading.set()
        assert await asyncio.wait_for(publishing, 30) is None
        bodies = []
        async with queue.iterator() as it:
            async for m in it:
                bodies.append(m.body.split(b":", 1)[0])
                await m.ack()
                if len(bodies) == 401:
                    break
        assert bodies == [b"first", *(str(i).encode() for i in range(400))]
    finally:
        await adapter.close()
        await proxy.close()


def test_acks_coalesce_to_highest_contiguous_tag() -> None:
    wake = asyncio.Event()
    acks = _Acks(None, 4, wake)  # type: ignore[arg-type]
    for tag in (2, 3, 5):
        acks.ack(tag)
    assert acks.frames() == []  # 1 is missing
    acks.ack(1)
    (frame,) = acks.frames()
    assert (frame.delivery_tag, frame.multiple) == (3, True)
    for tag in (5, 6, 7, 8):  # a gap (4) holding the pressure limit
        acks.ack(tag)
    frames = acks.frames()
    assert [(f.delivery_tag, f.multiple) for f in frames] == [
        (5, False),
        (6, False),
        (7, False),
        (8, False),
    ]
    acks.ack(4)
    acks.ack(9)
    (frame,) = acks.frames()
    assert (frame.delivery_tag, frame.multiple) == (9, True)
    assert acks.frames() == []
    acks.dead = True
    acks.ack(12)
    assert acks.frames() == []


def test_header_text_forms() -> None:
    assert header_text(None) == ""
    assert header_text(False) == "false"
    assert header_text(7) == "7"
    assert header_text(bytearray(b"ok")) == "ok"
    assert header_text([1, [2]]) == "[1,[2]]"


async def test_queue_with_other_arguments_is_a_subscribe_error(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    route = f"clash-{unique}"
    await pika.declare_queue(f"flowbridge.{route}", durable=False, auto_delete=True)
    adapter = await make_adapter()
    batches = adapter.subscribe(Subscription(route, ("k",), durable=True))
    with pytest.raises(ConnectError, match="PRECONDITION_FAILED"):
        await anext(batches)
    assert adapter.health().state is ConnState.CONNECTED  # only that route failed


async def test_deleted_queue_is_declared_again(
    make_adapter: MakeAdapter, pika: aio_pika.abc.AbstractChannel, unique: str
) -> None:
    adapter = await make_adapter()
    route = f"deleted-{unique}"
    batches = adapter.subscribe(Subscription(route, (f"{unique}.del",), durable=True))
    pending = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.3)
    await pika.queue_delete(f"flowbridge.{route}")  # the broker cancels the consumer
    async with asyncio.timeout(5):
        while True:
            await publish_native(pika, f"{unique}.del", b"again")
            done, _ = await asyncio.wait({pending}, timeout=0.2)
            if done:
                break
    (delivery, *_) = pending.result()
    assert delivery.message.payload == b"again"
    assert adapter.health().ok
    await batches.aclose()
    await pika.queue_delete(f"flowbridge.{route}")
