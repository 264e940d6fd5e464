"""Faults as users meet them: a target broker restarting under load, the bridge killed or
stopped mid-stream, a broker that is not there, and echo loops on real brokers.

The bridge runs as its own process (``flowbridge run -c FILE``) between native clients.
Anything stopped or killed is a broker of the test's own, never a shared service.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import nats
import pytest
from nats.js.api import StreamConfig

from tests.interop.harness import (
    AmqpNative,
    BridgeProcess,
    KafkaNative,
    MqttNative,
    NatsNative,
    open_native,
    wait_for,
)
from tests.support.brokers import Mosquitto, NatsServer, Tansu, free_port, host_port

TOPICS = 4  # messages go round-robin over this many topics, so order is checked per topic


# ---------------------------------------------------------------------------------------------
# helpers


class Paced:
    """Publishes ``count`` messages ``0..count-1`` round-robin over ``topics`` at a steady
    rate; ``reached(i)`` is set once message ``i`` was published (and confirmed)."""

    def __init__(
        self,
        publish: Callable[[str, bytes], Awaitable[None]],
        topics: list[str],
        count: int,
        seconds: float,
    ) -> None:
        self.publish = publish
        self.topics = topics
        self.count = count
        self.seconds = seconds
        self.sent = 0
        self._marks: dict[int, asyncio.Event] = {}
        self.task: asyncio.Task[None] | None = None

    def reached(self, i: int) -> asyncio.Event:
        return self._marks.setdefault(i, asyncio.Event())

    def start(self) -> Paced:
        self.task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        step = self.seconds / self.count
        for i in range(self.count):
            await self.publish(self.topics[i % len(self.topics)], str(i).encode())
            self.sent = i + 1
            mark = self._marks.get(i)
            if mark is not None:
                mark.set()
            delay = t0 + (i + 1) * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def wait(self, within: float = 60.0) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, within)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


def tally(
    got: list[tuple[str, bytes]], topics: list[str], count: int, *, ordered: bool = True
) -> tuple[int, list[int]]:
    """Check that every message 0..count-1 arrived on its topic and (``ordered``) that first
    occurrences keep per-topic order; return (duplicates, indices delivered more than once)."""
    seen: dict[int, int] = {}
    first: dict[str, list[int]] = {t: [] for t in topics}
    for topic, payload in got:
        i = int(payload)
        assert topic == topics[i % len(topics)], (topic, i)
        if i not in seen:
            first[topic].append(i)
        seen[i] = seen.get(i, 0) + 1
    missing = sorted(set(range(count)) - set(seen))
    assert not missing, f"{len(missing)} lost, first ones: {missing[:20]}"
    for k, topic in enumerate(topics):
        if ordered:
            assert first[topic] == list(range(k, count, len(topics))), f"order broken on {topic}"
        else:
            assert sorted(first[topic]) == list(range(k, count, len(topics))), topic
    again = sorted(i for i, n in seen.items() if n > 1)
    return sum(seen.values()) - count, again


class JsReader:
    """Reads a JetStream stream in sequence order, incrementally, from a native client."""

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream
        self.nc: Any = None
        self.js: Any = None
        self.next_seq = 1
        self.messages: list[tuple[str, bytes]] = []

    async def open(self, subjects: list[str]) -> JsReader:
        self.nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        self.js = self.nc.jetstream(timeout=5)
        await self.js.add_stream(StreamConfig(name=self.stream, subjects=subjects))
        return self

    async def poll(self) -> list[tuple[str, bytes]]:
        info = await self.js.stream_info(self.stream)
        for seq in range(self.next_seq, info.state.last_seq + 1):
            msg = await self.js.get_msg(self.stream, seq)
            self.messages.append((msg.subject, msg.data or b""))
        self.next_seq = max(self.next_seq, info.state.last_seq + 1)
        return self.messages

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


async def until(
    cond: Callable[[], Awaitable[bool]], within: float, what: str, bridge: BridgeProcess
) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; bridge log:\n{bridge.log()[-4000:]}"
            )
        await asyncio.sleep(0.2)


async def probe_until(
    send: Callable[[], Awaitable[None]],
    arrived: Callable[[], bool | Awaitable[bool]],
    bridge: BridgeProcess,
    within: float = 30.0,
    what: Callable[[], str] = lambda: "route",
) -> None:
    """Publish probes until one crosses: the route is subscribed end to end."""
    deadline = time.monotonic() + within
    while True:
        done = arrived()
        if done if isinstance(done, bool) else await done:
            return
        assert bridge.alive(), bridge.log()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what()} never became ready; bridge log:\n{bridge.log()[-4000:]}"
            )
        await send()
        await asyncio.sleep(0.25)


def data(received: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return [(t, m) for t, m in received if m != b"probe"]


def check_restart_duplicates(how: str, down_at: int, again: list[int], window: int) -> None:
    """After SIGTERM nothing comes twice (acked work is not redelivered); after SIGKILL only
    messages near the crash (at most ``window`` of them, none published after the restart)."""
    if how == "sigterm":
        assert not again, again
        return
    assert len(again) <= window, again
    assert all(down_at - window - 1000 <= i <= down_at for i in again), (down_at, again)


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    with Mosquitto() as m:
        yield m


@pytest.fixture
def nats_own() -> Iterator[NatsServer]:
    with NatsServer() as n:
        yield n


async def mqtt_client(url: str) -> aiomqtt.Client:
    host, port = host_port(url, 1883)
    client = aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5)
    await client.__aenter__()
    return client


# ---------------------------------------------------------------------------------------------
# 1. at-least-once through a target restart


@pytest.mark.parametrize(
    ("kill", "pipeline"),
    [(False, 1), (True, 1), (True, 4)],
    ids=["sigterm", "sigkill", "sigkill-pipeline-4"],
)
async def test_jetstream_target_restart(
    kill: bool,
    pipeline: int,
    mosquitto: Mosquitto,
    nats_own: NatsServer,
    unique: str,
    tmp_path: Path,
) -> None:
    """MQTT QoS 1 -> JetStream: the NATS server goes away for ~2 s mid-stream and comes back
    on the same port; every message ends up in the stream, first occurrences in order (with
    batches pipelined, a retried batch may land after the ones written behind it)."""
    p = f"f{unique}"
    count = 2000
    mqtt_topics = [f"{p}/t{k}" for k in range(TOPICS)]
    nats_topics = [f"{p}.t{k}" for k in range(TOPICS)]
    bridge = BridgeProcess(
        f"""
        brokers:
          mqtt: {{url: "{mosquitto.url}", options: {{client_id: fb-{p}}}}}
          nats:
            url: "{nats_own.url}"
            reconnect: {{initial: 0.1, max: 0.5, attempts: null}}
            options: {{js_timeout: 1.0}}
        routes:
          - name: js-{p}
            from: {{broker: mqtt, filter: "{p}/#"}}
            to: [{{broker: nats, options: {{jetstream: true}}}}]
            delivery: at-least-once
            max_in_flight: 200
            pipeline: {pipeline}
        """,
        tmp_path,
    )
    reader = await JsReader(nats_own.url, f"S{p}").open([f"{p}.>"])
    pub = await mqtt_client(mosquitto.url)
    paced: Paced | None = None
    try:
        bridge.start()

        async def probe() -> None:
            await pub.publish(f"{p}/probe", b"probe", qos=1)

        async def probed() -> bool:
            return any(m == b"probe" for _, m in await reader.poll())

        await probe_until(probe, probed, bridge)

        async def send(topic: str, payload: bytes) -> None:
            await pub.publish(topic, payload, qos=1)

        paced = Paced(send, mqtt_topics, count, 4.0).start()
        await asyncio.wait_for(paced.reached(count // 3).wait(), 20)
        await asyncio.to_thread(nats_own.stop, kill)
        down_at = paced.sent
        await asyncio.sleep(2.0)
        await asyncio.to_thread(nats_own.start)
        await paced.wait()

        async def complete() -> bool:
            got = {m for _, m in data(await reader.poll())}
            return len(got) >= count

        await until(complete, 60, f"{count} messages in the stream", bridge)
        await asyncio.sleep(1.0)  # late duplicates land now
        got = data(await reader.poll())
        dups, again = tally(got, nats_topics, count, ordered=pipeline == 1)
        print(f"target restart ({'kill' if kill else 'term'}) at #{down_at}: {dups} duplicate(s)")
        assert bridge.alive(), bridge.log()
        assert bridge.stop() == 0, bridge.log()
        # Duplicates come only from the batches in flight when the server went away, which
        # the source's window bounds, pipelined or not.
        assert dups <= 2 * 200, again[:50]
    finally:
        if paced is not None:
            paced.cancel()
        if bridge.alive():
            bridge.kill()
        await pub.__aexit__(None, None, None)
        await reader.close()


# ---------------------------------------------------------------------------------------------
# 2./3. the bridge killed or stopped mid-stream, then started again


def mqtt_to_core_nats(mqtt_url: str, nats_url: str, p: str) -> str:
    return f"""
        brokers:
          mqtt: {{url: "{mqtt_url}", options: {{client_id: fb-{p}}}}}
          nats: {{url: "{nats_url}"}}
        routes:
          - name: crash-{p}
            from: {{broker: mqtt, filter: "{p}/#"}}
            to: [{{broker: nats}}]
            delivery: at-least-once
            max_in_flight: 100
        """


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_bridge_restart_mqtt_to_nats(
    how: str, mosquitto: Mosquitto, nats_url: str, unique: str, tmp_path: Path
) -> None:
    """MQTT QoS 1 persistent session -> core NATS.  The bridge dies (SIGKILL) or stops
    (SIGTERM) mid-stream while publishing goes on; a new process with the same mapping picks
    up the session.  Nothing is lost; after SIGKILL duplicates are bounded by the in-flight
    window, after SIGTERM there are none (what was acked is not redelivered)."""
    p = f"f{unique}"
    count = 2000
    mqtt_topics = [f"{p}/t{k}" for k in range(TOPICS)]
    nats_topics = [f"{p}.t{k}" for k in range(TOPICS)]
    bridge = BridgeProcess(mqtt_to_core_nats(mosquitto.url, nats_url, p), tmp_path)
    sub = await NatsNative(nats_url).open()
    pub = await MqttNative(mosquitto.url).open()
    paced: Paced | None = None
    try:
        await sub.subscribe([f"{p}.>"])
        bridge.start()
        await probe_until(
            lambda: pub.publish(f"{p}/probe", b"probe"),
            lambda: any(m == b"probe" for _, m in sub.received),
            bridge,
        )
        paced = Paced(pub.publish, mqtt_topics, count, 4.0).start()
        await asyncio.wait_for(paced.reached(count // 3).wait(), 20)
        if how == "sigkill":
            bridge.kill()
        else:
            code = await asyncio.to_thread(bridge.stop)
            assert code == 0, bridge.log()
        down_at = paced.sent
        forwarded_before = len(data(sub.received))
        await asyncio.sleep(1.5)
        bridge.start()
        await paced.wait()
        await wait_for(
            lambda: len({m for _, m in data(sub.received)}) >= count,
            30,
            f"{count} messages",
            bridge.log,
        )
        await asyncio.sleep(1.0)
        dups, again = tally(data(sub.received), nats_topics, count)
        print(
            f"bridge {how} at #{down_at} ({forwarded_before} forwarded before): "
            f"{dups} duplicate(s) {again[:10]}"
        )
        assert bridge.stop() == 0, bridge.log()
        check_restart_duplicates(how, down_at, again, 100)
    finally:
        if paced is not None:
            paced.cancel()
        if bridge.alive():
            bridge.kill()
        await pub.close()
        await sub.close()


async def test_bridge_stopped_while_its_target_is_down_leaves_the_batch_unacked(
    mosquitto: Mosquitto, nats_own: NatsServer, unique: str, tmp_path: Path
) -> None:
    """MQTT QoS 1 -> NATS: the NATS server goes away, messages arrive, and the bridge is
    stopped; once its shutdown grace runs out it gives the batch up without acknowledging
    it, so the MQTT session hands it to the next bridge when NATS is back."""
    p = f"f{unique}"
    bridge = BridgeProcess(mqtt_to_core_nats(mosquitto.url, nats_own.url, p), tmp_path)
    pub = await MqttNative(mosquitto.url).open()
    sub: NatsNative | None = None
    try:
        sub = await NatsNative(nats_own.url).open()
        await sub.subscribe([f"{p}.>"])
        bridge.start()
        await probe_until(
            lambda: pub.publish(f"{p}/probe", b"probe"),
            lambda: sub is not None and any(m == b"probe" for _, m in sub.received),
            bridge,
        )
        await sub.close()
        sub = None
        await asyncio.to_thread(nats_own.stop, False)
        for i in range(5):
            await pub.publish(f"{p}/t", str(i).encode())
        await wait_for(lambda: "holding" in bridge.log(), 10, "the route holding", bridge.log)
        code = await asyncio.to_thread(bridge.stop, 30.0)  # the grace (10 s) runs out
        assert code == 0, bridge.log()
        await asyncio.to_thread(nats_own.start)
        sub = await NatsNative(nats_own.url).open()
        await sub.subscribe([f"{p}.>"])
        bridge.start()
        await wait_for(
            lambda: sub is not None and len({m for _, m in data(sub.received)}) == 5,
            30,
            "the 5 messages held at shutdown",
            bridge.log,
        )
        assert sorted({m for _, m in data(sub.received)}) == [str(i).encode() for i in range(5)]
        assert bridge.stop() == 0, bridge.log()
    finally:
        if bridge.alive():
            bridge.kill()
        await pub.close()
        if sub is not None:
            await sub.close()


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_bridge_restart_jetstream_to_amqp(
    how: str, nats_own: NatsServer, amqp_url: str, unique: str, tmp_path: Path
) -> None:
    """JetStream durable consumer -> AMQP, the bridge killed or stopped mid-stream."""
    p = f"f{unique}"
    count = 2000
    nats_topics = [f"{p}.t{k}" for k in range(TOPICS)]
    bridge = BridgeProcess(
        f"""
        brokers:
          nats: {{url: "{nats_own.url}"}}
          rabbit: {{url: "{amqp_url}"}}
        routes:
          - name: jscrash-{p}
            from:
              broker: nats
              filter: "{p}.>"
              options: {{jetstream: {{stream: S{p}, ack_wait: 2}}}}
            to: [{{broker: rabbit}}]
            delivery: at-least-once
            max_in_flight: 100
        """,
        tmp_path,
    )
    reader = await JsReader(nats_own.url, f"S{p}").open([f"{p}.>"])
    sub = await AmqpNative(amqp_url).open()
    paced: Paced | None = None
    try:
        await sub.subscribe([f"{p}.#"])
        bridge.start()

        async def js_publish(topic: str, payload: bytes) -> None:
            await reader.js.publish(topic, payload)

        await probe_until(
            lambda: js_publish(f"{p}.probe", b"probe"),
            lambda: any(m == b"probe" for _, m in sub.received),
            bridge,
        )
        paced = Paced(js_publish, nats_topics, count, 4.0).start()
        await asyncio.wait_for(paced.reached(count // 3).wait(), 20)
        if how == "sigkill":
            bridge.kill()
        else:
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.log()
        down_at = paced.sent
        await asyncio.sleep(1.5)
        bridge.start()
        await paced.wait()
        await wait_for(
            lambda: len({m for _, m in data(sub.received)}) >= count,
            30,
            f"{count} messages",
            bridge.log,
        )
        await asyncio.sleep(1.0)
        # After a SIGKILL, JetStream redelivers what was in flight only once ack_wait expires,
        # after newer messages: none may be lost, but those few may come late.
        dups, again = tally(data(sub.received), nats_topics, count, ordered=how != "sigkill")
        print(f"JetStream source, bridge {how} at #{down_at}: {dups} duplicate(s) {again[:10]}")
        assert bridge.stop() == 0, bridge.log()
        check_restart_duplicates(how, down_at, again, 100)
    finally:
        if paced is not None:
            paced.cancel()
        if bridge.alive():
            bridge.kill()
        await sub.close()
        await reader.close()


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_bridge_restart_kafka_to_nats(
    how: str, kafka_url: str, nats_url: str, unique: str, tmp_path: Path
) -> None:
    """Kafka consumer group (committed offsets) -> core NATS, the bridge killed or stopped
    mid-stream; the new process joins the same group and resumes from the commits."""
    p = f"f{unique}"
    count = 1000
    topics = [f"{p}.t{k}" for k in range(TOPICS)]
    bridge = BridgeProcess(
        f"""
        brokers:
          kafka:
            url: "{kafka_url}"
            options: {{session_timeout_ms: 3000, heartbeat_interval_ms: 500,
                       metadata_max_age_ms: 1000}}
          nats: {{url: "{nats_url}"}}
        routes:
          - name: kcrash-{p}
            from: {{broker: kafka, filter: "{p}.#", group: g-{p}}}
            to: [{{broker: nats}}]
            delivery: at-least-once
            max_in_flight: 100
        """,
        tmp_path,
    )
    pub = await KafkaNative(kafka_url).open()
    sub = await NatsNative(nats_url).open()
    paced: Paced | None = None
    try:
        await pub.create([*topics, f"{p}.probe"])
        await sub.subscribe([f"{p}.>"])
        bridge.start()

        async def probe() -> None:
            await pub.publish(f"{p}.probe", b"probe")
            await pub.flush()

        await probe_until(
            probe, lambda: any(m == b"probe" for _, m in sub.received), bridge, within=60
        )

        async def send(topic: str, payload: bytes) -> None:
            assert pub.producer is not None
            await (await pub.producer.send(topic, payload))

        paced = Paced(send, topics, count, 3.0).start()
        await asyncio.wait_for(paced.reached(count // 3).wait(), 20)
        if how == "sigkill":
            bridge.kill()
        else:
            assert await asyncio.to_thread(bridge.stop) == 0, bridge.log()
        down_at = paced.sent
        await asyncio.sleep(1.5)
        bridge.start()
        await paced.wait()
        await wait_for(
            lambda: len({m for _, m in data(sub.received)}) >= count,
            60,
            f"{count} messages",
            bridge.log,
        )
        await asyncio.sleep(1.0)
        dups, again = tally(data(sub.received), topics, count)
        print(f"Kafka source, bridge {how} at #{down_at}: {dups} duplicate(s) {again[:10]}")
        assert bridge.stop() == 0, bridge.log()
        # Offsets are committed per partition (one per topic), each bounded by the window.
        check_restart_duplicates(how, down_at, again, TOPICS * 100)
    finally:
        if paced is not None:
            paced.cancel()
        if bridge.alive():
            bridge.kill()
        await sub.close()
        await pub.close()


# ---------------------------------------------------------------------------------------------
# 4. a broker that is not there


CLOSED_URL = {
    "mqtt": "mqtt://127.0.0.1:{port}",
    "nats": "nats://127.0.0.1:{port}",
    "amqp": "amqp://guest:guest@127.0.0.1:{port}/",
    "kafka": "kafka://127.0.0.1:{port}",
}
CAUSE = re.compile(r"refused|connect call failed|errno 111|cannot connect|unreachable", re.I)


@pytest.mark.parametrize("protocol", ["mqtt", "nats", "amqp", "kafka"])
async def test_unreachable_target_exits_with_one_line(
    protocol: str, nats_url: str, unique: str, tmp_path: Path
) -> None:
    port = free_port()
    url = CLOSED_URL[protocol].format(port=port)
    bridge = BridgeProcess(
        f"""
        brokers:
          src: {{url: "{nats_url}"}}
          gone{unique}:
            url: "{url}"
            reconnect: {{initial: 0.1, max: 0.2, attempts: 2}}
        routes:
          - name: gone-{unique}
            from: {{broker: src, filter: "f{unique}.>"}}
            to: [{{broker: gone{unique}}}]
            delivery: at-most-once
        """,
        tmp_path,
    )
    bridge.start()
    assert bridge.proc is not None
    t0 = time.monotonic()
    try:
        code = await asyncio.to_thread(bridge.proc.wait, 20)
    finally:
        if bridge.alive():
            bridge.kill()
    took = time.monotonic() - t0
    out = bridge.log()
    assert code != 0, out
    assert took < 10, f"exit took {took:.1f}s"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1, out
    line = errors[0]
    assert f"gone{unique}" in line, line
    assert f"127.0.0.1:{port}" in line, line
    assert CAUSE.search(line), line
    assert "guest:guest" not in out, "password in the log"


@pytest.mark.parametrize("protocol", ["mqtt", "nats", "kafka"])
async def test_unreachable_target_forever_then_starts(
    protocol: str, nats_url: str, unique: str, tmp_path: Path
) -> None:
    """With ``attempts: null`` the bridge waits for the broker; once a broker is started on
    that port the route works."""
    port = free_port()
    url = CLOSED_URL[protocol].format(port=port)
    p = f"f{unique}"
    extra = ""
    if protocol == "kafka":
        extra = "options: {session_timeout_ms: 6000, heartbeat_interval_ms: 1000}"
    bridge = BridgeProcess(
        f"""
        brokers:
          src: {{url: "{nats_url}"}}
          late:
            url: "{url}"
            reconnect: {{initial: 0.1, max: 0.5, attempts: null}}
            {extra}
        routes:
          - name: late-{p}
            from: {{broker: src, filter: "{p}.>"}}
            to: [{{broker: late}}]
            delivery: at-most-once
        """,
        tmp_path,
    )
    server = {"mqtt": Mosquitto, "nats": NatsServer, "kafka": Tansu}[protocol](port)
    pub = await NatsNative(nats_url).open()
    sub: Any = None
    try:
        bridge.start()
        await asyncio.sleep(3.0)
        assert bridge.alive(), bridge.log()
        assert "Traceback" not in bridge.log(), bridge.log()
        await asyncio.to_thread(server.start)
        sub = await open_native(protocol, server.url)
        await sub.subscribe([{"mqtt": f"{p}/#", "nats": f"{p}.>", "kafka": rf"^{p}\..*"}[protocol]])
        want = f"{p}/x" if protocol == "mqtt" else f"{p}.x"
        await probe_until(
            lambda: pub.publish(f"{p}.x", b"probe"),
            lambda: any(t == want for t, _ in sub.received),
            bridge,
            within=30 if protocol != "kafka" else 60,
        )
        assert bridge.stop() == 0, bridge.log()
        assert "Traceback" not in bridge.log(), bridge.log()
    finally:
        if bridge.alive():
            bridge.kill()
        if sub is not None:
            await sub.close()
        await pub.close()
        server.__exit__(None, None, None)


@pytest.mark.parametrize("protocol", ["mqtt", "nats"])
async def test_unreachable_source_forever_then_starts(
    protocol: str, nats_url: str, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    """A source broker that is down when the bridge starts: once it is up, each message is
    forwarded exactly once (one connection, one subscription, however many dials failed)."""
    port = free_port()
    p = f"f{unique}"
    other = "nats" if protocol == "mqtt" else "mqtt"
    other_url = {"nats": nats_url, "mqtt": mqtt_url}[other]
    src_filter = {"mqtt": f"{p}/#", "nats": f"{p}.>"}
    bridge = BridgeProcess(
        f"""
        brokers:
          late:
            url: "{CLOSED_URL[protocol].format(port=port)}"
            reconnect: {{initial: 0.1, max: 0.5, attempts: null}}
          out: {{url: "{other_url}"}}
        routes:
          - name: late-src-{p}
            from: {{broker: late, filter: "{src_filter[protocol]}"}}
            to: [{{broker: out}}]
            delivery: at-most-once
        """,
        tmp_path,
    )
    server = {"mqtt": Mosquitto, "nats": NatsServer}[protocol](port)
    sub = await open_native(other, other_url)
    pub: Any = None
    try:
        await sub.subscribe([src_filter[other]])
        bridge.start()
        await asyncio.sleep(3.0)
        assert bridge.alive(), bridge.log()
        await asyncio.to_thread(server.start)
        pub = await open_native(protocol, server.url)
        sep = "/" if protocol == "mqtt" else "."
        await probe_until(
            lambda: pub.publish(f"{p}{sep}probe", b"probe"),
            lambda: bool(sub.received),
            bridge,
        )
        count = 50
        for i in range(count):
            await pub.publish(f"{p}{sep}x", str(i).encode())
        osep = "/" if other == "mqtt" else "."
        await wait_for(lambda: len(data(sub.received)) >= count, 10, "messages", bridge.log)
        await asyncio.sleep(1.0)
        assert data(sub.received) == [(f"{p}{osep}x", str(i).encode()) for i in range(count)]
        assert bridge.stop() == 0, bridge.log()
    finally:
        if bridge.alive():
            bridge.kill()
        if pub is not None:
            await pub.close()
        await sub.close()
        server.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------
# 5. echo loops on real brokers


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_bidirectional_no_echo(
    version: str, mqtt_url: str, nats_url: str, unique: str, tmp_path: Path
) -> None:
    """MQTT x/# -> NATS and NATS x.> -> MQTT on one bridge: what is published on each side
    arrives once on the other and never comes back."""
    p = f"f{unique}"
    bridge = BridgeProcess(
        f"""
        bridge: {{id: echo-{p}}}
        brokers:
          mqtt: {{url: "{mqtt_url}", options: {{version: "{version}", client_id: fb-{p}}}}}
          nats: {{url: "{nats_url}"}}
        routes:
          - name: up-{p}
            from: {{broker: mqtt, filter: "{p}/#"}}
            to: [{{broker: nats}}]
          - name: down-{p}
            from: {{broker: nats, filter: "{p}.>"}}
            to: [{{broker: mqtt}}]
        """,
        tmp_path,
    )
    m = await MqttNative(mqtt_url).open()
    n = await NatsNative(nats_url).open()
    try:
        await m.subscribe([f"{p}/#"])
        await n.subscribe([f"{p}.>"])
        bridge.start()
        await probe_until(
            lambda: m.publish(f"{p}/probe/m", b"probe"),
            lambda: any(t == f"{p}.probe.m" for t, _ in n.received),
            bridge,
        )
        await probe_until(
            lambda: n.publish(f"{p}.probe.n", b"probe"),
            lambda: any(t == f"{p}/probe/n" for t, _ in m.received),
            bridge,
        )
        per_side = 20
        for i in range(per_side):
            await m.publish(f"{p}/from/mqtt", f"m{i}".encode())
            await n.publish(f"{p}.from.nats", f"n{i}".encode())
        await n.nc.flush()
        await wait_for(
            lambda: len(data(m.received)) >= 2 * per_side and len(data(n.received)) >= 2 * per_side,
            10,
            "both directions",
            bridge.log,
        )
        await asyncio.sleep(1.0)  # echoes would arrive now
        ms = [f"m{i}".encode() for i in range(per_side)]
        ns = [f"n{i}".encode() for i in range(per_side)]
        # Each side: its own publishes once (the native client's own echo) and the other
        # side's once, in order; nothing else.
        assert sorted(data(m.received)) == sorted(
            [(f"{p}/from/mqtt", x) for x in ms] + [(f"{p}/from/nats", x) for x in ns]
        )
        assert sorted(data(n.received)) == sorted(
            [(f"{p}.from.mqtt", x) for x in ms] + [(f"{p}.from.nats", x) for x in ns]
        )
        assert [x for t, x in m.received if t == f"{p}/from/nats"] == ns
        assert [x for t, x in n.received if t == f"{p}.from.mqtt"] == ms
        # Probes crossed too and never came back either.
        assert not any(t == f"{p}/probe/m" and x != b"probe" for t, x in m.received)
        assert bridge.stop() == 0, bridge.log()
    finally:
        if bridge.alive():
            bridge.kill()
        await m.close()
        await n.close()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_four_broker_mirror_no_echo(
    version: str,
    mqtt_url: str,
    nats_url: str,
    amqp_url: str,
    kafka_url: str,
    unique: str,
    tmp_path: Path,
) -> None:
    """12 routes, each broker to each other one: one message published on each broker
    arrives exactly once on each of the other three, and never twice anywhere."""
    p = f"f{unique}"
    urls = {"mqtt": mqtt_url, "nats": nats_url, "amqp": amqp_url, "kafka": kafka_url}
    protos = list(urls)
    filters = {"mqtt": f"{p}/#", "nats": f"{p}.>", "amqp": f"{p}.#", "kafka": f"{p}.#"}
    native_filters = {"mqtt": f"{p}/#", "nats": f"{p}.>", "amqp": f"{p}.#", "kafka": rf"^{p}\..*"}

    def name(proto: str, *levels: str) -> str:
        sep = "/" if proto == "mqtt" else "."
        return p + sep + sep.join(levels)

    options = {
        "mqtt": f'{{client_id: fb-{p}, version: "{version}"}}',
        # A produce Tansu leaves unanswered fails after this and is retried (held, not lost).
        "kafka": "{session_timeout_ms: 6000, heartbeat_interval_ms: 1000, "
        "metadata_max_age_ms: 1000, request_timeout_ms: 8000}",
    }
    brokers = "\n".join(
        f'          {proto}: {{url: "{urls[proto]}", options: {options.get(proto, "{}")}}}'
        for proto in protos
    )
    routes = []
    for src in protos:
        for dst in protos:
            # One group per route: routes sharing a group would split the partitions.
            group = f", group: g-{p}-{dst}" if src == "kafka" else ""
            if dst != src:
                routes.append(
                    f"          - name: m-{p}-{src}-{dst}\n"
                    f'            from: {{broker: {src}, filter: "{filters[src]}"{group}}}\n'
                    f"            to: [{{broker: {dst}}}]"
                )
    mapping = (
        f"\n        bridge: {{id: mirror-{p}}}\n        brokers:\n{brokers}\n"
        "        routes:\n" + "\n".join(routes) + "\n"
    )
    bridge = BridgeProcess(mapping, tmp_path)
    natives: dict[str, Any] = {}
    try:
        for proto in protos:
            natives[proto] = await open_native(proto, urls[proto])
        kafka = natives["kafka"]
        await kafka.create([name("kafka", "probe", "kafka"), name("kafka", "from", "kafka")])
        for proto in protos:
            await natives[proto].subscribe([native_filters[proto]])
        bridge.start()

        async def publish(proto: str, topic: str, payload: bytes) -> None:
            await natives[proto].publish(topic, payload)
            if proto == "kafka":
                await kafka.flush()

        def dead_pairs() -> list[str]:
            """Routes whose probe has not crossed yet."""
            return [
                f"{src}->{dst}"
                for src in protos
                for dst in protos
                if dst != src
                and not any(t == name(dst, "probe", src) for t, _ in natives[dst].received)
            ]

        # Every route is ready once each broker's probe reached the three others.
        deadline = time.monotonic() + 60
        while pending := dead_pairs():
            assert bridge.alive(), bridge.log()
            assert time.monotonic() < deadline, f"routes never ready: {pending}"
            for src in {pair.split("->")[0] for pair in pending}:
                await publish(src, name(src, "probe", src), b"probe")
            await asyncio.sleep(0.25)
        for src in protos:
            await publish(src, name(src, "from", src), f"hello-{src}".encode())

        def complete() -> bool:
            return all(len(data(natives[d].received)) >= len(protos) for d in protos)

        await wait_for(
            complete,
            30,
            "the mirror",
            lambda: f"{ {d: natives[d].received for d in protos} }\n{bridge.log()}",
        )
        await asyncio.sleep(1.5)  # echoes and duplicates would arrive now
        for dst in protos:
            # Each broker holds each origin's message once: the native client's own
            # publish and the three forwarded copies.
            want = sorted((name(dst, "from", src), f"hello-{src}".encode()) for src in protos)
            assert sorted(data(natives[dst].received)) == want, (dst, natives[dst].received)
        assert bridge.stop() == 0, bridge.log()
    finally:
        if bridge.alive():
            bridge.kill()
        for native in natives.values():
            with contextlib.suppress(Exception):
                await native.close()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_routes_sharing_an_mqtt_filter_each_get_every_message(
    version: str, mqtt_url: str, nats_url: str, amqp_url: str, unique: str, tmp_path: Path
) -> None:
    """Two routes of one MQTT broker with the same filter (one to NATS, one to AMQP): each
    route forwards every message.  The broker keeps one subscription per filter and session,
    so the second SUBSCRIBE replaces the first one's options."""
    p = f"f{unique}"
    bridge = BridgeProcess(
        f"""
        brokers:
          mqtt: {{url: "{mqtt_url}", options: {{client_id: fb-{p}, version: "{version}"}}}}
          nats: {{url: "{nats_url}"}}
          rabbit: {{url: "{amqp_url}"}}
        routes:
          - name: a-{p}
            from: {{broker: mqtt, filter: "{p}/#"}}
            to: [{{broker: nats}}]
          - name: b-{p}
            from: {{broker: mqtt, filter: "{p}/#"}}
            to: [{{broker: rabbit}}]
        """,
        tmp_path,
    )
    pub = await MqttNative(mqtt_url).open()
    to_nats = await NatsNative(nats_url).open()
    to_amqp = await AmqpNative(amqp_url).open()
    try:
        await to_nats.subscribe([f"{p}.>"])
        await to_amqp.subscribe([f"{p}.#"])
        bridge.start()
        # Both routes log their subscription before the broker has either; give it time.
        await wait_for(lambda: bridge.log().count("subscribes") >= 2, 10, "routes", bridge.log)
        await asyncio.sleep(1.0)
        count = 20
        for i in range(count):
            await pub.publish(f"{p}/x", str(i).encode())
        want = [str(i).encode() for i in range(count)]

        def arrived() -> bool:
            return len(to_nats.received) >= count and len(to_amqp.received) >= count

        with contextlib.suppress(AssertionError):  # the exact check below says what is missing
            await wait_for(arrived, 10, "both routes", bridge.log)
        await asyncio.sleep(0.5)
        got = {
            "nats": [m for _, m in to_nats.received],
            "amqp": [m for _, m in to_amqp.received],
        }
        assert got == {"nats": want, "amqp": want}, (got, bridge.log()[-3000:])
        assert bridge.stop() == 0, bridge.log()
    finally:
        if bridge.alive():
            bridge.kill()
        await pub.close()
        await to_nats.close()
        await to_amqp.close()
