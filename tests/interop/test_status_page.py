"""The status page in headless Chromium while traffic flows through a bridge between the
shared NATS and Mosquitto: route names, broker states, live counts and a dead letter show,
and a screenshot is kept in the test's tmp dir for a human to look at."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.interop.harness import MqttNative, NatsNative, wait_for
from tests.interop.test_ops_http import HttpBridge

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed on first use (root and the Debian archive needed)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} missing and cannot install it here: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(
            cmd, check=False, env=env, capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} is missing")
    return CHROMIUM


def run_chromium(chromium: str, profile: Path, *args: str) -> str:
    profile.mkdir()
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,800", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


async def headless(chromium: str, profile: Path, *args: str) -> str:
    """Run Chromium once, in a thread, so the traffic task keeps publishing meanwhile."""
    return await asyncio.to_thread(run_chromium, chromium, profile, *args)


def in_rate(status: bytes, route: str) -> float:
    return float(next(r for r in json.loads(status)["routes"] if r["name"] == route)["rate"]["in"])


async def test_status_page_shows_live_bridge(
    chromium: str, nats_url: str, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    p = f"page{unique}"
    up, down = f"{p}-up", f"{p}-down"
    bridge = HttpBridge(
        f"""
brokers:
  core: {{url: "{nats_url}"}}
  edge: {{url: "{mqtt_url}", options: {{client_id: fb-{p}}}}}
routes:
  - name: {up}
    from: {{broker: edge, filter: "{p}/#"}}
    to: [{{broker: core}}]
    delivery: at-least-once
  - name: {down}
    from: {{broker: core, filter: "{p}.down.>"}}
    to: [{{broker: edge}}]
    dead_letter: {{broker: core, topic: "{p}.dead"}}
""",
        tmp_path,
    )
    bridge.start()
    mqtt = await MqttNative(mqtt_url).open()
    core = await NatsNative(nats_url).open()
    sent = 0

    async def traffic() -> None:
        nonlocal sent
        for _ in range(1500):  # bounded: 50 msg/s for at most 30 s
            await mqtt.publish(f"{p}/sensor/{sent % 3}", b"reading %d" % sent)
            sent += 1
            await asyncio.sleep(0.02)

    flowing = asyncio.ensure_future(traffic())
    try:
        await bridge.poll("/readyz", lambda c, _: c == 200, 20)
        await core.subscribe([f"{p}.dead"])
        # '+' cannot be in an MQTT topic: refused by translation, dead-lettered on NATS.
        await core.publish(f"{p}.down.a+b", b"unrepresentable")
        await wait_for(lambda: bool(core.received), 10, "the dead letter", bridge.log)
        # Traffic has been seen over at least one of the server's rate samples.
        await bridge.poll("/api/status", lambda _, b: in_rate(b, up) > 0, 10)

        url = bridge.base + "/"
        shot = tmp_path / "status.png"
        budget = "--virtual-time-budget=3000"
        await headless(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", budget, url)
        dom = await headless(chromium, tmp_path / "profile-dom", "--dump-dom", budget, url)
    finally:
        flowing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flowing
        await mqtt.close()
        await core.close()
        assert bridge.stop() == 0, bridge.log()

    assert shot.stat().st_size > 10_000, "screenshot missing or blank"
    (tmp_path / "status.html").write_text(dom)
    assert f'data-route="{up}"' in dom
    assert f'data-route="{down}"' in dom
    assert 'data-broker="core"' in dom
    assert 'data-broker="edge"' in dom
    assert re.findall(r'class="state"><span class="badge ok">connected</span>', dom), dom
    assert ">ready<" in dom
    received = re.search(
        rf'data-route="{re.escape(up)}">.*?class="n received">([\d,]+)<', dom, re.S
    )
    assert received is not None, dom
    assert int(received.group(1).replace(",", "")) > 0
    rate = re.search(rf'data-route="{re.escape(up)}">.*?class="n in-rate">([\d.,]+)<', dom, re.S)
    assert rate is not None
    assert float(rate.group(1).replace(",", "")) > 0
    assert f"{p}.down.a+b" in dom  # the dead letter's topic
    assert "topic not representable" in dom
    assert '<span id="error"></span>' in dom  # the last poll succeeded
