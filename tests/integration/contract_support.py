"""Helpers of the adapter contract suite: a background reader of an adapter's subscription and
one native client per protocol, reduced to what the contract compares: the payload and the
named fields read from their native carriers (NATS headers, MQTT 5 properties, AMQP basic
properties, Kafka record headers and timestamp)."""

from __future__ import annotations

import abc
import asyncio
import base64
import calendar
import contextlib
import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import nats
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowbridge.adapters.base import Adapter, Delivery, Subscription
from tests.support.brokers import Mosquitto, host_port

PROBE = b"probe:"
"""Payload prefix of warm-up messages: acked on sight and left out of every comparison."""

# What a native publisher puts into its protocol's carriers (see native publish below).
NATIVE_CONTENT_TYPE = "text/plain"
NATIVE_CORRELATION = b"native-corr"
NATIVE_MESSAGE_ID = "native-mid"
NATIVE_HEADER = ("x-native", "yes")


@dataclass(slots=True)
class NativeMsg:
    """A message as a native client saw it, named fields read from their native carriers."""

    payload: bytes
    content_type: str | None = None
    correlation_id: bytes | None = None
    reply_to: str | None = None
    message_id: str | None = None
    timestamp: float | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "content_type": self.content_type,
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "message_id": self.message_id,
            "timestamp": self.timestamp,
        }


def iso_seconds(text: str | None) -> float | None:
    if text is None:
        return None
    dt = datetime.datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


class Reader:
    """Consumes an adapter's subscription in the background, as a route would.

    Probes are acked and counted apart; other deliveries are kept (and acked when
    ``auto_ack``).  An error ending the iteration is raised by the next wait.
    """

    def __init__(self, adapter: Adapter, sub: Subscription, *, auto_ack: bool = True) -> None:
        self.adapter = adapter
        self.sub = sub
        self.auto_ack = auto_ack
        self.got: list[Delivery] = []
        self.acked = 0  # deliveries of ``got`` acked so far (in order)
        self.probes = 0
        self.peak_unacked = 0
        self.changed = asyncio.Event()
        self.error: BaseException | None = None
        self.ended = False
        self.task = asyncio.create_task(self._run(), name=f"contract-reader-{sub.route}")

    async def _run(self) -> None:
        try:
            async for batch in self.adapter.subscribe(self.sub):
                for d in batch:
                    if d.message.payload.startswith(PROBE):
                        d.ack()
                        self.probes += 1
                        continue
                    self.got.append(d)
                    if self.auto_ack:
                        d.ack()
                        self.acked += 1
                self.peak_unacked = max(self.peak_unacked, len(self.got) - self.acked)
                self.changed.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.ended = True
            self.changed.set()

    def ack_all(self) -> None:
        for d in self.got[self.acked :]:
            d.ack()
        self.acked = len(self.got)

    def payloads(self) -> list[bytes]:
        return [d.message.payload for d in self.got]

    def _check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"subscription of {self.sub.route} failed") from self.error

    async def _changed(self, within: float) -> None:
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), within)

    async def warm(
        self, publish: Callable[[bytes], Awaitable[object]], within: float = 15.0
    ) -> None:
        """Publish probes until one arrives: the subscription is then live on the broker."""
        deadline = asyncio.get_running_loop().time() + within
        i = 0
        while self.probes == 0:
            self._check()
            if self.ended:
                raise AssertionError(f"subscription of {self.sub.route} ended while warming up")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no probe came through {self.sub.route} in {within}s")
            await publish(PROBE + b"%d" % i)
            i += 1
            await self._changed(0.3)

    async def wait_for(self, n: int, within: float = 10.0) -> list[Delivery]:
        deadline = asyncio.get_running_loop().time() + within
        while len(self.got) < n:
            self._check()
            if self.ended:
                raise AssertionError(f"subscription ended after {len(self.got)} of {n}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(self.got)} of {n} deliveries within {within}s")
            await self._changed(0.2)
        self._check()
        return self.got

    async def settle(self, quiet: float = 0.5) -> None:
        """Return once nothing new arrived for ``quiet`` seconds."""
        while True:
            before = len(self.got)
            await asyncio.sleep(quiet)
            self._check()
            if len(self.got) == before:
                return

    async def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# ---------------------------------------------------------------------------- native clients


class Native(abc.ABC):
    """A native client of one protocol: reads one topic (started before publishing) and
    publishes to it.  ``take`` leaves probes out."""

    @abc.abstractmethod
    async def open(self, topic: str) -> None: ...

    @abc.abstractmethod
    async def take(self, n: int, within: float = 10.0) -> list[NativeMsg]: ...

    @abc.abstractmethod
    async def publish(self, topic: str, payloads: list[bytes], *, fields: bool = False) -> None:
        """Publish in order; with ``fields`` every message also carries the NATIVE_*
        values (and ``reply_to``) in its protocol's native carriers where it has them."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class _Queue(Native):
    """A native reader whose client pushes into a bounded queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[NativeMsg] = asyncio.Queue(maxsize=10_000)

    def push(self, msg: NativeMsg) -> None:
        if not msg.payload.startswith(PROBE):
            self.queue.put_nowait(msg)  # QueueFull fails the test: never silently dropped

    async def take(self, n: int, within: float = 10.0) -> list[NativeMsg]:
        out: list[NativeMsg] = []
        async with asyncio.timeout(within):
            while len(out) < n:
                out.append(await self.queue.get())
        return out

    def extra(self) -> int:
        return self.queue.qsize()


class NatsNative(_Queue):
    """nats-py on core NATS; the reply subject is the reply_to carrier."""

    def __init__(self, url: str, reply_to: str) -> None:
        super().__init__()
        self.url = url
        self.reply_to = reply_to
        self.nc: NatsClient | None = None

    async def client(self) -> NatsClient:
        if self.nc is None:
            self.nc = await nats.connect(self.url, allow_reconnect=False)
        return self.nc

    @staticmethod
    def view(data: bytes, headers: dict[str, str] | None, reply: str | None) -> NativeMsg:
        h = headers or {}
        corr = h.get("Correlation-Id")
        if corr is not None and h.get("Correlation-Id-Encoding") == "base64":
            corr_bytes: bytes | None = base64.b64decode(corr)
        else:
            corr_bytes = corr.encode() if corr is not None else None
        return NativeMsg(
            data,
            content_type=h.get("Content-Type"),
            correlation_id=corr_bytes,
            reply_to=reply or None,
            message_id=h.get("Nats-Msg-Id"),
            timestamp=iso_seconds(h.get("Timestamp")),
        )

    async def open(self, topic: str) -> None:
        nc = await self.client()

        async def on_msg(m: Msg) -> None:
            self.push(self.view(m.data, m.headers, m.reply))

        await nc.subscribe(topic, cb=on_msg)
        await nc.flush()

    def native_headers(self) -> dict[str, str]:
        return {
            "Content-Type": NATIVE_CONTENT_TYPE,
            "Correlation-Id": NATIVE_CORRELATION.decode(),
            "Nats-Msg-Id": NATIVE_MESSAGE_ID,
            NATIVE_HEADER[0]: NATIVE_HEADER[1],
        }

    async def publish(self, topic: str, payloads: list[bytes], *, fields: bool = False) -> None:
        nc = await self.client()
        for p in payloads:
            if fields:
                await nc.publish(topic, p, reply=self.reply_to, headers=self.native_headers())
            else:
                await nc.publish(topic, p)
        await nc.flush()

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class JetStreamNative(NatsNative):
    """nats-py JetStream: reads what the stream stored, publishes with a JetStream ack."""

    def __init__(self, url: str, reply_to: str, stream: str) -> None:
        super().__init__(url, reply_to)
        self.stream = stream
        self.seq = 0

    async def open(self, topic: str) -> None:
        await self.client()

    async def take(self, n: int, within: float = 10.0) -> list[NativeMsg]:
        jsm = (await self.client()).jsm()
        out: list[NativeMsg] = []
        async with asyncio.timeout(within):
            while len(out) < n:
                try:
                    raw = await jsm.get_msg(self.stream, self.seq + 1)
                except NotFoundError:
                    await asyncio.sleep(0.05)
                    continue
                self.seq += 1
                data = raw.data or b""
                if not data.startswith(PROBE):
                    out.append(self.view(data, raw.headers, None))
        return out

    def extra(self) -> int:
        return 0

    async def publish(self, topic: str, payloads: list[bytes], *, fields: bool = False) -> None:
        js = (await self.client()).jetstream()
        for p in payloads:
            await js.publish(topic, p, headers=self.native_headers() if fields else None)


class MqttNative(_Queue):
    def __init__(self, url: str, version: str, reply_to: str, client_id: str) -> None:
        super().__init__()
        self.host, self.port = host_port(url, 1883)
        self.v5 = version == "5"
        self.reply_to = reply_to
        self.client_id = client_id
        self.stack = contextlib.AsyncExitStack()
        self.mqtt: aiomqtt.Client | None = None
        self.task: asyncio.Task[None] | None = None

    async def client(self) -> aiomqtt.Client:
        if self.mqtt is None:
            protocol = aiomqtt.ProtocolVersion.V5 if self.v5 else aiomqtt.ProtocolVersion.V311
            kw: dict[str, Any] = {} if self.v5 else {"clean_session": True}
            client = aiomqtt.Client(
                self.host, self.port, identifier=self.client_id, protocol=protocol, **kw
            )
            self.mqtt = await self.stack.enter_async_context(client)
        return self.mqtt

    @staticmethod
    def view(m: aiomqtt.Message) -> NativeMsg:
        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
        props = m.properties
        msg = NativeMsg(payload)
        if props is None:
            return msg
        msg.content_type = getattr(props, "ContentType", None)
        msg.correlation_id = getattr(props, "CorrelationData", None)
        msg.reply_to = getattr(props, "ResponseTopic", None)
        user = dict(getattr(props, "UserProperty", []))
        msg.message_id = user.get("message-id")
        msg.timestamp = iso_seconds(user.get("timestamp"))
        return msg

    async def open(self, topic: str) -> None:
        client = await self.client()
        await client.subscribe(topic, qos=1)

        async def pump() -> None:
            async for m in client.messages:
                self.push(self.view(m))

        self.task = asyncio.create_task(pump())

    async def publish(self, topic: str, payloads: list[bytes], *, fields: bool = False) -> None:
        client = await self.client()
        props = None
        if fields and self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ContentType = NATIVE_CONTENT_TYPE
            props.CorrelationData = NATIVE_CORRELATION
            props.ResponseTopic = self.reply_to
            props.UserProperty = [("message-id", NATIVE_MESSAGE_ID), NATIVE_HEADER]
        for p in payloads:
            await client.publish(topic, p, qos=1, properties=props)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.stack.aclose()


class AmqpNative(_Queue):
    """aio-pika on the exchange the adapter publishes to (amq.topic)."""

    def __init__(self, url: str, reply_to: str) -> None:
        super().__init__()
        self.url = url
        self.reply_to = reply_to
        self.conn: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def chan(self) -> aio_pika.abc.AbstractChannel:
        if self.channel is None:
            self.conn = conn = await aio_pika.connect(self.url)
            self.channel = await conn.channel()
        return self.channel

    @staticmethod
    def view(m: aio_pika.abc.AbstractIncomingMessage) -> NativeMsg:
        ts = m.timestamp
        stamp = None
        if ts is not None:
            stamp = (
                float(calendar.timegm(ts.utctimetuple())) if ts.tzinfo is None else ts.timestamp()
            )
        corr = m.correlation_id
        # Not UTF-8 or over 255 bytes: the correlation id travels as a byte-array header.
        raw = (m.headers or {}).get("x-correlation-id")
        if corr is not None:
            corr_bytes: bytes | None = corr.encode()
        else:
            corr_bytes = bytes(raw) if isinstance(raw, bytes | bytearray) else None
        return NativeMsg(
            m.body,
            content_type=m.content_type,
            correlation_id=corr_bytes,
            reply_to=m.reply_to,
            message_id=m.message_id,
            timestamp=stamp,
        )

    async def open(self, topic: str) -> None:
        ch = await self.chan()
        exchange = await ch.get_exchange("amq.topic")
        queue = await ch.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=topic)

        async def on_msg(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.push(self.view(m))

        await queue.consume(on_msg, no_ack=True)

    async def publish(self, topic: str, payloads: list[bytes], *, fields: bool = False) -> None:
        exchange = await (await self.chan()).get_exchange("amq.topic")
        for p in payloads:
            if fields:
                msg = aio_pika.Message(
                    p,
                    content_type=NATIVE_CONTENT_TYPE,
                    correlation_id=NATIVE_CORRELATION.decode(),
                    reply_to=self.reply_to,
                    message_id=NATIVE_MESSAGE_ID,
                    headers={NATIVE_HEADER[0]: NATIVE_HEADER[1]},
                )
            else:
                msg = aio_pika.Message(p)
            await exchange.publish(msg, routing_key=topic)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class KafkaNative(Native):
    """aiokafka: reads the topic from the start (no group), produces with acks=all."""

    def __init__(self, url: str, reply_to: str) -> None:
        self.bootstrap = url.removeprefix("kafka://")
        self.reply_to = reply_to
        self.consumer: AIOKafkaConsumer | None = None
        self.pending: list[NativeMsg] = []

    async def open(self, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
            metadata_max_age_ms=500,
        )
        await self.consumer.start()

    @staticmethod
    def view(rec: Any) -> NativeMsg:
        h: dict[str, bytes] = {}
        for name, value in rec.headers or ():
            h.setdefault(name, value)

        def text(name: str) -> str | None:
            v = h.get(name)
            return v.decode() if v is not None else None

        return NativeMsg(
            rec.value or b"",
            content_type=text("content-type"),
            correlation_id=h.get("correlation-id"),
            reply_to=text("reply-to"),
            message_id=text("message-id"),
            timestamp=rec.timestamp / 1000 if rec.timestamp is not None else None,
        )

    async def take(self, n: int, within: float = 10.0) -> list[NativeMsg]:
        assert self.consumer is not None
        async with asyncio.timeout(within):
            while len(self.pending) < n:
                for records in (await self.consumer.getmany(timeout_ms=200)).values():
                    for rec in records:
                        msg = self.view(rec)
                        if not msg.payload.startswith(PROBE):
                            self.pending.append(msg)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    async def publish(self, topic: str, payloads: list[bytes], *, fields: bool = False) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        headers = None
        if fields:
            headers = [
                ("content-type", NATIVE_CONTENT_TYPE.encode()),
                ("correlation-id", NATIVE_CORRELATION),
                ("reply-to", self.reply_to.encode()),
                ("message-id", NATIVE_MESSAGE_ID.encode()),
                (NATIVE_HEADER[0], NATIVE_HEADER[1].encode()),
            ]
        try:
            for p in payloads:
                await producer.send_and_wait(topic, p, headers=headers)
        finally:
            await producer.stop()

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


class LimitedMosquitto(Mosquitto):
    """A Mosquitto of the test's own that announces a Maximum Packet Size (MQTT 5)."""

    def __init__(self, max_packet_size: int) -> None:
        super().__init__()
        self.max_packet_size = max_packet_size

    def command(self) -> list[str]:
        cmd = super().command()
        conf = Path(cmd[-1])
        conf.write_text(conf.read_text() + f"max_packet_size {self.max_packet_size}\n")
        return cmd
