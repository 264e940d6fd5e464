"""Envelopes cross protocols byte for byte, with their fields on each target's native carriers
(native clients on both sides, flowbridge in its own process)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import nats
from aiokafka import AIOKafkaConsumer

from flowbridge.envelope import Envelope, Payload
from tests.interop.harness import BridgeProcess, wait_for


def _envelope(n: int) -> Envelope:
    return Envelope(
        send_to="/chat/room1",
        sender_name="msghandler",
        payloads=[Payload.direct("message", "text", f"Hello {n}!".encode())],
    )


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
    return host, int(port)


async def test_envelope_mqtt5_to_nats_to_amqp_to_kafka(
    nats_url: str, mqtt_url: str, amqp_url: str, kafka_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"env{unique}"
    bridge = BridgeProcess(
        f"""
brokers:
  edge: {{url: "{mqtt_url}", options: {{client_id: fb-env-{p}}}}}
  core: {{url: "{nats_url}"}}
  rabbit: {{url: "{amqp_url}"}}
  log: {{url: "{kafka_url}", options: {{session_timeout_ms: 6000, heartbeat_interval_ms: 1000}}}}
routes:
  - name: m2n-{p}
    from: {{broker: edge, filter: "{p}/#"}}
    to: [{{broker: core}}, {{broker: rabbit}}, {{broker: log}}]
""",
        tmp_path,
    )
    host, port = _host_port(mqtt_url)
    nc = await nats.connect(nats_url)
    got_nats: list[Any] = []

    async def on_nats(msg: Any) -> None:
        got_nats.append(msg)

    await nc.subscribe(f"{p}.>", cb=on_nats)
    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(await channel.get_exchange("amq.topic"), routing_key=f"{p}.#")
    got_amqp: list[Any] = []

    async def on_amqp(msg: Any) -> None:
        got_amqp.append(msg)

    await queue.consume(on_amqp, no_ack=True)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_url.split("://", 1)[1],
        group_id=f"native-{p}",
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
    )
    consumer.subscribe(pattern=rf"^{p}\..*")
    await consumer.start()
    got_kafka: list[Any] = []

    async def read_kafka() -> None:
        async for rec in consumer:
            got_kafka.append(rec)

    reading = asyncio.ensure_future(read_kafka())
    bridge.start()
    try:
        async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as mqtt:
            await wait_for(lambda: f"route m2n-{p}" in bridge.log(), 30, "start", bridge.log)
            sent: list[Envelope] = []
            for n in range(40):  # until the subscription is live, then a few more
                env = _envelope(n)
                sent.append(env)
                await mqtt.publish(f"{p}/chat", env.to_json(), qos=1)
                await asyncio.sleep(0.1)
                if len(got_nats) >= 3 and len(got_amqp) >= 3 and len(got_kafka) >= 3:
                    break
            await wait_for(lambda: len(got_kafka) >= 3, 30, "kafka", bridge.log)
        by_id = {e.msg_id: e for e in sent}
        msg = got_nats[-1]
        env = by_id[msg.headers["Nats-Msg-Id"]]
        assert msg.data == env.to_json()  # byte-identical
        assert msg.headers["Correlation-Id"] == env.correlation_id
        assert msg.headers["Content-Type"] == "application/json"
        amqp_msg = got_amqp[-1]
        env = by_id[amqp_msg.message_id]
        assert amqp_msg.body == env.to_json()
        assert amqp_msg.correlation_id == env.correlation_id
        assert amqp_msg.content_type == "application/json"
        rec = got_kafka[-1]
        headers = dict(rec.headers)
        env = by_id[headers["message-id"].decode()]
        assert rec.value == env.to_json()
        assert headers["correlation-id"].decode() == env.correlation_id
        assert rec.key == f"{p}/chat".encode()
        assert bridge.stop() == 0
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
        await consumer.stop()
        if bridge.alive():
            bridge.kill()
        await conn.close()
        await nc.close()
