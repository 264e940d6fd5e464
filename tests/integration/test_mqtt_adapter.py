"""MQTT adapter against real brokers (Mosquitto, amqtt), aiomqtt/paho on the other side."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from amqtt.broker import Broker
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowbridge.adapters import mqtt as mqtt_adapter
from flowbridge.adapters.base import Backoff, ConnState, Delivery, Message, Subscription
from flowbridge.adapters.mqtt import (
    MqttAdapter,
    MqttBrokerOptions,
    MqttSourceOptions,
    MqttTargetOptions,
)
from flowbridge.errors import ConnectError, PublishError
from tests.support.brokers import Mosquitto, free_port, host_port

VERSIONS = ["5", "3.1.1"]
PAHO = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


def make(url: str, version: str, name: str = "mq", **opts: Any) -> MqttAdapter:
    backoff = opts.pop("backoff", Backoff(0.05, 0.5, attempts=3))
    return MqttAdapter(
        name, url, MqttBrokerOptions.model_validate({"version": version, **opts}), backoff
    )


@contextlib.asynccontextmanager
async def running(adapter: MqttAdapter) -> AsyncIterator[MqttAdapter]:
    await adapter.connect()
    try:
        yield adapter
    finally:
        await adapter.close()


@contextlib.asynccontextmanager
async def native(url: str, version: str, **kw: Any) -> AsyncIterator[aiomqtt.Client]:
    host, port = host_port(url, 1883)
    async with aiomqtt.Client(host, port, protocol=PAHO[version], **kw) as client:
        yield client


class Reader:
    """Consumes a subscription in the background like a route would."""

    def __init__(
        self, adapter: MqttAdapter, sub: Subscription, *, ack: bool = True, delay: float = 0.0
    ) -> None:
        self.adapter = adapter
        self.sub = sub
        self.ack = ack
        self.delay = delay
        self.got: list[Delivery] = []
        self.batches = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.adapter.subscribe(self.sub):
            self.got.extend(batch)
            self.batches += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.ack:
                for d in batch:
                    d.ack()

    async def ready(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self.until(
            lambda: any(r.sub is self.sub and r.active for r in self.adapter._routes.values()),
            timeout,
            "subscription active",
        )

    async def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            if self.task.done():
                self.task.result()
                raise AssertionError(f"reader ended before {what}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {len(self.got)}")
            await asyncio.sleep(0.01)

    async def wait(self, n: int, timeout: float = 10.0) -> list[Delivery]:  # noqa: ASYNC109
        await self.until(lambda: len(self.got) >= n, timeout, f"{n} deliveries")
        return self.got

    def payloads(self) -> list[bytes]:
        return [d.message.payload for d in self.got]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def subscribed(
    a: MqttAdapter, sub: Subscription
) -> tuple[AsyncIterator[list[Any]], asyncio.Future[list[Any]]]:
    """Start a route's iterator by hand (the test decides when it takes and acks) and
    return once its subscription is active, with the future of its first batch."""
    it = a.subscribe(sub)
    first = asyncio.ensure_future(anext(it))
    async with asyncio.timeout(5):
        while not any(r.sub is sub and r.active for r in a._routes.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return it, first


async def collect(
    client: aiomqtt.Client,
    n: int,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[aiomqtt.Message]:
    out: list[aiomqtt.Message] = []
    async with asyncio.timeout(timeout):
        async for m in client.messages:
            out.append(m)
            if len(out) >= n:
                break
    return out


async def forget_session(url: str, version: str, client_id: str) -> None:
    """Drop a persistent session left on the shared broker."""
    host, port = host_port(url, 1883)
    kw: dict[str, Any] = {"identifier": client_id}
    if version == "3.1.1":
        kw["clean_session"] = True
    async with aiomqtt.Client(host, port, protocol=PAHO[version], **kw):
        pass


class ConfiguredMosquitto(Mosquitto):
    """A Mosquitto of the test's own with extra configuration lines and an ACL."""

    def __init__(self, extra: str = "", acl: str | None = None) -> None:
        super().__init__()
        self.extra = extra
        self.acl = acl

    def command(self) -> list[str]:
        cmd = super().command()
        conf = Path(cmd[-1])
        text = conf.read_text() + self.extra  # the base config already runs it as root
        if self.acl is not None:
            acl = Path(self.workdir) / "acl"
            acl.write_text(self.acl)
            text += f"acl_file {acl}\n"
        conf.write_text(text)
        return cmd


# ---------------------------------------------------------------------------- receiving


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_native_to_adapter(mqtt_url: str, unique: str, version: str, qos: int) -> None:
    topic = f"fbt/{unique}/in"
    async with running(make(mqtt_url, version, clean_start=True)) as a:
        sub = Subscription("r", (f"fbt/{unique}/+",), durable=False,
                           options=MqttSourceOptions.model_validate({"qos": qos}))  # fmt: skip
        reader = Reader(a, sub)
        await reader.ready()
        async with native(mqtt_url, version) as pub:
            for i in range(50):
                await pub.publish(topic, f"m{i}".encode(), qos=qos)
        await reader.wait(50)
        assert reader.payloads() == [f"m{i}".encode() for i in range(50)]
        assert all(d.message.topic == topic for d in reader.got)
        await reader.stop()


@pytest.mark.parametrize("version", VERSIONS)
async def test_ordering_and_batches(mqtt_url: str, unique: str, version: str) -> None:
    topic = f"fbt/{unique}/order"
    n = 1000
    async with running(make(mqtt_url, version, clean_start=True)) as a:
        reader = Reader(a, Subscription("r", (topic,), durable=False, max_in_flight=100))
        await reader.ready()
        async with native(mqtt_url, version, max_inflight_messages=100) as pub:
            await asyncio.gather(*(pub.publish(topic, str(i), qos=1) for i in range(n)))
        await reader.wait(n)
        assert [int(p) for p in reader.payloads()] == list(range(n))
        assert reader.batches < n  # several messages per await
        await reader.stop()


@pytest.mark.parametrize("version", VERSIONS)
async def test_shared_subscription(mqtt_url: str, unique: str, version: str) -> None:
    topic = f"fbt/{unique}/shared"
    sub = Subscription("r", (topic,), durable=False, group=f"g{unique}")
    async with (
        running(make(mqtt_url, version, "s1", clean_start=True)) as a1,
        running(make(mqtt_url, version, "s2", clean_start=True)) as a2,
    ):
        r1, r2 = Reader(a1, sub), Reader(a2, sub)
        await r1.ready()
        await r2.ready()
        async with native(mqtt_url, version) as pub:
            for i in range(40):
                await pub.publish(topic, str(i), qos=1)
        await r1.until(lambda: len(r1.got) + len(r2.got) >= 40, 10, "40 messages")
        await asyncio.sleep(0.2)
        got = r1.payloads() + r2.payloads()
        assert sorted(int(p) for p in got) == list(range(40))  # each exactly once
        assert r1.got
        assert r2.got
        await r1.stop()
        await r2.stop()


@pytest.mark.parametrize("version", VERSIONS)
async def test_unacked_redelivered_after_reconnect(
    mqtt_url: str, unique: str, version: str
) -> None:
    topic = f"fbt/{unique}/durable"
    cid = f"fbt-{unique}"
    a = make(mqtt_url, version, client_id=cid, session_expiry=60)
    try:
        async with running(a):
            reader = Reader(a, Subscription("r", (topic,), durable=True), ack=False)
            await reader.ready()
            async with native(mqtt_url, version) as pub:
                for i in range(5):
                    await pub.publish(topic, str(i), qos=1)
            first = list(await reader.wait(5))
            first[0].ack()
            first[1].ack()
            await asyncio.sleep(0.1)  # the two PUBACKs are written
            assert a._conn is not None
            assert a._conn.transport is not None
            a._conn.transport.abort()  # connection lost with 3 unacked
            await reader.wait(8)
            assert a.health().reconnects == 1
            assert [d.message.payload for d in reader.got[5:]] == [b"2", b"3", b"4"]
            for d in first[2:]:
                d.ack()  # from before the reconnect: must be ignored, not sent
            for d in reader.got[5:]:
                d.ack()
            await asyncio.sleep(0.1)
            a._conn.transport.abort()
            assert await a.wait_connected(5)
            await asyncio.sleep(0.3)
            assert len(reader.got) == 8  # acked ones are not redelivered
            await reader.stop()
    finally:
        await forget_session(mqtt_url, version, cid)


@pytest.mark.parametrize("version", VERSIONS)
async def test_persistent_session_survives_bridge_restart(
    mqtt_url: str, unique: str, version: str
) -> None:
    topic = f"fbt/{unique}/restart"
    cid = f"fbt-{unique}"
    sub = Subscription("r", (topic,), durable=True)
    try:
        async with running(make(mqtt_url, version, client_id=cid)) as a:
            reader = Reader(a, sub)
            await reader.ready()
            await reader.stop()
        # Bridge down: messages queue in the broker's session.
        async with native(mqtt_url, version) as pub:
            for i in range(10):
                await pub.publish(topic, str(i), qos=1)
        async with running(make(mqtt_url, version, client_id=cid)) as a:
            reader = Reader(a, sub)
            await reader.wait(10)
            assert reader.payloads() == [str(i).encode() for i in range(10)]
            await reader.stop()
    finally:
        await forget_session(mqtt_url, version, cid)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_route_stopped_with_a_backlog_finds_it_when_it_comes_back(
    mqtt_url: str, unique: str, version: str
) -> None:
    """A reload stops a route and starts it again on the same connection: what the first
    had received and not taken goes to the second, in order (left unacked, those QoS 1
    messages held back every later ack and the broker's window: the route stalled)."""
    topic = f"fbt/{unique}/reload"
    cid = f"fbt-{unique}"
    sub = Subscription("r", (topic,), durable=True, max_in_flight=5)
    try:
        async with running(make(mqtt_url, version, client_id=cid)) as a:
            it, first_batch = await subscribed(a, sub)
            async with native(mqtt_url, version) as pub:
                for i in range(40):
                    await pub.publish(topic, str(i), qos=1)
            batch = await first_batch
            first: list[bytes] = []
            while True:  # the route acks what it took, then stops with the rest waiting
                for d in batch:
                    d.ack()
                first += [d.message.payload for d in batch]
                if len(first) >= 10:
                    break
                batch = await anext(it)
            await it.aclose()
            again = Reader(a, sub)
            await again.wait(40 - len(first))
            assert first + again.payloads() == [str(i).encode() for i in range(40)]
            await asyncio.sleep(0.2)
            assert len(again.got) == 40 - len(first)
            await again.stop()
    finally:
        await forget_session(mqtt_url, version, cid)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_backlog_no_route_takes_back_is_acked_and_counted(
    mqtt_url: str, unique: str, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"fbt/{unique}/gone"
    async with running(make(mqtt_url, version, clean_start=True)) as a:
        sub = Subscription("gone", (topic,), durable=False, max_in_flight=5)
        it, first_batch = await subscribed(a, sub)
        async with native(mqtt_url, version) as pub:
            for i in range(20):
                await pub.publish(topic, str(i), qos=1)
        taken = await first_batch
        for d in taken:
            d.ack()
        await asyncio.sleep(0.3)  # more arrives and waits
        await it.aclose()
        left = 20 - len(taken)  # what the route held, then what arrived for no route
        async with asyncio.timeout(5):
            while len(a._orphans) < left:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        monkeypatch.setattr(mqtt_adapter, "ORPHAN_GRACE", 0.0)
        a._expire_orphans()
        assert a.counters() == {"orphans_dropped": left}
        assert not a._order  # every ack went out: later messages are not held back
        other = f"fbt/{unique}/other"
        reader = Reader(a, Subscription("other", (other,), durable=False))
        await reader.ready()
        async with native(mqtt_url, version) as pub:
            await pub.publish(other, b"after", qos=1)
        await reader.wait(1)
        await reader.stop()


@pytest.mark.parametrize("version", VERSIONS)
async def test_qos0_messages_left_at_close_are_counted(
    mqtt_url: str, unique: str, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"fbt/{unique}/closing"
    a = make(mqtt_url, version, clean_start=True)
    async with running(a):
        sub = Subscription("r", (topic,), durable=False, max_in_flight=5)
        it, first_batch = await subscribed(a, sub)
        async with native(mqtt_url, version) as pub:
            for i in range(20):
                await pub.publish(topic, str(i), qos=0)
        taken = len(await first_batch)
        await it.aclose()
        async with asyncio.timeout(5):
            while len(a._orphans) < 20 - taken:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    assert a.counters() == {"orphans_dropped": 20 - taken}
    assert f"{20 - taken} message(s) received for no route lost at close" in caplog.text


@pytest.mark.parametrize("version", VERSIONS)
async def test_close_drops_only_transient_subscriptions(
    mqtt_url: str, unique: str, version: str
) -> None:
    cid = f"fbt-{unique}"
    keep, drop = f"fbt/{unique}/keep", f"fbt/{unique}/drop"
    try:
        async with running(make(mqtt_url, version, client_id=cid)) as a:
            r1 = Reader(a, Subscription("durable", (keep,), durable=True))
            r2 = Reader(a, Subscription("transient", (drop,), durable=False))
            await r1.ready()
            await r2.ready()
        async with native(mqtt_url, version) as pub:
            await pub.publish(drop, b"d", qos=1)
            await pub.publish(keep, b"k", qos=1)
        async with running(make(mqtt_url, version, client_id=cid)) as a:
            reader = Reader(a, Subscription("durable", (keep,), durable=True))
            await reader.wait(1)
            await asyncio.sleep(0.3)
            assert reader.payloads() == [b"k"]
            assert not a._orphans  # nothing arrived for the transient route
            await reader.stop()
    finally:
        await forget_session(mqtt_url, version, cid)


@pytest.mark.parametrize("version", VERSIONS)
async def test_in_flight_is_bounded(mqtt_url: str, unique: str, version: str) -> None:
    topic = f"fbt/{unique}/bound"
    async with running(make(mqtt_url, version, clean_start=True, receive_maximum=20)) as a:
        reader = Reader(a, Subscription("r", (topic,), durable=False, max_in_flight=20), ack=False)
        await reader.ready()
        async with native(mqtt_url, version) as pub:
            for i in range(200):
                await pub.publish(topic, str(i), qos=1)
        await reader.wait(20)
        await asyncio.sleep(0.3)
        # QoS 1: at most the receive maximum (v5) or roughly the pause threshold (3.1.1).
        assert 20 <= len(reader.got) < 100
        for d in list(reader.got):
            d.ack()
        await reader.until(lambda: len(reader.got) >= 40, 5, "more after acks")
        await reader.stop()


# ---------------------------------------------------------------------------- publishing


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_adapter_to_native(mqtt_url: str, unique: str, version: str, qos: int) -> None:
    topic = f"fbt/{unique}/out"
    async with native(mqtt_url, version) as sub, running(make(mqtt_url, version)) as a:
        await sub.subscribe(topic, qos=2)
        msgs = [Message(topic, f"m{i}".encode()) for i in range(100)]
        outcome = await a.publish(
            msgs, confirm=qos > 0, options=MqttTargetOptions.model_validate({"qos": qos})
        )
        assert outcome is None
        got = await collect(sub, 100)
        assert [m.payload for m in got] == [m.payload for m in msgs]
        assert {m.qos for m in got} == {qos}


@pytest.mark.parametrize("version", VERSIONS)
async def test_qos2_publish_across_connection_loss(
    mqtt_url: str, unique: str, version: str
) -> None:
    # Identifiers of QoS 2 publishes cut off by the loss stay held in the broker's session;
    # reusing one before PUBREL would make the broker discard the new message.
    topic = f"fbt/{unique}/q2"
    cid = f"fbt-{unique}"
    opts = MqttTargetOptions(qos=2)
    n = 300
    try:
        async with (
            native(mqtt_url, version) as sub,
            running(make(mqtt_url, version, client_id=cid)) as a,
        ):
            await sub.subscribe(topic, qos=2)
            msgs = [Message(topic, str(i).encode()) for i in range(n)]
            task = asyncio.create_task(a.publish(msgs, confirm=True, options=opts))
            await asyncio.sleep(0.01)
            assert a._conn is not None
            assert a._conn.transport is not None
            a._conn.transport.abort()
            with pytest.raises(PublishError) as e:
                await task
            assert e.value.retriable
            assert await a.wait_connected(5)
            assert await a.publish(msgs, confirm=True, options=opts) is None
            got: set[bytes] = set()
            async with asyncio.timeout(10):
                async for m in sub.messages:
                    got.add(bytes(m.payload))
                    if len(got) == n:
                        break
            assert got == {str(i).encode() for i in range(n)}
    finally:
        await forget_session(mqtt_url, version, cid)


async def test_v5_properties_both_ways(mqtt_url: str, unique: str) -> None:
    topic = f"fbt/{unique}/props"
    async with native(mqtt_url, "5") as peer, running(make(mqtt_url, "5")) as a:
        await peer.subscribe(f"{topic}/out", qos=1)
        reader = Reader(a, Subscription("r", (f"{topic}/in",), durable=False))
        await reader.ready()
        props: Any = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = "application/json"
        props.CorrelationData = b"\x00\xffid"
        props.ResponseTopic = "reply/x"
        props.UserProperty = [
            ("a", "1"),
            ("message-id", "m-1"),
            ("a", "2"),
            ("timestamp", "2023-11-14T22:13:20.123Z"),
            ("b", ""),
        ]
        await peer.publish(f"{topic}/in", b"{}", qos=1, properties=props)
        (d,) = await reader.wait(1)
        m = d.message
        assert m.content_type == "application/json"
        assert m.correlation_id == b"\x00\xffid"
        assert m.reply_to == "reply/x"
        assert m.message_id == "m-1"
        assert m.timestamp == pytest.approx(1_700_000_000.123)
        assert m.headers == [("a", "1"), ("a", "2"), ("b", "")]
        await reader.stop()

        out = Message(
            f"{topic}/out",
            b"x",
            headers=[("k", "1"), ("k", "2"), ("z", "3")],
            content_type="text/plain",
            correlation_id=b"\x01\x02",
            reply_to="r/t",
            message_id="id-9",
            timestamp=1_700_000_000.5,
        )
        assert await a.publish([out], confirm=True) is None
        (got,) = await collect(peer, 1)
        p: Any = got.properties
        assert p is not None
        assert p.ContentType == "text/plain"
        assert p.CorrelationData == b"\x01\x02"
        assert p.ResponseTopic == "r/t"
        assert p.UserProperty == [
            ("message-id", "id-9"),
            ("timestamp", "2023-11-14T22:13:20.500Z"),
            ("k", "1"),
            ("k", "2"),
            ("z", "3"),
        ]

        # One header list shared by several messages (as a route's per topic) is encoded
        # once; what else a message carries, and the target's expiry, still come out.
        shared = [("via", "x"), ("via", "y")]
        batch = [
            Message(f"{topic}/out", b"1", headers=shared),
            Message(f"{topic}/out", b"2", headers=shared, message_id="m-2"),
            Message(f"{topic}/out", b"3", headers=shared),
        ]
        assert await a.publish(batch, confirm=True) is None
        expiring = MqttTargetOptions(message_expiry=60)
        assert await a.publish(batch[2:], confirm=True, options=expiring) is None
        got4 = await collect(peer, 4)
        assert [g.payload for g in got4] == [b"1", b"2", b"3", b"3"]
        users = [g.properties.UserProperty for g in got4]  # type: ignore[union-attr]
        assert users == [shared, [("message-id", "m-2"), *shared], shared, shared]
        assert [getattr(g.properties, "MessageExpiryInterval", None) for g in got4][:3] == [
            None,
            None,
            None,
        ]
        assert 0 < got4[3].properties.MessageExpiryInterval <= 60  # type: ignore[union-attr]
        assert shared == [("via", "x"), ("via", "y")]


async def test_v5_no_local_never_echoes(mqtt_url: str, unique: str) -> None:
    topic = f"fbt/{unique}/echo"
    async with running(make(mqtt_url, "5", clean_start=True)) as a:
        reader = Reader(a, Subscription("r", (topic,), durable=False))
        await reader.ready()
        await a.publish([Message(topic, b"own")], confirm=True)
        async with native(mqtt_url, "5") as pub:
            await pub.publish(topic, b"foreign", qos=1)
        await reader.wait(1)
        await asyncio.sleep(0.2)
        assert reader.payloads() == [b"foreign"]
        await reader.stop()


@pytest.mark.parametrize("version", VERSIONS)
async def test_retain_flag(mqtt_url: str, unique: str, version: str) -> None:
    topic = f"fbt/{unique}/retained"
    async with running(make(mqtt_url, version)) as a:
        await a.publish([Message(topic, b"state", retain=True)], confirm=True)
        try:
            async with native(mqtt_url, version) as sub:
                await sub.subscribe(topic, qos=1)
                (m,) = await collect(sub, 1)
                assert m.payload == b"state"
                assert m.retain
            reader = Reader(a, Subscription("r", (topic,), durable=False))
            (d,) = await reader.wait(1)
            assert d.message.retain
            await reader.stop()
        finally:
            await a.publish(
                [Message(topic, b"")], confirm=True, options=MqttTargetOptions(retain=True)
            )


# ---------------------------------------------------------------------------- failures


async def test_connect_error_names_broker_and_hides_password() -> None:
    port = free_port()
    a = make(f"mqtt://user:secret@127.0.0.1:{port}", "5", "down",
             backoff=Backoff(0.01, 0.02, attempts=2))  # fmt: skip
    with pytest.raises(ConnectError, match=rf"broker down \(mqtt://127.0.0.1:{port}\): ") as e:
        await a.connect()
    assert "secret" not in str(e.value)


def test_check_source_refuses_qos0_durable() -> None:
    msg = MqttAdapter.check_source(MqttSourceOptions(qos=0), durable=True)
    assert msg is not None
    assert "qos 0" in msg
    assert MqttAdapter.check_source(MqttSourceOptions(qos=1), durable=True) is None
    assert MqttAdapter.check_target(MqttTargetOptions(qos=0), confirm=True) is not None


def test_headers_only_with_v5() -> None:
    assert make("mqtt://127.0.0.1:1", "5").supports_headers
    assert not make("mqtt://127.0.0.1:1", "3.1.1").supports_headers


async def test_v5_refused_publish_is_a_per_message_error(unique: str) -> None:
    broker = ConfiguredMosquitto(acl="topic readwrite open/#\n")
    with broker:
        async with native(broker.url, "5") as sub, running(make(broker.url, "5")) as a:
            await sub.subscribe("#", qos=1)
            msgs = [Message("open/x", b"1"), Message("closed/x", b"2"), Message("open/y", b"3")]
            out = await a.publish(msgs, confirm=True)
            assert out is not None
            assert out[0] is None
            assert out[2] is None
            assert isinstance(out[1], PublishError)
            assert not out[1].retriable
            assert "0x87" in out[1].reason
            assert "'closed/x'" in out[1].reason
            got = await collect(sub, 2)
            assert [m.payload for m in got] == [b"1", b"3"]


async def test_message_over_max_packet_size_refused(unique: str) -> None:
    broker = ConfiguredMosquitto(extra="max_packet_size 2000\n")
    with broker:
        async with native(broker.url, "5") as sub, running(make(broker.url, "5")) as a:
            assert a.max_payload() == 2000
            await sub.subscribe("big/#", qos=1)
            msgs = [Message("big/1", b"a"), Message("big/2", b"x" * 3000), Message("big/3", b"c")]
            out = await a.publish(msgs, confirm=True)
            assert out is not None
            assert out[0] is None
            assert out[2] is None
            assert isinstance(out[1], PublishError)
            assert not out[1].retriable
            got = await collect(sub, 2)
            assert [m.payload for m in got] == [b"a", b"c"]
            assert a.health().ok


@pytest.mark.parametrize("version", VERSIONS)
async def test_durable_route_survives_broker_restart(unique: str, version: str) -> None:
    topic = f"fbt/{unique}/restart"
    n = 300
    broker = ConfiguredMosquitto()  # its own Mosquitto, persistence on
    with broker:
        a = make(broker.url, version, client_id=f"fbt-{unique}", receive_maximum=10)
        async with running(a):
            sub = Subscription("r", (topic,), durable=True, max_in_flight=10)
            reader = Reader(a, sub, delay=0.05)  # a slow route: the broker queues
            await reader.ready()
            async with native(broker.url, version, max_inflight_messages=50) as pub:
                await asyncio.gather(*(pub.publish(topic, str(i), qos=1) for i in range(n)))
            assert len(reader.got) < n  # mid-stream
            await asyncio.to_thread(broker.stop)
            await reader.until(lambda: a.health().state is not ConnState.CONNECTED, 5, "loss")
            with pytest.raises(PublishError) as e:
                await a.publish([Message(topic, b"x")], confirm=True)
            assert e.value.retriable
            await asyncio.to_thread(broker.start)
            await reader.until(
                lambda: {int(p) for p in reader.payloads()} >= set(range(n)), 30, "all messages"
            )
            assert a.health().reconnects >= 1
            assert a.health().ok
            await reader.stop()


# ---------------------------------------------------------------------------- amqtt


async def stop_amqtt(broker: Broker) -> None:
    await broker.shutdown()
    # amqtt leaves its server-side stream writers to the garbage collector.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def amqtt_broker(port: int, plugins: dict[str, Any] | None = None) -> Broker:
    return Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                **(plugins or {}),
            },
        }
    )


async def test_amqtt_accepts_the_client(unique: str) -> None:
    port = free_port()
    broker = amqtt_broker(port)
    await broker.start()
    try:
        url = f"mqtt://127.0.0.1:{port}"
        async with running(make(url, "3.1.1", clean_start=True)) as a:
            reader = Reader(a, Subscription("r", (f"t/{unique}/#",), durable=False))
            await reader.ready()
            async with native(url, "3.1.1") as peer:
                await peer.subscribe(f"u/{unique}", qos=1)
                for qos in (0, 1, 2):
                    await peer.publish(f"t/{unique}/{qos}", str(qos), qos=qos)
                await reader.wait(3)
                assert sorted(reader.payloads()) == [b"0", b"1", b"2"]
                out = [Message(f"u/{unique}", str(q).encode()) for q in range(3)]
                assert await a.publish(out, confirm=True, options=MqttTargetOptions(qos=2)) is None
                got = await collect(peer, 3)
                assert [m.payload for m in got] == [b"0", b"1", b"2"]
            await reader.stop()
    finally:
        await stop_amqtt(broker)


async def test_refused_subscription_names_the_filter(unique: str) -> None:
    # Mosquitto 2.0 grants every subscription (its ACL filters at delivery); amqtt's topic
    # ACL plugin refuses in SUBACK.
    port = free_port()
    acl = {"anonymous": [f"open/{unique}/#"]}
    broker = amqtt_broker(
        port, {"amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"acl": acl}}
    )
    await broker.start()
    try:
        url = f"mqtt://127.0.0.1:{port}"
        async with running(make(url, "3.1.1", clean_start=True)) as a:
            sub = Subscription("r", (f"open/{unique}/a", f"closed/{unique}"), durable=False)
            reader = Reader(a, sub)
            with pytest.raises(Exception, match=rf"refused subscription to 'closed/{unique}'"):
                await asyncio.wait_for(reader.task, 5)
            assert not a.health().ok or not a._routes
    finally:
        await stop_amqtt(broker)
