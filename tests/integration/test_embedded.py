"""The embedded default brokers: real nats-server and amqtt, exercised with native clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from flowbridge import embedded
from flowbridge.embedded import embedded_brokers
from flowbridge.errors import FlowbridgeError
from tests.support.brokers import free_port

ROOT = Path(__file__).resolve().parents[2]


def nats_pids(port: int) -> list[int]:
    """nats-server processes listening on ``port``, found by their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nats-server") and b"-p" in argv:
            index = argv.index(b"-p")
            if index + 1 < len(argv) and argv[index + 1] == str(port).encode():
                found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has stopped running all the same.
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]) == "Z"
    return True


def is_dir(path: str) -> bool:
    return Path(path).is_dir()


@contextlib.contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


class PahoClient:
    """paho in its own network thread; waits run in worker threads so the amqtt broker,
    which shares this test's event loop, keeps running."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.received: list[tuple[str, bytes, int]] = []
        self.got = threading.Event()
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.port = port

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.received.append((msg.topic, msg.payload, msg.qos))
        self.got.set()

    async def __aenter__(self) -> PahoClient:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert await asyncio.to_thread(self.connected.wait, 5), "MQTT CONNACK not received"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


async def test_nats_jetstream_and_mqtt_work(unique: str) -> None:
    nats_port, mqtt_port = free_port(), free_port()
    async with embedded_brokers(nats_port=nats_port, mqtt_port=mqtt_port) as brokers:
        assert brokers.nats_url == f"nats://127.0.0.1:{nats_port}"
        assert brokers.mqtt_url == f"mqtt://127.0.0.1:{mqtt_port}"

        nc = await nats.connect(brokers.nats_url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            sub = await nc.subscribe(f"{unique}.core")
            await nc.publish(f"{unique}.core", b"hello nats")
            msg = await sub.next_msg(timeout=2)
            assert msg.data == b"hello nats"

            js = nc.jetstream()
            await js.add_stream(name=f"S{unique}", subjects=[f"{unique}.js.>"])
            ack = await js.publish(f"{unique}.js.a", b"stored", timeout=2)
            assert (ack.stream, ack.seq) == (f"S{unique}", 1)
            stored = await js.get_msg(f"S{unique}", 1)
            assert stored.data == b"stored"
        finally:
            await nc.close()

        async with PahoClient(mqtt_port) as sub_client, PahoClient(mqtt_port) as pub_client:
            sub_client.client.subscribe(f"{unique}/+/t", qos=1)
            assert await asyncio.to_thread(sub_client.subscribed.wait, 5), "no SUBACK"
            info = pub_client.client.publish(f"{unique}/a/t", b"hello mqtt", qos=1)
            await asyncio.to_thread(info.wait_for_publish, 5)
            assert await asyncio.to_thread(sub_client.got.wait, 5), "message not delivered"
            assert sub_client.received == [(f"{unique}/a/t", b"hello mqtt", 1)]


async def test_amqtt_info_logging_is_silenced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    mqtt_port = free_port()
    async with (
        embedded_brokers(nats_port=free_port(), mqtt_port=mqtt_port),
        PahoClient(mqtt_port),
    ):
        pass
    noisy = [
        r for r in caplog.records if r.name.startswith("amqtt") and r.levelno < logging.WARNING
    ]
    assert noisy == []


@pytest.mark.parametrize(
    ("which", "purpose", "flag"),
    [("nats", "NATS", "--nats-port"), ("mqtt", "MQTT", "--mqtt-port")],
)
async def test_port_in_use_is_a_clear_error(which: str, purpose: str, flag: str) -> None:
    busy, other = free_port(), free_port()
    ports = (
        {"nats_port": busy, "mqtt_port": other}
        if which == "nats"
        else {"nats_port": other, "mqtt_port": busy}
    )
    with listening(busy), pytest.raises(FlowbridgeError) as err:
        async with embedded_brokers(**ports):
            pytest.fail("started although the port is taken")
    text = str(err.value)
    assert f"port {busy}" in text
    assert purpose in text
    assert flag in text
    assert "already in use" in text
    # Nothing was started: the other port is still free and no nats-server runs.
    with listening(other):
        pass
    assert nats_pids(ports["nats_port"]) == []


async def test_same_port_for_both_is_rejected() -> None:
    port = free_port()
    with pytest.raises(FlowbridgeError, match=f"share port {port}.*--nats-port.*--mqtt-port"):
        async with embedded_brokers(nats_port=port, mqtt_port=port):
            pytest.fail("started with one port for both")


async def test_nats_server_gone_after_exit() -> None:
    nats_port = free_port()
    async with embedded_brokers(nats_port=nats_port, mqtt_port=free_port()) as brokers:
        pid = brokers.nats_pid
        assert nats_pids(nats_port) == [pid]
        store = brokers.store_dir
        assert is_dir(store)
    assert gone(pid)
    assert nats_pids(nats_port) == []
    assert not is_dir(store)


async def test_nats_server_gone_after_error_in_block() -> None:
    nats_port = free_port()
    seen: list[int] = []

    async def fail_inside() -> None:
        async with embedded_brokers(nats_port=nats_port, mqtt_port=free_port()):
            seen.extend(nats_pids(nats_port))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert len(seen) == 1
    assert nats_pids(nats_port) == []


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01, 0.02, None])
async def test_nats_server_gone_after_cancellation(delay: float | None) -> None:
    """Cancelled while starting (delay) or while running (None)."""
    nats_port, mqtt_port = free_port(), free_port()
    running = asyncio.Event()

    async def serve() -> None:
        async with embedded_brokers(nats_port=nats_port, mqtt_port=mqtt_port):
            running.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(serve())
    if delay is None:
        await asyncio.wait_for(running.wait(), 10)
        assert nats_pids(nats_port)
    else:
        await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert nats_pids(nats_port) == []
    with listening(mqtt_port):  # the MQTT listener is closed too
        pass


async def test_mqtt_listener_closed_when_cancelled_inside_broker_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled after amqtt opened its listener but before start() returned."""
    listener_open = asyncio.Event()

    class SlowStart(Broker):  # type: ignore[misc]
        async def start(self) -> None:
            await super().start()
            listener_open.set()
            await asyncio.sleep(0.3)

    monkeypatch.setattr(embedded, "_amqtt_broker", lambda: SlowStart)
    nats_port, mqtt_port = free_port(), free_port()

    async def serve() -> None:
        async with embedded_brokers(nats_port=nats_port, mqtt_port=mqtt_port):
            pytest.fail("start should have been cancelled")

    task = asyncio.create_task(serve())
    await asyncio.wait_for(listener_open.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with listening(mqtt_port):
        pass
    assert nats_pids(nats_port) == []


def test_nats_server_dies_with_a_killed_parent() -> None:
    """SIGKILL skips every finally block; the kernel's parent-death signal still stops it."""
    nats_port = free_port()
    script = textwrap.dedent(
        f"""
        import asyncio
        from flowbridge.embedded import embedded_brokers

        async def main():
            async with embedded_brokers(nats_port={nats_port}, mqtt_port={free_port()}) as b:
                print(b.nats_pid, b.store_dir, flush=True)
                await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as parent:
        store = ""
        try:
            assert parent.stdout is not None
            pid_text, store = parent.stdout.readline().split()
            pid = int(pid_text)
            assert nats_pids(nats_port) == [pid]
            parent.send_signal(signal.SIGKILL)
            parent.wait(5)
            deadline = time.monotonic() + 5
            while nats_pids(nats_port) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert nats_pids(nats_port) == []
        finally:
            parent.kill()
            for leftover in nats_pids(nats_port):
                os.kill(leftover, signal.SIGKILL)
            # Nothing ran the killed parent's cleanup.
            if store:
                shutil.rmtree(Path(store).parent, ignore_errors=True)


def test_missing_nats_server_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_distribution(name: str) -> None:
        raise embedded.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(embedded.importlib.metadata, "distribution", no_distribution)
    with pytest.raises(FlowbridgeError, match=r"install flowbridge\[embedded\]"):
        embedded.nats_server_binary()


def test_nats_server_found_through_the_installed_distribution(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = embedded.nats_server_binary()
    monkeypatch.setattr(embedded.sys, "executable", str(tmp_path / "python"))
    assert Path(embedded.nats_server_binary()).samefile(real)
