"""flowbridge's MQTT<->NATS names agree with a real nats-server MQTT gateway (2.10+ rules):
an MQTT client publishes through nats-server and a NATS client sees the subject flowbridge
computes, and the reverse."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import nats
import paho.mqtt.client as paho
import pytest

from flowbridge import translate_topic
from tests.support.brokers import NatsServer, free_port

TOPICS = [
    "foo/bar",
    "/foo",
    "foo/",
    "foo//bar",
    ".",
    "foo.bar/baz",
    "spBv1.0/plant1/node.x",
    "a/./b",
    "$data/x",
    "u/é/ü",
    "q/%20/_-",
    "a*b/c>d",
]


@pytest.fixture(scope="module")
def gateway() -> Iterator[NatsServer]:
    with NatsServer(mqtt_port=free_port()) as server:
        yield server


def _mqtt_client(port: int) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10), "MQTT connect to nats-server timed out"
    return client


async def test_mqtt_publish_arrives_on_flowbridge_subject(gateway: NatsServer) -> None:
    nc = await nats.connect(gateway.url)
    got: list[str] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        # '>' also sees the gateway's own JetStream API traffic.
        if not msg.subject.startswith(("$JS.", "$MQTT.")):
            got.append(msg.subject)

    sub = await nc.subscribe(">", cb=on_msg)
    await nc.flush()
    assert gateway.mqtt_port is not None
    client = _mqtt_client(gateway.mqtt_port)
    try:
        for topic in TOPICS:
            client.publish(topic, b"x", qos=1).wait_for_publish(10)
        for _ in range(100):
            if len(got) >= len(TOPICS):
                break
            await asyncio.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
        await sub.unsubscribe()
        await nc.close()
    assert got == [translate_topic(t, "mqtt", "nats") for t in TOPICS]


async def test_nats_publish_arrives_on_flowbridge_topic(gateway: NatsServer) -> None:
    subjects = [translate_topic(t, "mqtt", "nats") for t in TOPICS if not t.startswith("$")]
    got: list[str] = []
    done = threading.Event()
    assert gateway.mqtt_port is not None
    client = _mqtt_client(gateway.mqtt_port)

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        got.append(msg.topic)
        if len(got) == len(subjects):
            done.set()

    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe("#", qos=0)
    assert subscribed.wait(10)
    nc = await nats.connect(gateway.url)
    try:
        for subject in subjects:
            await nc.publish(subject, b"x")
        await nc.flush()
        await asyncio.get_running_loop().run_in_executor(None, done.wait, 10)
    finally:
        client.loop_stop()
        client.disconnect()
        await nc.close()
    assert got == [translate_topic(s, "nats", "mqtt") for s in subjects]
