"""The benchmark's own brokers on free loopback ports, so it never disturbs shared services
and every run starts from the same state."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support.brokers import Mosquitto, NatsServer, Tansu, _Process, free_port, wait_port

__all__ = ["BenchMosquitto", "NatsServer", "RabbitMQ", "Tansu"]


class BenchMosquitto(Mosquitto):
    """Mosquitto with room for a fast QoS 1 consumer: its default of 20 unacked deliveries
    per client would measure round trips, not the bridge."""

    def command(self) -> list[str]:
        conf = os.path.join(self.workdir, "mosquitto.conf")
        Path(conf).write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 0\n"
            "set_tcp_nodelay true\n"
        )
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return [exe, "-c", conf]


class RabbitMQ(_Process):
    """A RabbitMQ node of our own (own node name, ports, data directory, no plugins)."""

    def __init__(self) -> None:
        super().__init__()
        self.dist_port = free_port()
        self.node = f"fbbench{os.getpid()}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        exe = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
        wd = Path(self.workdir)
        (wd / "mnesia").mkdir(exist_ok=True)
        (wd / "log").mkdir(exist_ok=True)
        (wd / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (wd / "env.conf").write_text("")
        (wd / "plugins").write_text("[].\n")
        # The server script drops to the rabbitmq user when run as root.
        shutil.chown(wd, "rabbitmq") if os.geteuid() == 0 else None
        for p in wd.rglob("*"):
            if os.geteuid() == 0:
                shutil.chown(p, "rabbitmq")
        env = {
            **os.environ,
            "RABBITMQ_CONF_ENV_FILE": str(wd / "env.conf"),
            "RABBITMQ_CONFIG_FILE": str(wd / "rabbitmq.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(wd / "mnesia"),
            "RABBITMQ_LOG_BASE": str(wd / "log"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(wd / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(wd / "plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        log = open(wd / "out.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        wait_port(self.port, timeout=60, proc=self.proc)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        # The script runs the VM as a child and may exit before it: signal the whole
        # process group we created, then make sure nothing of it is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        # Run as root, the server script starts the VM as the rabbitmq user in a session of
        # its own, out of reach of the group above: find it by its node name (epmd, which
        # the first node may have started, serves every node on the machine and stays).
        for vm in _pids_with_env(f"RABBITMQ_NODENAME={self.node}", but="epmd"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(vm), signal.SIGKILL)


def _pids_with_env(entry: str, but: str) -> list[int]:
    """Processes whose environment holds ``entry`` (``NAME=value``), except those named
    ``but``."""
    want = entry.encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (d / "comm").read_text().strip() == but:
                continue
            if want in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
    return found
