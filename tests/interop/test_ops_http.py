"""``flowbridge run --http``: probes, metrics and status as an operator meets them, with the
bridge in its own process between a nats-server of the test's own (stopped and restarted
here) and the shared Mosquitto, native clients on both sides."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.interop.harness import BridgeProcess, MqttNative, NatsNative, wait_for
from tests.support.brokers import NatsServer, free_port, wait_port


class HttpBridge(BridgeProcess):
    """``flowbridge run -c FILE --http 127.0.0.1:PORT`` in its own process."""

    def __init__(self, mapping: str, workdir: Path) -> None:
        super().__init__(mapping, workdir)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flowbridge",
                    "run",
                    "-c",
                    str(self.path),
                    "--http",
                    f"127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_port(self.port, timeout=20, proc=self.proc)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}; bridge log:\n{self.log()}") from None

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as res:
                return int(res.status), bytes(res.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def get(self, path: str) -> tuple[int, bytes]:
        return await asyncio.to_thread(self._get, path)

    async def status(self) -> Any:
        code, body = await self.get("/api/status")
        assert code == 200, body
        return json.loads(body)

    async def metric(self, name: str, **labels: str) -> float | None:
        _, body = await self.get("/metrics")
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return None

    async def poll(self, path: str, want: Callable[[int, bytes], bool], within: float) -> bytes:
        """GET ``path`` until ``want(code, body)``; fail with the last answer and the log."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            code, body = await self.get(path)
            if want(code, body):
                return body
            if loop.time() > deadline:
                raise AssertionError(
                    f"{path}: still {code} {body[:500]!r} after {within}s; bridge log:\n"
                    f"{self.log()[-4000:]}"
                )
            await asyncio.sleep(0.1)


def mapping(own_nats: str, mqtt_url: str, p: str) -> str:
    return f"""
brokers:
  own: {{url: "{own_nats}"}}
  edge: {{url: "{mqtt_url}", options: {{client_id: fb-{p}}}}}
routes:
  - name: ops-{p}
    from: {{broker: edge, filter: "{p}/#"}}
    to: [{{broker: own}}]
    delivery: at-least-once
"""


async def test_readiness_follows_broker_and_metrics_count(
    mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"ops{unique}"
    route = f"ops-{p}"
    count = 200
    with NatsServer() as own:
        bridge = HttpBridge(mapping(own.url, mqtt_url, p), tmp_path)
        bridge.start()
        sub = await NatsNative(own.url).open()
        pub = await MqttNative(mqtt_url).open()
        try:
            assert await bridge.get("/healthz") == (200, b"ok\n")
            await bridge.poll("/readyz", lambda c, _: c == 200, 20)

            await sub.subscribe([f"{p}.>"])
            for i in range(count):
                await pub.publish(f"{p}/t", str(i).encode())
            await wait_for(lambda: len(sub.received) >= count, 20, "NATS side", bridge.log)
            assert [b for _, b in sub.received] == [str(i).encode() for i in range(count)]
            out = await bridge.metric("flowbridge_route_messages_out_total", route=route)
            assert out == count
            assert await bridge.metric("flowbridge_route_messages_in_total", route=route) == count
            assert await bridge.metric("flowbridge_broker_connected", broker="own") == 1
            assert await bridge.metric("flowbridge_ready") == 1
            doc = await bridge.status()
            assert doc["routes"][0]["forwarded"] == count
            await sub.close()

            own.stop()
            body = await bridge.poll("/readyz", lambda c, _: c == 503, 10)
            assert "own" in json.loads(body)["brokers"]
            assert (await bridge.get("/healthz"))[0] == 200  # alive, only not ready
            states = {b["name"]: b["state"] for b in (await bridge.status())["brokers"]}
            assert states["own"] != "connected"
            assert states["edge"] == "connected"
            assert await bridge.metric("flowbridge_ready") == 0

            own.start()
            await bridge.poll("/readyz", lambda c, _: c == 200, 20)
            reconnects = await bridge.metric("flowbridge_broker_reconnects_total", broker="own")
            assert reconnects is not None
            assert reconnects >= 1
        finally:
            await pub.close()
            if sub.nc.is_connected:
                await sub.close()
            assert bridge.stop() == 0, bridge.log()


async def test_credentials_never_shown(mqtt_url: str, unique: str, tmp_path: Path) -> None:
    p = f"cred{unique}"
    with NatsServer() as own:
        # nats-server accepts and ignores a user name it was not configured with.
        secret_url = own.url.replace("nats://", "nats://operator:Sup3rS3cret@")
        bridge = HttpBridge(mapping(secret_url, mqtt_url, p), tmp_path)
        bridge.start()
        try:
            await bridge.poll("/readyz", lambda c, _: c in (200, 503), 20)
            for path in ("/api/status", "/metrics", "/readyz", "/"):
                code, body = await bridge.get(path)
                assert code in (200, 503), path
                assert b"Sup3rS3cret" not in body, path
            doc = await bridge.status()
            own_doc = next(b for b in doc["brokers"] if b["name"] == "own")
            assert own_doc["url"] == f"nats://operator:***@127.0.0.1:{own.port}"
        finally:
            assert bridge.stop() == 0, bridge.log()
