"""smartsend on one protocol, smartreceive on another, flowbridge (its own process) between:
payload bytes identical, checksums verified, links fetched from the file server, reply topics
written for the receiving side.  And AMQP RPC answered over NATS."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import nats
import pytest

from flowbridge.fileserver import PlikStore
from flowbridge.smart import listen, smartsend
from tests.interop.harness import BridgeProcess, wait_for

KAFKA_OPTS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "metadata_max_age_ms": 500}
# topic/filter for (protocol): the sender's topic, the receiver's filter, the reply topic sent
# and how the receiver must see it.
NAMES = {
    "mqtt": ("{p}/img", "{p}/#", "{p}/replies/r1"),
    "nats": ("{p}.img", "{p}.>", "{p}.replies.r1"),
    "amqp": ("{p}.img", "{p}.#", "{p}.replies.r1"),
    "kafka": ("{p}.img", "{p}.#", "{p}.replies.r1"),
}


@pytest.fixture
async def store() -> AsyncIterator[PlikStore]:
    async with PlikStore() as s:
        yield s


@pytest.mark.parametrize(("src", "dst"), [("mqtt", "nats"), ("nats", "kafka"), ("amqp", "mqtt")])
async def test_smartsend_smartreceive_across_the_bridge(
    src: str,
    dst: str,
    nats_url: str,
    mqtt_url: str,
    amqp_url: str,
    kafka_url: str,
    unique: str,
    tmp_path: Path,
    store: PlikStore,
) -> None:
    urls = {"nats": nats_url, "mqtt": mqtt_url, "amqp": amqp_url, "kafka": kafka_url}
    p = f"sb{unique}"
    topic, _, reply = (n.format(p=p) for n in NAMES[src])
    _, dst_filter, dst_reply = (n.format(p=p) for n in NAMES[dst])
    opts = {"kafka": f", options: {KAFKA_OPTS}", "mqtt": f", options: {{client_id: fb-{p}}}"}
    bridge = BridgeProcess(
        f"""
brokers:
  src: {{url: "{urls[src]}"{opts.get(src, "")}}}
  dst: {{url: "{urls[dst]}"{opts.get(dst, "")}}}
routes:
  - name: smart-{p}
    from: {{broker: src, filter: "{NAMES[src][1].format(p=p)}"}}
    to: [{{broker: dst}}]
""",
        tmp_path,
    )
    image = os.urandom(2 * 1024 * 1024)  # over the 500,000-byte threshold: a link
    items = [("note", "héllo", "text"), ("photo", image, "image")]
    broker_options = KAFKA_OPTS if dst == "kafka" else None
    bridge.start()
    try:
        await wait_for(lambda: f"route smart-{p}" in bridge.log(), 30, "start", bridge.log)
        async with listen(
            urls[dst], dst_filter, fileserver=store.url, broker_options=broker_options
        ) as rx:
            sent = None
            got = None
            for _ in range(20):  # until the bridge's subscription is live end to end
                sent = await smartsend(
                    urls[src],
                    topic,
                    items,
                    fileserver=store.url,
                    reply_to=reply,
                    broker_options=KAFKA_OPTS if src == "kafka" else None,
                )
                try:
                    got = await rx.receive(timeout=3)
                    break
                except TimeoutError:
                    continue
            assert got is not None, bridge.log()
            assert sent is not None
            got_items, env = got
            assert [(n, t) for n, _, t in got_items] == [("note", "text"), ("photo", "image")]
            assert got_items[0][1] == "héllo"
            assert got_items[1][1] == image  # identical bytes; the checksum was verified
            assert [pl.transport for pl in env.payloads] == ["direct", "link"]
            assert env.msg_id == sent.msg_id
            assert env.correlation_id == sent.correlation_id
            assert env.reply_to == dst_reply  # written in the receiver's protocol
        assert bridge.stop() == 0
    finally:
        if bridge.alive():
            bridge.kill()


async def test_amqp_rpc_answered_over_nats(
    nats_url: str, amqp_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"ar{unique}"
    bridge = BridgeProcess(
        f"""
brokers:
  rabbit: {{url: "{amqp_url}"}}
  core: {{url: "{nats_url}"}}
routes:
  - name: rpc-{p}
    from: {{broker: rabbit, filter: "rpc.{p}.#"}}
    to: [{{broker: core}}]
  - name: rpc-replies-{p}
    from: {{broker: core, filter: "amq.>"}}
    # RPC clients wait on their own queue: replies go through the default exchange.
    to: [{{broker: rabbit, options: {{exchange: ""}}}}]
""",
        tmp_path,
    )
    nc = await nats.connect(nats_url)

    async def on_request(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    await nc.subscribe(f"rpc.{p}.>", cb=on_request)
    await nc.flush()
    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel()
    callback = await channel.declare_queue(exclusive=True)  # amq.gen-... as RPC clients do
    replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await callback.consume(replies.put, no_ack=True)
    exchange = await channel.get_exchange("amq.topic")
    bridge.start()
    try:
        await wait_for(lambda: f"route rpc-replies-{p}" in bridge.log(), 30, "start", bridge.log)
        answer = None
        for i in range(30):
            corr = str(uuid.uuid4())
            await exchange.publish(
                aio_pika.Message(f"ping{i}".encode(), correlation_id=corr, reply_to=callback.name),
                routing_key=f"rpc.{p}.clock",
            )
            try:
                answer = await asyncio.wait_for(replies.get(), 1.0)
                break
            except TimeoutError:
                continue
        assert answer is not None, bridge.log()
        assert answer.body == f"pong:ping{i}".encode()
        assert answer.correlation_id == corr  # the responder's copy of the request headers
        assert bridge.stop() == 0
    finally:
        if bridge.alive():
            bridge.kill()
        await conn.close()
        await nc.close()


async def test_message_over_nats_max_payload_is_offloaded(
    nats_url: str, mqtt_url: str, unique: str, tmp_path: Path, store: PlikStore
) -> None:
    p = f"of{unique}"
    bridge = BridgeProcess(
        f"""
bridge: {{fileserver: "{store.url}"}}
brokers:
  edge: {{url: "{mqtt_url}", options: {{client_id: fb-{p}}}}}
  core: {{url: "{nats_url}"}}
routes:
  - name: big-{p}
    from: {{broker: edge, filter: "{p}/#"}}
    to: [{{broker: core}}]
""",
        tmp_path,
    )
    import aiomqtt  # noqa: PLC0415

    from flowbridge.smart import smartreceive  # noqa: PLC0415

    nc = await nats.connect(nats_url)
    got: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        got.append(msg.data)

    await nc.subscribe(f"{p}.>", cb=on_msg)
    await nc.flush()
    big = os.urandom(nc.max_payload + 500_000)  # larger than the NATS server accepts
    host, _, port = mqtt_url.split("://", 1)[1].rstrip("/").rpartition(":")
    bridge.start()
    try:
        async with aiomqtt.Client(host, int(port)) as mqtt:
            await wait_for(lambda: f"route big-{p}" in bridge.log(), 30, "start", bridge.log)
            for _ in range(20):
                await mqtt.publish(f"{p}/blob", b"small", qos=1)
                await asyncio.sleep(0.2)
                if got:
                    break
            await mqtt.publish(f"{p}/blob", big, qos=1)
            await wait_for(lambda: len(got) >= 2 and got[-1] != b"small", 30, "big", bridge.log)
        items, env = await smartreceive(got[-1], fileserver=store.url)
        assert items == [("body", big, "binary")]
        assert env.payloads[0].transport == "link"
        assert bridge.stop() == 0
    finally:
        if bridge.alive():
            bridge.kill()
        await nc.close()
