"""`flowbridge run` with no mapping: embedded NATS + MQTT brokers bridged both ways."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats

from tests.interop.harness import MqttNative, wait_for
from tests.support.brokers import free_port


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flowbridge", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def test_embedded_default_bridges_both_ways_without_echo(tmp_path: Path) -> None:
    nats_port, mqtt_port = free_port(), free_port()
    log = tmp_path / "run.log"
    proc = _start(["--nats-port", str(nats_port), "--mqtt-port", str(mqtt_port)], log)
    try:
        await wait_for(
            lambda: (
                "route nats-to-mqtt" in log.read_text() and "route mqtt-to-nats" in log.read_text()
            ),
            30,
            "the embedded default to start",
            log.read_text,
        )
        assert f"nats://127.0.0.1:{nats_port}" in log.read_text()
        assert f"mqtt://127.0.0.1:{mqtt_port}" in log.read_text()
        nc = await nats.connect(f"nats://127.0.0.1:{nats_port}")
        got_nats: list[tuple[str, bytes]] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            got_nats.append((msg.subject, msg.data))

        await nc.subscribe("demo.>", cb=on_msg)
        await nc.flush()
        mqtt = MqttNative(f"mqtt://127.0.0.1:{mqtt_port}")
        # amqtt speaks MQTT 3.1.1 only.
        import aiomqtt  # noqa: PLC0415

        mqtt.client = aiomqtt.Client("127.0.0.1", mqtt_port, protocol=aiomqtt.ProtocolVersion.V311)
        await mqtt.client.__aenter__()
        mqtt.reader = asyncio.ensure_future(mqtt._read())
        await mqtt.subscribe(["demo/#"])
        # What mosquitto_pub -t demo/a.b -m hi does:
        await mqtt.publish("demo/a.b", b"hi")
        await wait_for(lambda: bool(got_nats), 10, "MQTT -> NATS", log.read_text)
        assert got_nats == [("demo.a//b", b"hi")]
        await nc.publish("demo.from.nats", b"hello")
        await nc.flush()
        await wait_for(
            lambda: ("demo/from/nats", b"hello") in mqtt.received, 10, "NATS -> MQTT", log.read_text
        )
        await asyncio.sleep(1.0)  # an echo would have arrived by now
        assert got_nats == [("demo.a//b", b"hi"), ("demo.from.nats", b"hello")]
        assert mqtt.received == [("demo/a.b", b"hi"), ("demo/from/nats", b"hello")]
        await mqtt.close()
        await nc.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_in_use_is_reported_clearly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        log = tmp_path / "run.log"
        proc = _start(["--nats-port", str(port), "--mqtt-port", str(free_port())], log)
        start = time.monotonic()
        code = proc.wait(30)
    text = log.read_text()
    assert code != 0
    assert time.monotonic() - start < 30
    assert str(port) in text
    assert "--nats-port" in text
    assert "Traceback" not in text
