"""The AMQP adapter's RPC target and replies source against the shared RabbitMQ, answered by
an aio-pika responder the test drives: replies, reconnects, a full map, stray replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from flowbridge.adapters.amqp import (
    AmqpAdapter,
    AmqpBrokerOptions,
    AmqpSourceOptions,
    AmqpTargetOptions,
)
from flowbridge.adapters.base import Backoff, Delivery, Message, Subscription
from flowbridge.errors import PublishError
from tests.integration.test_amqp_adapter import close_from_broker


class HeldResponder:
    """An RPC server whose answers the test releases one request at a time."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.requests: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def serve(self, queue_name: str) -> None:
        queue = await self.channel.declare_queue(queue_name, auto_delete=True)
        await queue.consume(self.requests.put, no_ack=True)

    async def answer(self, body: bytes | None = None) -> AbstractIncomingMessage:
        req = await asyncio.wait_for(self.requests.get(), 10)
        assert req.reply_to is not None
        await self.channel.default_exchange.publish(
            aio_pika.Message(body or b"re:" + req.body, correlation_id=req.correlation_id),
            routing_key=req.reply_to,
        )
        return req


async def until(cond: Callable[[], bool], what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def responder(amqp_url: str, unique: str) -> AsyncIterator[HeldResponder]:
    conn = await aio_pika.connect(amqp_url)
    r = HeldResponder(await conn.channel())
    await r.serve(f"rpc-{unique}")
    yield r
    await conn.close()


async def adapter_for(amqp_url: str, unique: str, **options: object) -> AmqpAdapter:
    adapter = AmqpAdapter(
        f"rabbit-{unique}",
        amqp_url,
        AmqpBrokerOptions.model_validate({"connection_name": f"fbrpc-{unique}", **options}),
        Backoff(initial=0.05, maximum=0.5, attempts=20),
    )
    await adapter.connect()
    return adapter


def replies_of(adapter: AmqpAdapter, *filters: str, max_in_flight: int = 1000) -> Subscription:
    return Subscription(
        "replies",
        filters,
        durable=False,
        max_in_flight=max_in_flight,
        options=AmqpSourceOptions(replies=True),
    )


RPC = AmqpTargetOptions(exchange="", rpc=True)


def request(unique: str, reply_to: str | None, corr: bytes | None = None) -> Message:
    return Message(f"rpc-{unique}", b"q", correlation_id=corr, reply_to=reply_to)


async def test_reply_comes_back_under_the_original_reply_to_and_correlation(
    amqp_url: str, unique: str, responder: HeldResponder
) -> None:
    adapter = await adapter_for(amqp_url, unique)
    batches = adapter.subscribe(replies_of(adapter, "_INBOX.#"))
    first = asyncio.ensure_future(anext(batches))
    try:
        assert (
            await adapter.publish(
                [request(unique, "_INBOX.a.b", b"\xff\x01")], confirm=True, options=RPC
            )
            is None
        )
        req = await responder.answer(b"42")
        assert req.reply_to is not None
        assert req.reply_to.startswith("amq.rabbitmq.reply-to")
        assert req.correlation_id is not None
        assert req.correlation_id.startswith("fb-")
        batch: list[Delivery] = await asyncio.wait_for(first, 10)
        [reply] = [d.message for d in batch]
        assert (reply.topic, reply.payload, reply.correlation_id) == (
            "_INBOX.a.b",
            b"42",
            b"\xff\x01",
        )
        # A message without a reply-to is no request: sent as it is, nothing awaited.
        await adapter.publish([request(unique, None, b"plain")], confirm=False, options=RPC)
        plain = await asyncio.wait_for(responder.requests.get(), 10)
        assert (plain.reply_to, plain.correlation_id) == (None, "plain")
        assert adapter.counters() == {
            "rpc_requests": 1,
            "rpc_replies": 1,
            "rpc_unknown_replies": 0,
            "rpc_unrouted_replies": 0,
            "rpc_overflow_replies": 0,
            "rpc_expired": 0,
            "rpc_evicted": 0,
        }
    finally:
        await batches.aclose()
        await adapter.close()


async def test_reconnect_counts_lost_requests_and_consumes_again(
    amqp_url: str, unique: str, responder: HeldResponder
) -> None:
    adapter = await adapter_for(amqp_url, unique)
    batches = adapter.subscribe(replies_of(adapter, "#"))
    nxt = asyncio.ensure_future(anext(batches))
    try:
        await adapter.publish([request(unique, "r.before")], confirm=True, options=RPC)
        held = await asyncio.wait_for(responder.requests.get(), 10)
        await close_from_broker(f"fbrpc-{unique}")
        # The request's reply could only reach the channel that is gone: counted as expired.
        await until(lambda: adapter.counters()["rpc_expired"] == 1, "the lost request")
        await until(lambda: adapter.health().reconnects == 1, "the reconnect")
        assert await adapter.wait_connected(10)
        # Answering the old request now reaches nobody (RabbitMQ drops it).
        assert held.reply_to is not None
        await responder.channel.default_exchange.publish(
            aio_pika.Message(b"late", correlation_id=held.correlation_id),
            routing_key=held.reply_to,
        )
        # A new request goes out on a new channel that consumes its replies again.
        await adapter.publish([request(unique, "r.after")], confirm=True, options=RPC)
        await responder.answer(b"fresh")
        batch = await asyncio.wait_for(nxt, 10)
        assert [(d.message.topic, d.message.payload) for d in batch] == [("r.after", b"fresh")]
        counts = adapter.counters()
        assert (counts["rpc_requests"], counts["rpc_replies"]) == (2, 1)
        assert counts["rpc_unknown_replies"] == 0
    finally:
        await batches.aclose()
        await adapter.close()


async def test_full_map_unknown_unrouted_and_overflowing_replies_are_counted(
    amqp_url: str, unique: str, responder: HeldResponder
) -> None:
    adapter = await adapter_for(amqp_url, unique, rpc_max_pending=2)
    batches = adapter.subscribe(replies_of(adapter, "r.#", max_in_flight=1))
    first = asyncio.ensure_future(anext(batches))
    try:
        msgs = [request(unique, f"r.{i}") for i in range(3)]
        assert await adapter.publish(msgs, confirm=True, options=RPC) is None
        assert adapter.counters()["rpc_evicted"] == 1  # r.0 made room for r.2
        await responder.answer()  # r.0: nobody waits for it any more
        await until(lambda: adapter.counters()["rpc_unknown_replies"] == 1, "unknown reply")
        await responder.answer()  # r.1
        assert [d.message.topic for d in await asyncio.wait_for(first, 10)] == ["r.1"]
        # Nobody takes the next batch: one reply waits, the one after is counted.
        await adapter.publish([request(unique, "r.3")], confirm=True, options=RPC)
        await responder.answer()  # r.2
        await responder.answer()  # r.3
        await until(lambda: adapter.counters()["rpc_overflow_replies"] == 1, "overflow")
        assert [d.message.topic for d in await anext(batches)] == ["r.2"]
        # A reply-to no replies source reads.
        await adapter.publish([request(unique, "other.x")], confirm=True, options=RPC)
        await responder.answer()
        await until(lambda: adapter.counters()["rpc_unrouted_replies"] == 1, "unrouted reply")
        # A refused request (unroutable, mandatory) is dead-lettered, not awaited.
        refused = AmqpTargetOptions(exchange="", rpc=True, mandatory=True)
        outcome = await adapter.publish(
            [Message(f"nobody-{unique}", b"x", reply_to="r.9")], confirm=True, options=refused
        )
        assert outcome is not None
        assert isinstance(outcome[0], PublishError)
        assert len(adapter._rpc) == 0
        counts = adapter.counters()
        assert (counts["rpc_requests"], counts["rpc_replies"], counts["rpc_expired"]) == (6, 4, 0)
    finally:
        await batches.aclose()
        await adapter.close()


async def test_requests_without_answer_expire_on_their_timeout(
    amqp_url: str, unique: str, responder: HeldResponder
) -> None:
    adapter = await adapter_for(amqp_url, unique)
    batches = adapter.subscribe(replies_of(adapter, "#"))
    try:
        quick = AmqpTargetOptions(exchange="", rpc=True, rpc_timeout=0.2)
        await adapter.publish([request(unique, "r.slow")], confirm=False, options=quick)
        await until(lambda: adapter.counters()["rpc_expired"] == 1, "expiry", within=5)
        assert len(adapter._rpc) == 0
        await responder.answer()
        await until(lambda: adapter.counters()["rpc_unknown_replies"] == 1, "unknown reply")
    finally:
        await batches.aclose()
        await adapter.close()
