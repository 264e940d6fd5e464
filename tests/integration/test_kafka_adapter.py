"""Kafka adapter against a Kafka-compatible broker (Tansu), plain aiokafka on the other side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import cramjam
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from flowbridge.adapters.base import Backoff, ConnState, Delivery, Message, Subscription
from flowbridge.adapters.kafka import (
    KafkaAdapter,
    KafkaBrokerOptions,
    KafkaSourceOptions,
    KafkaTargetOptions,
    literal_topic,
    plan_subscription,
)
from flowbridge.errors import ConnectError, PublishError, TopicError
from tests.support.brokers import Tansu, free_port
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.kafka

FAST = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 100, "metadata_max_age_ms": 500}


def bootstrap(url: str) -> str:
    return url.removeprefix("kafka://")


def adapter(url: str, **options: Any) -> KafkaAdapter:
    opts = KafkaBrokerOptions(**{**FAST, "request_timeout_ms": 5000, **options})
    return KafkaAdapter("k", url, opts, Backoff(initial=0.05, maximum=0.5, attempts=3))


@contextlib.asynccontextmanager
async def connected(url: str, **options: Any) -> AsyncIterator[KafkaAdapter]:
    a = adapter(url, **options)
    await a.connect()
    try:
        yield a
    finally:
        await a.close()


async def read(url: str, topic: str, n: int, within: float = 10.0) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap(url), auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(within):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(records)
    finally:
        await consumer.stop()
    return out


async def produce(url: str, records: list[tuple[str, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(url), acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(t, v, key=b"k", headers=h, timestamp_ms=1_700_000_000_000 + i)
            for i, (t, v, h) in enumerate(records)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class Pump:
    """Pulls batches from a source in the background, so a test can look at what arrived
    without cancelling the iterator."""

    def __init__(self, it: AsyncIterator[list[Delivery]]) -> None:
        self.it = it
        self.got: list[Delivery] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.it:
            self.got.extend(batch)
            self.changed.set()

    async def wait_for(self, n: int, within: float = 15.0) -> list[Delivery]:
        async with asyncio.timeout(within):
            while len(self.got) < n:
                self.changed.clear()
                await self.changed.wait()
        return self.got

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    for _ in range(int(within / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {within}s")


def sub(route: str, *filters: str, **kw: Any) -> Subscription:
    return Subscription(route=route, filters=filters, durable=True, **kw)


def literal(topic: str) -> str:
    return f"^{re.escape(topic)}$"


# -- filters (no broker) ----------------------------------------------------------------


def test_literal_filters_subscribe_by_name() -> None:
    assert literal_topic(r"^orders\.eu\-west_1$") == "orders.eu-west_1"
    assert literal_topic(r"^orders\..*$") is None
    assert literal_topic(r"^a\d$") is None
    assert literal_topic("orders") is None  # not anchored
    assert plan_subscription([literal("a.b"), literal("c")]) == (["a.b", "c"], None)
    topics, pattern = plan_subscription([literal("a.b"), r"^c\..+$"])
    assert topics == []
    assert pattern is not None
    rx = re.compile(pattern)
    assert [t for t in ("a.b", "c.x", "axb", "c.", "a.bc") if rx.match(t)] == ["a.b", "c.x"]
    with pytest.raises(TopicError):
        plan_subscription(["^a(b$"])


# -- target ----------------------------------------------------------------------------


async def test_publish_carries_value_key_headers_fields_timestamp(
    kafka_url: str, unique: str
) -> None:
    topic = f"fb.pub.{unique}"
    msg = Message(
        topic,
        b"\x00payload\xff",
        headers=[("x", "1"), ("y", "\u00e9"), ("x", "2")],
        content_type="application/json",
        correlation_id=b"\xfe\x00corr",
        reply_to="replies.here",
        message_id="m-1",
        timestamp=1_700_000_000.123,
        key=b"key-1",
    )
    async with connected(kafka_url) as a:
        assert await a.publish([msg], confirm=True) is None
    [rec] = await read(kafka_url, topic, 1)
    assert rec.value == b"\x00payload\xff"
    assert rec.key == b"key-1"
    assert rec.timestamp == 1_700_000_000_123
    assert list(rec.headers) == [
        ("content-type", b"application/json"),
        ("correlation-id", b"\xfe\x00corr"),
        ("reply-to", b"replies.here"),
        ("message-id", b"m-1"),
        ("x", b"1"),
        ("y", "\u00e9".encode()),
        ("x", b"2"),
    ]


async def test_publish_batch_in_order_and_topic_created_with_partitions(
    kafka_url: str, unique: str
) -> None:
    topic = f"fb.create.{unique}"
    async with connected(kafka_url, partitions=3) as a:
        msgs = [Message(topic, str(i).encode(), key=b"same") for i in range(200)]
        assert await a.publish(msgs, confirm=True) is None
        assert a.health().ok
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap(kafka_url))
    await admin.start()
    try:
        [desc] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert len(desc["partitions"]) == 3
    records = await read(kafka_url, topic, 200)
    # One key, one partition: order is kept.
    assert [r.value for r in records] == [str(i).encode() for i in range(200)]


async def test_one_record_calls_join_the_batch_waiting_for_the_partition(
    kafka_url: str, unique: str
) -> None:
    """A route at a moderate rate hands over one record per call: those calls share the
    partition's next produce request instead of waiting one round trip each; order holds
    across calls sending record by record and calls sending a batch."""
    topic = f"fb.coalesce.{unique}"
    async with connected(kafka_url) as a:
        assert await a.publish([Message(topic, b"first")], confirm=True) is None
        assert a.producer is not None
        client = a.producer.client
        produce_requests = 0
        send = client.send

        async def counting(node_id: int, request: Any, **kw: Any) -> Any:
            nonlocal produce_requests
            produce_requests += type(request).__name__.startswith("ProduceRequest")
            return await send(node_id, request, **kw)

        client.send = counting  # type: ignore[method-assign]
        runs = [[str(i).encode()] for i in range(40)]
        runs[10] = [f"10.{j}".encode() for j in range(30)]  # one call over the small-run size
        for run in runs:
            assert await a.publish([Message(topic, v) for v in run], confirm=False) is None
        assert await a.publish([Message(topic, b"last")], confirm=True) is None
    expected = [b"first", *(v for run in runs for v in run), b"last"]
    assert [r.value for r in await read(kafka_url, topic, len(expected))] == expected
    # One request per call would be 41; a batch of our own waits for the one before it.
    assert produce_requests <= 6, produce_requests


class LevelSpy:
    """Records the level of every compressor aiokafka's codec makes (cramjam's own, which
    its lz4 and zstd functions look up when called)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lz4: list[int] = []
        self.zstd: list[int] = []
        real_lz4, real_zstd = cramjam.lz4.Compressor, cramjam.zstd.compress

        def lz4(*args: Any, level: int, **kwargs: Any) -> Any:
            self.lz4.append(level)
            return real_lz4(*args, level=level, **kwargs)

        def zstd(data: Any, level: int) -> Any:
            self.zstd.append(level)
            return real_zstd(data, level=level)

        monkeypatch.setattr(cramjam.lz4, "Compressor", lz4)
        monkeypatch.setattr(cramjam.zstd, "compress", zstd)

    def take(self) -> tuple[set[int], set[int]]:
        seen = (set(self.lz4), set(self.zstd))
        self.lz4.clear()
        self.zstd.clear()
        return seen


async def test_compression_levels_per_broker_default_fast(
    kafka_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka compresses lz4 at level 9 (LZ4 HC) and takes no level: each producer gets
    its broker's level, the default librdkafka's (lz4 fast), and records read back intact."""
    spy = LevelSpy(monkeypatch)
    topic = f"fb.level.{unique}"
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon"]
    bodies = [b" ".join(words[(i * 7 + k) % 5] for k in range(400)) for i in range(30)]
    async with (
        connected(kafka_url, compression="lz4") as fast,
        connected(kafka_url, compression="lz4", compression_level=12) as high,
        connected(kafka_url, compression="zstd") as zstd,
    ):
        for a, expected in ((fast, ({0}, set())), (high, ({12}, set())), (fast, ({0}, set()))):
            assert await a.publish([Message(topic, b) for b in bodies], confirm=True) is None
            assert spy.take() == expected
        assert await zstd.publish([Message(topic, b) for b in bodies], confirm=True) is None
        assert spy.take() == (set(), {3})
    records = await read(kafka_url, topic, 4 * len(bodies))
    assert [r.value for r in records] == bodies * 4


def test_compression_level_needs_a_codec_with_levels_and_its_range() -> None:
    with pytest.raises(ValueError, match="needs compression gzip, lz4 or zstd"):
        KafkaBrokerOptions(compression="snappy", compression_level=3)
    with pytest.raises(ValueError, match=r"compression_level 13 is outside 0\.\.12 for lz4"):
        KafkaBrokerOptions(compression="lz4", compression_level=13)
    assert KafkaBrokerOptions(compression="gzip", compression_level=1).compression_level == 1


async def test_unknown_topic_without_creation_refused_per_message(
    kafka_url: str, unique: str
) -> None:
    good = f"fb.exists.{unique}"
    missing = f"fb.missing.{unique}"
    async with connected(kafka_url, create_topics=False) as a, connected(kafka_url) as creator:
        await creator.publish([Message(good, b"seed")], confirm=True)
        out = await a.publish(
            [Message(good, b"a"), Message(missing, b"b"), Message(good, b"c")], confirm=True
        )
        assert out is not None
        assert out[0] is None
        assert out[2] is None
        assert isinstance(out[1], PublishError)
        assert not out[1].retriable
        assert "unknown topic" in out[1].reason
        # Asking must not have created it.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap(kafka_url))
        await admin.start()
        try:
            assert missing not in await admin.list_topics()
        finally:
            await admin.close()
    assert [r.value for r in await read(kafka_url, good, 3)] == [b"seed", b"a", b"c"]


async def test_oversized_message_refused_alone(kafka_url: str, unique: str) -> None:
    topic = f"fb.big.{unique}"
    async with connected(kafka_url, max_request_size=4096) as a:
        assert a.max_payload() == 4096
        out = await a.publish(
            [Message(topic, b"small-1"), Message(topic, b"x" * 8000), Message(topic, b"small-2")],
            confirm=True,
        )
    assert out is not None
    assert out[0] is None
    assert out[2] is None
    assert isinstance(out[1], PublishError)
    assert not out[1].retriable
    assert [r.value for r in await read(kafka_url, topic, 2)] == [b"small-1", b"small-2"]


async def test_fixed_partition_option(kafka_url: str, unique: str) -> None:
    topic = f"fb.part.{unique}"
    async with connected(kafka_url, partitions=4) as a:
        msgs = [Message(topic, b"%d" % i, key=b"%d" % i) for i in range(20)]
        assert await a.publish(msgs, confirm=True, options=KafkaTargetOptions(partition=2)) is None
    assert {r.partition for r in await read(kafka_url, topic, 20)} == {2}


async def test_keyed_records_land_where_the_default_partitioner_puts_them(
    kafka_url: str, unique: str
) -> None:
    """Records are batched per partition by the adapter itself: a key must still land on
    the partition aiokafka's (and Java's) murmur2 partitioner picks, in order per key, and a
    fixed partition the topic does not have is refused alone."""
    ours, theirs = f"fb.keys.{unique}", f"fb.keys-native.{unique}"
    keys = [b"k%d" % (i % 7) for i in range(140)]
    async with connected(kafka_url, partitions=5) as a:
        msgs = [Message(ours, b"%d" % i, key=k) for i, k in enumerate(keys)]
        # The native producer writes to a topic of the same size, created by the adapter.
        assert await a.publish([Message(theirs, b"seed", key=b"seed")], confirm=True) is None
        assert await a.publish(msgs, confirm=True) is None
        out = await a.publish(
            [Message(ours, b"x"), Message(ours, b"y")],
            confirm=True,
            options=KafkaTargetOptions(partition=9),
        )
        assert out is not None
        assert all(isinstance(r, PublishError) and "no partition 9" in r.reason for r in out)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(kafka_url))
    await producer.start()
    try:
        native = {}
        for k in sorted(set(keys)):
            native[k] = (await producer.send_and_wait(theirs, b"n", key=k)).partition
    finally:
        await producer.stop()
    records = await read(kafka_url, ours, len(keys))
    assert {r.key: r.partition for r in records} == native
    for k in set(keys):
        got = [int(r.value) for r in records if r.key == k]
        assert got == [i for i, kk in enumerate(keys) if kk == k]


async def test_idempotence_auto_falls_back_once(
    kafka_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"fb.idem.{unique}"
    caplog.set_level(logging.WARNING, logger="flowbridge.broker.k")
    async with connected(kafka_url) as a:
        for i in range(3):
            assert await a.publish([Message(topic, b"%d" % i)], confirm=True) is None
        assert not a.idempotent
    refusals = [r for r in caplog.records if "refused the idempotent producer" in r.message]
    assert len(refusals) == 1
    assert len(await read(kafka_url, topic, 3)) == 3


async def test_idempotence_true_refused_is_connect_error(kafka_url: str) -> None:
    a = adapter(kafka_url, idempotence="true")
    with pytest.raises(ConnectError, match=r"broker k \(kafka://.*idempotent"):
        await a.connect()
    await a.close()


async def test_unreachable_broker_connect_error_after_attempts() -> None:
    url = f"kafka://127.0.0.1:{free_port()}"
    a = adapter(url)
    with pytest.raises(ConnectError, match=re.escape(f"broker k ({url})")):
        await a.connect()
    assert a.health().state is ConnState.DISCONNECTED
    await a.close()


# -- source ----------------------------------------------------------------------------


async def test_source_receives_from_aiokafka_with_fields_lifted(
    kafka_url: str, unique: str
) -> None:
    topic = f"fb.src.{unique}"
    headers = [
        ("h", b"1"),
        ("content-type", b"text/plain"),
        ("correlation-id", b"\x01\x02"),
        ("h", b"2"),
        ("reply-to", b"back"),
        ("message-id", b"id-7"),
        ("bin", b"\xff\xfe"),
    ]
    await produce(kafka_url, [(topic, b"hello", headers)])
    async with connected(kafka_url) as a:
        pump = Pump(a.subscribe(sub(f"r{unique}", literal(topic))))
        [d] = await pump.wait_for(1)
        m = d.message
        assert (m.topic, m.payload, m.key) == (topic, b"hello", b"k")
        assert m.content_type == "text/plain"
        assert m.correlation_id == b"\x01\x02"
        assert m.reply_to == "back"
        assert m.message_id == "id-7"
        assert m.timestamp == pytest.approx(1_700_000_000.0)
        assert m.headers is not None
        assert m.headers[:2] == [("h", "1"), ("h", "2")]
        # Non-UTF-8 header bytes survive a trip through the adapter unchanged.
        assert m.headers[2][0] == "bin"
        out_topic = f"fb.src.out.{unique}"
        assert await a.publish([Message(out_topic, b"x", headers=m.headers)], confirm=True) is None
        d.ack()
        await pump.stop()
    [rec] = await read(kafka_url, out_topic, 1)
    assert list(rec.headers) == [("h", b"1"), ("h", b"2"), ("bin", b"\xff\xfe")]


async def test_pattern_subscription_picks_up_new_topics(kafka_url: str, unique: str) -> None:
    prefix = f"fb.pat.{unique}"
    await produce(kafka_url, [(f"{prefix}.a", b"a", []), (f"other.{unique}", b"no", [])])
    async with connected(kafka_url) as a:
        pump = Pump(a.subscribe(sub(f"r{unique}", rf"^{re.escape(prefix)}\..+$")))
        await pump.wait_for(1)
        assert a.health().subscribed
        # A topic created after the subscription started, found by metadata refresh.
        await produce(kafka_url, [(f"{prefix}.b", b"b", [])])
        got = await pump.wait_for(2)
        await asyncio.sleep(0.5)
        await pump.stop()
    # A rebalance may deliver an unacked record again; what matters is which topics matched.
    assert {d.message.topic for d in got} == {f"{prefix}.a", f"{prefix}.b"}


async def test_commit_only_after_ack(kafka_url: str, unique: str) -> None:
    topic = f"fb.commit.{unique}"
    await produce(kafka_url, [(topic, b"%d" % i, []) for i in range(100)])
    group = f"g{unique}"
    async with connected(kafka_url) as a:
        pump = Pump(a.subscribe(sub("r", literal(topic), group=group)))
        got = await pump.wait_for(100)
        assert [d.message.payload for d in got] == [b"%d" % i for i in range(100)]
        for d in got[:50]:
            d.ack()
        got[60].ack()  # beyond a gap: must not move the committed offset past 50
        got[60].ack()  # a repeated ack is harmless
        await asyncio.sleep(0.3)
        await pump.stop()
    async with connected(kafka_url) as a:
        pump = Pump(a.subscribe(sub("r", literal(topic), group=group)))
        again = await pump.wait_for(50)
        await pump.stop()
    assert again[0].message.payload == b"50"
    assert [d.message.payload for d in again[:50]] == [b"%d" % i for i in range(50, 100)]


async def test_never_more_than_max_in_flight(kafka_url: str, unique: str) -> None:
    topic = f"fb.inflight.{unique}"
    await produce(kafka_url, [(topic, b"%d" % i, []) for i in range(30)])
    async with connected(kafka_url) as a:
        pump = Pump(a.subscribe(sub(f"r{unique}", literal(topic), max_in_flight=10)))
        await pump.wait_for(10)
        await asyncio.sleep(1.0)
        assert len(pump.got) == 10
        for d in pump.got[:4]:
            d.ack()
        await pump.wait_for(14)
        await asyncio.sleep(0.7)
        assert len(pump.got) == 14
        while len(pump.got) < 30:
            for d in pump.got[4:]:
                d.ack()
            await pump.wait_for(len(pump.got) + 1)
        got = pump.got
        await pump.stop()
    assert [d.message.payload for d in got] == [b"%d" % i for i in range(30)]


async def test_records_larger_than_fetch_max_bytes_still_come_in_order(
    kafka_url: str, unique: str
) -> None:
    # fetch_max_bytes bounds what one fetch holds, not the largest record a route can read.
    topic = f"fb.fetchmax.{unique}"
    big = [bytes([65 + i]) * 40_000 for i in range(6)]
    await produce(kafka_url, [(topic, v, []) for v in [*big, b"tail"]])
    async with connected(kafka_url, fetch_max_bytes=4096) as a:
        assert a.opts.fetch_max_bytes == 4096
        pump = Pump(a.subscribe(sub(f"r{unique}", literal(topic))))
        got = [d.message.payload for d in await pump.wait_for(7, within=30)]
        await pump.stop()
    assert got == [*big, b"tail"]


async def test_start_latest_skips_existing(kafka_url: str, unique: str) -> None:
    topic = f"fb.latest.{unique}"
    await produce(kafka_url, [(topic, b"old", [])])
    async with connected(kafka_url) as a:
        it = a.subscribe(
            sub(f"r{unique}", literal(topic), options=KafkaSourceOptions(start="latest"))
        )
        pump = Pump(it)
        await until(lambda: bool(a.sources) and a.health().subscribed)
        await asyncio.sleep(0.5)
        await produce(kafka_url, [(topic, b"new", [])])
        [d] = await pump.wait_for(1)
        await pump.stop()
    assert d.message.payload == b"new"


class _ProxiedTansu(Tansu):
    """A Tansu that tells clients to reach it at ``advertised`` (a proxy's port)."""

    def __init__(self, advertised: int) -> None:
        super().__init__()
        self.advertised = advertised

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--advertised-listener-url") + 1] = f"tcp://127.0.0.1:{self.advertised}"
        return cmd


class CorruptingProxy(TcpProxy):
    """Flips one byte inside the first run of ``run`` the broker sends back (a fetch
    response carrying that record), as a bad cable or disk would."""

    def __init__(self, port: int, upstream: int, run: bytes) -> None:
        super().__init__(("127.0.0.1", upstream), port)
        self.run = run
        self.flipped = 0

    async def relay(self, data: bytes, *, to_broker: bool) -> bytes:
        at = -1 if to_broker or self.flipped else data.find(self.run)
        if at < 0:
            return data
        self.flipped += 1
        return data[:at] + b"R" + data[at + 1 :]


@pytest.mark.parametrize("check", [True, False])
async def test_a_batch_damaged_on_the_way_is_fetched_again_or_passed_on_without_check_crcs(
    unique: str, check: bool, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    payload = b"Q" * 10_240
    with _ProxiedTansu(port) as tansu:
        proxy = CorruptingProxy(port, tansu.port, b"Q" * 64)
        await proxy.start()
        try:
            url = f"kafka://127.0.0.1:{port}"
            topic = f"fb.crc.{unique}"
            await produce(url, [(topic, payload, []), (topic, b"after", [])])
            async with connected(url, check_crcs=check) as a:
                pump = Pump(a.subscribe(sub(f"r{unique}", literal(topic))))
                got = [d.message.payload for d in await pump.wait_for(2, within=30)]
                await pump.stop()
                corrupt = a.counters()["corrupt_batches"]
        finally:
            await proxy.close()
    assert proxy.flipped == 1
    if check:
        # Refused, logged, counted and read again: intact, in order, once.
        assert got == [payload, b"after"]
        assert corrupt >= 1
        assert "corrupt batch" in caplog.text
    else:
        # Without the check the damage goes through: what the option trades away.
        assert got[1] == b"after"
        assert got[0] != payload
        assert len(got[0]) == len(payload)
        assert corrupt == 0


# -- faults (a broker of the test's own) -------------------------------------------------


async def test_target_survives_broker_restart() -> None:
    tansu = Tansu()
    with tansu:
        topic = "fb.restart"
        async with connected(tansu.url, request_timeout_ms=3000) as a:
            assert await a.publish([Message(topic, b"before")], confirm=True) is None
            assert a.health().ok
            tansu.stop(kill=True)
            await until(lambda: a.health().state is ConnState.DISCONNECTED)
            assert not a.health().ok
            with pytest.raises(PublishError) as err:
                await a.publish([Message(topic, b"while-down")], confirm=True)
            assert err.value.retriable
            tansu.start()
            assert await a.wait_connected(15)
            assert a.health().reconnects >= 1
            async with asyncio.timeout(15):
                assert await a.publish([Message(topic, b"after")], confirm=True) is None
        # Memory storage: only what was sent after the restart is there.
        assert [r.value for r in await read(tansu.url, topic, 1)] == [b"after"]
