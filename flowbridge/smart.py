"""smartsend / smartreceive: msg_envelope_v1 messages over NATS, MQTT, AMQP 0-9-1 or Kafka.

``smartsend`` serializes each item, sends it ``direct`` (base64 inside the envelope) when its
serialized size is under the threshold (``SIZE_THRESHOLD``, default 500,000 bytes) and as a
``link`` to a file server otherwise, and publishes the envelope through the adapter of the
broker URL's scheme.  The envelope's ids, reply topic and time also travel on the protocol's
native carriers (``Message`` named fields), with content type ``application/json``.

``smartreceive`` turns a received body back into ``(items, envelope)``: direct payloads are
decoded, links downloaded (only from configured file servers), and every payload is checked
against its declared size and SHA-256.  ``listen`` subscribes and yields such results.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

from flowbridge.adapters import SCHEMES, adapter_class
from flowbridge.adapters.base import Adapter, Backoff, Incoming, Message, Options, Subscription
from flowbridge.envelope import (
    CONTENT_TYPE,
    PAYLOAD_TYPES,
    Envelope,
    EnvelopeError,
    Payload,
    deserialize,
    serialize,
)
from flowbridge.errors import ConnectError, FlowbridgeError
from flowbridge.fileserver import DEFAULT_MAX_SIZE, FileServer, FileServerError
from flowbridge.fileserver import from_url as fileserver_from_url
from flowbridge.topics import translate_filter

DEFAULT_SIZE_THRESHOLD = 500_000
DEFAULT_BROKER_URL = "nats://localhost:4222"
Item = tuple[str, Any, str]
"""``(dataname, data, payload_type)``, as given to smartsend and returned by smartreceive."""

# Connection attempts of a one-shot send or a listener before giving up.
_BACKOFF = Backoff(initial=0.1, maximum=2.0, attempts=5)
_READY_ATTR = {"nats": "_specs", "mqtt": "_routes", "amqp": "_consumers", "kafka": "sources"}


def size_threshold() -> int:
    """``SIZE_THRESHOLD`` from the environment, else 500,000 bytes."""
    text = os.environ.get("SIZE_THRESHOLD")
    if not text:
        return DEFAULT_SIZE_THRESHOLD
    try:
        value = int(text)
    except ValueError:
        raise FlowbridgeError(f"SIZE_THRESHOLD must be an integer, got {text!r}") from None
    if value < 0:
        raise FlowbridgeError(f"SIZE_THRESHOLD must not be negative, got {value}")
    return value


def _public_url(url: str) -> str:
    """The broker URL without credentials, as it may appear in an envelope."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def protocol_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    try:
        return SCHEMES[scheme]
    except KeyError:
        known = ", ".join(sorted(SCHEMES))
        raise FlowbridgeError(f"unknown broker URL scheme {scheme!r} in {url!r}: {known}") from None


def open_adapter(
    url: str, *, options: Mapping[str, Any] | Options | None = None, role: str = "smart"
) -> Adapter:
    """An adapter for ``url`` (not yet connected).  ``options`` are the protocol's broker
    options; MQTT gets a unique client id and a session that ends with the connection, so
    short-lived clients never take over each other's sessions."""
    protocol = protocol_of(url)
    cls = adapter_class(protocol)
    if isinstance(options, Options):
        opts = options
    else:
        given = dict(options or {})
        if protocol == "mqtt":
            given.setdefault("client_id", f"flowbridge-{role}-{uuid.uuid4().hex[:12]}")
            given.setdefault("clean_start", True)
            given.setdefault("session_expiry", 0)
        opts = cls.BrokerOptions.model_validate(given)
    return cls(role, url, opts, _BACKOFF)


@contextlib.asynccontextmanager
async def _connected(
    target: str | Adapter | None, options: Mapping[str, Any] | Options | None, role: str
) -> AsyncIterator[Adapter]:
    if isinstance(target, Adapter):
        yield target  # the caller's connection: left open
        return
    adapter = open_adapter(
        target or os.environ.get("NATS_URL") or DEFAULT_BROKER_URL, options=options, role=role
    )
    try:
        await adapter.connect()
        yield adapter
    finally:
        await adapter.close()


def _fileserver(fs: FileServer | str | None) -> FileServer:
    return fs if isinstance(fs, FileServer) else fileserver_from_url(fs)


def _serialize_items(items: Sequence[Item]) -> list[tuple[str, str, bytes]]:
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple | list) and len(item) == 3):
            raise EnvelopeError(f"items[{i}]", "expected (dataname, data, payload_type)")
        dataname, data, payload_type = item
        if not isinstance(dataname, str):
            raise EnvelopeError(f"items[{i}].dataname", "expected a string")
        if payload_type not in PAYLOAD_TYPES:
            raise EnvelopeError(
                f"items[{i}].payload_type",
                f"expected one of {', '.join(PAYLOAD_TYPES)}, got {payload_type!r}",
            )
        try:
            raw = serialize(data, payload_type)
        except EnvelopeError as exc:
            raise EnvelopeError(f"items[{i}].{exc.field}", exc.reason) from exc
        out.append((dataname, payload_type, raw))
    return out


async def build_envelope(
    topic: str,
    items: Sequence[Item],
    *,
    fileserver: FileServer | str | None = None,
    threshold: int | None = None,
    max_body: int | None = None,
    **fields: Any,
) -> Envelope:
    """The envelope smartsend would publish: payloads under ``threshold`` direct, the rest
    uploaded to ``fileserver``.  When ``max_body`` is given and the JSON body would exceed it,
    the largest direct payloads move to the file server until it fits.  ``fields`` are
    msg_envelope_v1 fields (``msg_purpose``, ``sender_name``, ``reply_to``, ...)."""
    limit = size_threshold() if threshold is None else threshold
    serialized = _serialize_items(items)
    fs: FileServer | None = fileserver if isinstance(fileserver, FileServer) else None

    async def link(dataname: str, payload_type: str, raw: bytes) -> Payload:
        nonlocal fs
        if fs is None:
            fs = _fileserver(fileserver)
        url = await fs.upload(raw, dataname or "payload")
        return Payload.link(dataname, payload_type, url, raw)

    payloads = []
    for dataname, payload_type, raw in serialized:
        if len(raw) < limit:
            payloads.append(Payload.direct(dataname, payload_type, raw))
        else:
            payloads.append(await link(dataname, payload_type, raw))
    fields.setdefault("sender_name", "flowbridge")
    env = Envelope(send_to=topic, payloads=payloads, **fields)
    if max_body is not None:
        body_len = len(env.to_json())
        order = sorted(
            (i for i, p in enumerate(payloads) if p.transport == "direct"),
            key=lambda i: -len(payloads[i].data),
        )
        for i in order:
            if body_len <= max_body:
                break
            dataname, payload_type, raw = serialized[i]
            before = len(payloads[i].data)
            payloads[i] = await link(dataname, payload_type, raw)
            body_len -= before - len(payloads[i].data)
        body_len = len(env.to_json())
        if body_len > max_body:
            raise EnvelopeError(
                "payloads", f"envelope of {body_len} bytes exceeds the broker's {max_body} limit"
            )
    return env


def envelope_message(env: Envelope, topic: str, *, key: bytes | None = None) -> Message:
    """The message carrying ``env``: its body, plus the envelope's ids, reply topic and time
    on the protocol's native carriers."""
    return Message(
        topic,
        env.to_json(),
        content_type=CONTENT_TYPE,
        correlation_id=env.correlation_id.encode(),
        reply_to=env.reply_to or None,
        message_id=env.msg_id,
        timestamp=env.time,
        key=key,
    )


async def smartsend(
    target: str | Adapter | None,
    topic: str,
    items: Sequence[Item],
    *,
    fileserver: FileServer | str | None = None,
    threshold: int | None = None,
    broker_options: Mapping[str, Any] | Options | None = None,
    target_options: Options | None = None,
    confirm: bool = True,
    key: bytes | None = None,
    **fields: Any,
) -> Envelope:
    """Publish ``items`` on ``topic`` (native name of the broker's protocol) as one envelope.

    ``target`` is a broker URL (``nats://``, ``mqtt://``, ``amqp://``, ``kafka://``; None:
    ``NATS_URL``) or a connected adapter (left open).  ``fileserver`` is a handler or URL
    (None: ``FILESERVER_URL``), used only for payloads at or over ``threshold``.  With
    ``confirm`` (default) it returns once the broker confirmed the message.  Returns the
    envelope sent; raises ``PublishError`` when the broker refused it."""
    async with _connected(target, broker_options, "send") as adapter:
        if isinstance(target, str) or target is None:
            fields.setdefault("broker_url", _public_url(adapter.url))
        env = await build_envelope(
            topic,
            items,
            fileserver=fileserver,
            threshold=threshold,
            max_body=adapter.max_payload(),
            **fields,
        )
        msg = envelope_message(env, topic, key=key)
        outcome = await adapter.publish([msg], confirm=confirm, options=target_options)
        if outcome is not None and outcome[0] is not None:
            raise outcome[0]
        return env


# ---- receiving ---------------------------------------------------------------------------


def _fileservers(
    fileserver: FileServer | str | Sequence[FileServer | str] | None,
) -> list[FileServer]:
    if fileserver is None or isinstance(fileserver, FileServer | str):
        return [_fileserver(fileserver)]
    return [_fileserver(fs) for fs in fileserver]


async def smartreceive(
    message: Message | bytes | str,
    *,
    fileserver: FileServer | str | Sequence[FileServer | str] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
) -> tuple[list[Item], Envelope]:
    """``(items, envelope)`` of a received envelope body.

    Link payloads are downloaded only from ``fileserver`` (a handler, URL or several; None:
    ``FILESERVER_URL``), at most ``min(declared size, max_size)`` bytes.  Raises
    ``EnvelopeError`` (``IntegrityError`` for a size or SHA-256 mismatch) or
    ``FileServerError`` (``RefusedURLError`` for a URL off every file server), each carrying
    the envelope's correlation id."""
    body = message.payload if isinstance(message, Message) else message
    env = Envelope.from_json(body)
    servers: list[FileServer] | None = None
    items: list[Item] = []
    for i, p in enumerate(env.payloads):
        try:
            if p.transport == "direct":
                raw = p.direct_bytes()
            else:
                if servers is None:
                    servers = _fileservers(fileserver)
                raw = await _download(servers, str(p.data), p.size, max_size)
            p.verify(raw)
            value = deserialize(raw, p.payload_type)
        except EnvelopeError as exc:
            raise type(exc)(
                f"payloads[{i}].{exc.field}", exc.reason, correlation_id=env.correlation_id
            ) from exc
        except FileServerError as exc:
            exc.correlation_id = env.correlation_id
            exc.args = (f"payloads[{i}]: {exc.reason} (correlation_id {env.correlation_id})",)
            raise
        items.append((p.dataname, value, p.payload_type))
    return items, env


async def _download(servers: Sequence[FileServer], url: str, size: int, cap: int) -> bytes:
    if size > cap:
        raise FileServerError(f"link payload of {size} bytes over the {cap} byte cap", url=url)
    for fs in servers:
        if fs.allows(url):
            # One byte over the declared size still reads, so an overlong body shows as a
            # size mismatch instead of a silently truncated payload.
            return await fs.download(url, max_size=size + 1)
    servers[0].check_url(url)  # raises RefusedURLError naming the configured server
    raise AssertionError("unreachable")


@dataclass(slots=True)
class Received:
    """One message of a listener: decoded, or the error that kept it from being decoded."""

    message: Message
    items: list[Item] = field(default_factory=list)
    envelope: Envelope | None = None
    error: Exception | None = None


class Listener:
    """Envelopes arriving on a filter, as ``Received`` values (``async for``) or one at a time
    (``receive``).  The subscription is active on the broker once ``async with`` entered, so
    anything published after that is seen.

    ``filter`` uses the protocol's route filter syntax (NATS ``a.*.>``, MQTT ``a/+/#``, AMQP
    ``a.*.#``, Kafka ``a.+.#``).  Each message is acknowledged once decoded or reported as
    failed; at most ``max_in_flight`` wait undelivered (then the broker holds the rest)."""

    def __init__(
        self,
        source: str | Adapter | None,
        filter: str,
        *,
        fileserver: FileServer | str | Sequence[FileServer | str] | None = None,
        broker_options: Mapping[str, Any] | Options | None = None,
        source_options: Options | Mapping[str, Any] | None = None,
        group: str | None = None,
        max_in_flight: int = 64,
        max_size: int = DEFAULT_MAX_SIZE,
        ready_timeout: float = 30.0,
    ) -> None:
        self._source = source
        self._owned = not isinstance(source, Adapter)
        self.adapter: Adapter | None = source if isinstance(source, Adapter) else None
        self.filter = filter
        self._fileserver = fileserver
        self._servers: list[FileServer] | None = None
        self._broker_options = broker_options
        self._source_options = source_options
        self.group = group
        self.max_in_flight = max_in_flight
        self.max_size = max_size
        self.ready_timeout = ready_timeout
        self._queue: asyncio.Queue[Incoming | BaseException] = asyncio.Queue(max_in_flight)
        self._pump: asyncio.Task[None] | None = None
        self._failure: Exception | None = None

    async def __aenter__(self) -> Self:
        if self.adapter is None:
            url = self._source if isinstance(self._source, str) else None
            self.adapter = open_adapter(
                url or os.environ.get("NATS_URL") or DEFAULT_BROKER_URL,
                options=self._broker_options,
                role="listen",
            )
        adapter = self.adapter
        try:
            if self._owned:
                await adapter.connect()
            protocol = adapter.protocol
            filters = tuple(translate_filter(self.filter, protocol, protocol))
            sopts = self._source_options
            if not isinstance(sopts, Options):
                given = dict(sopts or {})
                if protocol == "kafka":
                    given.setdefault("start", "latest")
                sopts = adapter.SourceOptions.model_validate(given)
            route = f"listen-{uuid.uuid4().hex[:12]}"
            sub = Subscription(
                route=route,
                filters=filters,
                durable=False,
                max_in_flight=self.max_in_flight,
                group=self.group or (f"flowbridge-{route}" if protocol == "kafka" else None),
                options=sopts,
            )
            self._pump = asyncio.create_task(self._run(adapter, sub), name=f"smart-{route}")
            await self._ready(adapter)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
            self._pump = None
        if self._owned and self.adapter is not None:
            await self.adapter.close()

    async def _run(self, adapter: Adapter, sub: Subscription) -> None:
        try:
            async for batch in adapter.subscribe(sub):
                for delivery in batch:
                    await self._queue.put(delivery)  # blocks when full: backpressure
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failure = exc
        else:
            self._failure = ConnectError(f"broker {adapter.name}: subscription ended")
        await self._queue.put(self._failure)

    async def _ready(self, adapter: Adapter) -> None:
        """Wait until the broker has the subscription (adapters register it on the first
        pull; NATS confirms with a round trip, the others report it through health)."""
        attr = _READY_ATTR.get(adapter.protocol)
        try:
            async with asyncio.timeout(self.ready_timeout):
                while True:
                    if self._pump is not None and self._pump.done():
                        break
                    registered = attr is None or bool(getattr(adapter, attr, None))
                    if registered and adapter.health().subscribed:
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise ConnectError(
                f"broker {adapter.name}: subscription to {self.filter!r} not active after "
                f"{self.ready_timeout}s"
            ) from None
        if self._failure is not None:
            raise self._failure
        client = getattr(adapter, "client", None)
        nc = client() if adapter.protocol == "nats" and callable(client) else None
        if nc is not None:
            await nc.flush()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later call sees the end too
            raise item
        msg = item.message
        try:
            if self._servers is None:
                self._servers = _fileservers(self._fileserver)
            items, env = await smartreceive(msg, fileserver=self._servers, max_size=self.max_size)
        except (EnvelopeError, FileServerError) as exc:
            item.ack()  # reported to the caller, not retried: the same bytes fail again
            return Received(msg, error=exc)
        item.ack()
        return Received(msg, items, env)

    async def receive(self, timeout: float | None = None) -> tuple[list[Item], Envelope]:  # noqa: ASYNC109
        """The next envelope's ``(items, envelope)``; raises its decoding error, or
        TimeoutError when none arrives within ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            got = await self.__anext__()
        if got.error is not None:
            raise got.error
        assert got.envelope is not None
        return got.items, got.envelope


def listen(source: str | Adapter | None, filter: str, **kwargs: Any) -> Listener:
    """``async with listen(url, filter) as rx: items, env = await rx.receive(5)``."""
    return Listener(source, filter, **kwargs)
