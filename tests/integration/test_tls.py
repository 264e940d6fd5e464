"""TLS and credentials against real brokers of the test's own (nats-server, mosquitto) with
certificates made here, and login against the shared RabbitMQ.  The adapters are built from
mapping files, as ``flowbridge run`` builds them; the other side is a native client.  No
log record and no error text may hold the password."""

from __future__ import annotations

import asyncio
import logging
import ssl
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import nats
import pytest
from nats.aio.client import Client

from flowbridge import config
from flowbridge.adapters.base import Adapter, Backoff, Message
from flowbridge.errors import ConnectError
from flowbridge.security import TlsSettings
from tests.support.brokers import Mosquitto, NatsServer, Pki, make_pki

SECRET = "tls-Test-pa55word"
# Two attempts: the first failure is logged (with its cause) before the second is raised.
TWICE = Backoff(initial=0.05, maximum=0.1, attempts=2)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def logged(caplog: pytest.LogCaptureFixture) -> str:
    records = caplog.get_records("setup") + caplog.get_records("call")
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) for r in records)


@pytest.fixture(autouse=True)
def no_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every record of every logger (client libraries too, at DEBUG), tracebacks included."""
    caplog.set_level(logging.DEBUG)
    yield
    assert SECRET not in logged(caplog)


def build(tmp_path: Path, url: str, extra: str, *, filter: str, environ: dict[str, str]) -> Adapter:
    """The adapter of broker ``b`` described by ``url`` and ``extra`` keys."""
    text = f'brokers:\n  b:\n    url: "{url}"\n' + textwrap.indent(textwrap.dedent(extra), "    ")
    text += (
        "routes:\n  - name: r\n"
        f'    from: {{broker: b, filter: "{filter}"}}\n'
        "    to: {broker: b, topic: x}\n    delivery: at-most-once\n"
    )
    path = tmp_path / "m.yaml"
    path.write_text(text)
    b = config.load([str(path)], environ=environ).brokers["b"]
    return b.adapter(b.name, b.url, b.options, TWICE)


async def refused(
    adapter: Adapter, caplog: pytest.LogCaptureFixture, *, retry_logged: bool = True
) -> str:
    """The ConnectError's text; with ``retry_logged`` the failure before it was logged (and
    is checked for secrets by ``no_secret_logged``).  The MQTT adapter keeps the failures of
    its first connect in its health detail, unlogged."""
    with pytest.raises(ConnectError) as info:
        await adapter.connect()
    await adapter.close()
    text = str(info.value)
    print(text)  # shown with -s: what an operator reads
    assert SECRET not in text
    assert not retry_logged or any(
        r.name.startswith("flowbridge") and r.levelno >= logging.WARNING
        for r in caplog.get_records("call")
    ), logged(caplog)
    return text


# ----------------------------------------------------------------------------------- NATS


@pytest.fixture(scope="module")
def nats_tls(pki: Pki) -> Iterator[NatsServer]:
    """TLS required, client certificates verified, user bridge / SECRET."""
    with NatsServer(pki=pki, verify_clients=True, users={"bridge": SECRET}, jetstream=False) as s:
        yield s


def nats_block(pki: Pki, *, ca: str | None = None, cert: bool = True) -> str:
    tls = f"ca: {ca or pki.ca}"
    if cert:
        tls += f", cert: {pki.client_cert}, key: {pki.client_key}"
    return f"tls: {{{tls}}}\nauth: {{username: bridge, password_env: FB_PW}}\n"


@pytest.fixture
async def native_nats(nats_tls: NatsServer, pki: Pki) -> AsyncIterator[Client]:
    ctx = TlsSettings(ca=pki.ca, cert=pki.client_cert, key=pki.client_key).context()
    nc = await nats.connect(nats_tls.url, tls=ctx, user="bridge", password=SECRET)
    yield nc
    await nc.close()


async def test_nats_tls_client_certificate_and_password(
    tmp_path: Path, pki: Pki, nats_tls: NatsServer, native_nats: Client, unique: str
) -> None:
    adapter = build(
        tmp_path, nats_tls.url, nats_block(pki), filter="a.>", environ={"FB_PW": SECRET}
    )
    sub = await native_nats.subscribe(f"tls.{unique}")
    await native_nats.flush()
    try:
        await adapter.connect()
        await adapter.publish([Message(f"tls.{unique}", b"over tls")], confirm=True)
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"over tls"
    finally:
        await adapter.close()


async def test_nats_tls_scheme_token(tmp_path: Path, pki: Pki, unique: str) -> None:
    with NatsServer(pki=pki, token=SECRET, jetstream=False) as server:
        url = server.url.replace("nats://", "tls://")
        adapter = build(
            tmp_path,
            url,
            f"tls: {{ca: {pki.ca}}}\nauth: {{token_env: FB_TOKEN}}\n",
            filter="a.>",
            environ={"FB_TOKEN": SECRET},
        )
        nc = await nats.connect(url, tls=TlsSettings(ca=pki.ca).context(), token=SECRET)
        try:
            sub = await nc.subscribe(f"tok.{unique}")
            await nc.flush()
            await adapter.connect()
            await adapter.publish([Message(f"tok.{unique}", b"t")], confirm=True)
            assert (await sub.next_msg(timeout=5)).data == b"t"
        finally:
            await adapter.close()
            await nc.close()


async def test_nats_wrong_ca(
    tmp_path: Path, pki: Pki, nats_tls: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    block = nats_block(pki, ca=pki.other_ca)
    adapter = build(tmp_path, nats_tls.url, block, filter="a.>", environ={"FB_PW": SECRET})
    text = await refused(adapter, caplog)
    assert "server certificate not trusted" in text
    assert text.startswith(f"broker b ({nats_tls.url}): TLS:")


async def test_nats_wrong_password(
    tmp_path: Path, pki: Pki, nats_tls: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The server's answer to a wrong password names the refusal, never the password tried.
    adapter = build(
        tmp_path, nats_tls.url, nats_block(pki), filter="a.>", environ={"FB_PW": SECRET + "x"}
    )
    text = await refused(adapter, caplog)
    assert "authorization violation" in text.lower()
    assert SECRET + "x" not in text


async def test_nats_without_client_certificate(
    tmp_path: Path, pki: Pki, nats_tls: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    block = nats_block(pki, cert=False)
    adapter = build(tmp_path, nats_tls.url, block, filter="a.>", environ={"FB_PW": SECRET})
    await refused(adapter, caplog)


async def test_nats_server_without_tls_gets_no_credentials(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # TLS is configured, the server (or a man in the middle) does not offer it: the client
    # must stop before CONNECT, which would carry the password in clear.
    with NatsServer(users={"bridge": SECRET}, jetstream=False) as plain:
        adapter = build(
            tmp_path, plain.url, nats_block(pki), filter="a.>", environ={"FB_PW": SECRET}
        )
        text = await refused(adapter, caplog)
        assert "did not start TLS" in text


# ----------------------------------------------------------------------------------- MQTT


@pytest.fixture(scope="module")
def mosquitto_tls(pki: Pki) -> Iterator[Mosquitto]:
    """TLS listener, client certificate required, user bridge / SECRET."""
    with Mosquitto(pki=pki, require_certificate=True, users={"bridge": SECRET}) as broker:
        yield broker


def mqtt_block(
    pki: Pki, *, ca: str | None = None, cert: bool = True, password_file: str = "pw"
) -> str:
    tls = f"ca: {ca or pki.ca}, server_name: localhost"
    if cert:
        tls += f", cert: {pki.client_cert}, key: {pki.client_key}"
    return f"tls: {{{tls}}}\nauth: {{username: bridge, password_file: {password_file}}}\n"


@pytest.fixture
def pw_file(tmp_path: Path) -> Path:
    (tmp_path / "pw").write_text(SECRET + "\n")
    (tmp_path / "bad-pw").write_text("not-" + SECRET)
    return tmp_path / "pw"


async def test_mqtt_tls_client_certificate_and_password(
    tmp_path: Path, pki: Pki, mosquitto_tls: Mosquitto, pw_file: Path, unique: str
) -> None:
    adapter = build(tmp_path, mosquitto_tls.url, mqtt_block(pki), filter="a/#", environ={})
    ctx = TlsSettings(ca=pki.ca, cert=pki.client_cert, key=pki.client_key).context()
    async with aiomqtt.Client(
        "127.0.0.1",
        mosquitto_tls.port,
        username="bridge",
        password=SECRET,
        tls_context=ctx,
        identifier=f"native-{unique}",
    ) as native:
        await native.subscribe(f"tls/{unique}", qos=1)
        try:
            await adapter.connect()
            await adapter.publish([Message(f"tls/{unique}", b"over tls")], confirm=True)
            async with asyncio.timeout(5):
                msg = await anext(native.messages)
            assert msg.payload == b"over tls"
        finally:
            await adapter.close()


async def test_mqtt_wrong_ca(
    tmp_path: Path,
    pki: Pki,
    mosquitto_tls: Mosquitto,
    pw_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    block = mqtt_block(pki, ca=pki.other_ca)
    text = await refused(
        build(tmp_path, mosquitto_tls.url, block, filter="a/#", environ={}),
        caplog,
        retry_logged=False,
    )
    assert "server certificate not trusted" in text


async def test_mqtt_wrong_password(
    tmp_path: Path,
    pki: Pki,
    mosquitto_tls: Mosquitto,
    pw_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    block = mqtt_block(pki, password_file="bad-pw")
    text = await refused(
        build(tmp_path, mosquitto_tls.url, block, filter="a/#", environ={}),
        caplog,
        retry_logged=False,
    )
    assert "not authorized" in text or "bad user name or password" in text
    assert "not-" + SECRET not in text


async def test_mqtt_without_client_certificate(
    tmp_path: Path,
    pki: Pki,
    mosquitto_tls: Mosquitto,
    pw_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    block = mqtt_block(pki, cert=False)
    await refused(
        build(tmp_path, mosquitto_tls.url, block, filter="a/#", environ={}),
        caplog,
        retry_logged=False,
    )


# ----------------------------------------------------------------------------------- AMQP


def amqp_base(amqp_url: str) -> str:
    parts = urlsplit(amqp_url)
    return f"amqp://{parts.hostname}:{parts.port or 5672}/"


async def test_amqp_password_from_env(tmp_path: Path, amqp_url: str) -> None:
    # The shared broker's user guest/guest; its password only in the environment.
    password = urlsplit(amqp_url).password or "guest"
    user = urlsplit(amqp_url).username or "guest"
    adapter = build(
        tmp_path,
        amqp_base(amqp_url),
        f"auth: {{username: {user}, password_env: FB_AMQP_PW}}\n",
        filter="a.#",
        environ={"FB_AMQP_PW": password},
    )
    try:
        await adapter.connect()
        assert adapter.health().ok
    finally:
        await adapter.close()


async def test_amqp_wrong_password(
    tmp_path: Path, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = build(
        tmp_path,
        amqp_base(amqp_url),
        "auth: {username: guest, password_env: FB_AMQP_PW}\n",
        filter="a.#",
        environ={"FB_AMQP_PW": SECRET},
    )
    text = await refused(adapter, caplog)
    assert "ACCESS_REFUSED" in text or "authentication" in text.lower()


def test_tls_contexts_are_fresh_per_connection(pki: Pki) -> None:
    # Renewed certificate files are read on the next connection, not cached.
    settings = TlsSettings(ca=pki.ca)
    first: Any = settings.context()
    assert isinstance(first, ssl.SSLContext)
    assert settings.context() is not first
