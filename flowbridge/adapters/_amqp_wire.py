"""Deliveries straight from the socket for flowbridge's own aiormq connections.

aiormq reads each frame with three awaited reads, decodes it with pamqp and hands it to the
channel's task through an asyncio queue: a delivered message is three frames, so three
queue hand-overs and task switches.  ``FrameReceiver`` below reads the socket in chunks,
assembles each delivery (Basic.Deliver, content header, body frames) for a channel that takes
deliveries itself (it has a ``fb_deliver`` handler) and calls the handler at once; every
other frame goes to aiormq as before, decoded by pamqp, in the order it arrived.  Property
blocks repeat on a stream (the same headers on every message of a topic): each distinct one
is decoded once.

It takes over from aiormq's receiver only on connections made through ``TransportFactory``
(their reader carries the connection); any other aiormq connection in the process keeps
aiormq's own behaviour.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

DeliverHandler = Callable[[int, str, spec.Basic.Properties, bytes], None]
"""``(delivery tag, routing key, properties, body)``; the properties object may be shared by
many deliveries and must not be changed."""

_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_BODY_HEAD = struct.Struct(">HHQ")  # content header: class, weight, body size
_TAG = struct.Struct(">Q")
_DELIVER = b"\x00\x3c\x00\x3c"  # Basic.Deliver: class 60, method 60
_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_END = 0xCE
_READ = 1 << 17
_PROPS_MAX = 4096  # distinct property blocks remembered
_PROPS_SHORT = 1024  # longer blocks are decoded every time


class _Partial:
    """A delivery whose content header or body frames have not all arrived."""

    __slots__ = ("handler", "key", "parts", "props", "remaining", "tag")

    def __init__(self, handler: DeliverHandler, tag: int, key: str) -> None:
        self.handler = handler
        self.tag = tag
        self.key = key
        self.props: spec.Basic.Properties | None = None
        self.remaining = -1  # body bytes still to come; -1 until the content header
        self.parts: list[bytes] = []


class FrameReceiver(aiormq.connection.FrameReceiver):
    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.conn: aiormq.Connection | None = getattr(reader, "fb_connection", None)
        self.rest = b""
        self.ready: deque[tuple[int, int, Any]] = deque()
        self.partial: dict[int, _Partial] = {}
        self.props: dict[bytes, spec.Basic.Properties] = {}

    async def get_frame(self) -> Any:
        if self.conn is None:
            return await super().get_frame()
        ready = self.ready
        while not ready:
            try:
                chunk = await self.reader.read(_READ)
            except (ConnectionError, OSError) as exc:
                raise AMQPConnectionError(f"Server connection error: {exc!r}") from exc
            if not chunk:
                if self.rest or self.partial:
                    raise AMQPConnectionError("Server connection unexpectedly closed")
                raise StopAsyncIteration
            if not self.started:
                if chunk.startswith(b"AMQP"):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
            if self._parse(self.rest + chunk if self.rest else chunk) and not ready:
                # Deliveries alone: aiormq still sees a frame (a heartbeat, which it
                # ignores), so its idea of when the server last spoke stays current.
                ready.append((8, 0, Heartbeat()))
        return ready.popleft()

    def _parse(self, data: bytes) -> bool:
        """Split ``data`` into frames; returns whether deliveries were handed over."""
        channels = self.conn.channels if self.conn is not None else {}
        partial = self.partial
        ready = self.ready
        delivered = False
        pos = 0
        end = len(data)
        while end - pos >= 8:
            kind, number, size = _HEAD.unpack_from(data, pos)
            stop = pos + 7 + size
            if stop >= end:
                break
            if data[stop] != _FRAME_END:
                raise InvalidFrameError(f"frame without its end marker on channel {number}")
            start = pos + 7
            pos = stop + 1
            if kind == _METHOD and data.startswith(_DELIVER, start):
                handler = getattr(channels.get(number), "fb_deliver", None)
                if handler is not None:
                    partial[number] = self._deliver(handler, data, start + 4, stop)
                    continue
            elif kind in (_HEADER, _BODY):
                p = partial.get(number)
                if p is not None:
                    if kind == _HEADER:
                        self._header(p, data[start:stop])
                    else:
                        p.parts.append(data[start:stop])
                        p.remaining -= size
                    if p.remaining == 0:
                        del partial[number]
                        body = p.parts[0] if len(p.parts) == 1 else b"".join(p.parts)
                        assert p.props is not None
                        p.handler(p.tag, p.key, p.props, body)
                        delivered = True
                    elif p.remaining < 0 and kind == _BODY:
                        raise InvalidFrameError(f"body longer than announced on channel {number}")
                    continue
            frame = data[start - 7 : pos]
            try:
                ready.append(pamqp.frame.unmarshal(frame))
            except PAMQPException as exc:
                raise InvalidFrameError(str(exc)) from exc
            if number in partial and kind == _METHOD:
                del partial[number]  # the channel closed (or moved on) mid-delivery
        self.rest = data[pos:] if pos < end else b""
        return delivered

    @staticmethod
    def _deliver(handler: DeliverHandler, data: bytes, i: int, stop: int) -> _Partial:
        """Basic.Deliver's arguments: consumer tag, delivery tag, redelivered, exchange,
        routing key (short strings are a length byte and UTF-8)."""
        try:
            i += 1 + data[i]  # consumer tag
            (tag,) = _TAG.unpack_from(data, i)
            i += 9  # delivery tag, redelivered
            i += 1 + data[i]  # exchange
            n = data[i]
        except (IndexError, struct.error) as exc:
            raise InvalidFrameError(f"malformed Basic.Deliver: {exc}") from exc
        if i + 1 + n > stop:
            raise InvalidFrameError("malformed Basic.Deliver: routing key overruns the frame")
        try:
            key = data[i + 1 : i + 1 + n].decode()
        except UnicodeDecodeError as exc:
            raise InvalidFrameError(f"Basic.Deliver routing key: {exc}") from exc
        return _Partial(handler, tag, key)

    def _header(self, p: _Partial, payload: bytes) -> None:
        if p.remaining >= 0 or len(payload) < 14:
            raise InvalidFrameError("unexpected or short content header")
        _, _, p.remaining = _BODY_HEAD.unpack_from(payload)
        block = payload[12:]
        props = self.props.get(block)
        if props is None:
            header = ContentHeader()
            try:
                header.unmarshal(payload)
            except (PAMQPException, ValueError, struct.error) as exc:
                raise InvalidFrameError(f"malformed content header: {exc}") from exc
            props = header.properties
            if len(block) <= _PROPS_SHORT:
                if len(self.props) >= _PROPS_MAX:
                    self.props.clear()
                self.props[block] = props
        p.props = props


class TransportFactory(aiormq.connection.TransportFactory):
    """aiormq's TCP or TLS transport, with a reader that tells ``FrameReceiver`` which
    connection it serves, and the writer kept for publishes that go straight to the socket."""

    def __init__(self, tls: bool) -> None:
        self.inner: aiormq.connection.TransportFactory = (
            aiormq.connection.TLSTransportFactory()
            if tls
            else aiormq.connection.TCPTransportFactory()
        )
        self.connection: aiormq.Connection | None = None
        self.writer: asyncio.StreamWriter | None = None  # the connection's, once open

    async def create(
        self, url: Any, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self.inner.create(url, **kwargs)
        reader.fb_connection = self.connection  # type: ignore[attr-defined]
        self.writer = writer
        return reader, writer


# aiormq makes its receiver by this module-level name when it connects.
aiormq.connection.FrameReceiver = FrameReceiver  # type: ignore[misc]
