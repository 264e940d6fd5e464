"""Interop harness: flowbridge as users run it (``flowbridge run -c FILE`` in its own
process) between native clients of each protocol."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aio_pika
import aiomqtt
import nats
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


class BridgeProcess:
    def __init__(self, mapping: str, workdir: Path) -> None:
        self.path = workdir / "mapping.yaml"
        self.path.write_text(textwrap.dedent(mapping))
        self.logfile = workdir / "bridge.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.args: list[str] = []  # extra `flowbridge run` options

    def start(self) -> None:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flowbridge", "run", "-c", str(self.path), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("bridge did not stop on SIGTERM:\n" + self.log()) from None
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Native(Protocol):
    received: list[tuple[str, bytes]]

    async def subscribe(self, filters: list[str]) -> None: ...
    async def publish(self, topic: str, payload: bytes) -> None: ...
    async def close(self) -> None: ...


class NatsNative:
    def __init__(self, url: str) -> None:
        self.url = url
        self.received: list[tuple[str, bytes]] = []
        self.nc: Any = None

    async def open(self) -> NatsNative:
        self.nc = await nats.connect(self.url)
        return self

    async def subscribe(self, filters: list[str]) -> None:
        async def cb(msg: Any) -> None:
            self.received.append((msg.subject, msg.data))

        for f in filters:
            await self.nc.subscribe(f, cb=cb)
        await self.nc.flush()

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.nc.publish(topic, payload)

    async def close(self) -> None:
        await self.nc.drain()


class MqttNative:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 1883
        self.received: list[tuple[str, bytes]] = []
        self.client: aiomqtt.Client | None = None
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> MqttNative:
        self.client = aiomqtt.Client(
            self.host,
            self.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            max_queued_incoming_messages=0,
        )
        await self.client.__aenter__()
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self.client is not None
        async for msg in self.client.messages:
            self.received.append((msg.topic.value, bytes(msg.payload)))  # type: ignore[arg-type]

    async def subscribe(self, filters: list[str]) -> None:
        assert self.client is not None
        for f in filters:
            await self.client.subscribe(f, qos=1)

    async def publish(self, topic: str, payload: bytes) -> None:
        assert self.client is not None
        await self.client.publish(topic, payload, qos=1)

    async def close(self) -> None:
        if self.reader:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader
        if self.client:
            await self.client.__aexit__(None, None, None)


class AmqpNative:
    def __init__(self, url: str) -> None:
        self.url = url
        self.received: list[tuple[str, bytes]] = []
        self.conn: Any = None
        self.channel: Any = None
        self.exchange: Any = None

    async def open(self) -> AmqpNative:
        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel()
        self.exchange = await self.channel.get_exchange("amq.topic")
        return self

    async def subscribe(self, filters: list[str]) -> None:
        queue = await self.channel.declare_queue(exclusive=True)
        for f in filters:
            await queue.bind(self.exchange, routing_key=f)

        async def cb(msg: Any) -> None:
            self.received.append((msg.routing_key, msg.body))

        await queue.consume(cb, no_ack=True)

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.exchange.publish(aio_pika.Message(payload), routing_key=topic)

    async def close(self) -> None:
        await self.conn.close()


class KafkaNative:
    def __init__(self, url: str) -> None:
        self.bootstrap = urlsplit(url).netloc
        self.received: list[tuple[str, bytes]] = []
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> KafkaNative:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await self.producer.start()
        return self

    async def create(self, topics: list[str]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 1, 1) for t in topics])
        finally:
            await admin.close()

    async def subscribe(self, filters: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=f"native-{time.monotonic_ns()}",
            auto_offset_reset="earliest",
            metadata_max_age_ms=500,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )
        self.consumer.subscribe(pattern="|".join(f"(?:{f})" for f in filters))
        await self.consumer.start()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.consumer is not None
        async for rec in self.consumer:
            self.received.append((rec.topic, rec.value or b""))

    async def publish(self, topic: str, payload: bytes) -> None:
        assert self.producer is not None
        await self.producer.send(topic, payload)

    async def flush(self) -> None:
        assert self.producer is not None
        await self.producer.flush()

    async def close(self) -> None:
        if self.reader:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader
        if self.consumer:
            await self.consumer.stop()
        if self.producer:
            await self.producer.stop()


async def open_native(protocol: str, url: str) -> Any:
    cls = {"nats": NatsNative, "mqtt": MqttNative, "amqp": AmqpNative, "kafka": KafkaNative}
    return await cls[protocol](url).open()


async def wait_for(
    cond: Callable[[], bool], within: float, what: str, log: Callable[[], str]
) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; bridge log:\n{log()[-4000:]}")
        await asyncio.sleep(0.05)
