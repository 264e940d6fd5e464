"""The smallest forwarders between NATS and Kafka, for the ``kafka-latency`` suite:
``python -m benchmarks.forwarder NATS KAFKA SUBJECT TOPIC [--from-kafka]``.

Into Kafka: a nats-py subscription, one aiokafka ``send()`` per message (acks=1, no linger,
no compression, no headers).  Out of Kafka (``--from-kafka``): an aiokafka consumer assigned
the topic's partition 0 (the benchmark's fetch wait), one nats-py ``publish()`` per record,
a flush per fetch.  The latency floor a bridge through these two client libraries has.  Not
a bridge: no acks, no loss accounting."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from urllib.parse import urlsplit

import nats
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from nats.aio.msg import Msg

from benchmarks.gen import KAFKA_FETCH_WAIT_MS


def _servers(kafka: str) -> str:
    return urlsplit(kafka).netloc or kafka


async def into_kafka(nats_url: str, kafka: str, subject: str, topic: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=_servers(kafka), acks=1, linger_ms=0, enable_idempotence=False
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


async def out_of_kafka(nats_url: str, kafka: str, subject: str, topic: str) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=_servers(kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        fetch_max_wait_ms=KAFKA_FETCH_WAIT_MS,
    )
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    nc = await nats.connect(nats_url)
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    await nc.publish(subject, rec.value or b"")
            if batch:
                await nc.flush()
    finally:
        await nc.close()
        await consumer.stop()


def main() -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    args = [a for a in sys.argv[1:] if a != "--from-kafka"]
    run = out_of_kafka if "--from-kafka" in sys.argv[1:] else into_kafka
    asyncio.run(run(*args[:4]))


if __name__ == "__main__":
    main()
