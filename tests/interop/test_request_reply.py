"""Request-reply across protocols through the bridge: a NATS request answered by an MQTT 5
responder (response topic + correlation data), and an MQTT 5 request answered over NATS."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt
import nats
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.interop.harness import BridgeProcess, wait_for


def _mapping(p: str, nats_url: str, mqtt_url: str) -> str:
    return f"""
brokers:
  core: {{url: "{nats_url}"}}
  edge: {{url: "{mqtt_url}", options: {{client_id: fb-rr-{p}}}}}
routes:
  - name: requests-{p}
    from: {{broker: core, filter: "svc.{p}.>"}}
    to: [{{broker: edge}}]
  - name: replies-{p}
    from: {{broker: edge, filter: "_INBOX/#"}}
    to: [{{broker: core}}]
  - name: mqtt-requests-{p}
    from: {{broker: edge, filter: "rpc/{p}/#"}}
    to: [{{broker: core}}]
  - name: mqtt-replies-{p}
    from: {{broker: core, filter: "resp.{p}.>"}}
    to: [{{broker: edge}}]
"""


def _host_port(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port)


async def test_nats_request_answered_over_mqtt5_and_back(
    nats_url: str, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"rr{unique}"
    bridge = BridgeProcess(_mapping(p, nats_url, mqtt_url), tmp_path)
    host, port = _host_port(mqtt_url)
    nc = await nats.connect(nats_url)
    responder = aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5)
    await responder.__aenter__()
    answered: list[str] = []

    async def respond() -> None:
        async for msg in responder.messages:
            props = msg.properties
            reply = getattr(props, "ResponseTopic", None)
            if not reply or str(msg.topic) != f"svc/{p}/time":
                continue
            answered.append(str(msg.topic))
            out = Properties(PacketTypes.PUBLISH)
            corr = getattr(props, "CorrelationData", None)
            if corr:
                out.CorrelationData = corr
            await responder.publish(reply, b"answer:" + bytes(msg.payload), qos=1, properties=out)

    await responder.subscribe(f"svc/{p}/#", qos=1)
    serving = asyncio.ensure_future(respond())
    bridge.start()
    try:
        await wait_for(lambda: "route replies-" in bridge.log(), 30, "start", bridge.log)
        # The first requests may race the bridge's subscriptions (no subscriber on NATS yet:
        # no responders; on MQTT yet: a timeout): retry until one is answered.
        reply = None
        for _ in range(50):
            try:
                reply = await nc.request(f"svc.{p}.time", b"q0", timeout=0.5)
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.1)
            except nats.errors.TimeoutError:
                continue
        assert reply is not None, bridge.log()
        for i in range(1, 20):
            r = await nc.request(f"svc.{p}.time", f"q{i}".encode(), timeout=5)
            assert r.data == f"answer:q{i}".encode()
        assert answered[-1] == f"svc/{p}/time"
        # Forwarded, but nobody answers there: the requester gets a clear timeout, not a hang.
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"svc.{p}.nobody.listens", b"x", timeout=0.5)
        assert bridge.stop() == 0
    finally:
        serving.cancel()
        with contextlib.suppress(BaseException):
            await serving
        if bridge.alive():
            bridge.kill()
        await responder.__aexit__(None, None, None)
        await nc.close()


async def test_mqtt5_request_answered_over_nats(
    nats_url: str, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"rq{unique}"
    bridge = BridgeProcess(_mapping(p, nats_url, mqtt_url), tmp_path)
    host, port = _host_port(mqtt_url)
    nc = await nats.connect(nats_url)

    async def on_request(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    await nc.subscribe(f"rpc.{p}.>", cb=on_request)
    await nc.flush()
    requester = aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5)
    await requester.__aenter__()
    await requester.subscribe(f"resp/{p}/#", qos=1)
    got: list[bytes] = []

    async def read() -> None:
        async for msg in requester.messages:
            got.append(bytes(msg.payload))  # type: ignore[arg-type]

    reading = asyncio.ensure_future(read())
    bridge.start()
    try:
        await wait_for(lambda: "route mqtt-replies-" in bridge.log(), 30, "start", bridge.log)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"resp/{p}/client1"
        props.CorrelationData = b"c-1"
        for _ in range(50):
            await requester.publish(f"rpc/{p}/ping", b"hi", qos=1, properties=props)
            await asyncio.sleep(0.2)
            if got:
                break
        assert got, bridge.log()
        assert got[0] == b"pong:hi"
        assert bridge.stop() == 0
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
        if bridge.alive():
            bridge.kill()
        await requester.__aexit__(None, None, None)
        await nc.close()
