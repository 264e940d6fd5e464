"""smartsend -> smartreceive through each protocol's real broker, with the protocol's native
client on the other side: it sees the envelope fields on its own carriers, and an envelope it
publishes (as a peer in another language would) reaches a flowbridge listener."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import nats
import pyarrow as pa  # type: ignore[import-untyped]
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from flowbridge import cli
from flowbridge.envelope import Envelope
from flowbridge.fileserver import PlikStore
from flowbridge.smart import Item, build_envelope, listen, smartreceive, smartsend
from tests.support.brokers import free_port, host_port

FIVE_MB = 5 * 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
KAFKA_FAST = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 100, "metadata_max_age_ms": 500}


@pytest.fixture
async def store() -> AsyncIterator[PlikStore]:
    async with PlikStore() as s:
        yield s


@pytest.fixture(scope="module")
def big() -> bytes:
    return os.urandom(FIVE_MB)


@pytest.fixture
def items(big: bytes) -> list[Item]:
    return [
        ("greeting", "héllo", "text"),
        ("config", {"threshold": 3, "tags": ["a", "b"]}, "dictionary"),
        ("rows", [{"id": 1}, {"id": 2}], "jsontable"),
        ("table", pa.table({"x": [1, 2, 3]}), "arrowtable"),
        ("blob", b"\x00\x01\xff", "binary"),
        ("photo", big, "image"),  # over the threshold: a link to the file store
    ]


def check_items(got: list[Item], sent: list[Item]) -> None:
    assert [(n, t) for n, _, t in got] == [(n, t) for n, _, t in sent]
    for (_, value, t), (_, original, _) in zip(got, sent, strict=True):
        assert value.equals(original) if t == "arrowtable" else value == original


def check_envelope(env: Envelope, sent: Envelope) -> None:
    assert env.to_dict() == sent.to_dict()
    assert [p.transport for p in env.payloads] == ["direct"] * 5 + ["link"]


# ---- NATS -------------------------------------------------------------------------------


async def test_nats(nats_url: str, unique: str, store: PlikStore, items: list[Item]) -> None:
    subject = f"fb.smart.{unique}"
    nc = await nats.connect(nats_url)
    try:
        native = await nc.subscribe(subject)
        await nc.flush()
        async with listen(nats_url, f"fb.smart.{unique}", fileserver=store.url) as rx:
            sent = await smartsend(
                nats_url, subject, items, fileserver=store.url, reply_to=f"fb.reply.{unique}"
            )
            got_items, env = await rx.receive(timeout=10)
            check_items(got_items, items)
            check_envelope(env, sent)

            msg = await native.next_msg(timeout=5)
            headers = msg.headers or {}
            assert headers["Content-Type"] == "application/json"
            assert headers["Nats-Msg-Id"] == sent.msg_id
            assert headers["Correlation-Id"] == sent.correlation_id
            assert headers["Timestamp"] == sent.timestamp
            assert msg.reply == f"fb.reply.{unique}"
            native_items, _ = await smartreceive(msg.data, fileserver=store.url)
            check_items(native_items, items)

            # A peer writes its envelope with the plain client.
            peer = await build_envelope(subject, items[:2], sender_name="julia-peer")
            await nc.publish(subject, peer.to_json())
            got_items, env = await rx.receive(timeout=5)
            assert env.sender_name == "julia-peer"
            check_items(got_items, items[:2])
    finally:
        await nc.close()


# ---- MQTT -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_mqtt(
    mqtt_url: str, unique: str, store: PlikStore, items: list[Item], version: str
) -> None:
    topic = f"fb/smart/{unique}"
    opts = {"version": version}
    host, port = host_port(mqtt_url, 1883)
    proto = aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(host, port, protocol=proto) as client:
        await client.subscribe(topic, qos=1)
        async with listen(
            mqtt_url, f"fb/smart/{unique}", fileserver=store.url, broker_options=opts
        ) as rx:
            sent = await smartsend(
                mqtt_url,
                topic,
                items,
                fileserver=store.url,
                broker_options=opts,
                reply_to=f"fb/reply/{unique}",
            )
            got_items, env = await rx.receive(timeout=10)
            check_items(got_items, items)
            check_envelope(env, sent)

            async with asyncio.timeout(5):
                msg = await anext(aiter(client.messages))
            assert isinstance(msg.payload, bytes)
            native_items, _ = await smartreceive(msg.payload, fileserver=store.url)
            check_items(native_items, items)
            props: Any = msg.properties
            if version == "5":
                assert props.ContentType == "application/json"
                assert props.CorrelationData == sent.correlation_id.encode()
                assert props.ResponseTopic == f"fb/reply/{unique}"
                user = dict(props.UserProperty)
                assert user["message-id"] == sent.msg_id
                assert user["timestamp"] == sent.timestamp
            else:
                assert props is None  # 3.1.1: the envelope body is the only carrier

            peer = await build_envelope(topic, items[:2], sender_name="js-peer")
            await client.publish(topic, peer.to_json(), qos=1)
            got_items, env = await rx.receive(timeout=5)
            assert env.sender_name == "js-peer"
            check_items(got_items, items[:2])


# ---- AMQP 0-9-1 -------------------------------------------------------------------------


async def test_amqp(amqp_url: str, unique: str, store: PlikStore, items: list[Item]) -> None:
    key = f"fb.smart.{unique}"
    conn = await aio_pika.connect(amqp_url)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind("amq.topic", key)
        async with listen(amqp_url, f"fb.*.{unique}", fileserver=store.url) as rx:
            sent = await smartsend(
                amqp_url, key, items, fileserver=store.url, reply_to=f"fb.reply.{unique}"
            )
            got_items, env = await rx.receive(timeout=10)
            check_items(got_items, items)
            check_envelope(env, sent)
            assert sent.broker_url == "amqp://127.0.0.1:5672/"  # no credentials in the envelope

            async with asyncio.timeout(5), queue.iterator() as incoming:
                msg = await anext(aiter(incoming))
                await msg.ack()
            assert msg.content_type == "application/json"
            assert msg.correlation_id == sent.correlation_id
            assert msg.message_id == sent.msg_id
            assert msg.reply_to == f"fb.reply.{unique}"
            assert msg.timestamp is not None
            assert msg.timestamp.replace(tzinfo=UTC).timestamp() == int(sent.time)
            native_items, _ = await smartreceive(msg.body, fileserver=store.url)
            check_items(native_items, items)

            peer = await build_envelope(key, items[:2], sender_name="py-peer")
            exchange = await channel.get_exchange("amq.topic")
            await exchange.publish(aio_pika.Message(peer.to_json()), routing_key=key)
            got_items, env = await rx.receive(timeout=5)
            assert env.sender_name == "py-peer"
            check_items(got_items, items[:2])
    finally:
        await conn.close()


# ---- Kafka (Tansu) ----------------------------------------------------------------------


@pytest.mark.kafka
async def test_kafka(kafka_url: str, unique: str, store: PlikStore, items: list[Item]) -> None:
    topic = f"fb.smart.{unique}"
    bootstrap = kafka_url.removeprefix("kafka://")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        async with listen(kafka_url, topic, fileserver=store.url, broker_options=KAFKA_FAST) as rx:
            sent = await smartsend(
                kafka_url,
                topic,
                items,
                fileserver=store.url,
                broker_options=KAFKA_FAST,
                reply_to="fb.reply",
                key=b"k1",
            )
            got_items, env = await rx.receive(timeout=10)
            check_items(got_items, items)
            check_envelope(env, sent)

            async with asyncio.timeout(10):
                rec = await consumer.getone()
            headers = dict(rec.headers)
            assert headers["content-type"] == b"application/json"
            assert headers["correlation-id"] == sent.correlation_id.encode()
            assert headers["message-id"] == sent.msg_id.encode()
            assert headers["reply-to"] == b"fb.reply"
            assert rec.timestamp == round(sent.time * 1000)
            assert rec.key == b"k1"
            assert rec.value is not None
            native_items, _ = await smartreceive(rec.value, fileserver=store.url)
            check_items(native_items, items)

            peer = await build_envelope(topic, items[:2], sender_name="kafka-peer")
            await producer.send_and_wait(topic, peer.to_json())
            got_items, env = await rx.receive(timeout=10)
            assert env.sender_name == "kafka-peer"
            check_items(got_items, items[:2])
    finally:
        await producer.stop()
        await consumer.stop()


# ---- failure modes ----------------------------------------------------------------------


async def test_a_bad_envelope_is_reported_and_the_listener_goes_on(
    nats_url: str, unique: str, store: PlikStore
) -> None:
    subject = f"fb.smart.bad.{unique}"
    nc = await nats.connect(nats_url)
    try:
        async with listen(nats_url, subject, fileserver=store.url) as rx:
            await nc.publish(subject, b'{"not": "an envelope"}')
            await smartsend(nats_url, subject, [("m", "after", "text")], fileserver=store.url)
            it = aiter(rx)
            async with asyncio.timeout(5):
                first = await anext(it)
                second = await anext(it)
            assert first.error is not None
            assert "missing" in str(first.error)
            assert first.message.payload == b'{"not": "an envelope"}'
            assert second.error is None
            assert second.items == [("m", "after", "text")]
    finally:
        await nc.close()


async def test_an_envelope_too_big_for_the_broker_moves_payloads_to_links(
    nats_url: str, unique: str, store: PlikStore
) -> None:
    # Under the threshold each, but together (base64) over NATS' max payload (1 MB default).
    parts: list[Item] = [(f"p{i}", os.urandom(400_000), "binary") for i in range(3)]
    subject = f"fb.smart.fit.{unique}"
    async with listen(nats_url, subject, fileserver=store.url) as rx:
        sent = await smartsend(nats_url, subject, parts, fileserver=store.url)
        got_items, _ = await rx.receive(timeout=10)
    assert "link" in [p.transport for p in sent.payloads]
    assert got_items == parts


async def test_environment_defaults(
    nats_url: str, unique: str, store: PlikStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", nats_url)
    monkeypatch.setenv("FILESERVER_URL", store.url)
    monkeypatch.setenv("SIZE_THRESHOLD", "10")
    subject = f"fb.smart.env.{unique}"
    async with listen(None, subject) as rx:
        sent = await smartsend(
            None, subject, [("a", "short", "text"), ("b", "longer text", "text")]
        )
        got_items, _ = await rx.receive(timeout=5)
    assert [p.transport for p in sent.payloads] == ["direct", "link"]
    assert got_items == [("a", "short", "text"), ("b", "longer text", "text")]
    assert store.served == 1


# ---- the send and listen commands -------------------------------------------------------


def _spawn(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _wait_line(proc: subprocess.Popen[str], needle: str, within: float = 20.0) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + within
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"no {needle!r} from {proc.args!r}: {''.join(seen)}")


CLI_CASES = {
    "nats": ("fb.cli.{u}", "fb.cli.>", []),
    "mqtt": ("fb/cli/{u}", "fb/cli/{u}/#", ["-o", "version=5"]),
    "amqp": ("fb.cli.{u}", "fb.cli.#", []),
    "kafka": (
        "fb.cli.{u}",
        "fb.cli.{u}",
        [f"-o{k}={v}" for k, v in KAFKA_FAST.items()],
    ),
}


@pytest.mark.parametrize("protocol", list(CLI_CASES))
def test_cli_send_and_listen(
    protocol: str, request: pytest.FixtureRequest, unique: str, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{protocol}_url")
    topic, flt, opts = CLI_CASES[protocol]
    topic, flt = topic.format(u=unique), flt.format(u=unique)
    port = free_port()
    picture = tmp_path / "pic.png"
    picture.write_bytes(os.urandom(700_000))  # over the threshold: through the file store
    files = _spawn("-m", "flowbridge.fileserver", "--listen", f"127.0.0.1:{port}", cwd=tmp_path)
    listener = None
    try:
        _wait_line(files, "file store on")
        fs = f"http://127.0.0.1:{port}"
        listener = _spawn(
            "-m", "flowbridge", "listen", url, flt, *opts, "--fileserver", fs,
            "--save-dir", "got", "--count", "1", "--timeout", "20",
            cwd=tmp_path,
        )  # fmt: skip
        _wait_line(listener, "listening on")
        items = ["--text", "Grüß\x1b[2J", "--json", '{"a": [1, 2]}', "--file", str(picture)]
        code = cli.main(
            ["send", url, topic, *opts, *items, "--fileserver", fs, "--purpose", "updateStatus"]
        )
        assert code == 0
        out, err = listener.communicate(timeout=20)
        assert listener.returncode == 0, err
        assert "updateStatus from flowbridge" in out
        assert "text (text, 10 bytes, direct): Grüß\\x1b[2J" in out  # escaped, not obeyed
        assert '"a": [' in out
        saved = list((tmp_path / "got").iterdir())
        assert [p.name.split("-", 1)[1] for p in saved] == ["pic.png"]
        assert saved[0].read_bytes() == picture.read_bytes()
        assert "pic.png (image, 700000 bytes, link): saved to" in out
    finally:
        for proc in (listener, files):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            if proc is not None:
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()


def test_cli_rejects_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["send", "nats://127.0.0.1:4222", "t"]) == 2
    assert "at least one --text" in capsys.readouterr().err
    assert cli.main(["send", "nats://127.0.0.1:4222", "t", "--json", "[1]"]) == 2
    assert "object or an array of objects" in capsys.readouterr().err
    assert cli.main(["send", "ftp://x", "t", "--text", "a"]) == 2
    assert "unknown broker URL scheme" in capsys.readouterr().err
    assert cli.main(["send", "nats://x", "t", "--file", str(tmp_path / "missing")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert cli.main(["listen", "nats://x", "a", "--count", "0"]) == 2
    for command in ("send", "listen"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out
        assert f"flowbridge {command} " in out
