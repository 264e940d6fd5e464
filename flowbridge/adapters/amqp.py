"""AMQP 0-9-1 adapter (RabbitMQ), on aiormq's connection and framing.

Topics are routing keys on one exchange (default ``amq.topic``, the exchange RabbitMQ's own
MQTT plugin uses); a source binds its filters as binding keys of one queue per route.

Hot paths avoid a task, future or await per message: the channels below handle deliveries,
publisher confirms and returns themselves (aiormq would start a task per delivery and a
future per publish), publishes are encoded straight to wire frames and written as one chunk,
and acks are coalesced into ``basic.ack multiple=True``.

Named fields travel in the basic properties: ``content_type``, ``correlation_id`` (a short
string when it is UTF-8 of at most 255 bytes, else header ``x-correlation-id`` as a byte
array), ``reply_to``, ``message_id``, ``timestamp`` (whole seconds).  ``headers`` go to the
headers table; a repeated name becomes a field array of its values.  On receipt an array
becomes repeated ``(name, value)`` pairs and every other AMQP value becomes text:
strings as they are; byte arrays as UTF-8 when valid, else standard base64; booleans
``true``/``false``; integers, floats and decimals in Python's ``str`` form; timestamps as
ISO 8601 UTC (``2024-01-31T12:00:00Z``); void as the empty string; nested tables and
arrays inside arrays as compact JSON.  The table carries distinct names in sorted order
(pamqp sorts them); values of one name keep their order.

RPC (target option ``rpc``): a message with a reply-to is published with reply-to
``amq.rabbitmq.reply-to`` (RabbitMQ direct reply-to) and a correlation id the adapter
generates, on a channel that consumes that pseudo-queue (no-ack) before it publishes.  A
bounded map (``rpc_max_pending``, entries expire after ``rpc_timeout``) remembers the
original reply-to and correlation id; the reply is handed, under the original reply-to and
with the original correlation id, to every ``replies`` source of this broker whose filter
matches.  Replies cannot be acknowledged and are not redelivered: those for a channel that
closed (connection lost) are gone by RabbitMQ's design, and their requests count as expired.
A reply nobody waits for any more is counted (``rpc_unknown_replies``) and logged once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import secrets
import struct
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from decimal import Decimal
from itertools import count
from typing import Any, ClassVar

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.channel import Channel
from aiormq.exceptions import AMQPChannelError, AMQPError, ChannelInvalidStateError
from pamqp import commands as spec
from pamqp import encode as pamqp_encode
from pamqp.body import ContentBody
from pamqp.common import FieldValue
from pamqp.header import ContentHeader
from pydantic import Field, model_validator
from yarl import URL

from flowbridge.adapters._amqp_wire import DeliverHandler, TransportFactory
from flowbridge.adapters._rpc import PendingReplies
from flowbridge.adapters.base import (
    Adapter,
    Backoff,
    ConnState,
    Delivery,
    Health,
    Message,
    Options,
    PerHeaders,
    PublishOutcome,
    Subscription,
)
from flowbridge.errors import ConnectError, PublishError, TopicError
from flowbridge.security import (
    SecuredOptions,
    TlsSettings,
    describe,
    redact_url,
    security_of,
    tls_for,
)
from flowbridge.topics import parse_filter, parse_topic

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size
CORRELATION_HEADER = "x-correlation-id"
_PREFETCH_MAX = 65535  # basic.qos prefetch_count is a short
_CHUNK_BYTES = 256 * 1024  # publish frames are handed to the writer in chunks of this size
_FLUSH_TIMEOUT = 5.0
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_TIMER_SLACK = 0.005  # an expiry timer may fire a hair before its deadline


class AmqpBrokerOptions(SecuredOptions):
    exchange: str = "amq.topic"
    exchange_type: str = "topic"
    # None: declare (durable) unless the name is reserved (``amq.*`` or the default exchange).
    declare_exchange: bool | None = None
    heartbeat: int | None = Field(default=None, ge=0, le=65535)  # None: the URL's, else 60 s
    max_message_size: int = Field(default=DEFAULT_MAX_MESSAGE_SIZE, gt=0)
    connection_name: str | None = None  # None: "flowbridge NAME"
    connect_timeout: float = Field(default=10.0, gt=0)
    # Requests of ``rpc`` targets awaiting a reply; beyond it the oldest is forgotten.
    rpc_max_pending: int = Field(default=10_000, ge=1, le=1_000_000)


class AmqpSourceOptions(Options):
    exchange: str | None = None  # None: the broker's exchange
    queue: str | None = None  # durable queue name; None: "flowbridge.<route>"
    queue_arguments: dict[str, str | int | bool] = Field(default_factory=dict)
    # The replies to this broker's ``rpc`` targets, under their requests' reply-to names
    # (the route's filter selects among them); no queue, no acknowledgements.
    replies: bool = False

    @model_validator(mode="after")
    def _replies_read_no_queue(self) -> AmqpSourceOptions:
        if self.replies:
            queue_keys = ("exchange", "queue", "queue_arguments")
            given = [k for k in queue_keys if k in self.model_fields_set]
            if given:
                raise ValueError(
                    f"replies: true reads RabbitMQ direct reply-to, not a queue: "
                    f"{', '.join(given)} cannot be set with it"
                )
        return self


class AmqpTargetOptions(Options):
    exchange: str | None = None
    mandatory: bool = False
    persistent: bool | None = None  # None: persistent exactly when the publish is confirmed
    # A request (a message with a reply-to) goes out with RabbitMQ direct reply-to and a
    # correlation id of the bridge's; its reply comes back through a ``replies`` source.
    rpc: bool = False
    rpc_timeout: float = Field(default=30.0, gt=0, le=86_400)  # seconds a request waits

    @model_validator(mode="after")
    def _timeout_needs_rpc(self) -> AmqpTargetOptions:
        if "rpc_timeout" in self.model_fields_set and not self.rpc:
            raise ValueError("rpc_timeout is only used with rpc: true")
        return self


# --- message <-> wire ------------------------------------------------------------------

_FRAME_END = b"\xce"
_PUBLISH_METHOD = struct.pack(">HHH", 60, 40, 0)  # Basic.Publish, reserved ticket
_FLAG_CONTENT_TYPE = 0x8000
_FLAG_HEADERS = 0x2000
_FLAG_DELIVERY_MODE = 0x1000
_FLAG_CORRELATION_ID = 0x0400
_FLAG_REPLY_TO = 0x0200
_FLAG_MESSAGE_ID = 0x0080
_FLAG_TIMESTAMP = 0x0040
_frame_head = struct.Struct(">BHI").pack
_header_head = struct.Struct(">HHQH").pack  # class, weight, body size, property flags
_u64 = struct.Struct(">Q").pack
_CACHE_MAX = 4096  # method frames remembered (one per channel, exchange and topic)


def _shortstr(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise PublishError(f"{what} is {len(raw)} bytes, AMQP allows 255", retriable=False)
    return bytes((len(raw),)) + raw


def _headers_table(msg: Message) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name, value in msg.headers or ():
        # pamqp truncates longer names silently; refuse instead.
        if len(name) > 32 and len(name.encode()) > 128:
            raise PublishError(f"header name {name[:40]!r}... over 128 bytes", retriable=False)
        if name not in table:
            table[name] = value
        elif isinstance(prev := table[name], list):
            prev.append(value)
        else:
            table[name] = [prev, value]
    return table


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _properties(msg: Message, delivery_mode: int) -> tuple[int, bytes]:
    """Property flags and values of a content header, in the order AMQP defines."""
    flags = _FLAG_DELIVERY_MODE
    parts: list[bytes] = []
    if msg.content_type is not None:
        flags |= _FLAG_CONTENT_TYPE
        parts.append(_shortstr(msg.content_type, "content_type"))
    corr_prop: bytes | None = None
    table = _headers_table(msg) if msg.headers else None
    if msg.correlation_id is not None:
        cid = msg.correlation_id
        if len(cid) <= 255 and _is_utf8(cid):
            corr_prop = bytes((len(cid),)) + cid
        else:
            if table is None:
                table = {}
            table[CORRELATION_HEADER] = bytearray(cid)
    if table is not None:
        flags |= _FLAG_HEADERS
        parts.append(pamqp_encode.field_table(table))
    parts.append(b"\x02" if delivery_mode == 2 else b"\x01")
    if corr_prop is not None:
        flags |= _FLAG_CORRELATION_ID
        parts.append(corr_prop)
    if msg.reply_to is not None:
        flags |= _FLAG_REPLY_TO
        parts.append(_shortstr(msg.reply_to, "reply_to"))
    if msg.message_id is not None:
        flags |= _FLAG_MESSAGE_ID
        parts.append(_shortstr(msg.message_id, "message_id"))
    if msg.timestamp is not None:
        flags |= _FLAG_TIMESTAMP
        parts.append(_u64(max(0, int(msg.timestamp))))
    return flags, b"".join(parts)


class PublishCache:
    """What the publishes of a stream repeat, encoded once: each topic's method frame, and
    the properties of a header list many messages share (a route gives all messages of a
    topic one list) when they carry nothing else."""

    __slots__ = ("methods", "props")

    def __init__(self) -> None:
        self.methods: dict[tuple[int, bytes, str, bool], bytes] = {}
        self.props: PerHeaders[tuple[int, int, bytes]] = PerHeaders()

    def method(self, channel: int, exchange: bytes, topic: str, mandatory: bool) -> bytes:
        key = (channel, exchange, topic, mandatory)
        frame = self.methods.get(key)
        if frame is None:
            method = (
                _PUBLISH_METHOD
                + exchange
                + _shortstr(topic, "routing key")
                + (b"\x01" if mandatory else b"\x00")
            )
            frame = _frame_head(1, channel, len(method)) + method + _FRAME_END
            if len(self.methods) >= _CACHE_MAX:
                self.methods.clear()
            self.methods[key] = frame
        return frame

    def properties(self, msg: Message, delivery_mode: int) -> tuple[int, bytes]:
        h = msg.headers
        if (
            h is None
            or msg.content_type is not None
            or msg.correlation_id is not None
            or msg.reply_to is not None
            or msg.message_id is not None
            or msg.timestamp is not None
        ):
            return _properties(msg, delivery_mode)
        hit = self.props.get(h)
        if hit is not None and hit[0] == delivery_mode:
            return hit[1], hit[2]
        flags, props = _properties(msg, delivery_mode)
        self.props.put(h, (delivery_mode, flags, props))
        return flags, props


def encode_publish(
    msg: Message,
    channel: int,
    *,
    exchange: bytes,
    mandatory: bool,
    delivery_mode: int,
    frame_body_max: int,
    cache: PublishCache | None = None,
) -> bytes:
    """The wire frames of one basic.publish: method, content header, body frames.

    ``exchange`` is the exchange as an encoded short string.  Raises PublishError for a
    message AMQP cannot carry.
    """
    cache = cache or PublishCache()
    payload = msg.payload
    flags, props = cache.properties(msg, delivery_mode)
    header = _header_head(60, 0, len(payload), flags) + props
    out = [
        cache.method(channel, exchange, msg.topic, mandatory),
        _frame_head(2, channel, len(header)),
        header,
        _FRAME_END,
    ]
    size = len(payload)
    if size <= frame_body_max:
        if size:
            out += (_frame_head(3, channel, size), payload, _FRAME_END)
    else:
        view = memoryview(payload)
        for start in range(0, size, frame_body_max):
            piece = view[start : start + frame_body_max]
            out += (_frame_head(3, channel, len(piece)), bytes(piece), _FRAME_END)
    return b"".join(out)


def header_text(value: Any) -> str:
    """An AMQP field value as header text (see the module docstring)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
        stamp: str = value.strftime("%Y-%m-%dT%H:%M:%SZ")
        return stamp
    if value is None:
        return ""
    text: str = json.dumps(value, default=header_text, separators=(",", ":"), ensure_ascii=False)
    return text


def _correlation_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return header_text(value).encode()


def decode_message(routing_key: str, props: spec.Basic.Properties, body: bytes) -> Message:
    msg = Message(routing_key, body)
    if props.content_type is not None:
        msg.content_type = props.content_type
    if props.correlation_id is not None:
        msg.correlation_id = props.correlation_id.encode()
    if props.reply_to is not None:
        msg.reply_to = props.reply_to
    if props.message_id is not None:
        msg.message_id = props.message_id
    if props.timestamp is not None:
        msg.timestamp = props.timestamp.timestamp()
    table = props.headers
    if table:
        headers: list[tuple[str, str]] = []
        for name, value in table.items():
            if name == CORRELATION_HEADER and msg.correlation_id is None:
                msg.correlation_id = _correlation_bytes(value)
            elif isinstance(value, list):
                headers.extend((name, header_text(v)) for v in value)
            else:
                headers.append((name, header_text(value)))
        if headers:
            msg.headers = headers
    return msg


# --- channels -------------------------------------------------------------------------


class _Batch:
    """Confirm state of one publish call: one future for the batch, not one per message."""

    __slots__ = ("exchange", "future", "messages", "remaining", "results", "sealed")

    def __init__(
        self, messages: Sequence[Message], exchange: str, future: asyncio.Future[None]
    ) -> None:
        self.messages = messages
        self.exchange = exchange
        self.results: list[PublishError | None] = [None] * len(messages)
        self.remaining = 0
        self.sealed = False  # every message is registered: confirms may complete the batch
        self.future = future

    def settle(self, index: int, nack: bool) -> None:
        if nack and self.results[index] is None:
            self.results[index] = PublishError("nacked by the broker", retriable=False)
        self.remaining -= 1
        if self.remaining == 0 and self.sealed and not self.future.done():
            self.future.set_result(None)

    def seal(self) -> None:
        self.sealed = True
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(None)

    def lost(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _ChannelLost(Exception):
    """The channel closed before every confirm arrived; ``refused`` when the broker
    closed the channel itself (e.g. unknown exchange) rather than the connection
    going away."""

    def __init__(self, cause: BaseException | None, *, refused: bool) -> None:
        super().__init__(str(cause) if cause else "channel closed")
        self.refused = refused


class _Channel(Channel):
    """An aiormq channel that settles confirms, returns and deliveries without a task or
    future per message (deliveries come straight from ``_amqp_wire.FrameReceiver``)."""

    def __init__(
        self,
        conn: aiormq.Connection,
        number: int,
        *,
        confirms: bool,
        on_deliver: DeliverHandler,
        writer: asyncio.StreamWriter | None = None,
    ) -> None:
        super().__init__(conn, number, publisher_confirms=confirms, frame_buffer=64)
        self.fb_deliver = on_deliver
        self.writer = writer  # the connection's socket, for publishes written directly
        self.next_tag = 1
        self.pending: dict[int, tuple[_Batch, int]] = {}
        self.order: deque[int] = deque()
        self.unreported_returns = 0
        self.closing.add_done_callback(self._closed)

    def _closed(self, _: asyncio.Future[Any]) -> None:
        cause = self._close_exception
        refused = isinstance(cause, AMQPChannelError) and self.connection.is_opened
        lost = _ChannelLost(cause, refused=refused)
        for batch, _index in self.pending.values():
            batch.lost(lost)
        self.pending.clear()
        self.order.clear()

    async def _read_body(self, size: int) -> bytes:
        if not size:
            return b""
        frame = await self._get_frame()
        if not isinstance(frame, ContentBody):
            raise TypeError(f"expected a content body, got {frame!r}")
        body = frame.value
        if len(body) >= size:
            return body
        parts = [body]
        got = len(body)
        while got < size:
            frame = await self._get_frame()
            if not isinstance(frame, ContentBody):
                raise TypeError(f"expected a content body, got {frame!r}")
            parts.append(frame.value)
            got += len(frame.value)
        return b"".join(parts)

    async def _read_content_header(self) -> ContentHeader:
        header = await self._get_frame()
        if not isinstance(header, ContentHeader):
            raise TypeError(f"expected a content header, got {header!r}")
        return header

    async def _on_deliver_frame(self, frame: spec.Basic.Deliver) -> None:
        header = await self._read_content_header()
        body = await self._read_body(header.body_size)
        self.fb_deliver(frame.delivery_tag or 0, frame.routing_key or "", header.properties, body)

    async def _on_confirm_frame(
        self, frame: spec.Basic.Ack | spec.Basic.Nack | spec.Basic.Reject
    ) -> None:
        tag = frame.delivery_tag or 0
        nack = not isinstance(frame, spec.Basic.Ack)
        pending = self.pending
        order = self.order
        if getattr(frame, "multiple", False):
            while order and order[0] <= tag:
                entry = pending.pop(order.popleft(), None)
                if entry is not None:
                    entry[0].settle(entry[1], nack)
        else:
            entry = pending.pop(tag, None)
            if entry is not None:
                entry[0].settle(entry[1], nack)
            while order and order[0] not in pending:
                order.popleft()

    async def _on_return_frame(self, frame: spec.Basic.Return) -> None:
        header = await self._read_content_header()
        await self._read_body(header.body_size)
        # A return precedes the confirm of its message and returns come in publish order,
        # so it belongs to the oldest unconfirmed, not yet returned message with its
        # exchange and routing key.
        error = PublishError(f"unroutable: {frame.reply_code} {frame.reply_text}", retriable=False)
        for tag in self.order:
            entry = self.pending.get(tag)
            if entry is None:
                continue
            batch, index = entry
            if (
                batch.results[index] is None
                and batch.exchange == frame.exchange
                and batch.messages[index].topic == frame.routing_key
            ):
                batch.results[index] = error
                return
        self.unreported_returns += 1

    def register(self, batch: _Batch, index: int) -> int:
        tag = self.next_tag
        self.next_tag = tag + 1
        self.pending[tag] = (batch, index)
        self.order.append(tag)
        batch.remaining += 1
        return tag


def _ignore_delivery(*_: Any) -> None:
    return None


def _as_request(msg: Message, cid: str) -> Message:
    """``msg`` as an RPC request: replies come to the publishing channel, with ``cid``."""
    return Message(
        msg.topic,
        msg.payload,
        msg.headers,
        msg.content_type,
        cid.encode(),
        DIRECT_REPLY_TO,
        msg.message_id,
        msg.timestamp,
        msg.key,
        msg.retain,
    )


async def _consumer_placeholder(_: Any) -> None:
    """aiormq wants a consumer callback; deliveries go to ``_Channel.fb_deliver``."""


async def _put(channel: _Channel, frame: ChannelFrame) -> None:
    """Hand frames to the connection's writer; fails instead of waiting forever when the
    channel or connection goes away while the writer queue is full."""
    if channel.is_closed:
        raise _ChannelLost(channel._close_exception, refused=False)
    queue = channel.write_queue
    try:
        queue.put_nowait(frame)
    except asyncio.QueueFull:
        pass
    else:
        return
    put = asyncio.ensure_future(queue.put(frame))
    closing = channel.closing
    try:
        await asyncio.wait((put, closing), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not put.done():
            put.cancel()
        closing.cancel()
    if put.cancelled():
        raise _ChannelLost(channel._close_exception, refused=False)


async def _drained(channel: _Channel, drain: asyncio.Future[None]) -> None:
    closing = channel.closing
    try:
        await asyncio.wait((drain, closing), return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
    if not drain.done():
        drain.cancel()
        raise _ChannelLost(channel._close_exception, refused=False)
    if not drain.cancelled() and drain.exception() is not None:
        raise _ChannelLost(drain.exception(), refused=False)  # the socket failed


async def _write(channel: _Channel, payload: bytes, *, wait: bool) -> None:
    """Send publish frames, holding the caller back while the socket is backed up.

    With nothing queued for aiormq's writer task they go straight to the socket: every frame
    that task took is already written, so order holds, and a call costs no hand-over to that
    task and back (a queue put, two loop turns and a future).  Otherwise they queue behind
    the frames waiting there, and ``wait`` says whether to wait until the task wrote them.
    """
    writer = channel.writer
    if (
        writer is not None
        and channel.write_queue.empty()
        and not channel.is_closed
        and not channel.connection.is_closed
        and not writer.is_closing()
    ):
        writer.write(payload)
        # The socket's buffer only grows when the broker stops reading (a resource alarm):
        # beyond a chunk, wait for it, whatever ``wait`` says, so it stays bounded.
        if writer.transport.get_write_buffer_size() > _CHUNK_BYTES:
            await _drained(channel, asyncio.ensure_future(writer.drain()))
        return
    drain = asyncio.get_running_loop().create_future() if wait else None
    await _put(channel, ChannelFrame(payload=payload, should_close=False, drain_future=drain))
    if drain is not None:
        await _drained(channel, drain)


def _refused(exc: BaseException, conn: aiormq.Connection | None) -> bool:
    """True when the broker refused something on a channel (unknown exchange, queue with
    other arguments, access) while the connection itself is fine."""
    return isinstance(exc, AMQPChannelError) and conn is not None and conn.is_opened


# Errors that mean the connection or channel went away under an operation.
_LOST = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError)


# --- consumers ------------------------------------------------------------------------


class _Acks:
    """Acknowledgements of one channel generation, coalesced into multiple acks."""

    __slots__ = ("channel", "dead", "done", "pressure", "sent", "singles", "upto", "wake")

    def __init__(self, channel: _Channel, pressure: int, wake: asyncio.Event) -> None:
        self.channel = channel
        self.upto = 0  # every tag up to this one is acked
        self.sent = 0  # highest multiple ack written
        self.done: set[int] = set()  # acked above a gap, not yet written
        self.singles: set[int] = set()  # acked above a gap and written one by one
        self.pressure = pressure
        self.dead = False
        self.wake = wake

    def ack(self, token: Any) -> None:
        if self.dead:
            return  # the broker redelivers what the lost channel had delivered
        tag: int = token
        upto = self.upto
        if tag == upto + 1:
            upto = tag
            done, singles = self.done, self.singles
            while done or singles:
                if upto + 1 in done:
                    done.discard(upto + 1)
                elif upto + 1 in singles:
                    singles.discard(upto + 1)
                else:
                    break
                upto += 1
            self.upto = upto
            self.wake.set()
        elif tag > upto and tag not in self.singles:
            self.done.add(tag)
            if len(self.done) >= self.pressure:
                self.wake.set()

    def ack_through(self, tag: int) -> None:
        if not self.dead and tag > self.upto:
            self.upto = tag
            self.wake.set()

    def frames(self, *, final: bool = False) -> list[spec.Basic.Ack]:
        """Ack frames for what was acked since the last call; ``final`` also acks every
        tag above a gap (the channel is about to close)."""
        frames: list[spec.Basic.Ack] = []
        if self.upto > self.sent:
            # Acks only what is outstanding, so tags already acked one by one are fine.
            frames.append(spec.Basic.Ack(delivery_tag=self.upto, multiple=True))
            self.sent = self.upto
        if self.done and (final or len(self.done) >= self.pressure):
            # A gap holding half the prefetch window would stall the consumer: ack the tags
            # above it one by one, and remember them so none is ever acked twice.
            tags = sorted(self.done)
            frames.extend(spec.Basic.Ack(delivery_tag=t) for t in tags)
            self.singles.update(tags)
            self.done = set()
        return frames


class _Consumer:
    def __init__(self, adapter: AmqpAdapter, sub: Subscription) -> None:
        self.adapter = adapter
        self.sub = sub
        opts = sub.options
        self.opts = opts if isinstance(opts, AmqpSourceOptions) else AmqpSourceOptions()
        self.prefetch = max(1, min(sub.max_in_flight, _PREFETCH_MAX))
        self.ready: deque[Delivery] = deque()
        self.wakeup = asyncio.Event()
        self.ack_wake = asyncio.Event()
        self.acks: _Acks | None = None
        self.channel: _Channel | None = None
        self.conn: aiormq.Connection | None = None
        self.error: BaseException | None = None
        self.start_lock = asyncio.Lock()
        self.acker: asyncio.Task[None] | None = None
        self.queue = ""
        self.consuming = False

    @property
    def active(self) -> bool:
        ch = self.channel
        return self.consuming and ch is not None and not ch.is_closed

    async def start(self, conn: aiormq.Connection) -> None:
        async with self.start_lock:
            if self.conn is conn and self.active:
                return
            self.lose()
            ch = await self.adapter._open_channel(conn, confirms=False, on_deliver=self._deliver)
            acks = _Acks(ch, max(1, self.prefetch // 2), self.ack_wake)
            sub = self.sub
            exchange = self.opts.exchange or self.adapter.opts.exchange
            await ch.basic_qos(prefetch_count=self.prefetch)
            await self.adapter._ensure_exchange(ch, exchange)
            args: dict[str, FieldValue] | None = dict(self.opts.queue_arguments) or None
            if sub.durable:
                name = self.opts.queue or f"flowbridge.{sub.route}"
                ok = await ch.queue_declare(name, durable=True, arguments=args)
            elif sub.group:
                # Competing consumers share one queue, deleted when the last one leaves.
                name = self.opts.queue or f"flowbridge.{sub.route}.{sub.group}"
                ok = await ch.queue_declare(name, auto_delete=True, arguments=args)
            else:
                ok = await ch.queue_declare("", exclusive=True, auto_delete=True, arguments=args)
            self.queue = ok.queue or ""
            for binding_key in sub.filters:
                await ch.queue_bind(self.queue, exchange, routing_key=binding_key)
            self.ready.clear()
            self.channel, self.acks, self.conn = ch, acks, conn
            ch.on_consumer_cancel_callbacks.add(self._cancelled)
            ch.closing.add_done_callback(lambda _: self._channel_closed(ch))
            await ch.basic_consume(self.queue, _consumer_placeholder)
            self.consuming = True
            if self.acker is None or self.acker.done():
                self.acker = asyncio.create_task(
                    self._ack_loop(), name=f"amqp-acks-{self.adapter.name}-{sub.route}"
                )

    def _deliver(self, tag: int, key: str, props: spec.Basic.Properties, body: bytes) -> None:
        msg = decode_message(key, props, body)
        settler = self.acks if self.sub.durable else None
        self.ready.append(Delivery(msg, settler, tag))
        self.wakeup.set()

    def _cancelled(self, _frame: Any) -> None:
        # The broker cancelled the consumer (queue deleted): start over on a new channel.
        self.adapter.log.warning("consumer of route %s cancelled by the broker", self.sub.route)
        self.consuming = False
        if self.channel is not None:
            self.adapter._spawn(self.channel.close())
        self.adapter._restart_consumer(self)

    def _channel_closed(self, ch: _Channel) -> None:
        if ch is not self.channel:
            return
        self.consuming = False
        if self.adapter.closing:
            return
        cause = ch._close_exception
        if isinstance(cause, AMQPChannelError) and ch.connection.is_opened:
            self.adapter.log.warning("channel of route %s closed: %s", self.sub.route, cause)
            self.adapter._restart_consumer(self)

    def lose(self) -> None:
        """Forget the current channel: its unacked deliveries come back from the broker."""
        if self.acks is not None:
            self.acks.dead = True
        self.consuming = False
        self.ready.clear()

    async def _ack_loop(self) -> None:
        while True:
            await self.ack_wake.wait()
            self.ack_wake.clear()
            await self.flush()

    async def flush(self, *, wait: bool = False) -> None:
        acks = self.acks
        if acks is None or acks.dead or acks.channel.is_closed:
            return
        frames = acks.frames(final=wait)
        if not frames:
            return
        ch = acks.channel
        drain = asyncio.get_running_loop().create_future() if wait else None
        try:
            await _put(ch, ChannelFrame.marshall(ch.number, frames, drain_future=drain))
            if drain is not None:
                await asyncio.wait_for(drain, _FLUSH_TIMEOUT)
        except (_ChannelLost, *_LOST) as exc:
            self.adapter.log.debug("acks not sent (broker redelivers): %s", exc)

    async def batches(self) -> AsyncIterator[list[Delivery]]:
        while True:
            if not self.ready:
                if self.error is not None:
                    raise self.error
                if self.adapter.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = list(self.ready)
            self.ready.clear()
            if not self.sub.durable and self.acks is not None:
                # At-most-once: acked when handed out, so prefetch still paces the broker.
                self.acks.ack_through(batch[-1].token)
            yield batch

    async def stop(self) -> None:
        await self.flush(wait=True)
        if self.acker is not None:
            self.acker.cancel()
        self.lose()
        ch = self.channel
        self.channel = None
        # When the whole connection is closing, it takes its channels down itself; closing
        # the channel here would race it and surface aiormq's CancelledError in the route.
        if ch is not None and not ch.is_closed and not self.adapter.closing:
            try:
                await asyncio.wait_for(ch.close(), _FLUSH_TIMEOUT)
            except (AMQPError, TimeoutError, OSError) as exc:
                self.adapter.log.debug("closing channel: %s", exc)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # a real cancellation of this route
                self.adapter.log.debug("closing channel: connection went away")


class _Replies:
    """A ``replies`` source: the replies to this broker's RPC requests whose (original)
    reply-to matches the route's filter.  Direct reply-to has no acknowledgements and
    cannot be paused, so at most ``max_in_flight`` replies wait here; more are counted."""

    def __init__(self, adapter: AmqpAdapter, sub: Subscription) -> None:
        self.adapter = adapter
        self.sub = sub
        self.filters = tuple(parse_filter(f, "amqp") for f in sub.filters)
        self.limit = max(1, sub.max_in_flight)
        self.ready: deque[Delivery] = deque()
        self.wakeup = asyncio.Event()

    def wants(self, topic: str) -> bool:
        try:
            parsed = parse_topic(topic, "amqp")
        except TopicError:
            return False
        return any(f.matches(parsed) for f in self.filters)

    def offer(self, msg: Message) -> bool:
        if len(self.ready) >= self.limit:
            return False
        self.ready.append(Delivery(msg))
        self.wakeup.set()
        return True

    async def batches(self) -> AsyncIterator[list[Delivery]]:
        while True:
            if not self.ready:
                if self.adapter.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = list(self.ready)
            self.ready.clear()
            yield batch


# --- the adapter ----------------------------------------------------------------------


class AmqpAdapter(Adapter):
    protocol: ClassVar[str] = "amqp"
    BrokerOptions: ClassVar[type[Options]] = AmqpBrokerOptions
    SourceOptions: ClassVar[type[Options]] = AmqpSourceOptions
    TargetOptions: ClassVar[type[Options]] = AmqpTargetOptions

    def __init__(self, name: str, url: str, options: Options, backoff: Backoff) -> None:
        super().__init__(name, url, options, backoff)
        self.opts = options if isinstance(options, AmqpBrokerOptions) else AmqpBrokerOptions()
        conn_url = URL(url)
        if self.opts.heartbeat is not None:
            conn_url = conn_url.update_query(heartbeat=str(self.opts.heartbeat))
        self.security = security_of(self.opts)
        configured_tls = self.security.tls
        self.tls: TlsSettings | None = tls_for(url, self.security)
        if configured_tls is not None and conn_url.scheme != "amqps":
            # aiormq speaks TLS for amqps only; without a port, amqps means 5671.
            conn_url = conn_url.with_scheme("amqps")
        if (auth := self.security.auth) is not None:
            # aiormq reads credentials from the URL only (and censors it when printing).
            conn_url = conn_url.with_user(auth.username)
            if auth.password is not None:
                conn_url = conn_url.with_password(auth.password.get_secret_value())
        self._conn_url = conn_url
        self.connection_name = self.opts.connection_name or f"flowbridge {name}"
        self._conn: aiormq.Connection | None = None
        self._writer: tuple[aiormq.Connection, asyncio.StreamWriter | None] | None = None
        self._state = ConnState.DISCONNECTED
        self._detail = ""
        self._reconnects = 0
        self.closing = False
        self._consumers: set[_Consumer] = set()
        self._publishers: dict[tuple[bool, bool], _Channel] = {}  # by (confirm, rpc)
        self._publisher_lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # RPC: requests awaiting replies, the sources they go to, what happened to them.
        self._rpc = PendingReplies(self.opts.rpc_max_pending)
        self._rpc_prefix = f"fb-{secrets.token_hex(4)}-"
        self._rpc_seq = count(1)
        self._encoded = PublishCache()
        self._rpc_timer: asyncio.TimerHandle | None = None
        self._reply_sources: list[_Replies] = []
        self._logged: set[str] = set()
        self.stats: dict[str, int] = {
            "rpc_requests": 0,  # published with direct reply-to and a correlation id of ours
            "rpc_replies": 0,  # replies matched to their request
            "rpc_unknown_replies": 0,  # a correlation id nobody waits for (expired, evicted)
            "rpc_unrouted_replies": 0,  # no replies source of this broker matches the topic
            "rpc_overflow_replies": 0,  # the matching replies source had max_in_flight waiting
        }

    @classmethod
    def check_source(cls, options: Options, *, durable: bool) -> str | None:
        if isinstance(options, AmqpSourceOptions) and options.replies and durable:
            return (
                "replies: true reads RabbitMQ direct reply-to, which is never acknowledged "
                "(no-ack): a reply lost in a crash is not redelivered"
            )
        return None

    @classmethod
    def check_target(cls, options: Options, *, confirm: bool) -> str | None:
        if isinstance(options, AmqpTargetOptions) and options.mandatory and not confirm:
            return "mandatory needs confirm: a returned message is reported through its confirm"
        return None

    @classmethod
    def reads_replies(cls, options: Options) -> bool:
        return isinstance(options, AmqpSourceOptions) and options.replies

    @classmethod
    def replies_needed(cls, options: Options) -> str | None:
        if isinstance(options, AmqpTargetOptions) and options.rpc:
            return (
                "rpc: true needs a route that carries the replies back: "
                "from: {{broker: {broker}, filter: '#', options: {{replies: true}}}}"
            )
        return None

    def counters(self) -> dict[str, int]:
        return {
            **self.stats,
            "rpc_expired": self._rpc.expired,
            "rpc_evicted": self._rpc.evicted,
        }

    def _log_once(self, kind: str, msg: str, *args: Any) -> None:
        if kind in self._logged:
            return
        self._logged.add(kind)
        self.log.warning(msg + " (further ones are counted, not logged)", *args)

    def max_payload(self) -> int | None:
        return self.opts.max_message_size

    def health(self) -> Health:
        subscribed = all(c.active for c in self._consumers)
        return Health(self._state, self._detail, self._reconnects, subscribed)

    async def wait_connected(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (the contract's signature)
        if self._state is ConnState.CLOSED:
            return False
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return self._state is ConnState.CONNECTED

    # connection ---------------------------------------------------------------------

    def _error(self, cause: object) -> ConnectError:
        text = describe(cause, self.security) if isinstance(cause, BaseException) else str(cause)
        return ConnectError(f"broker {self.name} ({redact_url(self.url)}): {text}")

    async def _open(self) -> aiormq.Connection:
        # With tls settings of our own (not those of amqps:// alone, where aiormq's URL
        # query options such as cafile keep working), a fresh context per connection.
        context = None if self.security.tls is None else self.security.tls.context()
        transport = TransportFactory(tls=URL(self._conn_url).scheme == "amqps")
        conn = aiormq.Connection(
            self._conn_url,
            client_properties={"connection_name": self.connection_name},
            context=context,
            transport_factory=transport,
        )
        transport.connection = conn
        try:
            async with asyncio.timeout(self.opts.connect_timeout):
                await conn.connect()
        except BaseException:
            await conn.close()
            raise
        self._writer = (conn, transport.writer)
        return conn

    async def _establish(self) -> None:
        """Connect (retrying with backoff) and restore every subscription."""
        self._state = ConnState.CONNECTING
        delays = self.backoff.delays()
        failures = 0
        while True:
            try:
                conn = await self._open()
                self._conn = conn
                self._declared = set()
                self._publishers = {}
                for consumer in list(self._consumers):
                    try:
                        await consumer.start(conn)
                    except AMQPChannelError as exc:
                        if not _refused(exc, conn):
                            raise
                        consumer.error = self._error(f"route {consumer.sub.route}: {exc}")
                        consumer.wakeup.set()
                break
            except _LOST as exc:
                failures += 1
                self._detail = describe(exc, self.security)
                attempts = self.backoff.attempts
                delay = await anext(delays, None)
                if (attempts is not None and failures >= attempts) or delay is None:
                    raise self._error(exc) from exc
                self.log.warning("connect failed (%s); retrying in %.2fs", self._detail, delay)
                await asyncio.sleep(delay)
        self._state = ConnState.CONNECTED
        self._detail = ""
        self._connected.set()

    async def connect(self) -> None:
        if self.closing:
            raise self._error("adapter closed")
        if self._state is ConnState.CONNECTED:
            return
        try:
            await self._establish()
        except ConnectError:
            self._state = ConnState.DISCONNECTED
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"amqp-{self.name}")

    async def _supervise(self) -> None:
        while not self.closing:
            conn = self._conn
            assert conn is not None
            await asyncio.wait((conn.closing,))
            if self.closing:
                return
            cause = conn.closing.exception() if not conn.closing.cancelled() else None
            self._connected.clear()
            self._state = ConnState.DISCONNECTED
            self._detail = self.security.scrub(f"connection lost: {cause}")
            self.log.warning("%s; reconnecting", self._detail)
            for consumer in self._consumers:
                consumer.lose()
            try:
                await self._establish()
            except ConnectError as exc:
                self._state = ConnState.CLOSED
                self._detail = str(exc)
                for consumer in self._consumers:
                    consumer.error = exc
                    consumer.wakeup.set()
                return
            self._reconnects += 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.warning("background task failed: %r", exc)

    def _restart_consumer(self, consumer: _Consumer) -> None:
        async def restart() -> None:
            delays = self.backoff.delays()
            while not self.closing and consumer in self._consumers:
                conn = self._conn
                if conn is None or conn.is_closed:
                    return  # the supervisor restarts it with the connection
                try:
                    await consumer.start(conn)
                except _LOST as exc:
                    if _refused(exc, conn):
                        consumer.error = self._error(f"route {consumer.sub.route}: {exc}")
                        consumer.wakeup.set()
                        return
                    delay = await anext(delays, self.backoff.maximum)
                    self.log.warning("resubscribing %s failed: %s", consumer.sub.route, exc)
                    await asyncio.sleep(delay)
                else:
                    return

        self._spawn(restart())

    async def _open_channel(
        self, conn: aiormq.Connection, *, confirms: bool, on_deliver: DeliverHandler
    ) -> _Channel:
        await conn.connected.wait()
        number = 1
        while number in conn.channels:
            number += 1
        writer = self._writer[1] if self._writer is not None and self._writer[0] is conn else None
        ch = _Channel(conn, number, confirms=confirms, on_deliver=on_deliver, writer=writer)
        conn.channels[number] = ch
        await ch.open(timeout=self.opts.connect_timeout)
        return ch

    def _declares(self, exchange: str) -> bool:
        flag = self.opts.declare_exchange
        if flag is None:
            return exchange != "" and not exchange.startswith("amq.")
        return flag

    async def _ensure_exchange(self, ch: _Channel, exchange: str) -> None:
        if exchange in self._declared or not self._declares(exchange):
            return
        await ch.exchange_declare(exchange, exchange_type=self.opts.exchange_type, durable=True)
        self._declared.add(exchange)

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), _FLUSH_TIMEOUT)
            except TimeoutError:
                self.log.warning("closing with %d publish calls unfinished", self._inflight)
        for consumer in list(self._consumers):
            await consumer.flush(wait=True)
            consumer.wakeup.set()
        for replies in self._reply_sources:
            replies.wakeup.set()
        if self._rpc_timer is not None:
            self._rpc_timer.cancel()
            self._rpc_timer = None
        if self._supervisor is not None:
            self._supervisor.cancel()
        for task in list(self._tasks):
            task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        for consumer in list(self._consumers):
            consumer.lose()
            if consumer.acker is not None:
                consumer.acker.cancel()
        self._state = ConnState.CLOSED
        self._connected.set()

    async def __aenter__(self) -> AmqpAdapter:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # source -------------------------------------------------------------------------

    async def subscribe(self, sub: Subscription) -> AsyncGenerator[list[Delivery], None]:
        if isinstance(sub.options, AmqpSourceOptions) and sub.options.replies:
            if sub.durable:
                raise ValueError(f"route {sub.route}: replies cannot be at-least-once (no-ack)")
            replies = _Replies(self, sub)
            self._reply_sources.append(replies)
            try:
                async for batch in replies.batches():
                    yield batch
            finally:
                self._reply_sources.remove(replies)
            return
        consumer = _Consumer(self, sub)
        self._consumers.add(consumer)
        try:
            conn = self._conn
            # Before the connection is set, the supervisor starts this consumer with it.
            if conn is not None and not conn.is_closed:
                try:
                    await consumer.start(conn)
                except _LOST as exc:
                    if _refused(exc, conn):
                        raise self._error(f"route {sub.route}: {exc}") from exc
                    # The connection is going away; the supervisor subscribes again.
                    self.log.debug("subscribe during connection loss: %s", exc)
            async for batch in consumer.batches():
                yield batch
        finally:
            self._consumers.discard(consumer)
            await consumer.stop()

    # target -------------------------------------------------------------------------

    async def _publisher(self, confirm: bool, exchange: str, rpc: bool) -> _Channel:
        key = (confirm, rpc)
        ch = self._publishers.get(key)
        if ch is None or ch.is_closed:
            async with self._publisher_lock:
                ch = self._publishers.get(key)
                if ch is None or ch.is_closed:
                    conn = self._conn
                    if conn is None or conn.is_closed:
                        raise PublishError(f"broker {self.name}: not connected", retriable=True)
                    if rpc:
                        ch = await self._open_rpc_channel(conn, confirm)
                    else:
                        ch = await self._open_channel(
                            conn, confirms=confirm, on_deliver=_ignore_delivery
                        )
                    self._publishers[key] = ch
        if exchange not in self._declared and self._declares(exchange):
            await self._ensure_exchange(ch, exchange)
        return ch

    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        if not messages:
            return None
        opts = options if isinstance(options, AmqpTargetOptions) else AmqpTargetOptions()
        if self._state is not ConnState.CONNECTED or self.closing:
            raise PublishError(f"broker {self.name}: not connected", retriable=True)
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._publish(messages, confirm, opts)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _publish(
        self, messages: Sequence[Message], confirm: bool, opts: AmqpTargetOptions
    ) -> PublishOutcome:
        exchange = self.opts.exchange if opts.exchange is None else opts.exchange
        persistent = confirm if opts.persistent is None else opts.persistent
        delivery_mode = 2 if persistent else 1
        mandatory = opts.mandatory
        limit = self.opts.max_message_size
        results: list[PublishError | None] = [None] * len(messages)
        refused = False
        rpc = opts.rpc
        requests: list[tuple[int, str]] = []  # (index, correlation id) of RPC requests
        try:
            ch = await self._publisher(confirm, exchange, rpc)
        except _LOST as exc:
            if _refused(exc, self._conn):
                error = PublishError(f"exchange {exchange!r}: {exc}", retriable=False)
                return [error] * len(messages)
            raise PublishError(f"broker {self.name}: {exc}", retriable=True) from exc
        exchange_raw = _shortstr(exchange, "exchange")
        body_max = ch.max_content_size
        batch = (
            _Batch(messages, exchange, asyncio.get_running_loop().create_future())
            if confirm
            else None
        )
        try:
            async with ch.lock:
                number = ch.number
                chunk: list[bytes] = []
                size = 0
                for i, msg in enumerate(messages):
                    if len(msg.payload) > limit:
                        results[i] = PublishError(
                            f"payload of {len(msg.payload)} bytes over max_message_size {limit}",
                            retriable=False,
                        )
                        refused = True
                        continue
                    cid = None
                    if rpc and msg.reply_to is not None:
                        cid = f"{self._rpc_prefix}{next(self._rpc_seq):x}"
                    try:
                        frames = encode_publish(
                            msg if cid is None else _as_request(msg, cid),
                            number,
                            exchange=exchange_raw,
                            mandatory=mandatory,
                            delivery_mode=delivery_mode,
                            frame_body_max=body_max,
                            cache=self._encoded,
                        )
                    except PublishError as exc:
                        results[i] = exc
                        refused = True
                        continue
                    except (TypeError, ValueError) as exc:
                        results[i] = PublishError(str(exc), retriable=False)
                        refused = True
                        continue
                    if cid is not None:
                        self._await_reply(cid, msg, opts.rpc_timeout, ch)
                        requests.append((i, cid))
                    if batch is not None:
                        ch.register(batch, i)
                    chunk.append(frames)
                    size += len(frames)
                    if size >= _CHUNK_BYTES:
                        await _write(ch, b"".join(chunk), wait=True)
                        chunk, size = [], 0
                if chunk:
                    # A broker that stops reading (resource alarm) holds the publisher
                    # back instead of growing the send buffer; confirms bound the rest.
                    payload = chunk[0] if len(chunk) == 1 else b"".join(chunk)
                    await _write(ch, payload, wait=batch is None)
        except (_ChannelLost, *_LOST) as exc:
            if batch is None or not isinstance(exc, _ChannelLost):
                raise PublishError(f"broker {self.name}: {exc}", retriable=True) from exc
            batch.lost(exc)
        if batch is None:
            return results if refused else None
        batch.seal()
        try:
            await batch.future
        except _ChannelLost as exc:
            if not exc.refused:
                raise PublishError(
                    f"broker {self.name}: connection lost before confirms: {exc}", retriable=True
                ) from exc
            error = PublishError(f"channel closed by the broker: {exc}", retriable=False)
            for i, result in enumerate(batch.results):
                results[i] = results[i] or result or error
            return results
        for i, result in enumerate(batch.results):
            if result is not None:
                results[i] = result
                refused = True
        if refused:
            for i, cid in requests:
                if results[i] is not None:
                    self._rpc.discard(cid)  # never delivered: no reply to wait for
        return results if refused else None

    # rpc ----------------------------------------------------------------------------

    async def _open_rpc_channel(self, conn: aiormq.Connection, confirm: bool) -> _Channel:
        """A publishing channel that receives the replies to what it publishes: direct
        reply-to needs the consumer before the first request."""
        ch = await self._open_channel(conn, confirms=confirm, on_deliver=self._on_reply)
        ch.closing.add_done_callback(lambda _: self._rpc_channel_closed(ch))
        try:
            await ch.basic_consume(DIRECT_REPLY_TO, _consumer_placeholder, no_ack=True)
        except BaseException:
            if not ch.is_closed:
                self._spawn(ch.close())
            raise
        return ch

    def _await_reply(self, cid: str, msg: Message, timeout: float, ch: _Channel) -> None:
        assert msg.reply_to is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        evicted = self._rpc.add(
            cid, msg.reply_to, msg.correlation_id, timeout=timeout, owner=ch, now=now
        )
        self.stats["rpc_requests"] += 1
        if evicted is not None:
            self._log_once(
                "evicted",
                "broker %s: %d RPC requests awaiting replies (rpc_max_pending): the oldest, "
                "for %r, is forgotten and its reply will be unknown",
                self.name,
                self.opts.rpc_max_pending,
                evicted.reply_to,
            )
        deadline = now + timeout
        timer = self._rpc_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._rpc_timer = loop.call_at(deadline, self._rpc_expire)

    def _rpc_expire(self) -> None:
        self._rpc_timer = None
        loop = asyncio.get_running_loop()
        gone = self._rpc.expire(loop.time() + _TIMER_SLACK)
        if gone:
            self._log_once(
                "expired",
                "broker %s: RPC request for %r got no reply within %gs; counted as rpc_expired",
                self.name,
                gone[0].reply_to,
                gone[0].deadline - gone[0].created,
            )
        nxt = self._rpc.next_deadline()
        if nxt is not None and not self.closing:
            self._rpc_timer = loop.call_at(nxt, self._rpc_expire)

    def _rpc_channel_closed(self, ch: _Channel) -> None:
        gone = self._rpc.drop_owner(ch)
        if not gone:
            return
        if self.closing:
            self.log.info("closing with %d RPC request(s) awaiting replies", len(gone))
            return
        self.log.warning(
            "%d RPC request(s) awaiting replies lost with their channel (%s): RabbitMQ "
            "cannot deliver those replies to a new one; counted as rpc_expired",
            len(gone),
            self.security.scrub(str(ch._close_exception or "closed")),
        )

    def _on_reply(self, _tag: int, _key: str, props: spec.Basic.Properties, body: bytes) -> None:
        cid = props.correlation_id
        entry = self._rpc.take(cid) if cid is not None else None
        if entry is None:
            self.stats["rpc_unknown_replies"] += 1
            self._log_once(
                "unknown",
                "broker %s: a reply with correlation id %r answers no pending RPC request "
                "(it expired, or was evicted); counted as rpc_unknown_replies",
                self.name,
                cid,
            )
            return
        self.stats["rpc_replies"] += 1
        msg = decode_message(entry.reply_to, props, body)
        msg.correlation_id = entry.correlation_id
        routed = False
        for replies in self._reply_sources:
            if not replies.wants(msg.topic):
                continue
            routed = True
            if not replies.offer(msg):
                self.stats["rpc_overflow_replies"] += 1
                self._log_once(
                    f"overflow:{replies.sub.route}",
                    "route %s: %d replies already waiting (max_in_flight); a reply for %r is "
                    "dropped and counted as rpc_overflow_replies",
                    replies.sub.route,
                    replies.limit,
                    msg.topic,
                )
        if not routed:
            self.stats["rpc_unrouted_replies"] += 1
            self._log_once(
                "unrouted",
                "broker %s: no route with replies: true matches the reply topic %r; "
                "counted as rpc_unrouted_replies",
                self.name,
                msg.topic,
            )
