"""TLS contexts and credentials for broker connections.

A mapping file names secrets, it does not have to hold them: ``password_env`` /
``password_file`` (and the same for tokens) are resolved once at load time, and a missing
variable or unreadable file is a load-time problem naming the key.  Resolved secrets are
``SecretStr``: their repr, ``str`` and ``model_dump`` never show the value, and
``Credentials.scrub`` removes them from any text a client library put them in.

TLS settings keep file paths, not contexts: a context is built for every connection, so a
renewed certificate is picked up on the next reconnect, and two loads of the same file compare
equal (a reload does not restart an unchanged broker).
"""

from __future__ import annotations

import importlib.util
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from flowbridge.adapters.base import Options

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
"""A problem at a key path relative to the broker (``("auth", "password_env")``)."""

SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

TLS_SCHEMES: Final = frozenset({"tls", "mqtts", "amqps", "kafka+ssl"})
SECRET_KEYS: Final = frozenset({"password", "token"})
"""Keys whose value must never be echoed in a problem."""

_MAX_SECRET_FILE = 64 * 1024


# ---------------------------------------------------------------------------------------------
# What a mapping file may say (``brokers.NAME.tls`` and ``brokers.NAME.auth``).


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSpec(_Spec):
    enabled: bool = True  # ``tls: true`` / ``tls: false`` stand for this alone
    ca: str | None = None  # PEM bundle of trusted CAs; None: the system's
    cert: str | None = None  # client certificate (PEM; may also hold the key)
    key: str | None = None
    verify: bool = True  # False: no certificate or host name check (testing only)
    server_name: str | None = None  # name to verify (and send as SNI) instead of the URL's host

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsSpec:
        if self.key is not None and self.cert is None:
            raise ValueError("key is set without cert: give the client certificate too")
        return self


class SaslSpec(_Spec):
    mechanism: SaslMechanism = "PLAIN"


class AuthSpec(_Spec):
    username: str | None = None
    # Secrets as text only: YAML would turn an unquoted 0123 into the number 83.
    password: str | None = Field(None, strict=True)
    password_env: str | None = None
    password_file: str | None = None
    token: str | None = Field(None, strict=True)
    token_env: str | None = None
    token_file: str | None = None
    creds_file: str | None = None  # NATS: user JWT and seed (.creds)
    nkey_file: str | None = None  # NATS: nkey seed
    sasl: SaslSpec | None = None  # Kafka

    @model_validator(mode="after")
    def _one_source_each(self) -> AuthSpec:
        for secret in ("password", "token"):
            given = [k for k in (secret, f"{secret}_env", f"{secret}_file") if getattr(self, k)]
            if len(given) > 1:
                raise ValueError(f"{' and '.join(given)} are both set: give the {secret} once")
        methods = [
            what
            for what, on in (
                ("username", self.username is not None),
                ("token", self.token or self.token_env or self.token_file),
                ("creds_file", self.creds_file),
                ("nkey_file", self.nkey_file),
            )
            if on
        ]
        if len(methods) > 1:
            raise ValueError(f"{' and '.join(methods)} are both set: choose one way to log in")
        if self.username is None and (self.password or self.password_env or self.password_file):
            raise ValueError("a password needs a username")
        return self


# ---------------------------------------------------------------------------------------------
# What adapters receive.


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Frozen):
    """TLS on, with these (absolute) paths; the defaults are the system CAs, verified."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context; raises ``OSError``/``ssl.SSLError`` for unusable files."""
        cls = _NamedContext if self.server_name else ssl.SSLContext
        ctx = cls(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names by default
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if isinstance(ctx, _NamedContext):
            ctx.server_name = self.server_name
        if self.ca is not None:
            ctx.load_verify_locations(cafile=self.ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert is not None:
            ctx.load_cert_chain(self.cert, self.key)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class _NamedContext(ssl.SSLContext):
    """Verifies (and sends as SNI) a configured name instead of the host dialled: every
    client library reaches ``wrap_bio``/``wrap_socket``, not all of them take a host name."""

    server_name: str | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(*args, **kwargs)


class Credentials(_Frozen):
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: str | None = None
    nkey_file: str | None = None
    sasl_mechanism: SaslMechanism | None = None

    def secrets(self) -> Iterator[str]:
        for secret in (self.password, self.token):
            if secret is not None and secret.get_secret_value():
                yield secret.get_secret_value()

    def scrub(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text


class Security(_Frozen):
    """TLS and credentials of one broker; both None: plain, the URL's credentials if any."""

    tls: TlsSettings | None = None
    auth: Credentials | None = None

    def scrub(self, text: str) -> str:
        return text if self.auth is None else self.auth.scrub(text)


NO_SECURITY: Final = Security()


class SecuredOptions(Options):
    """Base of the broker options of adapters that take ``tls``/``auth``.

    ``security`` is filled by the config loader from ``brokers.NAME.tls`` and ``.auth`` (a
    mapping file cannot set it under ``options``); it stays out of ``model_dump``.
    """

    security: Security = Field(default=NO_SECURITY, exclude=True)


def security_of(options: Options) -> Security:
    return options.security if isinstance(options, SecuredOptions) else NO_SECURITY


def tls_for(url: str, security: Security) -> TlsSettings | None:
    """The TLS settings a connection to ``url`` uses: the configured ones, else the system
    defaults when the scheme asks for TLS, else None (plain)."""
    if security.tls is not None:
        return security.tls
    if urlsplit(url).scheme.lower() in TLS_SCHEMES:
        return TlsSettings()
    return None


# ---------------------------------------------------------------------------------------------
# Load time: files and environment variables to settings, or problems.


def _path(value: str, base_dir: str) -> str:
    path = os.path.expanduser(value)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _readable(path: str) -> str | None:
    """Why ``path`` cannot be read, or None."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def resolve_tls(spec: TlsSpec, base_dir: str) -> tuple[TlsSettings | None, list[Problem]]:
    """Absolute paths, each file checked by building a context once."""
    problems: list[Problem] = []
    paths: dict[str, str | None] = {}
    for key in ("ca", "cert", "key"):
        value = getattr(spec, key)
        paths[key] = None if value is None else _path(value, base_dir)
        if paths[key] is not None and (why := _readable(str(paths[key]))) is not None:
            problems.append((("tls", key), why))
    if problems:
        return None, problems
    settings = TlsSettings(verify=spec.verify, server_name=spec.server_name, **paths)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.ca is not None:
        try:
            probe.load_verify_locations(cafile=settings.ca)
        except (OSError, ssl.SSLError) as exc:
            problems.append((("tls", "ca"), f"{settings.ca}: no usable CA certificate ({exc})"))
    if settings.cert is not None:
        try:
            probe.load_cert_chain(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            where = "key" if settings.key is not None else "cert"
            problems.append(
                (("tls", where), f"certificate and key do not load together ({_ssl_reason(exc)})")
            )
    return (None if problems else settings), problems


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc)


def _secret(
    spec: AuthSpec, name: str, environ: Mapping[str, str], base_dir: str
) -> tuple[SecretStr | None, list[Problem]]:
    inline: str | None = getattr(spec, name)
    if inline is not None:
        return SecretStr(inline), []
    var: str | None = getattr(spec, f"{name}_env")
    if var is not None:
        value = environ.get(var)
        if value is None:
            return None, [(("auth", f"{name}_env"), f"environment variable {var} is not set")]
        if not value:
            return None, [(("auth", f"{name}_env"), f"environment variable {var} is empty")]
        return SecretStr(value), []
    file: str | None = getattr(spec, f"{name}_file")
    if file is None:
        return None, []
    path = _path(file, base_dir)
    loc: Loc = ("auth", f"{name}_file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_SECRET_FILE + 1)
    except OSError as exc:
        return None, [(loc, f"cannot read {path}: {exc.strerror or exc}")]
    if len(raw) > _MAX_SECRET_FILE:
        return None, [(loc, f"{path} is larger than {_MAX_SECRET_FILE} bytes")]
    try:
        # Secret files usually end with a newline (echo, Docker and Kubernetes secrets).
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return None, [(loc, f"{path} is not UTF-8 text")]
    if not text:
        return None, [(loc, f"{path} is empty")]
    return SecretStr(text), []


# Which auth keys each protocol understands.
_PROTOCOL_KEYS: Final[dict[str, frozenset[str]]] = {
    "nats": frozenset({"username", "password", "token", "creds_file", "nkey_file"}),
    "mqtt": frozenset({"username", "password"}),
    "amqp": frozenset({"username", "password"}),
    "kafka": frozenset({"username", "password", "sasl"}),
}


_FAMILY: Final = {
    "password_env": "password",
    "password_file": "password",
    "token_env": "token",
    "token_file": "token",
}


def resolve_auth(
    spec: AuthSpec, protocol: str, environ: Mapping[str, str], base_dir: str
) -> tuple[Credentials | None, list[Problem]]:
    problems: list[Problem] = []
    allowed = _PROTOCOL_KEYS.get(protocol, frozenset())
    for key in sorted(spec.model_fields_set):
        if getattr(spec, key) is not None and _FAMILY.get(key, key) not in allowed:
            problems.append((("auth", key), f"{protocol} brokers do not take {key}"))
    if problems:
        return None, problems
    password, password_problems = _secret(spec, "password", environ, base_dir)
    token, token_problems = _secret(spec, "token", environ, base_dir)
    problems += password_problems + token_problems
    if (
        spec.username is not None
        and password is None
        and not password_problems
        and protocol != "mqtt"
    ):
        # MQTT may log in with a user name alone; the others need both.
        problems.append((("auth",), "username needs password, password_env or password_file"))
    files: dict[str, str | None] = {}
    for key in ("creds_file", "nkey_file"):
        value = getattr(spec, key)
        files[key] = None if value is None else _path(value, base_dir)
        if files[key] is None:
            continue
        if (why := _readable(str(files[key]))) is not None:
            problems.append((("auth", key), why))
        elif importlib.util.find_spec("nkeys") is None:
            problems.append((("auth", key), "needs the nkeys package (pip install nkeys)"))
    mechanism: SaslMechanism | None = None
    if protocol == "kafka" and spec.username is not None:
        mechanism = spec.sasl.mechanism if spec.sasl is not None else "PLAIN"
    elif spec.sasl is not None:
        problems.append((("auth", "sasl"), "sasl needs username and a password"))
    if problems:
        return None, problems
    creds = Credentials(
        username=spec.username,
        password=password,
        token=token,
        sasl_mechanism=mechanism,
        **files,
    )
    return creds, []


_USERINFO = re.compile(r"^([^:/?#]*://)([^/?#]*)@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&][\w.-]*(?:pass|token|secret|key|cred|auth|sig|nkey|jwt)[\w.-]*=)[^&#\s]+",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """``url`` for logs and pages: no password, no user name when that alone is the secret
    (a NATS token), no value of a query parameter that looks secret; works on malformed URLs
    too, since they are reported."""

    def sub(m: re.Match[str]) -> str:
        user, sep, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if sep else f"{m.group(1)}***@"

    return _SECRET_PARAM.sub(r"\g<key>***", _USERINFO.sub(sub, url, count=1))


def url_credentials(url: str) -> bool:
    """Whether ``url`` carries a user name or password."""
    netloc = urlsplit(url).netloc
    return "@" in netloc


def describe(exc: BaseException, security: Security) -> str:
    """An exception as text for a ``ConnectError`` or log line: secrets scrubbed, TLS
    failures with a hint at the setting to look at."""
    real: BaseException = exc
    for _ in range(5):  # the library's own error often wraps the ssl one
        inner = real.__cause__ or real.__context__
        if isinstance(real, ssl.SSLError) or inner is None:
            break
        real = inner
    name, said = type(exc).__name__, str(exc)
    # Some libraries (aiokafka) already start their text with the class name.
    text = said if said.startswith(name) else f"{name}: {said}".rstrip(": ")
    if isinstance(real, ssl.SSLCertVerificationError):
        text = f"TLS: server certificate not trusted ({real.verify_message or real.reason})"
        text += "; check tls.ca (the CA that signed the server's certificate)"
        text += " and tls.server_name (the name in it)"
    elif isinstance(real, ssl.SSLError):
        text = f"TLS handshake failed ({real.reason or real})"
        if "CERTIFICATE" in str(real.reason or "").upper():
            text += "; the server may require a client certificate (tls.cert, tls.key)"
    return security.scrub(text)
