"""Hot reload of a running bridge process: SIGHUP and --watch."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.interop.harness import BridgeProcess, MqttNative, NatsNative, wait_for

COUNT = 2000


def _mapping(p: str, nats_url: str, mqtt_url: str, extra: str = "") -> str:
    return f"""
brokers:
  edge: {{url: "{mqtt_url}", options: {{client_id: fb-reload-{p}}}}}
  core: {{url: "{nats_url}"}}
routes:
  - name: keep-{p}
    from: {{broker: edge, filter: "{p}/keep/#"}}
    to: [{{broker: core}}]
{extra}"""


async def test_sighup_reload_keeps_unchanged_route_and_rejects_bad_files(
    nats_url: str, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"rl{unique}"
    bridge = BridgeProcess(_mapping(p, nats_url, mqtt_url), tmp_path)
    pub = await MqttNative(mqtt_url).open()
    sub = await NatsNative(nats_url).open()
    await sub.subscribe([f"{p}.>"])
    bridge.start()
    try:

        async def probe() -> None:
            while not any(t == f"{p}.keep.probe" for t, _ in sub.received):
                await pub.publish(f"{p}/keep/probe", b"probe")
                await asyncio.sleep(0.2)

        await asyncio.wait_for(probe(), 30)
        assert bridge.proc is not None

        async def stream() -> None:
            for i in range(COUNT):
                await pub.publish(f"{p}/keep/s", str(i).encode())

        streaming = asyncio.ensure_future(stream())
        await asyncio.sleep(0.2)
        # 1. A broken file: rejected with FILE:LINE, the running route goes on.
        good = bridge.path.read_text()
        bridge.path.write_text(good + "  - name: broken\n    from: {broker: nowhere, filter: x}\n")
        bridge.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload rejected" in bridge.log(), 10, "rejection", bridge.log)
        assert "mapping.yaml:" in bridge.log()
        assert "unknown broker 'nowhere'" in bridge.log()
        # 2. A valid change adds a route while the stream still flows on the kept one.
        bridge.path.write_text(
            _mapping(
                p,
                nats_url,
                mqtt_url,
                f"""  - name: added-{p}
    from: {{broker: edge, filter: "{p}/added/#"}}
    to: [{{broker: core}}]
""",
            )
        )
        bridge.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: f"started added-{p}" in bridge.log(), 10, "reload", bridge.log)
        await streaming

        def kept() -> list[int]:
            return [int(m) for t, m in sub.received if t == f"{p}.keep.s"]

        await wait_for(lambda: len(kept()) >= COUNT, 30, "the stream", bridge.log)
        await asyncio.sleep(0.3)
        assert kept() == list(range(COUNT))  # nothing lost, nothing twice, in order

        async def probe_added() -> None:
            while not any(t == f"{p}.added.x" for t, _ in sub.received):
                await pub.publish(f"{p}/added/x", b"new")
                await asyncio.sleep(0.2)

        await asyncio.wait_for(probe_added(), 20)
        assert bridge.stop() == 0
    finally:
        if bridge.alive():
            bridge.kill()
        await pub.close()
        await sub.close()


async def test_watch_reloads_on_file_change(
    nats_url: str, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"rw{unique}"
    bridge = BridgeProcess(_mapping(p, nats_url, mqtt_url), tmp_path)
    bridge.args = ["--watch"]
    pub = await MqttNative(mqtt_url).open()
    sub = await NatsNative(nats_url).open()
    await sub.subscribe([f"{p}.>"])
    bridge.start()
    try:
        await wait_for(lambda: f"route keep-{p}" in bridge.log(), 30, "start", bridge.log)
        bridge.path.write_text(
            _mapping(
                p,
                nats_url,
                mqtt_url,
                f"""  - name: watched-{p}
    from: {{broker: edge, filter: "{p}/w/#"}}
    to: [{{broker: core}}]
""",
            )
        )
        await wait_for(lambda: f"started watched-{p}" in bridge.log(), 15, "watch", bridge.log)

        async def probe() -> None:
            while not any(t == f"{p}.w.x" for t, _ in sub.received):
                await pub.publish(f"{p}/w/x", b"w")
                await asyncio.sleep(0.2)

        await asyncio.wait_for(probe(), 20)
        assert bridge.stop() == 0
    finally:
        if bridge.alive():
            bridge.kill()
        await pub.close()
        await sub.close()
