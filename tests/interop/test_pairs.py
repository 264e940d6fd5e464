"""All 12 ordered protocol pairs: a native client publishes 1,000 messages on topics with
'.', empty levels and unicode; flowbridge (its own process) forwards them; a native client of
the other protocol receives each exactly once, in order per topic, under the expected name."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from tests.interop.harness import BridgeProcess, open_native, wait_for

PROTOCOLS = ("mqtt", "nats", "amqp", "kafka")
COUNT = 1000

# The same four topics written natively (expected names, not computed by flowbridge).
NAMES = {
    "mqtt": ["{p}/a.b/c", "{p}//x", "{p}/ü/ñ", "{p}/plain"],
    "nats": ["{p}.a//b.c", "{p}./.x", "{p}.ü.ñ", "{p}.plain"],
    "amqp": ["{p}.a//b.c", "{p}..x", "{p}.ü.ñ", "{p}.plain"],
    "kafka": ["{p}.a__2e_b.c", "{p}..x", "{p}.__fc_.__f1_", "{p}.plain"],
}
PROBE = {"mqtt": "{p}/probe", "nats": "{p}.probe", "amqp": "{p}.probe", "kafka": "{p}.probe"}
SOURCE_FILTER = {"mqtt": "{p}/#", "nats": "{p}.>", "amqp": "{p}.#", "kafka": "{p}.#"}
NATIVE_FILTER = {"mqtt": "{p}/#", "nats": "{p}.>", "amqp": "{p}.#", "kafka": r"^{p}\..*"}


def mapping(src: str, dst: str, p: str, urls: dict[str, str]) -> str:
    kafka_opts = (
        "options: {session_timeout_ms: 6000, heartbeat_interval_ms: 1000, "
        "metadata_max_age_ms: 1000}"
    )
    opts = {"kafka": ", " + kafka_opts, "mqtt": f", options: {{client_id: fb-{p}}}"}
    brokers = {proto: f"{{url: '{urls[proto]}'{opts.get(proto, '')}}}" for proto in (src, dst)}
    return f"""
brokers:
  src: {brokers[src]}
  dst: {brokers[dst]}
routes:
  - name: it-{src}-{dst}-{p}
    from: {{broker: src, filter: "{SOURCE_FILTER[src].format(p=p)}"}}
    to: [{{broker: dst}}]
"""


@pytest.fixture
def urls(nats_url: str, mqtt_url: str, amqp_url: str, kafka_url: str) -> dict[str, str]:
    return {"nats": nats_url, "mqtt": mqtt_url, "amqp": amqp_url, "kafka": kafka_url}


@pytest.mark.parametrize(("src", "dst"), list(itertools.permutations(PROTOCOLS, 2)))
async def test_pair(src: str, dst: str, urls: dict[str, str], unique: str, tmp_path: Path) -> None:
    p = f"it{unique}"
    names = {proto: [n.format(p=p) for n in NAMES[proto]] for proto in PROTOCOLS}
    probe_src, probe_dst = PROBE[src].format(p=p), PROBE[dst].format(p=p)
    publisher = await open_native(src, urls[src])
    subscriber = await open_native(dst, urls[dst])
    bridge = BridgeProcess(mapping(src, dst, p, urls), tmp_path)
    try:
        if src == "kafka":  # the bridge's pattern subscription finds existing topics
            await publisher.create([*names["kafka"], probe_src])
        await subscriber.subscribe([NATIVE_FILTER[dst].format(p=p)])
        bridge.start()

        # Readiness: probes until one crosses (the route is subscribed end to end).
        async def probe() -> None:
            while not any(t == probe_dst for t, _ in subscriber.received):
                await publisher.publish(probe_src, b"probe")
                if src == "kafka":
                    await publisher.flush()
                await asyncio.sleep(0.25)
                assert bridge.alive(), bridge.log()

        await asyncio.wait_for(probe(), 60)
        for i in range(COUNT):
            await publisher.publish(names[src][i % 4], str(i).encode())
        if src == "kafka":
            await publisher.flush()

        def data() -> list[tuple[str, bytes]]:
            return [(t, m) for t, m in subscriber.received if m != b"probe"]

        await wait_for(lambda: len(data()) >= COUNT, 60, f"{COUNT} messages", bridge.log)
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        got = data()
        assert len(got) == COUNT
        by_topic: dict[str, list[int]] = {}
        for topic, payload in got:
            by_topic.setdefault(topic, []).append(int(payload))
        assert sorted(by_topic) == sorted(names[dst])
        for k, topic in enumerate(names[dst]):
            assert by_topic[topic] == list(range(k, COUNT, 4)), topic
        assert bridge.stop() == 0
    finally:
        if bridge.alive():
            bridge.kill()
        await publisher.close()
        await subscriber.close()
