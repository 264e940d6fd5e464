"""NATS and MQTT 5 requesters answered by a standard AMQP RPC responder through the bridge.

The responder is the RabbitMQ tutorial's aio-pika RPC server: it consumes a queue and answers
on the default exchange with ``routing_key=request.reply_to`` and the request's correlation
id.  The bridge's ``rpc`` target publishes requests with RabbitMQ direct reply-to and a
correlation id of its own; its ``replies`` source hands the replies back under the original
reply-to (a NATS inbox, an MQTT response topic) with the original correlation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiomqtt
import nats
import nats.errors
import pytest
from aio_pika.abc import AbstractIncomingMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.interop.harness import wait_for
from tests.interop.test_ops_http import HttpBridge


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@dataclass
class Responder:
    """What the tutorial server saw: the reply-to and correlation id of every request."""

    seen: list[tuple[str | None, str | None]] = field(default_factory=list)
    hold: Callable[[], Awaitable[None]] | None = None  # awaited before answering


async def serve(channel: aio_pika.abc.AbstractChannel, queue_name: str, r: Responder) -> None:
    # The RabbitMQ tutorial's rpc_server.py (aio-pika), with an auto-delete queue so that the
    # shared broker is left clean.
    exchange = channel.default_exchange
    queue = await channel.declare_queue(queue_name, auto_delete=True)
    async with queue.iterator() as qiterator:
        message: AbstractIncomingMessage
        async for message in qiterator:
            try:
                async with message.process(requeue=False):
                    assert message.reply_to is not None
                    r.seen.append((message.reply_to, message.correlation_id))
                    if r.hold is not None:
                        await r.hold()
                    n = int(message.body.decode())
                    response = str(fib(n)).encode()
                    await exchange.publish(
                        aio_pika.Message(body=response, correlation_id=message.correlation_id),
                        routing_key=message.reply_to,
                    )
            except Exception:
                logging.exception("Processing error for message %r", message)


@contextlib.asynccontextmanager
async def responder(
    amqp_url: str, queue_name: str, r: Responder
) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel()
    # The queue exists before the bridge's first request (declared by serve, awaited here).
    await channel.declare_queue(queue_name, auto_delete=True)
    task = asyncio.ensure_future(serve(channel, queue_name, r))
    try:
        yield channel
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await conn.close()


def mapping(p: str, nats_url: str, mqtt_url: str, amqp_url: str) -> str:
    return f"""
brokers:
  core: {{url: "{nats_url}"}}
  edge: {{url: "{mqtt_url}", options: {{version: "5", client_id: fb-rpc-{p}}}}}
  rabbit: {{url: "{amqp_url}"}}
routes:
  - name: nats-requests-{p}
    from: {{broker: core, filter: "svc.{p}.fib"}}
    to: [{{broker: rabbit, topic: "rpc_queue_{p}", options: {{exchange: "", rpc: true}}}}]
  - name: nats-slow-{p}
    from: {{broker: core, filter: "svc.{p}.slow"}}
    to:
      - {{broker: rabbit, topic: "slow_{p}", options: {{exchange: "", rpc: true, rpc_timeout: 1}}}}
  - name: nats-unanswered-{p}
    from: {{broker: core, filter: "svc.{p}.nobody"}}
    to: [{{broker: rabbit, options: {{rpc: true, rpc_timeout: 1}}}}]
  - name: nats-replies-{p}
    from: {{broker: rabbit, filter: "_INBOX.#", options: {{replies: true}}}}
    to: [{{broker: core}}]
  - name: mqtt-requests-{p}
    from: {{broker: edge, filter: "rpc/{p}/fib"}}
    to: [{{broker: rabbit, topic: "rpc_queue_{p}", options: {{exchange: "", rpc: true}}}}]
  - name: mqtt-replies-{p}
    from: {{broker: rabbit, filter: "resp.{p}.#", options: {{replies: true}}}}
    to: [{{broker: edge}}]
"""


async def first_answer(nc: nats.NATS, subject: str, bridge: HttpBridge) -> nats.aio.msg.Msg:
    """The first request may race the bridge's subscriptions: retry until one is answered."""
    for _ in range(60):
        try:
            return await nc.request(subject, b"1", timeout=0.5)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await asyncio.sleep(0.1)
    raise AssertionError("no answer through the bridge:\n" + bridge.log())


async def event_count(bridge: HttpBridge, event: str) -> float:
    value = await bridge.metric("flowbridge_broker_events_total", broker="rabbit", event=event)
    assert value is not None, f"no {event} metric; log:\n{bridge.log()}"
    return value


async def until_event(bridge: HttpBridge, event: str, at_least: float, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (n := await event_count(bridge, event)) < at_least:
        if loop.time() > deadline:
            raise AssertionError(f"{event} is {n}, expected >= {at_least}:\n{bridge.log()}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def test_nats_requests_answered_by_amqp_rpc_server(
    nats_url: str, mqtt_url: str, amqp_url: str, unique: str, tmp_path: Path, nc: nats.NATS
) -> None:
    p = f"nr{unique}"
    bridge = HttpBridge(mapping(p, nats_url, mqtt_url, amqp_url), tmp_path)
    r = Responder()
    async with responder(amqp_url, f"rpc_queue_{p}", r):
        bridge.start()
        try:
            first = await first_answer(nc, f"svc.{p}.fib", bridge)
            assert first.data == b"1"
            # Concurrent requests, each with its own inbox: every one gets its own answer.
            ns = list(range(2, 32))
            replies = await asyncio.gather(
                *(nc.request(f"svc.{p}.fib", str(n).encode(), timeout=5) for n in ns)
            )
            assert [m.data for m in replies] == [str(fib(n)).encode() for n in ns]
            # The responder saw direct reply-to and correlation ids of the bridge's own, all
            # distinct (nats-py's requests carry none).
            assert all(
                reply_to is not None and reply_to.startswith("amq.rabbitmq.reply-to")
                for reply_to, _ in r.seen
            )
            cids = [cid for _, cid in r.seen[-len(ns) :]]
            assert None not in cids
            assert len(set(cids)) == len(ns)
            assert await event_count(bridge, "rpc_replies") == len(r.seen)
            assert await event_count(bridge, "rpc_unknown_replies") == 0
            assert await event_count(bridge, "rpc_unrouted_replies") == 0
            assert bridge.stop() == 0
        finally:
            if bridge.alive():
                bridge.kill()


async def test_mqtt5_requests_answered_by_amqp_rpc_server(
    nats_url: str, mqtt_url: str, amqp_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"mr{unique}"
    bridge = HttpBridge(mapping(p, nats_url, mqtt_url, amqp_url), tmp_path)
    host, _, port = mqtt_url.split("://", 1)[1].rstrip("/").rpartition(":")
    requester = aiomqtt.Client(host, int(port), protocol=aiomqtt.ProtocolVersion.V5)
    got: dict[bytes, bytes] = {}
    arrived = asyncio.Event()

    async def read() -> None:
        async for msg in requester.messages:
            corr = getattr(msg.properties, "CorrelationData", None)
            assert str(msg.topic) == f"resp/{p}/client1"
            got[bytes(corr or b"")] = bytes(msg.payload)  # type: ignore[arg-type]
            arrived.set()

    async def request(n: int, corr: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"resp/{p}/client1"
        props.CorrelationData = corr
        await requester.publish(f"rpc/{p}/fib", str(n).encode(), qos=1, properties=props)

    r = Responder()
    async with responder(amqp_url, f"rpc_queue_{p}", r), requester:
        await requester.subscribe(f"resp/{p}/#", qos=1)
        reading = asyncio.ensure_future(read())
        bridge.start()
        try:
            await wait_for(
                lambda: f"route mqtt-replies-{p}" in bridge.log(), 30, "start", bridge.log
            )
            for i in range(60):  # the bridge's MQTT subscription may not be active yet
                await request(1, f"warm-{i}".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 0.5)
                    break
            assert got, bridge.log()
            # Binary correlation data (not UTF-8) comes back byte for byte, per request.
            wanted = {b"\xff\x00corr-" + bytes([n]): n for n in range(2, 22)}
            await asyncio.gather(*(request(n, corr) for corr, n in wanted.items()))
            await wait_for(lambda: wanted.keys() <= got.keys(), 15, "replies", bridge.log)
            answers = {k: v for k, v in got.items() if not k.startswith(b"warm-")}
            assert answers == {corr: str(fib(n)).encode() for corr, n in wanted.items()}
            assert all(cid is not None and cid.startswith("fb-") for _, cid in r.seen)
            assert bridge.stop() == 0
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            if bridge.alive():
                bridge.kill()


async def test_unanswered_and_late_requests_expire_and_are_counted(
    nats_url: str, mqtt_url: str, amqp_url: str, unique: str, tmp_path: Path, nc: nats.NATS
) -> None:
    p = f"nx{unique}"
    bridge = HttpBridge(mapping(p, nats_url, mqtt_url, amqp_url), tmp_path)
    release = asyncio.Event()
    slow = Responder(hold=release.wait)
    fast = Responder()
    async with responder(amqp_url, f"rpc_queue_{p}", fast), responder(amqp_url, f"slow_{p}", slow):
        bridge.start()
        try:
            await first_answer(nc, f"svc.{p}.fib", bridge)
            requests = await event_count(bridge, "rpc_requests")
            # Nobody is bound to the request's routing key: the requester's own timeout says
            # so, and the bridge forgets the request after rpc_timeout (1 s), counting it.
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(f"svc.{p}.nobody", b"5", timeout=0.5)
            await until_event(bridge, "rpc_expired", 1, within=10)
            assert "got no reply within 1s" in bridge.log()
            # A responder that answers after the bridge gave up: its replies are unknown,
            # counted, and logged once.
            late = await asyncio.gather(
                nc.request(f"svc.{p}.slow", b"6", timeout=0.5),
                nc.request(f"svc.{p}.slow", b"7", timeout=0.5),
                return_exceptions=True,
            )
            assert all(isinstance(e, nats.errors.TimeoutError) for e in late), late
            await until_event(bridge, "rpc_expired", 3, within=10)
            release.set()
            await until_event(bridge, "rpc_unknown_replies", 2, within=10)
            assert len(slow.seen) == 2
            log = bridge.log()
            assert log.count("answers no pending RPC request") == 1
            assert log.count("got no reply within") == 1
            assert await event_count(bridge, "rpc_requests") == requests + 3
            # Still answering afterwards.
            answer = await nc.request(f"svc.{p}.fib", b"10", timeout=5)
            assert answer.data == b"55"
            assert bridge.stop() == 0
        finally:
            release.set()
            if bridge.alive():
                bridge.kill()
