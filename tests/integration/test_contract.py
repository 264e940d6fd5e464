"""The adapter contract (flowbridge/adapters/base.py), one suite run against every real broker.

``AdapterContract`` holds the shared cases; each ``Test*`` class below is one broker flavour
and runs every case.  Where a protocol cannot do something, the flavour says so with a
capability flag and the case asserts the documented behaviour instead (no skips).  The
other side of every exchange is a native client of the protocol (contract_support.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

import aio_pika
import aiomqtt
import nats
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.js.api import StreamConfig

from flowbridge.adapters.amqp import AmqpAdapter, AmqpBrokerOptions, AmqpSourceOptions
from flowbridge.adapters.base import (
    Adapter,
    Backoff,
    ConnState,
    Message,
    Options,
    Subscription,
)
from flowbridge.adapters.kafka import KafkaAdapter, KafkaBrokerOptions, KafkaSourceOptions
from flowbridge.adapters.mqtt import MqttAdapter, MqttBrokerOptions, MqttSourceOptions
from flowbridge.adapters.nats import (
    JetStreamSource,
    NatsAdapter,
    NatsBrokerOptions,
    NatsSourceOptions,
    NatsTargetOptions,
)
from flowbridge.errors import PublishError
from tests.integration.contract_support import (
    NATIVE_CONTENT_TYPE,
    NATIVE_CORRELATION,
    NATIVE_HEADER,
    NATIVE_MESSAGE_ID,
    AmqpNative,
    JetStreamNative,
    KafkaNative,
    LimitedMosquitto,
    MqttNative,
    Native,
    NatsNative,
    Reader,
)
from tests.support.brokers import host_port

BACKOFF = Backoff(initial=0.05, maximum=0.5, attempts=3)
TIMESTAMP = 1_700_000_000.123
NAMED = frozenset({"content_type", "correlation_id", "reply_to", "message_id", "timestamp"})


class AdapterContract:
    """Shared cases; a flavour subclass supplies the hooks and capability flags below."""

    # -- capability flags (defaults: everything the contract offers) -------------------
    adapter_class: ClassVar[type[Adapter]]
    can_ack: ClassVar[bool] = True  # at-least-once: acks, redelivery, an in-flight bound
    has_headers: ClassVar[bool] = True
    # "total": headers come back exactly as sent; "per_name": grouped by name in sorted
    # order, values of one name in order (an AMQP field table).
    header_order: ClassVar[Literal["total", "per_name"]] = "total"
    carried: ClassVar[frozenset[str]] = NAMED  # named fields that survive a round trip
    timestamp_resolution: ClassVar[float] = 0.001
    reports_max_payload: ClassVar[bool] = True
    limit_options: ClassVar[dict[str, Any]] = {}  # broker options that set a small limit

    url: str
    u: str
    stack: contextlib.AsyncExitStack
    durable_routes: list[str]

    @pytest.fixture(autouse=True)
    async def _contract(self, broker_url: str, unique: str) -> AsyncIterator[None]:
        self.url = broker_url
        self.u = unique
        self.durable_routes = []
        await self.setup_broker()
        try:
            async with contextlib.AsyncExitStack() as self.stack:
                yield
        finally:
            await self.cleanup()

    # -- flavour hooks --------------------------------------------------------------------
    def make(self, role: str, url: str, **options: Any) -> Adapter:
        raise NotImplementedError

    def topic(self, suffix: str = "") -> str:
        raise NotImplementedError

    def filter_of(self, topic: str) -> str:
        return topic

    def reply_topic(self) -> str:
        raise NotImplementedError

    def source_options(self, *, quick_redelivery: bool = False) -> Options:
        raise NotImplementedError

    def target_options(self) -> Options | None:
        return None

    def make_native(self) -> Native:
        raise NotImplementedError

    def refused_source(self) -> tuple[Options, str] | None:
        """Durable source options the adapter must refuse at load time, and a word of
        the reason."""
        return None

    async def setup_broker(self) -> None:
        """Broker-side objects the test's topics need (a JetStream stream)."""

    async def prepare(self, topic: str) -> None:
        """Make ``topic`` usable by a native publisher (a Kafka topic)."""

    async def limited(self) -> str:
        """URL of a broker whose adapter reports a small max_payload with limit_options."""
        return self.url

    async def cleanup(self) -> None:
        """Remove what the test left on the shared broker (durable queues, sessions)."""

    # -- helpers ----------------------------------------------------------------------------
    async def adapter(self, role: str, *, url: str | None = None, **options: Any) -> Adapter:
        a = self.make(role, url or self.url, **options)
        self.stack.push_async_callback(a.close)
        await a.connect()
        return a

    async def new_topic(self, suffix: str = "") -> str:
        topic = self.topic(suffix)
        await self.prepare(topic)
        return topic

    def sub(
        self,
        topic: str,
        *,
        durable: bool,
        max_in_flight: int = 1000,
        quick_redelivery: bool = False,
        suffix: str = "",
    ) -> Subscription:
        route = f"r{self.u}{suffix}"
        if durable:
            self.durable_routes.append(route)
        return Subscription(
            route=route,
            filters=(self.filter_of(topic),),
            durable=durable,
            max_in_flight=max_in_flight,
            options=self.source_options(quick_redelivery=quick_redelivery),
        )

    def reader(self, a: Adapter, sub: Subscription, *, auto_ack: bool = True) -> Reader:
        r = Reader(a, sub, auto_ack=auto_ack)
        self.stack.push_async_callback(r.stop)
        return r

    async def native(self, topic: str | None = None) -> Native:
        n = self.make_native()
        self.stack.push_async_callback(n.close)
        if topic is not None:
            await n.open(topic)
        return n

    async def send(
        self, a: Adapter, topic: str, payloads: list[bytes], *, confirm: bool = True
    ) -> None:
        msgs = [Message(topic, p) for p in payloads]
        outcome = await a.publish(msgs, confirm=confirm, options=self.target_options())
        assert outcome is None, outcome

    async def live(
        self, a: Adapter, sub: Subscription, publisher: Adapter, topic: str, *, ack: bool = True
    ) -> Reader:
        """A reader whose subscription is proven live by a probe from ``publisher``."""
        r = self.reader(a, sub, auto_ack=ack)
        await r.warm(lambda p: self.send(publisher, topic, [p]))
        return r

    def expected_fields(self, sent: Message) -> dict[str, Any]:
        return {f: (getattr(sent, f) if f in self.carried else None) for f in sorted(NAMED)}

    def received_fields(self, got: Message | dict[str, Any]) -> dict[str, Any]:
        values = got if isinstance(got, dict) else {f: getattr(got, f) for f in NAMED}
        return {f: values[f] for f in sorted(NAMED)}

    def assert_fields(self, got: Message | dict[str, Any], sent: Message) -> None:
        have = self.received_fields(got)
        want = self.expected_fields(sent)
        ts_have, ts_want = have.pop("timestamp"), want.pop("timestamp")
        assert have == want
        if ts_want is None:
            assert ts_have is None
        else:
            assert ts_have is not None
            assert abs(ts_have - ts_want) < self.timestamp_resolution + 1e-6, ts_have

    # -- the cases --------------------------------------------------------------------------
    async def test_connect_close_idempotent_and_health(self) -> None:
        a = self.make("life", self.url)
        self.stack.push_async_callback(a.close)
        await a.connect()
        assert a.health().state is ConnState.CONNECTED
        assert a.health().ok
        await a.connect()  # a second connect is a no-op
        assert a.health().state is ConnState.CONNECTED
        assert await a.wait_connected(2.0)
        await a.close()
        assert a.health().state is ConnState.CLOSED
        assert not a.health().ok
        await a.close()
        assert a.health().state is ConnState.CLOSED
        assert await a.wait_connected(0.5) is False

    async def test_batch_in_order_through_own_subscription_and_native(self) -> None:
        topic = await self.new_topic()
        native = await self.native(topic)
        pub = await self.adapter("pub")
        sub = await self.adapter("sub")
        r = await self.live(sub, self.sub(topic, durable=self.can_ack), pub, topic)
        assert sub.health().ok  # connected, and the subscription is active on the broker
        # Every byte value appears, NUL and CR LF included.
        payloads = [b"m%03d:" % i + bytes(range(i * 5, i * 5 + 5)) for i in range(50)]
        await self.send(pub, topic, payloads)
        await r.wait_for(50)
        assert r.payloads() == payloads
        assert {d.message.topic for d in r.got} == {topic}
        got = await native.take(50)
        assert [m.payload for m in got] == payloads
        await r.settle(0.3)
        assert len(r.got) == 50  # and nothing twice

    async def test_native_publish_reaches_subscription(self) -> None:
        topic = await self.new_topic()
        native = await self.native()
        r = self.reader(await self.adapter("sub"), self.sub(topic, durable=self.can_ack))
        await r.warm(lambda p: native.publish(topic, [p]))
        payloads = [b"n%02d" % i for i in range(20)]
        await native.publish(topic, payloads)
        await native.publish(topic, [b"with-fields"], fields=True)
        await r.wait_for(21)
        assert r.payloads() == [*payloads, b"with-fields"]
        plain = r.got[0].message
        assert plain.headers is None
        # (No message_id check here: aiormq stamps its own on every AMQP publish.)
        assert (plain.content_type, plain.correlation_id) == (None, None)
        m = r.got[-1].message
        sent = Message(
            topic,
            b"with-fields",
            content_type=NATIVE_CONTENT_TYPE,
            correlation_id=NATIVE_CORRELATION,
            reply_to=self.reply_topic(),
            message_id=NATIVE_MESSAGE_ID,
        )
        fields = self.received_fields(m)
        fields["timestamp"] = None  # native publishers set none; some protocols stamp anyway
        self.assert_fields(fields, sent)
        # Lifted into the named fields, not also left in the headers.
        assert m.headers == ([NATIVE_HEADER] if self.has_headers else None)

    async def test_headers_and_named_fields(self) -> None:
        topic = await self.new_topic()
        native = await self.native(topic)
        pub = await self.adapter("pub")
        r = await self.live(
            await self.adapter("sub"), self.sub(topic, durable=self.can_ack), pub, topic
        )
        headers = [("x-a", "1"), ("x-b", "2"), ("x-a", "3"), ("x-a", "4")]
        first = Message(
            topic,
            b"fields-1",
            headers=headers,
            content_type="application/json",
            correlation_id=b"corr-1",
            reply_to=self.reply_topic(),
            message_id=f"mid-{self.u}",
            timestamp=TIMESTAMP,
        )
        # A correlation id that is not UTF-8 travels as bytes and comes back lifted.
        second = Message(topic, b"fields-2", headers=[("x-c", "z")], correlation_id=b"\xff\x00c")
        outcome = await pub.publish([first, second], confirm=True, options=self.target_options())
        assert outcome is None
        a, b = (d.message for d in await r.wait_for(2))
        if not self.has_headers:
            assert a.headers is None
            assert b.headers is None
        elif self.header_order == "total":
            assert a.headers == headers
            assert b.headers == [("x-c", "z")]
        else:
            assert a.headers == sorted(headers, key=lambda h: h[0])  # stable: per-name order
            assert b.headers == [("x-c", "z")]
        self.assert_fields(a, first)
        assert b.correlation_id == (b"\xff\x00c" if "correlation_id" in self.carried else None)
        n1, n2 = await native.take(2)
        assert (n1.payload, n2.payload) == (b"fields-1", b"fields-2")
        self.assert_fields(n1.fields(), first)  # the native carriers hold the same values
        assert n2.correlation_id == (b"\xff\x00c" if "correlation_id" in self.carried else None)

    async def test_confirmed_publish_returns_none(self) -> None:
        topic = await self.new_topic()
        native = await self.native(topic)
        pub = await self.adapter("pub")
        confirmed = [b"c%02d" % i for i in range(20)]
        msgs = [Message(topic, p) for p in confirmed]
        assert await pub.publish(msgs, confirm=True, options=self.target_options()) is None
        # Confirmed means stored or routed: the native reader has them all.
        assert [m.payload for m in await native.take(20, within=5.0)] == confirmed
        unconfirmed = [b"u%02d" % i for i in range(5)]
        msgs = [Message(topic, p) for p in unconfirmed]
        assert await pub.publish(msgs, confirm=False, options=self.target_options()) is None
        assert [m.payload for m in await native.take(5, within=5.0)] == unconfirmed

    async def test_durable_unacked_come_back_acked_do_not(self) -> None:
        topic = await self.new_topic()
        pub = await self.adapter("pub")
        sub = self.sub(topic, durable=True, quick_redelivery=True)
        first = await self.adapter("dur")
        r1 = await self.live(first, sub, pub, topic, ack=False)
        payloads = [b"d%d" % i for i in range(6)]
        await self.send(pub, topic, payloads)
        got = await r1.wait_for(6)
        assert r1.payloads() == payloads
        for d in got[:3]:
            d.ack()
        await first.close()
        # Closing the adapter ends its subscriptions cleanly: no error, and no
        # CancelledError out of a task that nobody cancelled.
        done, _ = await asyncio.wait({r1.task}, timeout=5.0)
        assert done, "the subscription still runs 5s after its adapter closed"
        assert not r1.task.cancelled(), "the subscription raised CancelledError after close"
        assert r1.error is None
        # Reopened at once (a restart, a reload): acks given before close must have reached
        # the broker by the time close returned.
        r2 = self.reader(await self.adapter("dur"), sub)
        if self.can_ack:
            await r2.wait_for(3, within=15.0)
            await r2.settle(0.5)
            back = r2.payloads()
            assert back[:3] == payloads[3:]
            assert set(back) == set(payloads[3:])  # redelivery may repeat, never the acked
        else:
            # At-most-once: nothing to ack, nothing kept for a closed subscriber.
            assert all(d.settler is None for d in got)
            await r2.settle(1.0)
            assert r2.payloads() == []

    async def test_max_in_flight_bounds_unacked(self) -> None:
        limit, n = 4, 12
        topic = await self.new_topic()
        pub = await self.adapter("pub")
        sub = self.sub(topic, durable=self.can_ack, max_in_flight=limit)
        r = await self.live(await self.adapter("sub"), sub, pub, topic, ack=False)
        payloads = [b"f%02d" % i for i in range(n)]
        await self.send(pub, topic, payloads)
        if not self.can_ack:
            # Nothing to ack, so nothing to bound: every message is handed out at once.
            await r.wait_for(n)
            assert all(d.settler is None for d in r.got)
            assert r.payloads() == payloads
            return
        await r.wait_for(limit)
        await r.settle(0.5)
        assert len(r.got) == limit, f"{len(r.got)} handed out unacked, bound {limit}"
        while r.acked < n:
            r.ack_all()
            if len(r.got) < n:
                await r.wait_for(len(r.got) + 1)
            await r.settle(0.3)
            assert len(r.got) - r.acked <= limit
        assert r.peak_unacked <= limit
        assert r.payloads() == payloads

    async def test_publish_while_closed_raises_retriable(self) -> None:
        topic = await self.new_topic()
        never = self.make("never", self.url)
        self.stack.push_async_callback(never.close)
        closed = await self.adapter("closed")
        await closed.close()
        for a in (never, closed):
            for confirm in (False, True):
                async with asyncio.timeout(5):
                    with pytest.raises(PublishError) as info:
                        await a.publish(
                            [Message(topic, b"x")], confirm=confirm, options=self.target_options()
                        )
                assert info.value.retriable

    async def test_check_source_durable(self) -> None:
        cls = self.adapter_class
        opts = self.source_options()
        problem = cls.check_source(opts, durable=True)
        if self.can_ack:
            assert problem is None
        else:
            assert isinstance(problem, str)
            assert "acknowledge" in problem
        assert cls.check_source(opts, durable=False) is None
        refused = self.refused_source()
        if refused is not None:
            bad, word = refused
            text = cls.check_source(bad, durable=True)
            assert isinstance(text, str)
            assert word in text
            assert cls.check_source(bad, durable=False) is None

    async def test_oversized_message_refused_per_message(self) -> None:
        url = await self.limited()
        pub = await self.adapter("pub", url=url, **self.limit_options)
        limit = pub.max_payload()
        if not self.reports_max_payload:
            assert limit is None  # the protocol does not say, and nothing is configured
            return
        assert isinstance(limit, int)
        assert limit > 0
        topic = await self.new_topic()
        sub = await self.adapter("sub", url=url, **self.limit_options)
        r = await self.live(sub, self.sub(topic, durable=self.can_ack), pub, topic)
        msgs = [Message(topic, b"small-1"), Message(topic, b"x" * (limit + 1))]
        msgs.append(Message(topic, b"small-2"))
        outcome = await pub.publish(msgs, confirm=True, options=self.target_options())
        assert outcome is not None
        assert len(outcome) == 3
        assert outcome[0] is None
        assert outcome[2] is None
        assert isinstance(outcome[1], PublishError)
        assert not outcome[1].retriable
        await r.wait_for(2)
        await r.settle(0.3)
        assert r.payloads() == [b"small-1", b"small-2"]


# ------------------------------------------------------------------------------- NATS


class _Nats(AdapterContract):
    adapter_class = NatsAdapter

    @pytest.fixture
    def broker_url(self, nats_url: str) -> str:
        return nats_url

    def make(self, role: str, url: str, **options: Any) -> Adapter:
        opts = NatsBrokerOptions.model_validate({"js_timeout": 3.0, **options})
        return NatsAdapter(f"fbc-{self.u}-{role}", url, opts, BACKOFF)

    def topic(self, suffix: str = "") -> str:
        return f"fbc.{self.u}.t{suffix}"

    def reply_topic(self) -> str:
        return f"fbc.{self.u}.reply"


class TestNatsCore(_Nats):
    can_ack = False

    def source_options(self, *, quick_redelivery: bool = False) -> Options:
        return NatsSourceOptions()

    def make_native(self) -> Native:
        return NatsNative(self.url, self.reply_topic())


class TestNatsJetStream(_Nats):
    carried = NAMED - {"reply_to"}  # JetStream stores no reply subject

    @property
    def stream(self) -> str:
        return f"FBC_{self.u}"

    async def setup_broker(self) -> None:
        nc = await nats.connect(self.url)
        try:
            await nc.jsm().add_stream(StreamConfig(name=self.stream, subjects=[f"fbc.{self.u}.>"]))
        finally:
            await nc.close()

    async def cleanup(self) -> None:
        nc = await nats.connect(self.url)
        try:
            await nc.jsm().delete_stream(self.stream)
        finally:
            await nc.close()

    def source_options(self, *, quick_redelivery: bool = False) -> Options:
        # Unacked messages come back after ack_wait: short where the case waits for them.
        js = JetStreamSource(stream=self.stream, ack_wait=1.0 if quick_redelivery else 30.0)
        return NatsSourceOptions(jetstream=js)

    def target_options(self) -> Options | None:
        return NatsTargetOptions(jetstream=True)

    def make_native(self) -> Native:
        return JetStreamNative(self.url, self.reply_topic(), self.stream)


# ------------------------------------------------------------------------------- MQTT


class _Mqtt(AdapterContract):
    adapter_class = MqttAdapter
    version: ClassVar[Literal["5", "3.1.1"]]
    sessions: set[str]

    @pytest.fixture
    def broker_url(self, mqtt_url: str) -> str:
        return mqtt_url

    async def setup_broker(self) -> None:
        self.sessions = set()

    def make(self, role: str, url: str, **options: Any) -> Adapter:
        client_id = f"fbc-{self.u}-{role}"
        if url == self.url:
            self.sessions.add(client_id)
        opts = MqttBrokerOptions.model_validate(
            {"version": self.version, "client_id": client_id, "session_expiry": 60, **options}
        )
        return MqttAdapter(client_id, url, opts, BACKOFF)

    def topic(self, suffix: str = "") -> str:
        return f"fbc/{self.u}/t{suffix}"

    def reply_topic(self) -> str:
        return f"fbc/{self.u}/reply"

    def source_options(self, *, quick_redelivery: bool = False) -> Options:
        return MqttSourceOptions(qos=1)

    def refused_source(self) -> tuple[Options, str] | None:
        return MqttSourceOptions(qos=0), "qos"

    def make_native(self) -> Native:
        return MqttNative(self.url, self.version, self.reply_topic(), f"fbc-{self.u}-native")

    async def cleanup(self) -> None:
        # Persistent sessions of the adapters would outlive the test on the shared broker.
        host, port = host_port(self.url, 1883)
        for client_id in self.sessions:
            if self.version == "5":
                client = aiomqtt.Client(
                    host, port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=True,
                )  # fmt: skip
            else:
                client = aiomqtt.Client(
                    host, port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=True,
                )  # fmt: skip
            async with client:
                pass


class TestMqtt5(_Mqtt):
    version = "5"
    limit_options: ClassVar[dict[str, Any]] = {}

    async def limited(self) -> str:
        # The shared Mosquitto announces no Maximum Packet Size; this one does.
        broker = LimitedMosquitto(max_packet_size=2048)
        await asyncio.to_thread(broker.start)
        self.stack.callback(broker.__exit__, None, None, None)
        return broker.url


class TestMqtt311(_Mqtt):
    version = "3.1.1"
    has_headers = False  # MQTT 3.1.1 carries topic, payload, qos and retain only
    carried = frozenset()
    reports_max_payload = False  # no CONNACK properties: the broker cannot tell


# ------------------------------------------------------------------------------- AMQP


class TestAmqp(AdapterContract):
    adapter_class = AmqpAdapter
    header_order = "per_name"  # an AMQP field table: names sorted, one array per name
    timestamp_resolution = 1.0  # basic.timestamp is whole seconds
    limit_options: ClassVar[dict[str, Any]] = {"max_message_size": 4096}

    @pytest.fixture
    def broker_url(self, amqp_url: str) -> str:
        return amqp_url

    def make(self, role: str, url: str, **options: Any) -> Adapter:
        opts = AmqpBrokerOptions.model_validate(options)
        return AmqpAdapter(f"fbc-{self.u}-{role}", url, opts, BACKOFF)

    def topic(self, suffix: str = "") -> str:
        return f"fbc.{self.u}.t{suffix}"

    def reply_topic(self) -> str:
        return f"fbc.{self.u}.reply"

    def source_options(self, *, quick_redelivery: bool = False) -> Options:
        return AmqpSourceOptions()

    def refused_source(self) -> tuple[Options, str] | None:
        return AmqpSourceOptions(replies=True), "no-ack"

    def make_native(self) -> Native:
        return AmqpNative(self.url, self.reply_topic())

    async def cleanup(self) -> None:
        conn = await aio_pika.connect(self.url)
        try:
            ch = await conn.channel()
            for route in set(self.durable_routes):
                await ch.queue_delete(f"flowbridge.{route}")
        finally:
            await conn.close()


# ------------------------------------------------------------------------------- Kafka


@pytest.mark.kafka
class TestKafka(AdapterContract):
    adapter_class = KafkaAdapter
    limit_options: ClassVar[dict[str, Any]] = {"max_request_size": 1024}

    @pytest.fixture
    def broker_url(self, kafka_url: str) -> str:
        return kafka_url

    def make(self, role: str, url: str, **options: Any) -> Adapter:
        # Short group timeouts: Tansu holds a join for about half the session timeout.
        opts = KafkaBrokerOptions.model_validate(
            {
                "session_timeout_ms": 1000,
                "heartbeat_interval_ms": 100,
                "metadata_max_age_ms": 500,
                "request_timeout_ms": 5000,
                **options,
            }
        )
        return KafkaAdapter(f"fbc-{self.u}-{role}", url, opts, BACKOFF)

    def topic(self, suffix: str = "") -> str:
        return f"fbc-{self.u}-t{suffix}"

    def filter_of(self, topic: str) -> str:
        return f"^{topic}$"

    def reply_topic(self) -> str:
        return f"fbc-{self.u}-reply"

    def source_options(self, *, quick_redelivery: bool = False) -> Options:
        return KafkaSourceOptions(start="earliest")

    def make_native(self) -> Native:
        return KafkaNative(self.url, self.reply_topic())

    async def prepare(self, topic: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.url.removeprefix("kafka://"))
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()
