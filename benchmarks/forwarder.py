"""The smallest NATS -> Kafka forwarder: ``python -m benchmarks.forwarder NATS KAFKA SUBJECT
TOPIC``.  nats-py subscription, one aiokafka ``send()`` per message (acks=1, no linger, no
compression, no headers): the latency floor a bridge through these two client libraries has,
for the ``kafka-latency`` suite.  Not a bridge: no acks, no loss accounting."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from urllib.parse import urlsplit

import nats
from aiokafka import AIOKafkaProducer
from nats.aio.msg import Msg


async def forward(nats_url: str, kafka: str, subject: str, topic: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=urlsplit(kafka).netloc or kafka,
        acks=1,
        linger_ms=0,
        enable_idempotence=False,
    )
    await producer.start()
    nc = await nats.connect(nats_url)

    async def on_msg(msg: Msg) -> None:
        await producer.send(topic, msg.data, partition=0)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await nc.close()
        await producer.stop()


def main() -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(forward(*sys.argv[1:5]))


if __name__ == "__main__":
    main()
