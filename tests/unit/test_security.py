"""TLS and credentials: loading (FILE:LINE problems), the client arguments each adapter builds,
TLS contexts against a loopback TLS server, and that no secret reaches any output."""

from __future__ import annotations

import asyncio
import ssl
import textwrap
from pathlib import Path
from typing import Any

import pytest

from flowbridge import cli, config
from flowbridge.adapters.amqp import AmqpAdapter
from flowbridge.adapters.base import Backoff
from flowbridge.adapters.kafka import KafkaAdapter
from flowbridge.adapters.mqtt import MqttAdapter
from flowbridge.adapters.nats import NatsAdapter
from flowbridge.errors import ConfigError
from flowbridge.security import (
    Credentials,
    Security,
    TlsSettings,
    describe,
    redact_url,
    security_of,
)
from tests.support.brokers import Pki, make_pki

SECRET = "s3cr3t-Pa55"
ROUTES = """\
routes:
  - name: r
    from: {broker: core, filter: "a.>"}
    to: {broker: core, topic: "b"}
    delivery: at-most-once
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, text: str) -> str:
    Path(name).write_text(textwrap.dedent(text))
    return name


def load(text: str, environ: dict[str, str] | None = None) -> config.Config:
    return config.load([write("m.yaml", text)], environ=environ or {})


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, environ)
    return info.value.problems


def broker(block: str) -> str:
    """A mapping file with broker ``core`` described by ``block`` (indented under it)."""
    return "brokers:\n  core:\n" + textwrap.indent(textwrap.dedent(block), "    ") + ROUTES


# ------------------------------------------------------------------------------ loading


def test_tls_and_password_from_env(files: Path, pki: Pki) -> None:
    cfg = load(
        broker(f"""\
            url: "nats://127.0.0.1:4222"
            tls: {{ca: {pki.ca}, cert: {pki.client_cert}, key: {pki.client_key},
                  server_name: localhost}}
            auth: {{username: bridge, password_env: NATS_PASSWORD}}
            """),
        {"NATS_PASSWORD": SECRET},
    )
    core = cfg.brokers["core"]
    assert core.tls == TlsSettings(
        ca=pki.ca, cert=pki.client_cert, key=pki.client_key, server_name="localhost"
    )
    assert core.auth is not None
    assert core.auth.username == "bridge"
    assert core.auth.password is not None
    assert core.auth.password.get_secret_value() == SECRET
    # The adapter gets both through its options, which still compare equal when reloaded.
    assert security_of(core.options) == Security(tls=core.tls, auth=core.auth)
    again = load(Path("m.yaml").read_text(), {"NATS_PASSWORD": SECRET})
    assert again.brokers["core"].options == core.options
    changed = load(Path("m.yaml").read_text(), {"NATS_PASSWORD": "other"})
    assert changed.brokers["core"].options != core.options


def test_secret_files_are_read_relative_to_the_mapping_file(files: Path) -> None:
    (files / "secrets").mkdir()
    (files / "secrets" / "token").write_text(SECRET + "\n")  # the newline is not the token's
    Path("conf").mkdir()
    Path("conf/m.yaml").write_text(
        broker('url: "nats://127.0.0.1:4222"\nauth: {token_file: ../secrets/token}\n')
    )
    cfg = config.load(["conf/m.yaml"], environ={})
    auth = cfg.brokers["core"].auth
    assert auth is not None
    assert auth.token is not None
    assert auth.token.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("tls://127.0.0.1:4222", TlsSettings()),
        ("nats://127.0.0.1:4222", None),
    ],
)
def test_tls_scheme_means_system_cas(files: Path, url: str, tls: TlsSettings | None) -> None:
    assert load(broker(f'url: "{url}"\n')).brokers["core"].tls == tls


def test_tls_true_turns_tls_on(files: Path) -> None:
    assert load(broker('url: "nats://h:4222"\ntls: true\n')).brokers["core"].tls == TlsSettings()


@pytest.mark.parametrize(
    ("block", "environ", "expected"),
    [
        (
            "auth: {username: u, password_env: NOPE}",
            {},
            "m.yaml:4: brokers.core.auth.password_env: environment variable NOPE is not set",
        ),
        (
            "auth: {username: u, password_env: EMPTY}",
            {"EMPTY": ""},
            "m.yaml:4: brokers.core.auth.password_env: environment variable EMPTY is empty",
        ),
        (
            "auth:\n  username: u\n  password_file: /nonexistent/pw",
            {},
            "m.yaml:6: brokers.core.auth.password_file: cannot read /nonexistent/pw: "
            "No such file or directory",
        ),
        (
            "tls:\n  ca: /nonexistent/ca.pem",
            {},
            "m.yaml:5: brokers.core.tls.ca: cannot read /nonexistent/ca.pem: "
            "No such file or directory",
        ),
        (
            "auth: {username: u, password: x, password_env: P}",
            {},
            "m.yaml:4: brokers.core.auth: password and password_env are both set: "
            "give the password once",
        ),
        (
            "auth: {password: x}",
            {},
            "m.yaml:4: brokers.core.auth: a password needs a username",
        ),
        (
            "auth: {username: u, token: t}",
            {},
            "m.yaml:4: brokers.core.auth: username and token are both set: "
            "choose one way to log in",
        ),
        (
            "auth: {username: u, password: x, sasl: {mechanism: PLAIN}}",
            {},
            "m.yaml:4: brokers.core.auth.sasl: nats brokers do not take sasl",
        ),
        (
            "auth: {username: u}",
            {},
            "m.yaml:4: brokers.core.auth: username needs password, password_env or password_file",
        ),
        (
            "tls: {key: k.pem}",
            {},
            "m.yaml:4: brokers.core.tls: key is set without cert: give the client certificate too",
        ),
        (
            "tls: {verify: maybe}",
            {},
            "m.yaml:4: brokers.core.tls.verify: Input should be a valid boolean, unable to "
            "interpret input; got 'maybe'",
        ),
    ],
)
def test_problems_name_the_key(
    files: Path, block: str, environ: dict[str, str], expected: str
) -> None:
    found = problems(broker('url: "nats://127.0.0.1:4222"\n' + block + "\n"), environ)
    assert expected in found, found


def test_url_and_auth_credentials_conflict(files: Path) -> None:
    assert problems(broker('url: "nats://u:p@h:4222"\nauth: {token: t}\n')) == [
        "m.yaml:4: brokers.core.auth: the URL also holds credentials: give them in one place"
    ]


def test_tls_false_contradicts_tls_scheme(files: Path) -> None:
    assert problems(broker('url: "tls://h:4222"\ntls: false\n')) == [
        "m.yaml:4: brokers.core.tls: TLS is off here but the URL's scheme asks for it"
    ]


def test_token_is_nats_only(files: Path) -> None:
    text = broker('url: "mqtt://h"\nauth: {token_env: T}\n').replace('"a.>"', '"a/#"')
    assert problems(text) == [
        "m.yaml:4: brokers.core.auth.token_env: mqtt brokers do not take token_env"
    ]


def test_unusable_certificate_files(files: Path, pki: Pki) -> None:
    Path("junk.pem").write_text("not a certificate\n")
    found = problems(broker('url: "tls://h:4222"\ntls: {ca: junk.pem}\n'))
    assert len(found) == 1
    assert found[0].startswith("m.yaml:4: brokers.core.tls.ca: ")
    assert "no usable CA certificate" in found[0]
    found = problems(
        broker(f'url: "tls://h"\ntls: {{cert: {pki.client_cert}, key: {pki.server_key}}}\n')
    )
    assert len(found) == 1
    assert found[0].startswith("m.yaml:4: brokers.core.tls.key: certificate and key do not")


# ------------------------------------------------------------------ client arguments


FAST = Backoff(initial=0.01, maximum=0.02, attempts=1)


def adapter_for(cls: type[Any], url: str, security: Security) -> Any:
    options = cls.BrokerOptions().model_copy(update={"security": security})
    return cls("b", url, options, FAST)


def test_nats_login_arguments(pki: Pki) -> None:
    a = adapter_for(
        NatsAdapter,
        "nats://h:4222",
        Security(
            tls=TlsSettings(ca=pki.ca),
            auth=Credentials(username="u", password=SECRET),  # type: ignore[arg-type]
        ),
    )
    kwargs = a._login()
    assert isinstance(kwargs["tls"], ssl.SSLContext)
    assert kwargs["user"] == "u"
    # A callable: nats-py's options never hold the secret itself.
    assert callable(kwargs["password"])
    assert kwargs["password"]() == SECRET
    token = adapter_for(NatsAdapter, "nats://h", Security(auth=Credentials(token=SECRET)))  # type: ignore[arg-type]
    assert token._login()["token"]() == SECRET
    assert "tls" not in token._login()
    creds = adapter_for(
        NatsAdapter, "tls://h", Security(auth=Credentials(creds_file="/c", nkey_file="/n"))
    )
    assert creds._login()["user_credentials"] == "/c"
    assert creds._login()["nkeys_seed"] == "/n"
    assert isinstance(creds._login()["tls"], ssl.SSLContext)  # tls:// alone: system CAs


def test_mqtt_connect_packet_and_tls() -> None:
    a = adapter_for(
        MqttAdapter,
        "mqtt://h",
        Security(
            tls=TlsSettings(),
            auth=Credentials(username="u", password=SECRET),  # type: ignore[arg-type]
        ),
    )
    assert a.tls
    assert a.port == 8883  # TLS without a port: the MQTT TLS port
    packet = a._connect_packet()
    assert (packet.username, packet.password) == ("u", SECRET.encode())
    assert SECRET not in repr(a.__dict__)
    plain = adapter_for(MqttAdapter, "mqtt://u:pw@h:1884", Security())
    assert not plain.tls
    assert plain._connect_packet().password == b"pw"  # URL credentials still work


async def test_amqp_url_and_context(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    a = adapter_for(
        AmqpAdapter,
        "amqp://h/vh",
        Security(
            tls=TlsSettings(ca=pki.ca),
            auth=Credentials(username="u", password=SECRET),  # type: ignore[arg-type]
        ),
    )
    url = a._conn_url
    # No port given: aiormq takes amqps' own (5671).
    assert (url.scheme, url.user, url.password, url.explicit_port, url.path) == (
        "amqps",
        "u",
        SECRET,
        None,
        "/vh",
    )
    seen: dict[str, Any] = {}

    class Probe:
        def __init__(self, url: Any, **kwargs: Any) -> None:
            seen.update(kwargs, url=url)
            raise ConnectionRefusedError("probe")

    monkeypatch.setattr("flowbridge.adapters.amqp.aiormq.Connection", Probe)
    with pytest.raises(ConnectionRefusedError):
        await a._open()
    assert isinstance(seen["context"], ssl.SSLContext)
    assert SECRET not in str(a._error(ConnectionRefusedError(f"refused {SECRET}")))


@pytest.mark.parametrize(
    ("url", "security", "expected"),
    [
        ("kafka://h:9092", Security(), {"security_protocol": "PLAINTEXT"}),
        ("kafka+ssl://h:9093", Security(), {"security_protocol": "SSL"}),
        (
            "kafka://h",
            Security(auth=Credentials(username="u", password="p", sasl_mechanism="SCRAM-SHA-512")),  # type: ignore[arg-type]
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "u",
                "sasl_plain_password": "p",
            },
        ),
        (
            "kafka://h",
            Security(
                tls=TlsSettings(),
                auth=Credentials(username="u", password="p", sasl_mechanism="PLAIN"),  # type: ignore[arg-type]
            ),
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_plain_username": "u",
                "sasl_plain_password": "p",
            },
        ),
        (
            "kafka+ssl://u%40x:p%3A@h",
            Security(),
            {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_plain_username": "u@x",
                "sasl_plain_password": "p:",
            },
        ),
    ],
)
def test_kafka_client_arguments(url: str, security: Security, expected: dict[str, Any]) -> None:
    args = adapter_for(KafkaAdapter, url, security).client_security()
    context = args.pop("ssl_context", None)
    assert args == expected
    assert (context is not None) == expected["security_protocol"].endswith("SSL")


def test_kafka_sasl_mechanism_from_config(files: Path) -> None:
    cfg = load(
        broker(
            'url: "kafka://h:9092"\n'
            "auth: {username: u, password_env: K, sasl: {mechanism: SCRAM-SHA-256}}\n"
        ).replace('filter: "a.>"', 'filter: "a"'),
        {"K": SECRET},
    )
    core = cfg.brokers["core"]
    adapter = core.adapter("core", core.url, core.options, FAST)
    assert isinstance(adapter, KafkaAdapter)
    args = adapter.client_security()
    assert args["sasl_mechanism"] == "SCRAM-SHA-256"
    assert args["sasl_plain_password"] == SECRET


# --------------------------------------------------------------------------- contexts


async def _tls_server(pki: Pki, *, client_ca: str | None = None) -> asyncio.Server:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if client_ca is not None:
        server_ctx.load_verify_locations(client_ca)
        server_ctx.verify_mode = ssl.CERT_REQUIRED

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)


async def _hello(server: asyncio.Server, tls: TlsSettings) -> bytes:
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.context())
    try:
        return await reader.read(5)
    finally:
        writer.close()


async def test_context_verifies_the_server(pki: Pki) -> None:
    async with await _tls_server(pki) as server:
        assert await _hello(server, TlsSettings(ca=pki.ca)) == b"hello"
        # Dialled by IP, verified as a name the certificate holds (and as one it does not).
        assert await _hello(server, TlsSettings(ca=pki.ca, server_name="localhost")) == b"hello"
        with pytest.raises(ssl.SSLCertVerificationError):
            await _hello(server, TlsSettings(ca=pki.ca, server_name="other.example"))
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await _hello(server, TlsSettings(ca=pki.other_ca))
        text = describe(info.value, Security())
        assert text.startswith("TLS: server certificate not trusted")
        assert "tls.ca" in text
        assert await _hello(server, TlsSettings(ca=pki.other_ca, verify=False)) == b"hello"


async def test_context_presents_the_client_certificate(pki: Pki) -> None:
    async with await _tls_server(pki, client_ca=pki.ca) as server:
        with_cert = TlsSettings(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        assert await _hello(server, with_cert) == b"hello"
        try:
            got = await _hello(server, TlsSettings(ca=pki.ca))
        except (ssl.SSLError, ConnectionError):
            got = b""
        assert got == b""  # TLS 1.3: the server's refusal arrives as the first read


# ----------------------------------------------------------------------- no secret out


def test_no_secret_in_config_repr_errors_or_check(
    files: Path, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("pw").write_text(SECRET)
    text = (
        "brokers:\n"
        "  core:\n"
        "    url: nats://127.0.0.1:4222\n"
        f"    tls: {{ca: {pki.ca}}}\n"
        "    auth: {username: u, password_env: PW}\n"
        f'  tok: {{url: "nats://{SECRET}@127.0.0.1:4222"}}\n'
        f'  rabbit: {{url: "amqp://guest:{SECRET}@127.0.0.1/"}}\n'
        "  edge: {url: mqtt://h, auth: {username: u, password_file: pw}}\n"
        f'  log: {{url: kafka://h, auth: {{username: u, password: "{SECRET}"}}}}\n' + ROUTES
    )
    monkeypatch.setenv("PW", SECRET)
    cfg = config.load([write("m.yaml", text)])
    dumped = [repr(cfg), str(cfg)]
    for b in cfg.brokers.values():
        dumped += [repr(b.options), str(b.options), b.options.model_dump_json(), str(b.auth)]
    assert cli.main(["check", "-c", "m.yaml"]) == 0
    out, err = capsys.readouterr()
    dumped += [out, err]
    # Problems that sit next to secrets, or are about them, never echo them.
    bad = (
        text.replace("password_env: PW", "password_env: PW, password: x")
        .replace(f'password: "{SECRET}"', f"password: [{SECRET}]")
        .replace(f"amqp://guest:{SECRET}@127.0.0.1/", f"amqp://guest:{SECRET}@127.0.0.1:x/")
        .replace(f"nats://{SECRET}@", f"natz://{SECRET}@")
    )
    assert cli.main(["check", "-c", write("bad.yaml", bad)]) == 2
    out, err = capsys.readouterr()
    assert err.count("m.yaml") == 0
    assert "bad.yaml:" in err
    assert len(err.splitlines()) >= 5, err
    dumped += [out, err]
    leaked = [d for d in dumped if SECRET in d]
    assert not leaked, leaked


def test_redact_url() -> None:
    assert redact_url("nats://tok@h:4222") == "nats://***@h:4222"
    assert redact_url("amqp://u:p@h/") == "amqp://u:***@h/"
    assert redact_url("mqtt://h:1883") == "mqtt://h:1883"
    assert redact_url("amqp://u:p@[bad/") == "amqp://u:***@[bad/"  # malformed still masked


def test_scrub_removes_every_secret() -> None:
    creds = Credentials(username="u", password=SECRET, token="t0k")  # type: ignore[arg-type]
    assert creds.scrub(f"x {SECRET} y t0k") == "x *** y ***"
    assert SECRET not in repr(creds)
