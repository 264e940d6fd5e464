"""NATS adapter on nats-py: core subjects and JetStream, in both directions.

Hot paths bypass nats-py's per-message machinery: messages of flowbridge's own subscriptions
are taken straight from the protocol parser (raw header block, no ``Msg`` object, no queue
or task per subscription) and publishes are written as whole PUB/HPUB frame blocks.  That is
also how repeated header names survive, which nats-py's dict headers cannot carry.

JetStream sources are durable pull consumers driven by our own pull requests (batch at most
2,048, never more than ``max_in_flight`` unacked); acks are queued and written in bursts.
JetStream targets publish every message of a batch with its own reply subject and collect
the acks as they come back (bounded window), so one slow ack never serialises a batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, Literal, cast

import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client, Server
from nats.protocol.parser import Parser
from pydantic import Field

from flowbridge.adapters import _nats_wire as wire
from flowbridge.adapters.base import (
    Adapter,
    Backoff,
    ConnState,
    Delivery,
    Health,
    Incoming,
    Message,
    Options,
    PerHeaders,
    PublishOutcome,
    Subscription,
)
from flowbridge.errors import ConnectError, FlowbridgeError, PublishError
from flowbridge.security import SecuredOptions, describe, redact_url, security_of, tls_for

Handler = Callable[[bytes, bytes, bytes, bytes | None], None]

MAX_PULL_BATCH = 2048
DROP_REASON = "source buffer full"  # a route's dropped{reason}: at-most-once intake overflowed
_ACK = b" 4\r\n+ACK\r\n"
_CHUNK = 256 * 1024  # frame block size handed to nats-py's writer at once
_CLOSE_FAILED_DIAL = 1.0  # seconds
_MSG_OPS = (b"MSG ", b"HMSG ")
_NO_ENTRY: tuple[Handler, bytes, bytes, int, int] = (lambda *_: None, b"", b"", 0, -1)
_WRITE_NOW_MAX = 64 * 1024  # see _write_now
_BIG = 8192  # payloads from this size on are written as they are, not copied into a block
_MSG_OVERHEAD = 400  # bytes of Python objects per buffered message (Message, Delivery, ...)
_LINES_MAX = 4096
_TOPICS_MAX = 4096
MAX_CONTROL_LINE_SIZE = 1 << 20  # a line without its CRLF beyond this is no NATS protocol


class NatsBrokerOptions(SecuredOptions):
    name: str = "flowbridge"
    no_echo: bool = True  # the server never hands us our own publishes (no bridge loops)
    jetstream_domain: str | None = None
    connect_timeout: float = Field(default=2.0, gt=0)
    ping_interval: float = Field(default=20.0, gt=0)
    max_outstanding_pings: int = Field(default=2, ge=1)
    # Core source buffer between the socket and the route: beyond it messages are dropped
    # and counted (core NATS has no flow control; the server would cut us off instead).
    # Bytes count each message's objects too (~400 B), so 16 MiB hold ~30k small messages.
    max_pending_msgs: int = Field(default=65536, ge=1)
    max_pending_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    # Outbound bytes nats-py may hold before a publish waits for the socket.
    outbound_buffer: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    js_timeout: float = Field(default=5.0, gt=0)  # JetStream API calls and publish acks
    js_max_outstanding: int = Field(default=1024, ge=1)  # unacked JetStream publishes


class JetStreamSource(Options):
    stream: str | None = None  # found by subject when not set
    durable: str | None = None  # default "flowbridge-<route>"
    ack_wait: float = Field(default=30.0, gt=0)
    deliver_policy: Literal["all", "new", "last", "last_per_subject"] = "all"
    max_deliver: int = -1
    expires: float = Field(default=5.0, ge=1.0)  # pull request lifetime


class NatsSourceOptions(Options):
    jetstream: JetStreamSource | None = None


class NatsTargetOptions(Options):
    jetstream: bool = False  # publish with a JetStream ack per message
    expect_stream: str | None = None  # JetStream refuses when the subject is in another stream


class _Parser(Parser):
    """nats-py's protocol parser, rewritten for throughput.

    nats-py matches a regular expression per control line, copies every payload twice and
    awaits a coroutine per message.  This one splits each chunk on its own (one slice per
    payload) and calls the handlers of flowbridge's subscriptions synchronously; other
    subscriptions (nats-py's request inboxes, JetStream management) and the other operations
    still go through nats-py's client methods.
    """

    def __init__(self, nc: _Client) -> None:
        self.fb = nc
        super().__init__(nc)

    def reset(self) -> None:
        super().reset()
        self._rest = b""  # an incomplete frame from the end of the previous chunk
        self._parts: list[bytes] = []  # chunks of a large frame, joined once it is complete
        self._have = 0
        self._want = 0

    async def parse(self, data: bytes = b"") -> None:
        if self._want:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._want:
                return
            data = b"".join(self._parts)
            self._parts = []
            self._want = 0
        elif self._rest:
            data = self._rest + data
            self._rest = b""
        nc = self.fb
        handlers = nc.fb_handlers
        known = nc.fb_lines
        find = data.find
        starts = data.startswith
        end = len(data)
        pos = 0
        # The last remembered control line with its CRLF, and its entry: consecutive messages
        # of a stream usually repeat it, recognised in place without finding the line's end.
        # Its dispatch repeats the one below on purpose: one shared tail measured ~15% slower
        # per frame.
        last = b""
        handler, subject, reply, size, hsize = _NO_ENTRY
        while pos < end:
            if last and starts(last, pos):
                start = pos + len(last)
                stop = start + size
                if stop + 2 > end:
                    break
                pos = stop + 2
                try:
                    if hsize < 0:
                        handler(subject, reply, data[start:stop], None)
                    else:
                        hdr = data[start : start + hsize]
                        handler(subject, reply, data[start + hsize : stop], hdr)
                except Exception as exc:  # never let it reach the read loop: it would reconnect
                    nc.fb_errors(exc)
                continue
            eol = find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CONTROL_LINE_SIZE:
                    raise nats.errors.ProtocolError("nats: control line too long")
                break
            # A stream repeats its control lines (same subject, sid and size): each distinct
            # one is split and looked up once.
            entry = known.get(data[pos:eol])
            if entry is None and starts(_MSG_OPS, pos):
                hmsg = data[pos] == 72  # "H"
                args = data[pos + (5 if hmsg else 4) : eol].split()
                extra = len(args) - (4 if hmsg else 3)  # 1: a reply subject is present
                try:
                    size = int(args[-1])
                    hsize = int(args[-2]) if hmsg else 0
                except (ValueError, IndexError):
                    extra = -1
                if extra not in (0, 1) or size < hsize or size < 0:
                    raise nats.errors.ProtocolError(
                        f"nats: malformed message line {data[pos:eol][:200]!r}"
                    )
                reply = args[2] if extra else b""
                found = handlers.get(args[1])
                if found is None:
                    start = eol + 2
                    stop = start + size
                    if stop + 2 > end:
                        break
                    try:
                        sid = int(args[1])
                    except ValueError:
                        raise nats.errors.ProtocolError(
                            f"nats: malformed sid {args[1][:50]!r} in a message line"
                        ) from None
                    other = data[start : start + hsize] if hmsg else None
                    pos = stop + 2
                    last = b""  # the await lets subscriptions change
                    await nc._process_msg(sid, args[0], reply, data[start + hsize : stop], other)  # type: ignore[arg-type]
                    continue
                entry = (found, args[0], reply, size, hsize if hmsg else -1)
                if not extra:  # a reply subject (JetStream acks, inboxes) makes each line new
                    if len(known) >= _LINES_MAX:
                        known.clear()
                    known[data[pos:eol]] = entry
            if entry is not None:
                handler, subject, reply, size, hsize = entry
                last = data[pos : eol + 2] if not reply else b""
                start = eol + 2
                stop = start + size
                if stop + 2 > end:
                    break
                pos = stop + 2
                try:
                    if hsize < 0:
                        handler(subject, reply, data[start:stop], None)
                    else:
                        hdr = data[start : start + hsize]
                        handler(subject, reply, data[start + hsize : stop], hdr)
                except Exception as exc:  # never let it reach the read loop: it would reconnect
                    nc.fb_errors(exc)
                continue
            line = data[pos:eol]
            pos = eol + 2
            last = b""  # the awaits below let subscriptions change
            if line == b"PING":
                await nc._process_ping()
            elif line == b"PONG":
                await nc._process_pong()
            elif line == b"+OK":
                pass
            elif line.startswith(b"-ERR"):
                await nc._process_err(line[4:].strip().decode("utf-8", "replace").lower())
            elif line.startswith(b"INFO "):
                await nc._process_info(json.loads(line[5:]))
            else:
                raise nats.errors.ProtocolError("nats: unknown protocol")
        if pos < end:
            rest = data[pos:] if pos else data
            eol = rest.find(b"\r\n")
            want = 0
            if eol > 0 and rest.startswith(_MSG_OPS):  # validated by the loop above
                want = eol + 2 + int(rest[:eol].split()[-1]) + 2
            if want > 65536:  # a large frame: collect its chunks, join them once
                self._parts = [rest]
                self._have = len(rest)
                self._want = want
            else:
                self._rest = rest


class _Client(Client):
    """nats-py client that hands messages of registered sids to a plain function."""

    def __init__(self) -> None:
        super().__init__()
        self.fb_handlers: dict[bytes, Handler] = {}  # by sid as it appears on the wire
        # Control lines of messages for those handlers, parsed: cleared whenever they change.
        self.fb_lines: dict[bytes, tuple[Handler, bytes, bytes, int, int]] = {}
        self.fb_errors: Callable[[BaseException], None] = lambda exc: None
        self.fb_require_tls = False
        self._ps = _Parser(self)

    def _connect_command(self) -> bytes:
        # nats-py upgrades to TLS only when the server's INFO asks for it; a server (or
        # anything in between) that does not must not get credentials or data in clear.
        if self.fb_require_tls:
            writer = getattr(self._transport, "_io_writer", None)
            if writer is None or writer.get_extra_info("ssl_object") is None:
                raise nats.errors.Error(
                    "TLS is configured but the server did not start TLS (its INFO has no "
                    "tls_required); refusing to continue in clear"
                )
        return super()._connect_command()


class _Batch:
    """Bounded buffer of one route's deliveries; the iterator takes everything at once."""

    __slots__ = (
        "adapter",
        "closed",
        "dropped",
        "drops",
        "event",
        "interrupted",
        "items",
        "max_bytes",
        "max_msgs",
        "nbytes",
        "route",
        "taken",
        "topics",
        "warned",
    )

    def __init__(
        self,
        adapter: NatsAdapter,
        route: str,
        max_msgs: int,
        max_bytes: int,
        drops: collections.Counter[str] | None = None,
    ) -> None:
        self.adapter = adapter
        self.route = route
        self.items: list[Incoming] = []
        self.nbytes = 0
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self.event = asyncio.Event()
        self.closed = False
        self.interrupted = False  # the route stops waiting: hand it an empty batch
        self.dropped = 0
        self.drops = drops  # the route's dropped counters
        self.taken: list[asyncio.Event] = []  # set when the route takes the buffer
        self.warned = False
        self.topics: dict[bytes, str] = {}  # subjects decoded, once each

    def full(self, size: int, *, lost: bool = True) -> bool:
        """Whether a message of ``size`` bytes finds no room; counts it when not.  ``lost``:
        nobody will deliver it again (core NATS, JetStream without acks)."""
        if len(self.items) < self.max_msgs and self.nbytes + size <= self.max_bytes:
            return False
        self.dropped += 1
        self.adapter.stats["dropped_slow_consumer"] += 1
        if lost and self.drops is not None:
            self.drops[DROP_REASON] += 1
        if not self.warned:  # once per burst: the flag resets when the route catches up
            self.warned = True
            self.adapter.log.warning(
                "route %s: consumer too slow, dropping core NATS messages (buffer %d msgs)",
                self.route,
                len(self.items),
            )
        return True

    def core_msg(self, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        items = self.items
        # What the message costs in memory, not only its payload: the Python objects of a
        # small message weigh more than its bytes.
        size = len(data) + len(subject) + _MSG_OVERHEAD
        if (len(items) >= self.max_msgs or self.nbytes + size > self.max_bytes) and self.full(size):
            return
        topic = self.topics.get(subject)
        if topic is None:
            if len(self.topics) >= _TOPICS_MAX:
                self.topics.clear()
            topic = self.topics[subject] = subject.decode("utf-8", "surrogateescape")
        msg = Message(topic, data)
        if reply:
            msg.reply_to = reply.decode("utf-8", "surrogateescape")
        if hdr is not None:
            wire.decode_headers(hdr, msg)
        if not items:  # the route waits only on an empty buffer
            self.event.set()
        items.append(msg)  # nothing to acknowledge: the message is its own delivery
        self.nbytes += size

    def take(self) -> list[Incoming]:
        items = self.items
        self.items = []
        self.nbytes = 0
        for event in self.taken:
            event.set()
        if self.warned:
            self.warned = False
            self.adapter.log.warning(
                "route %s: %d core NATS messages dropped so far", self.route, self.dropped
            )
        return items


class _SubSpec:
    """A NATS subscription we own, kept so it can be replayed on a new client."""

    __slots__ = ("handler", "queue", "sid", "subject")

    def __init__(self, subject: str, queue: str, handler: Handler) -> None:
        self.subject = subject
        self.queue = queue
        self.handler = handler
        self.sid = 0


class _PullConsumer:
    """One durable JetStream pull consumer feeding a route's batch buffer."""

    def __init__(
        self,
        adapter: NatsAdapter,
        batch: _Batch,
        stream: str,
        name: str,
        *,
        filters: list[str],
        opts: JetStreamSource,
        max_in_flight: int,
        explicit_ack: bool,
    ) -> None:
        self.adapter = adapter
        self.batch = batch
        self.stream = stream
        self.name = name
        self.filters = filters
        self.opts = opts
        self.max_in_flight = max_in_flight
        self.explicit_ack = explicit_ack
        self.unacked = 0
        self.outstanding = 0  # messages asked for by the open pull request
        self.deadline = 0.0
        self.ready = False  # the consumer exists on the server as far as we know
        self.wake = asyncio.Event()
        self.inbox = ""
        self.spec: _SubSpec | None = None  # the subscription of the pull inbox
        self.task: asyncio.Task[None] | None = None

    def config(self) -> nats.js.api.ConsumerConfig:
        one = len(self.filters) == 1
        return nats.js.api.ConsumerConfig(
            durable_name=self.name,
            ack_policy=(
                nats.js.api.AckPolicy.EXPLICIT if self.explicit_ack else nats.js.api.AckPolicy.NONE
            ),
            ack_wait=self.opts.ack_wait,
            deliver_policy=nats.js.api.DeliverPolicy(self.opts.deliver_policy),
            max_deliver=self.opts.max_deliver,
            filter_subject=self.filters[0] if one else None,
            filter_subjects=None if one else list(self.filters),
            # The server enforces the in-flight bound too, also across reconnects.
            max_ack_pending=self.max_in_flight if self.explicit_ack else None,
        )

    async def ensure(self) -> None:
        """Create the consumer (or adopt the existing one with the same filters)."""
        jsm = self.adapter.jsm()
        try:
            await jsm.add_consumer(self.stream, self.config())
        except nats.js.errors.APIError as exc:
            info = await jsm.consumer_info(self.stream, self.name)
            cfg = info.config
            have = sorted(
                cfg.filter_subjects or ([cfg.filter_subject] if cfg.filter_subject else [])
            )
            if have != sorted(self.filters):
                raise FlowbridgeError(
                    f"broker {self.adapter.name}: durable {self.name!r} on stream "
                    f"{self.stream!r} exists with filters {have}, route wants {self.filters}; "
                    f"delete it or pick another durable"
                ) from exc
            self.adapter.log.warning(
                "durable %s on %s kept with its existing settings: %s",
                self.name,
                self.stream,
                exc.description,
            )
        self.ready = True

    def on_msg(self, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        if hdr is not None and not data:
            status = wire.status_of(hdr)
            if status is not None:
                self.on_status(*status)
                return
        if self.outstanding > 0:
            self.outstanding -= 1
        msg = Message(subject.decode("utf-8", "surrogateescape"), data)
        if hdr is not None:
            wire.decode_headers(hdr, msg)
        delivery: Incoming = msg
        if self.explicit_ack and reply:
            self.unacked += 1
            delivery = Delivery(msg, self, reply)
        batch = self.batch
        # Cannot overflow while the server honours max_ack_pending; if it ever does, the
        # message is counted and JetStream redelivers it after ack_wait.
        if batch.full(len(data), lost=not self.explicit_ack):
            return
        batch.items.append(delivery)
        batch.nbytes += len(data)
        batch.event.set()
        if self.outstanding == 0:
            self.wake.set()

    def on_status(self, code: int, text: str) -> None:
        if code == 100:  # idle heartbeat
            return
        if code in (404, 408):  # no messages / pull request expired
            pass
        elif code == 409 and "Deleted" not in text:
            # Max waiting, leadership change, limits: the request ended, pull again.
            self.adapter.log.debug("pull %s/%s ended: 409 %s", self.stream, self.name, text)
        else:  # 503 no responders or consumer deleted: recreate it
            self.adapter.log.warning(
                "JetStream consumer %s/%s unavailable (%d %s)", self.stream, self.name, code, text
            )
            self.ready = False
        self.outstanding = 0
        self.wake.set()

    def ack(self, token: Any) -> None:
        if self.unacked > 0:
            self.unacked -= 1
        self.adapter.queue_ack(token)
        if self.outstanding == 0:
            self.wake.set()

    def reset(self) -> None:
        """The connection changed: the open pull request died with it."""
        self.outstanding = 0
        self.wake.set()

    async def run(self) -> None:
        adapter = self.adapter
        retry = adapter.backoff.initial
        while not self.batch.closed:
            nc = adapter.client()
            if nc is None or not nc.is_connected:
                self.wake.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that
                # arrives as the event is set (here and below).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self.wake.wait()
                continue
            if not self.ready:
                try:
                    await self.ensure()
                    retry = adapter.backoff.initial
                except FlowbridgeError:
                    raise
                except Exception as exc:
                    adapter.log.warning(
                        "cannot create consumer %s/%s: %r; retry in %.1fs",
                        self.stream,
                        self.name,
                        exc,
                        retry,
                    )
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, adapter.backoff.maximum)
                    continue
            now = time.monotonic()
            if self.outstanding > 0 and now >= self.deadline:
                self.outstanding = 0  # the request was lost (server restart)
            # Without acks nothing else holds a pull back: messages not yet taken by the
            # route count too, so a slow route makes JetStream keep them instead of the
            # buffer dropping them.
            held = self.unacked if self.explicit_ack else len(self.batch.items)
            budget = self.max_in_flight - held
            if self.outstanding > 0 or budget <= 0:
                self.wake.clear()
                wait = self.deadline - now if self.outstanding > 0 else self.opts.expires
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.01)):
                        await self.wake.wait()
                continue
            n = min(budget, MAX_PULL_BATCH)
            request = b'{"batch":%d,"expires":%d}' % (n, int(self.opts.expires * 1e9))
            self.outstanding = n
            self.deadline = now + self.opts.expires + 1.0
            try:
                await nc.publish(
                    adapter.api_prefix + f".CONSUMER.MSG.NEXT.{self.stream}.{self.name}",
                    request,
                    reply=self.inbox,
                )
            except nats.errors.Error:
                self.outstanding = 0
                await asyncio.sleep(0.05)


class _JsBatch:
    """Acks still expected for one JetStream publish call."""

    __slots__ = ("acked", "event", "results", "target")

    def __init__(self, n: int) -> None:
        self.results: list[PublishError | object | None] = [_PENDING] * n
        self.acked = 0
        self.target = 0
        self.event = asyncio.Event()


_PENDING = object()


def _queue(nc: _Client, *parts: bytes) -> None:
    """Append parts to nats-py's pending writes with no await in between (``_send_command``
    may yield to the flusher, which would then write half a frame)."""
    nc._pending.extend(parts)
    nc._pending_data_size += sum(len(p) for p in parts)


async def _write_all(nc: _Client) -> bool:
    """Hand every pending write to the transport now (it buffers what the socket does not
    take).  nats-py writes PING straight to the transport: anything still pending would go
    out after it, and its PONG would confirm frames the server has not seen."""
    transport = nc._transport
    if not nc._pending_data_size or transport is None or not nc.is_connected:
        return False
    pending = nc._pending
    nc._pending = []
    nc._pending_data_size = 0
    try:
        transport.writelines(pending)
    except OSError as exc:
        # As the flusher would: the client reconnects, and the caller sees the epoch move.
        await nc._error_cb(exc)
        await nc._process_op_err(exc)
    return True


async def _write_now(nc: _Client) -> None:
    """Hand a small write to the socket now, as nats-py's flusher task would a loop turn
    later: a batch of one message otherwise waits for that task to be scheduled.  Larger
    writes, or any while the socket is backed up, stay with the flusher, which gathers
    them into fewer system calls while the route goes on with its next batch."""
    writer = getattr(nc._transport, "_io_writer", None)
    if (
        writer is None
        or not 0 < nc._pending_data_size <= _WRITE_NOW_MAX
        or writer.transport.get_write_buffer_size()
        or not await _write_all(nc)
    ):
        await nc._flush_pending()


def _frames(out: bytearray) -> bytes:
    # nats-py only hands its pending list to writelines(), which takes any buffer: passing
    # the block itself saves a copy of every payload.
    return cast(bytes, out)


class NatsAdapter(Adapter):
    protocol: ClassVar[str] = "nats"
    BrokerOptions: ClassVar[type[Options]] = NatsBrokerOptions
    SourceOptions: ClassVar[type[Options]] = NatsSourceOptions
    TargetOptions: ClassVar[type[Options]] = NatsTargetOptions

    def __init__(self, name: str, url: str, options: Options, backoff: Backoff) -> None:
        if not isinstance(options, NatsBrokerOptions):
            options = NatsBrokerOptions.model_validate(options.model_dump())
        super().__init__(name, url, options, backoff)
        self.opts: NatsBrokerOptions = options
        self.security = security_of(options)
        self.tls = tls_for(url, self.security)
        self.stats: dict[str, int] = {
            "dropped_slow_consumer": 0,
            "callback_errors": 0,
            "reconnects": 0,
            "acks_sent": 0,
            "acks_dropped": 0,
            "js_duplicates": 0,
            "publish_refused": 0,
            "reply_to_not_carried": 0,
        }
        domain = self.opts.jetstream_domain
        self.api_prefix = f"$JS.{domain}.API" if domain else "$JS.API"
        self._nc: _Client | None = None
        self._state = ConnState.CONNECTING
        self._closing = False
        self._epoch = 0
        self._lost: asyncio.Future[None] | None = None
        self._reconnect_delay = backoff.initial
        self._specs: dict[int, _SubSpec] = {}  # by id(spec)
        self._consumers: list[_PullConsumer] = []
        self._batches: list[_Batch] = []
        self._acks: list[bytes] = []
        self._ack_task: asyncio.Task[None] | None = None
        self._revive_task: asyncio.Task[None] | None = None
        self._subject_cache: dict[str, bytes] = {}
        # Per shared header list: (topic, b"HPUB <subject> <header size> ", CRLF + header
        # block, header size), the frame's head for that topic; see _publish_core.
        self._heads: PerHeaders[tuple[str, bytes, bytes, int]] = PerHeaders()
        self._js_prefix = b""
        self._js_batches: dict[int, _JsBatch] = {}
        self._js_seq = 0
        self._warned_reply_to = False

    # ---- load-time checks -------------------------------------------------------------

    @classmethod
    def check_source(cls, options: Options, *, durable: bool) -> str | None:
        if durable and getattr(options, "jetstream", None) is None:
            return (
                "core NATS cannot acknowledge; use delivery: at-most-once or from.options.jetstream"
            )
        return None

    # ---- connection -------------------------------------------------------------------

    def client(self) -> _Client | None:
        return self._nc

    def jsm(self) -> Any:
        assert self._nc is not None
        return self._nc.jsm(timeout=self.opts.js_timeout, prefix=self.api_prefix)

    async def connect(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        self._closing = False
        self._state = ConnState.CONNECTING
        nc = await self._dial(self.backoff.attempts)
        await self._adopt(nc)

    async def _dial(self, attempts: int | None) -> _Client:
        delay = self.backoff.initial
        failures = 0
        while True:
            nc = _Client()
            nc.fb_errors = self._handler_error
            nc.fb_require_tls = self.tls is not None
            dial_errors: list[Exception] = []

            def only_adopted(
                cb: Callable[..., Awaitable[None]],
                nc: _Client = nc,
                dial_errors: list[Exception] = dial_errors,
            ) -> Callable[..., Awaitable[None]]:
                # A dial that fails closes its client: those events are not a lost
                # connection (and must not start a second dial loop).
                async def event(*args: Any) -> None:
                    if nc is self._nc:
                        await cb(*args)
                    elif args and isinstance(args[0], Exception):
                        dial_errors.append(args[0])  # the real cause behind NoServersError

                return event

            try:
                await nc.connect(
                    servers=[self.url],
                    name=self.opts.name,
                    no_echo=self.opts.no_echo,
                    # Off for the first dial so a failure comes back to us; switched on after.
                    allow_reconnect=False,
                    # nats-py's first dial loops until a server exceeds this count (two
                    # quick tries); the real policy (forever, our backoff) is set after.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    reconnect_to_server_handler=self._next_server,
                    connect_timeout=self.opts.connect_timeout,  # type: ignore[arg-type]
                    ping_interval=self.opts.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=self.opts.max_outstanding_pings,
                    pending_size=self.opts.outbound_buffer,
                    error_cb=only_adopted(self._on_error),
                    disconnected_cb=only_adopted(self._on_disconnected),
                    reconnected_cb=only_adopted(self._on_reconnected),
                    closed_cb=only_adopted(self._on_closed),
                    **self._login(),
                )
            except Exception as exc:
                with contextlib.suppress(Exception):
                    # Bounded: after a failed TLS upgrade nats-py's close waits forever for
                    # the replaced plain stream to report its end.
                    await asyncio.wait_for(nc.close(), _CLOSE_FAILED_DIAL)
                failures += 1
                # The server's own refusal (-ERR 'Authorization Violation') says more than
                # the broken pipe or reset that may follow it as it hangs up.
                told = [e for e in dial_errors if not isinstance(e, OSError)]
                real = told[0] if told else dial_errors[-1] if dial_errors else exc
                cause = describe(real, self.security)
                if attempts is not None and failures >= attempts:
                    raise ConnectError(
                        f"broker {self.name} ({redact_url(self.url)}): {cause}"
                    ) from exc
                self.log.warning(
                    "cannot connect to %s (%s), retry in %.1fs", redact_url(self.url), cause, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff.maximum)
                continue
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            return nc

    def _login(self) -> dict[str, Any]:
        """nats-py's TLS and credential arguments.  Secrets go in as callables, so the
        client's options never hold them in clear."""
        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            # A fresh context per dial: renewed certificate files are read again.
            kwargs["tls"] = self.tls.context()
        auth = self.security.auth
        if auth is None:
            return kwargs
        if auth.username is not None:
            kwargs["user"] = auth.username
        if auth.password is not None:
            kwargs["password"] = auth.password.get_secret_value
        if auth.token is not None:
            kwargs["token"] = auth.token.get_secret_value
        if auth.creds_file is not None:
            kwargs["user_credentials"] = auth.creds_file
        if auth.nkey_file is not None:
            kwargs["nkeys_seed"] = auth.nkey_file
        return kwargs

    async def _adopt(self, nc: _Client) -> None:
        """Make ``nc`` the connection and (re)place every subscription we own on it."""
        self._nc = nc
        self._epoch += 1
        self._lost = asyncio.get_running_loop().create_future()
        self._reconnect_delay = self.backoff.initial
        for spec in list(self._specs.values()):
            await self._sub(nc, spec)
        self._state = ConnState.CONNECTED
        for consumer in self._consumers:
            consumer.reset()

    async def _sub(self, nc: _Client, spec: _SubSpec) -> None:
        # Register before SUB goes out so no early message takes nats-py's own path; the sid
        # nats-py assigns is the next one (assigned before its first await).
        sid = nc._sid + 1
        nc.fb_handlers[b"%d" % sid] = spec.handler
        nc.fb_lines.clear()
        sub = await nc.subscribe(spec.subject, queue=spec.queue)
        if sub._id != sid:  # pragma: no cover - nats-py changed how sids are assigned
            nc.fb_handlers.pop(b"%d" % sid, None)
            nc.fb_handlers[b"%d" % sub._id] = spec.handler
            nc.fb_lines.clear()
        spec.sid = sub._id

    async def _unsub(self, spec: _SubSpec) -> None:
        self._specs.pop(id(spec), None)
        nc = self._nc
        if nc is None:
            return
        nc.fb_handlers.pop(b"%d" % spec.sid, None)
        nc.fb_lines.clear()
        sub = nc._subs.get(spec.sid)
        if sub is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _next_server(self, servers: list[Server], info: dict[str, Any]) -> tuple[None, float]:
        # nats-py asks before every reconnect attempt: exponential backoff, forever.
        delay = self._reconnect_delay
        self._reconnect_delay = min(delay * 2, self.backoff.maximum)
        return None, delay

    def _handler_error(self, exc: BaseException) -> None:
        self.stats["callback_errors"] += 1
        self.log.error("message handler failed: %r", exc, exc_info=exc)

    async def _on_error(self, exc: Exception) -> None:
        try:
            if isinstance(exc, nats.errors.SlowConsumerError):
                self.stats["dropped_slow_consumer"] += 1
            self.log.warning("nats: %s", self.security.scrub(repr(exc)))
        except Exception:  # a raising callback would stop nats-py's reconnect loop
            self.stats["callback_errors"] += 1

    def _mark_lost(self) -> None:
        self._epoch += 1
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        for consumer in self._consumers:
            consumer.reset()

    async def _on_disconnected(self) -> None:
        try:
            if not self._closing:
                self._state = ConnState.DISCONNECTED
                self.log.warning("disconnected from %s; reconnecting", redact_url(self.url))
            self._mark_lost()
        except Exception as exc:
            self._handler_error(exc)

    async def _on_reconnected(self) -> None:
        try:
            self.stats["reconnects"] += 1
            self._reconnect_delay = self.backoff.initial
            self._lost = asyncio.get_running_loop().create_future()
            self._state = ConnState.CONNECTED
            self.log.info("reconnected to %s", redact_url(self.url))
            for consumer in self._consumers:
                consumer.reset()
        except Exception as exc:
            self._handler_error(exc)

    async def _on_closed(self) -> None:
        try:
            self._mark_lost()
            if self._closing:
                return
            # nats-py gave up on this connection (e.g. a server -ERR): start a new one.
            self._state = ConnState.DISCONNECTED
            if self._revive_task is None or self._revive_task.done():
                self._revive_task = asyncio.get_running_loop().create_task(
                    self._revive(), name=f"nats-revive-{self.name}"
                )
        except Exception as exc:
            self._handler_error(exc)

    async def _revive(self) -> None:
        self.log.warning(
            "connection to %s closed by the server; dialing again", redact_url(self.url)
        )
        nc = await self._dial(None)
        if self._closing:
            await nc.close()
            return
        self.stats["reconnects"] += 1
        await self._adopt(nc)

    async def close(self) -> None:
        if self._closing and self._state is ConnState.CLOSED:
            return
        self._closing = True
        if self._revive_task is not None:
            self._revive_task.cancel()
        for batch in self._batches:
            batch.closed = True
            batch.event.set()
        for consumer in self._consumers:
            if consumer.task is not None:
                consumer.task.cancel()
        nc = self._nc
        if nc is not None and not nc.is_closed:
            if nc.is_connected:
                with contextlib.suppress(Exception):
                    if self._acks:
                        await self._send_acks()
                    await nc.flush(timeout=max(1, int(self.opts.js_timeout)))
            with contextlib.suppress(Exception):
                await nc.close()
        if self._acks:
            self.stats["acks_dropped"] += len(self._acks)
            self._acks.clear()
        self._state = ConnState.CLOSED
        self._mark_lost()

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def health(self) -> Health:
        nc = self._nc
        state = self._state
        if state is ConnState.CONNECTED and nc is not None and not nc.is_connected:
            state = ConnState.DISCONNECTED
        subscribed = all(c.ready for c in self._consumers)
        return Health(
            state,
            detail=redact_url(self.url),
            reconnects=self.stats["reconnects"],
            subscribed=subscribed and state is ConnState.CONNECTED,
        )

    def max_payload(self) -> int | None:
        return self._nc.max_payload if self._nc is not None else None

    # ---- source -----------------------------------------------------------------------

    def subscribe(self, sub: Subscription) -> AsyncGenerator[list[Incoming], None]:
        return self._iterate(sub)

    async def _iterate(self, sub: Subscription) -> AsyncGenerator[list[Incoming], None]:
        nc = self._nc
        if nc is None:
            raise FlowbridgeError(f"broker {self.name}: subscribe before connect")
        opts = (
            sub.options
            if isinstance(sub.options, NatsSourceOptions)
            else (NatsSourceOptions.model_validate(sub.options.model_dump()))
        )
        js = opts.jetstream
        limit = self.opts.max_pending_msgs if js is None else max(sub.max_in_flight, 1)
        batch = _Batch(self, sub.route, limit, self.opts.max_pending_bytes, sub.drops)
        self._batches.append(batch)
        specs: list[_SubSpec] = []
        consumers: list[_PullConsumer] = []
        try:
            if js is None:
                for subject in sub.filters:
                    problem = wire.subject_problem(subject, publish=False)
                    if problem:
                        raise FlowbridgeError(f"broker {self.name}: filter {problem}")
                    spec = _SubSpec(subject, sub.group or "", batch.core_msg)
                    self._specs[id(spec)] = spec
                    specs.append(spec)
                    await self._sub(nc, spec)
            else:
                consumers = await self._consumers_for(sub, js, batch)
                if not sub.durable:
                    batch.taken = [c.wake for c in consumers]
                for consumer in consumers:
                    spec = _SubSpec(nc.new_inbox(), "", consumer.on_msg)
                    consumer.inbox = spec.subject
                    consumer.spec = spec
                    self._specs[id(spec)] = spec
                    specs.append(spec)
                    await self._sub(nc, spec)
                    self._consumers.append(consumer)
                    await consumer.ensure()
                    consumer.task = asyncio.get_running_loop().create_task(
                        consumer.run(), name=f"nats-pull-{consumer.stream}-{consumer.name}"
                    )
            while True:
                if batch.items:
                    yield batch.take()
                    continue
                if batch.closed:
                    return
                if batch.interrupted:
                    batch.interrupted = False
                    yield []  # the route is stopping: back to it, the subscription kept
                    continue
                for consumer in consumers:
                    if consumer.task is not None and consumer.task.done():
                        consumer.task.result()  # a consumer that cannot work: say why
                batch.event.clear()
                await batch.event.wait()
        finally:
            if batch.items and not sub.durable and batch.drops is not None:
                # At-most-once: what the route never took is gone with it; counted.
                batch.drops["route stopped"] += len(batch.items)
            batch.closed = True
            self._batches.remove(batch)
            for consumer in consumers:
                if consumer.task is not None:
                    consumer.task.cancel()
                if consumer in self._consumers:
                    self._consumers.remove(consumer)
            for spec in specs:
                await self._unsub(spec)

    def interrupt(self, route: str) -> bool:
        batch = next((b for b in self._batches if b.route == route), None)
        if batch is None:
            return False
        batch.interrupted = True
        batch.event.set()
        return True

    async def drain(self, route: str) -> list[Incoming]:
        """Stop pulling for ``route`` and return what was pulled and not yet taken.

        JetStream would redeliver those only after ack_wait, behind newer messages, so a
        restart or reload would break per-subject order; a NAK does not help either (servers
        before 2.10 hand the first NAKed message to the pull request that is going away).
        No new pull request is made; the open one is let run to its end (its last message, or
        the server's 408 when it expires), since what it delivered to an inbox already gone
        would come back only after ack_wait too.  Then the pull inboxes are unsubscribed and
        the connection flushed: once the PONG is in, nothing more is on its way."""
        batch = next((b for b in self._batches if b.route == route), None)
        consumers = [c for c in self._consumers if c.batch is batch and c.explicit_ack]
        nc = self._nc
        if batch is None or not consumers or nc is None or not nc.is_connected:
            return []
        for consumer in consumers:
            if consumer.task is not None:
                consumer.task.cancel()
        for c in consumers:
            # on_msg and on_status wake a consumer when its request has ended.
            while nc.is_connected and c.outstanding > 0 and time.monotonic() < c.deadline:
                c.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await c.wake.wait()
        try:
            for consumer in consumers:
                sub = nc._subs.get(consumer.spec.sid) if consumer.spec else None
                if sub is not None:
                    await sub.unsubscribe()
            await nc.flush(timeout=max(1, int(self.opts.js_timeout)))
        except Exception as exc:  # what arrives later comes back after ack_wait
            self.log.warning("route %s: pull inbox not closed cleanly: %r", route, exc)
        return batch.take()

    async def _consumers_for(
        self, sub: Subscription, js: JetStreamSource, batch: _Batch
    ) -> list[_PullConsumer]:
        jsm = self.jsm()
        by_stream: dict[str, list[str]] = {}
        for subject in sub.filters:
            stream = js.stream
            if stream is None:
                try:
                    stream = await jsm.find_stream_name_by_subject(subject)
                except nats.js.errors.NotFoundError as exc:
                    raise FlowbridgeError(
                        f"broker {self.name}: no JetStream stream captures {subject!r}"
                    ) from exc
            by_stream.setdefault(stream, []).append(subject)
        durable = js.durable or f"flowbridge-{sub.route}"
        version = self._nc.connected_server_version if self._nc else None
        multi_filter = version is not None and (version.major, version.minor) >= (2, 10)
        groups: list[tuple[str, list[str]]] = []
        for stream, subjects in by_stream.items():
            if multi_filter or len(subjects) == 1:
                groups.append((stream, subjects))
            else:  # nats-server < 2.10 has one filter per consumer
                groups.extend((stream, [s]) for s in subjects)
        consumers = []
        k = len(groups)
        total = max(sub.max_in_flight, 1)
        for i, (stream, subjects) in enumerate(groups):
            name = durable if k == 1 else f"{durable}-{i}"
            # Each consumer gets its share of the route's in-flight bound, so their sum
            # never exceeds it (a consumer needs at least one).
            share = max(total // k + (1 if i < total % k else 0), 1)
            consumers.append(
                _PullConsumer(
                    self,
                    batch,
                    stream,
                    name,
                    filters=subjects,
                    opts=js,
                    max_in_flight=share,
                    explicit_ack=sub.durable,
                )
            )
        return consumers

    def queue_ack(self, reply: bytes) -> None:
        self._acks.append(b"PUB " + reply + _ACK)
        if self._ack_task is None:
            self._ack_task = asyncio.get_running_loop().create_task(self._ack_writer())

    async def _ack_writer(self) -> None:
        try:
            await self._send_acks()
        except Exception as exc:
            self.stats["acks_dropped"] += len(self._acks)
            self._acks.clear()
            self.log.warning("acks not sent (%r); JetStream will redeliver", exc)
        finally:
            self._ack_task = None

    async def _send_acks(self) -> None:
        # Every ack of this loop turn goes out as one write; acks of deliveries from before
        # a reconnect are sent too: the server ignores those it no longer tracks.
        while self._acks:
            nc = self._nc
            if nc is None or nc.is_closed:
                self.stats["acks_dropped"] += len(self._acks)
                self._acks.clear()
                return
            data = b"".join(self._acks)
            self.stats["acks_sent"] += len(self._acks)
            self._acks.clear()
            await nc._send_command(data)
            await nc._flush_pending()

    # ---- target -----------------------------------------------------------------------

    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise PublishError(f"broker {self.name}: not connected", retriable=True)
        opts = (
            options
            if isinstance(options, NatsTargetOptions)
            else (
                NatsTargetOptions()
                if options is None
                else NatsTargetOptions.model_validate(options.model_dump())
            )
        )
        if opts.jetstream:
            return await self._publish_js(nc, messages, opts)
        return await self._publish_core(nc, messages, confirm)

    def _subject(self, topic: str) -> bytes:
        """The wire form of a publish subject, validated once per distinct subject."""
        cached = self._subject_cache.get(topic)
        if cached is not None:
            return cached
        problem = wire.subject_problem(topic, publish=True)
        if problem:
            raise wire.WireError(problem)
        encoded = topic.encode("utf-8", "surrogateescape")
        if len(self._subject_cache) >= 65536:
            self._subject_cache.clear()
        self._subject_cache[topic] = encoded
        return encoded

    def _refuse(
        self, results: list[PublishError | None] | None, n: int, i: int, reason: str
    ) -> list[PublishError | None]:
        self.stats["publish_refused"] += 1
        if results is None:
            results = [None] * n
        results[i] = PublishError(reason, retriable=False)
        return results

    async def _publish_core(
        self, nc: _Client, messages: Sequence[Message], confirm: bool
    ) -> PublishOutcome:
        epoch = self._epoch
        limit = nc.max_payload
        results: list[PublishError | None] | None = None
        out = bytearray()
        n = len(messages)
        heads = self._heads
        # The common case: a topic's messages share one header list (the engine's) and carry
        # nothing else, so a frame is a cached head, the size, the cached header block and
        # the payload.  The current run's head is kept here, and its frame prefix (head, size,
        # block) per payload size: a stream's sizes repeat.
        run: list[Any] | None = None  # the header list of the run
        topic = ""
        prefixes: dict[int, bytes] = {}
        head = block = b""
        hlen = 0
        crlf = wire.CRLF
        for i, m in enumerate(messages):
            payload = m.payload
            headers = m.headers
            plain = (
                headers is not None
                and m.reply_to is None
                and m.content_type is None
                and m.correlation_id is None
                and m.message_id is None
                and m.timestamp is None
            )
            if plain and (headers is not run or m.topic != topic):
                cached = heads.get(headers)  # type: ignore[arg-type]
                if cached is not None and cached[0] == m.topic:
                    topic, head, block, hlen = cached
                    run = headers
                    prefixes = {}
                else:
                    run = None
            if plain and headers is run:
                size = hlen + len(payload)
                if size <= limit:
                    if len(payload) < _BIG:
                        prefix = prefixes.get(size)
                        if prefix is None:
                            prefix = prefixes[size] = b"%s%d%s" % (head, size, block)
                        out += prefix
                        out += payload
                        out += crlf
                        if len(out) >= _CHUNK:
                            await nc._send_command(_frames(out))
                            out = bytearray()
                        continue
                    out += head
                    out += str(size).encode()
                    out += block
                    # Handed to the socket as it is, no copy into the frame block; all
                    # parts at once, so a write never ends inside a frame.
                    _queue(nc, _frames(out), payload, crlf)
                    out = bytearray()
                    if nc._pending_data_size > nc._max_pending_size:
                        await nc._flush_pending(force_flush=True)
                    continue
            try:
                subject = self._subject(m.topic)
                reply = b""
                if m.reply_to:
                    reply = self._subject(m.reply_to) + b" "
                hdr = wire.encode_headers(m)
            except wire.WireError as exc:
                results = self._refuse(results, n, i, str(exc))
                continue
            size = len(payload) + (len(hdr) if hdr is not None else 0)
            if size > limit:
                results = self._refuse(
                    results, n, i, f"message of {size} bytes exceeds max_payload {limit}"
                )
                continue
            if len(payload) < _BIG:
                wire.pub_frame(out, subject, reply, hdr, payload)
            else:
                # As on the fast path: the payload goes to the socket as it is.
                wire.pub_head(out, subject, reply, hdr, len(payload))
                _queue(nc, _frames(out), payload, crlf)
                out = bytearray()
            if plain and hdr is not None and headers is not None:
                heads.put(
                    headers,
                    (
                        m.topic,
                        b"HPUB %s %d " % (subject, len(hdr)),
                        crlf + hdr,
                        len(hdr),
                    ),
                )
            if len(out) >= _CHUNK:
                await nc._send_command(_frames(out))
                out = bytearray()
            elif nc._pending_data_size > nc._max_pending_size:
                await nc._flush_pending(force_flush=True)
        if out:
            await nc._send_command(_frames(out))
        await _write_now(nc)
        if self._epoch != epoch or not nc.is_connected:
            # Written into a connection that went away: nothing is known to have arrived.
            raise PublishError(
                f"broker {self.name}: connection lost while publishing", retriable=True
            )
        if confirm:
            await self._confirm(nc, epoch)
        return results

    async def _confirm(self, nc: _Client, epoch: int) -> None:
        """PING/PONG: the PONG proves the server processed everything written before."""
        lost = self._lost
        pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await _write_all(nc)  # the PING must follow every frame it confirms
        await nc._send_ping(pong)
        waiting: set[asyncio.Future[Any]] = {pong}
        if lost is not None:
            waiting.add(lost)
        await asyncio.wait(
            waiting, timeout=self.opts.js_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not pong.done() or self._epoch != epoch:
            pong.cancel()
            raise PublishError(
                f"broker {self.name}: no confirmation (connection lost or "
                f"no PONG within {self.opts.js_timeout}s)",
                retriable=True,
            )

    async def _js_inbox(self, nc: _Client) -> bytes:
        if not self._js_prefix:
            prefix = nc.new_inbox()
            spec = _SubSpec(prefix + ".>", "", self._on_js_ack)
            self._specs[id(spec)] = spec
            self._js_prefix = (prefix + ".").encode()
            await self._sub(nc, spec)
        return self._js_prefix

    def _on_js_ack(self, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        batch_no, _, index = subject[len(self._js_prefix) :].partition(b".")
        try:
            state = self._js_batches.get(int(batch_no))
            i = int(index)
        except ValueError:
            return
        if state is None or i >= len(state.results) or state.results[i] is not _PENDING:
            return  # late ack of a finished call, or a duplicate
        err: PublishError | None = None
        status = wire.status_of(hdr) if hdr is not None and not data else None
        if status is not None:
            code, text = status
            reason = (
                "no JetStream stream for this subject (503 no responders)"
                if code == 503
                else f"JetStream status {code} {text}".rstrip()
            )
            err = PublishError(reason, retriable=False)
        elif b'"error"' in data:
            try:
                info = json.loads(data)["error"]
                reason = (
                    f"JetStream refused: {info.get('description', '')} "
                    f"(code {info.get('code')}, err_code {info.get('err_code')})"
                )
            except (ValueError, KeyError, TypeError):
                reason = f"JetStream refused: {data[:200]!r}"
            err = PublishError(reason, retriable=False)
        elif b'"duplicate"' in data and b"true" in data.partition(b'"duplicate"')[2][:8]:
            # Formatting differs between server versions ("duplicate": true / :true).
            self.stats["js_duplicates"] += 1
        if err is not None:
            self.stats["publish_refused"] += 1
        state.results[i] = err
        state.acked += 1
        if state.acked >= state.target:
            state.event.set()

    async def _publish_js(
        self, nc: _Client, messages: Sequence[Message], opts: NatsTargetOptions
    ) -> PublishOutcome:
        epoch = self._epoch
        prefix = await self._js_inbox(nc)
        n = len(messages)
        self._js_seq += 1
        batch_no = self._js_seq
        state = _JsBatch(n)
        self._js_batches[batch_no] = state
        reply_base = prefix + b"%d." % batch_no
        extra = [(wire.EXPECTED_STREAM, opts.expect_stream)] if opts.expect_stream else None
        window = self.opts.js_max_outstanding
        limit = nc.max_payload
        timeout = self.opts.js_timeout
        try:
            out = bytearray()
            sent = 0  # frames written, including refused ones (counted as acked)
            for i, m in enumerate(messages):
                if sent - state.acked >= window:
                    await self._js_wait(nc, state, out, target=sent - window // 2, epoch=epoch)
                    out = bytearray()
                sent += 1
                try:
                    subject = self._subject(m.topic)
                    hdr = wire.encode_headers(m, extra)
                except wire.WireError as exc:
                    self._js_refuse(state, i, str(exc))
                    continue
                size = len(m.payload) + (len(hdr) if hdr is not None else 0)
                if size > limit:
                    self._js_refuse(
                        state, i, f"message of {size} bytes exceeds max_payload {limit}"
                    )
                    continue
                if m.reply_to is not None:
                    self.stats["reply_to_not_carried"] += 1
                    if not self._warned_reply_to:
                        self._warned_reply_to = True
                        self.log.warning(
                            "JetStream stores no reply subject: reply_to of "
                            "messages published with jetstream is not carried"
                        )
                wire.pub_frame(out, subject, reply_base + b"%d " % i, hdr, m.payload)
            await self._js_wait(nc, state, out, target=n, epoch=epoch)
        finally:
            del self._js_batches[batch_no]
        results: list[PublishError | None] = []
        missing = 0
        for r in state.results:
            if r is _PENDING:
                missing += 1
                results.append(PublishError(f"no JetStream ack within {timeout}s", retriable=True))
            else:
                results.append(r if isinstance(r, PublishError) else None)
        if missing == 0 and all(r is None for r in results):
            return None
        return results

    def _js_refuse(self, state: _JsBatch, i: int, reason: str) -> None:
        self.stats["publish_refused"] += 1
        state.results[i] = PublishError(reason, retriable=False)
        state.acked += 1

    async def _js_wait(
        self, nc: _Client, state: _JsBatch, out: bytearray, *, target: int, epoch: int
    ) -> None:
        """Write ``out`` and wait until ``target`` acks are in (or time runs out)."""
        if out:
            await nc._send_command(_frames(out))
            await _write_now(nc)
        lost = self._lost
        if state.acked < target:
            state.target = target
            state.event.clear()
            waiter = asyncio.ensure_future(state.event.wait())
            waiting: set[asyncio.Future[Any]] = {waiter}
            if lost is not None:
                waiting.add(lost)
            try:
                await asyncio.wait(
                    waiting, timeout=self.opts.js_timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
        if self._epoch != epoch:
            raise PublishError(
                f"broker {self.name}: connection lost while publishing to JetStream", retriable=True
            )
