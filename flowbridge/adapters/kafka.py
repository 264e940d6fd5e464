"""Kafka adapter on aiokafka.

Source: one consumer group per route, offsets committed by the adapter only for records the
route acknowledged (per partition, up to the highest contiguous ack), so whatever was not
acked before a close, crash or rebalance is read again.  Target: one producer (acks=all,
idempotent when the broker allows it), sends pipelined per batch, topics created on demand.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ConsumerStoppedError,
    CorruptRecordException,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
)
from aiokafka.partitioner import murmur2
from aiokafka.protocol.metadata import MetadataRequest
from pydantic import Field, field_validator, model_validator

from flowbridge.adapters import _kafka_codec as _codec
from flowbridge.adapters.base import (
    Adapter,
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
from flowbridge.security import SecuredOptions, describe, redact_url, security_of, tls_for

_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_REGEX_META = frozenset(".^$*+?{}[]|()")
_UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION
_TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
_CACHE_MAX = 4096
_NO_HEADERS: list[tuple[str, bytes]] = []  # never appended to
# Bytes a record adds to its value on the wire, beyond key and headers, at most.
_RECORD_OVERHEAD = 64
# A partition's run of at most this many records goes out record by record: aiokafka adds
# those to the batch already waiting for the partition's next request, where a batch of our
# own would wait for that one to be sent first (one produce round trip per call: at 1k msg/s
# that doubled the latency to a Kafka consumer).
_SMALL_RUN = 8
# Connection trouble: worth retrying the same batch later.
_TRANSIENT = (KafkaConnectionError, KafkaTimeoutError, OSError, asyncio.TimeoutError)


class KafkaBrokerOptions(SecuredOptions):
    client_id: str = "flowbridge"
    # "auto": idempotent producer when the broker grants a producer id, plain otherwise.
    idempotence: Literal["auto", "true", "false"] = "auto"
    create_topics: bool = True
    partitions: int = Field(default=1, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    session_timeout_ms: int = Field(default=10_000, ge=1)
    heartbeat_interval_ms: int = Field(default=3_000, ge=1)
    rebalance_timeout_ms: int = Field(default=30_000, ge=1)
    max_poll_interval_ms: int = Field(default=300_000, ge=1)
    metadata_max_age_ms: int = Field(default=300_000, ge=100)
    request_timeout_ms: int = Field(default=30_000, ge=100)
    max_request_size: int = Field(default=1_048_576, ge=1024)
    linger_ms: int = Field(default=0, ge=0)
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    # None: librdkafka's level for the codec (lz4 fast, gzip 6, zstd 3), not aiokafka's own
    # (lz4 9, gzip 9: several times the CPU for a few percent of size).
    compression_level: int | None = None
    commit_interval_ms: int = Field(default=100, ge=1)
    # aiokafka's defaults (16 KiB batches, 500 ms fetch wait) cost 10 KB messages a batch each
    # and every consumed record up to half a second.
    max_batch_size: int = Field(default=1_048_576, ge=1024)
    fetch_max_wait_ms: int = Field(default=20, ge=0)
    # A fetch response is held whole while its records are decoded, and the next is fetched
    # meanwhile: aiokafka's 50 MiB (capped by Tansu at 5 MiB) put the bridge at 83-93 MB at
    # full speed with 10 KB records, where 2 MiB keeps it at 63-70 MB at the same rate.
    fetch_max_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # Verify each fetched batch's CRC-32C (the Java client does; librdkafka does not by
    # default): 4-7 us of bridge CPU per 10 KB record in the benchmark.
    check_crcs: bool = True

    @field_validator("idempotence", mode="before")
    @classmethod
    def _bool_to_text(cls, value: object) -> object:
        # YAML reads `true`/`false` as booleans.
        if isinstance(value, bool):
            return "true" if value else "false"
        return value

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> KafkaBrokerOptions:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        return self

    @model_validator(mode="after")
    def _level_of_the_codec(self) -> KafkaBrokerOptions:
        level = self.compression_level
        if level is None:
            return self
        if self.compression not in _codec.LEVELS:
            raise ValueError(
                f"compression_level needs compression gzip, lz4 or zstd "
                f"(compression is {self.compression!r})"
            )
        low, high = _codec.LEVELS[self.compression]
        if not low <= level <= high:
            raise ValueError(
                f"compression_level {level} is outside {low}..{high} for {self.compression}"
            )
        return self


class KafkaSourceOptions(Options):
    # Where a group without committed offsets starts.
    start: Literal["earliest", "latest"] = "earliest"


class KafkaTargetOptions(Options):
    # A fixed partition for every record; None: the producer's partitioner (murmur2 of the key,
    # as the Java client does, so keyed records land where other producers put them).
    partition: int | None = Field(default=None, ge=0)


def _bootstrap(url: str) -> tuple[list[str], bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("kafka", "kafka+ssl"):
        raise ValueError(f"not a kafka URL: {url!r}")
    servers = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        servers.append(f"{host or '127.0.0.1'}:{port or 9092}")
    return servers, parts.scheme == "kafka+ssl"


def literal_topic(pattern: str) -> str | None:
    """The topic name an anchored filter matches when it is a plain escaped literal."""
    if not (pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")):
        return None
    inner = pattern[1:-1]
    out: list[str] = []
    i = 0
    while i < len(inner):
        ch = inner[i]
        if ch == "\\":
            if i + 1 >= len(inner) or inner[i + 1].isalnum():
                return None  # \d, \w, ...: a class, not a literal
            out.append(inner[i + 1])
            i += 2
            continue
        if ch in _REGEX_META:
            return None
        out.append(ch)
        i += 1
    name = "".join(out)
    return name if _TOPIC_NAME.fullmatch(name) else None


def plan_subscription(filters: Sequence[str]) -> tuple[list[str], str | None]:
    """Topics to subscribe by name, or one combined pattern when any filter is a regex."""
    if not filters:
        raise TopicError("kafka", "", "a subscription needs at least one filter")
    literals = [literal_topic(f) for f in filters]
    if all(name is not None for name in literals):
        return [n for n in literals if n is not None], None
    parts = []
    for f in filters:
        try:
            re.compile(f)
        except re.error as exc:
            raise TopicError("kafka", f, f"invalid regular expression: {exc}") from exc
        parts.append(f"(?:{f})" if f.startswith("^") and f.endswith("$") else f"(?:^(?:{f})$)")
    return [], "|".join(parts)


def _record_headers(m: Message) -> list[tuple[str, bytes]] | None:
    out: list[tuple[str, bytes]] = []
    if m.content_type is not None:
        out.append(("content-type", m.content_type.encode()))
    if m.correlation_id is not None:
        out.append(("correlation-id", m.correlation_id))
    if m.reply_to is not None:
        out.append(("reply-to", m.reply_to.encode()))
    if m.message_id is not None:
        out.append(("message-id", m.message_id.encode()))
    if m.headers:
        # surrogateescape: header bytes that were not UTF-8 on receipt go back unchanged.
        out.extend((k, v.encode("utf-8", "surrogateescape")) for k, v in m.headers)
    return out or None


def _sized(headers: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], int]:
    return headers, sum(len(k) + len(v) + 8 for k, v in headers)


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "surrogateescape")


def record_message(rec: ConsumerRecord[bytes, bytes]) -> Message:
    """A consumed record as a Message, named fields lifted out of the headers."""
    ts = rec.timestamp
    value = rec.value
    msg = Message(
        rec.topic,
        value if value is not None else b"",
        None,
        None,
        None,
        None,
        None,
        ts / 1000 if ts is not None and ts >= 0 else None,
        rec.key,
    )
    if rec.headers:
        rest: list[tuple[str, str]] = []
        for name, value in rec.headers:
            if name == "content-type" and msg.content_type is None:
                msg.content_type = _text(value)
            elif name == "correlation-id" and msg.correlation_id is None:
                msg.correlation_id = value or b""
            elif name == "reply-to" and msg.reply_to is None:
                msg.reply_to = _text(value)
            elif name == "message-id" and msg.message_id is None:
                msg.message_id = _text(value)
            else:
                rest.append((name, _text(value)))
        if rest:
            msg.headers = rest
    return msg


class _Partition:
    """Acks of one assigned partition; a new object per assignment, so acks of records
    delivered before a revoke land on a revoked object and are ignored."""

    __slots__ = ("acked", "commit_at", "committed", "pending", "revoked", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.pending: collections.deque[int] = collections.deque()  # delivered, in order
        self.acked: set[int] = set()  # acked but behind an unacked one
        self.commit_at: int | None = None
        self.committed: int | None = None
        self.revoked = False


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: _Source) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.source.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.source.on_assigned(assigned)


class _Source:
    """One route's consumer group member; the Settler of its deliveries."""

    def __init__(self, adapter: KafkaAdapter, sub: Subscription) -> None:
        self.adapter = adapter
        self.sub = sub
        opts = sub.options if isinstance(sub.options, KafkaSourceOptions) else None
        self.start = opts.start if opts is not None else "earliest"
        self.topics, self.pattern = plan_subscription(sub.filters)
        self.group = sub.group or f"flowbridge-{sub.route}"
        self.limit = max(1, sub.max_in_flight)
        self.consumer: AIOKafkaConsumer | None = None
        self.parts: dict[TopicPartition, _Partition] = {}
        self.dirty: set[_Partition] = set()
        self.in_flight = 0  # delivered and not yet committable
        self.room = asyncio.Event()
        self.paused = False
        self.assigned = False
        self.closed = False
        self.commit_lock = asyncio.Lock()
        self.commit_task: asyncio.Task[None] | None = None

    # Settler: called by Delivery.ack, never blocks.
    def ack(self, token: Any) -> None:
        part, offset = token
        if part.revoked:
            return
        pending = part.pending
        if not pending or offset < pending[0]:
            return  # already acked
        if offset != pending[0]:
            part.acked.add(offset)
            return
        pending.popleft()
        done = 1
        last = offset
        acked = part.acked
        while pending and pending[0] in acked:
            last = pending.popleft()
            acked.discard(last)
            done += 1
        part.commit_at = last + 1
        self.dirty.add(part)
        self.in_flight -= done
        if self.paused:  # only a paused fetch loop waits for room
            self.room.set()

    async def open(self) -> AIOKafkaConsumer | None:
        a = self.adapter
        o = a.opts
        delays = a.backoff.delays()
        while not self.closed:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=a.servers,
                client_id=o.client_id,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset=self.start,
                session_timeout_ms=o.session_timeout_ms,
                heartbeat_interval_ms=o.heartbeat_interval_ms,
                rebalance_timeout_ms=o.rebalance_timeout_ms,
                max_poll_interval_ms=o.max_poll_interval_ms,
                metadata_max_age_ms=o.metadata_max_age_ms,
                fetch_max_wait_ms=o.fetch_max_wait_ms,
                fetch_max_bytes=o.fetch_max_bytes,
                check_crcs=o.check_crcs,
                **a.client_security(),
            )
            try:
                await consumer.start()
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                delay = await anext(delays, a.backoff.maximum)
                a.log.warning(
                    "kafka source %s: cannot start (%s); retry in %.1fs", self.sub.route, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            listener = _Listener(self)
            if self.pattern is not None:
                consumer.subscribe(pattern=self.pattern, listener=listener)
            else:
                consumer.subscribe(topics=self.topics, listener=listener)
            self.consumer = consumer
            self.commit_task = asyncio.create_task(
                self._commit_loop(), name=f"kafka-commit-{self.sub.route}"
            )
            return consumer
        return None

    async def deliveries(self) -> AsyncIterator[list[Delivery]]:
        consumer = await self.open()
        if consumer is None:
            return
        limit = self.limit
        corrupt: AsyncIterator[float] | None = None
        while not self.closed:
            room = limit - self.in_flight
            try:
                if room <= 0:
                    batch = await self._wait_for_room(consumer)
                else:
                    if self.paused:
                        self.paused = False
                        consumer.resume(*consumer.assignment())
                    batch = await consumer.getmany(timeout_ms=200, max_records=room)
            except CorruptRecordException as exc:
                # A batch failed its CRC check: nothing of it was handed out and the position
                # stays before it, so the next fetch reads it again (damage on the way heals;
                # damage in the broker's log stalls the partition, logged each round).
                if self.closed:
                    return
                corrupt = corrupt or self.adapter.backoff.delays()
                delay = await anext(corrupt, self.adapter.backoff.maximum)
                self.adapter.corrupt_batches += 1
                self.adapter.log.error(  # noqa: TRY400 (the batch is at fault, not this code)
                    "kafka source %s: corrupt batch (%s); fetching it again in %.1fs",
                    self.sub.route,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except (ConsumerStoppedError, KafkaError):
                if self.closed:
                    return
                raise
            if not batch:
                continue
            corrupt = None
            out: list[Delivery] = []
            for tp, records in batch.items():
                part = self.parts.get(tp)
                if part is None:
                    continue  # revoked since the fetch; the new owner reads it again
                pending = part.pending
                for rec in records:
                    pending.append(rec.offset)
                    out.append(Delivery(record_message(rec), self, (part, rec.offset)))
                self.in_flight += len(records)
            if out:
                yield out

    async def _wait_for_room(
        self, consumer: AIOKafkaConsumer
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        # Stop fetching, but keep polling so the group does not think this member hung.
        self.paused = True
        consumer.pause(*consumer.assignment())
        self.room.clear()
        if self.limit - self.in_flight <= 0:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel (a route
            # stopping) that arrives as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self.room.wait()
        if self.limit - self.in_flight > 0:
            return {}
        # Paused partitions return nothing; anything that still comes is delivered, not lost.
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
        batch = await consumer.getmany(timeout_ms=0)
        return batch

    def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            if tp not in self.parts:
                self.parts[tp] = _Partition(tp)
        if self.paused and self.consumer is not None:
            self.consumer.pause(*assigned)
        self.assigned = True

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        await self.commit([self.parts[tp] for tp in revoked if tp in self.parts])
        for tp in revoked:
            part = self.parts.pop(tp, None)
            if part is None:
                continue
            part.revoked = True
            self.dirty.discard(part)
            self.in_flight -= len(part.pending)
        self.room.set()

    async def commit(self, parts: Iterable[_Partition] | None = None) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        async with self.commit_lock:
            chosen = list(self.dirty if parts is None else parts)
            offsets = {
                p.tp: p.commit_at
                for p in chosen
                if not p.revoked and p.commit_at is not None and p.commit_at != p.committed
            }
            self.dirty.difference_update(chosen)
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except (KafkaError, OSError) as exc:
                # Kept dirty: the next round retries; a revoke drops it (re-read, not lost).
                self.adapter.log.warning("kafka source %s: commit failed: %s", self.sub.route, exc)
                self.dirty.update(p for p in chosen if not p.revoked)
                return
            for p in chosen:
                if p.tp in offsets:
                    p.committed = offsets[p.tp]

    async def _commit_loop(self) -> None:
        interval = self.adapter.opts.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self.dirty:
                try:
                    await self.commit()
                except Exception:  # a failed round must not end committing
                    self.adapter.log.exception("kafka source %s: commit round", self.sub.route)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.room.set()
        if self.commit_task is not None:
            self.commit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.commit_task
        if self.consumer is not None:
            await self.commit()
            await self.consumer.stop()
        self.adapter.sources.discard(self)


class KafkaAdapter(Adapter):
    protocol: ClassVar[str] = "kafka"
    BrokerOptions: ClassVar[type[Options]] = KafkaBrokerOptions
    SourceOptions: ClassVar[type[Options]] = KafkaSourceOptions
    TargetOptions: ClassVar[type[Options]] = KafkaTargetOptions

    def __init__(self, name: str, url: str, options: Options, backoff: Any) -> None:
        super().__init__(name, url, options, backoff)
        self.opts = options if isinstance(options, KafkaBrokerOptions) else KafkaBrokerOptions()
        self.servers, _ = _bootstrap(url)
        self.security = security_of(self.opts)
        self.tls = tls_for(url, self.security)
        self.ssl = self.tls is not None
        self.safe_url = redact_url(url)
        self.sources: set[_Source] = set()
        self.producer: AIOKafkaProducer | None = None
        self.idempotent = self.opts.idempotence != "false"
        self._admin: AIOKafkaAdminClient | None = None
        self._known: set[str] = set()
        self._state = ConnState.DISCONNECTED
        self._detail = "not connected"
        self._reconnects = 0
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False
        self._default_target = KafkaTargetOptions()
        self.unconfirmed_failures = 0  # unconfirmed sends that later failed (logged)
        self.corrupt_batches = 0  # fetched batches that failed the CRC check (read again)
        self._partitions: dict[tuple[str, bytes], tuple[int, int]] = {}
        self._header_cache: PerHeaders[tuple[list[tuple[str, bytes]], int]] = PerHeaders(_CACHE_MAX)

    # -- connection ---------------------------------------------------------------------

    def client_security(self) -> dict[str, Any]:
        """aiokafka's TLS and SASL arguments: SSL / SASL_SSL / SASL_PLAINTEXT / PLAINTEXT."""
        args: dict[str, Any] = {"security_protocol": "SSL" if self.tls else "PLAINTEXT"}
        if self.tls is not None:
            # A fresh context per client: renewed certificate files are read again.
            args["ssl_context"] = self.tls.context()
        auth = self.security.auth
        username: str | None
        if auth is not None:
            username, mechanism = auth.username, auth.sasl_mechanism or "PLAIN"
            password = None if auth.password is None else auth.password.get_secret_value()
        else:
            parts = urlsplit(self.url)
            username, mechanism = parts.username, "PLAIN"
            password = None if parts.password is None else unquote(parts.password)
            username = None if username is None else unquote(username)
        if username is not None:
            args["security_protocol"] = "SASL_SSL" if self.tls else "SASL_PLAINTEXT"
            args["sasl_mechanism"] = mechanism
            args["sasl_plain_username"] = username
            args["sasl_plain_password"] = password or ""
        return args

    def _producer_for(self, idempotent: bool) -> AIOKafkaProducer:
        o = self.opts
        return AIOKafkaProducer(
            bootstrap_servers=self.servers,
            client_id=o.client_id,
            acks="all",
            enable_idempotence=idempotent,
            max_request_size=o.max_request_size,
            max_batch_size=min(o.max_batch_size, o.max_request_size),
            linger_ms=o.linger_ms,
            compression_type=None if o.compression == "none" else o.compression,
            request_timeout_ms=o.request_timeout_ms,
            metadata_max_age_ms=o.metadata_max_age_ms,
            **self.client_security(),
        )

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = self._producer_for(self.idempotent)
        try:
            with _codec.producer_level(self.opts.compression_level):
                await producer.start()
        except KafkaError as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            if isinstance(exc, _TRANSIENT) or not self.idempotent:
                raise
            if self.opts.idempotence == "true":
                raise ConnectError(
                    f"broker {self.name} ({self.safe_url}): idempotent producer refused: "
                    f"{self.security.scrub(repr(exc))}"
                ) from exc
            # The broker refused InitProducerId (Tansu does): acks=all without idempotence.
            self.log.warning(
                "broker %s refused the idempotent producer (%r); using acks=all without it",
                self.name,
                exc,
            )
            self.idempotent = False
            producer = self._producer_for(False)
            try:
                with _codec.producer_level(self.opts.compression_level):
                    await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
        return producer

    async def connect(self) -> None:
        if self.producer is not None:
            return
        self._state = ConnState.CONNECTING
        delays = self.backoff.delays()
        failures = 0
        while True:
            try:
                self.producer = await self._start_producer()
                break
            except (KafkaError, OSError) as exc:
                failures += 1
                self._state = ConnState.DISCONNECTED
                self._detail = cause = describe(exc, self.security)
                if isinstance(exc, KafkaConnectionError):
                    # aiokafka only says it could not bootstrap: ask the socket why.
                    cause = await self._bootstrap_cause() or cause
                attempts = self.backoff.attempts
                delay = await anext(delays, None)
                if delay is None or (attempts is not None and failures >= attempts):
                    raise ConnectError(f"broker {self.name} ({self.safe_url}): {cause}") from exc
                self.log.warning(
                    "broker %s: connect failed (%s); retry in %.1fs", self.name, cause, delay
                )
                await asyncio.sleep(delay)
        self._state = ConnState.CONNECTED
        self._detail = ""
        self._monitor = asyncio.create_task(self._watch(), name=f"kafka-health-{self.name}")

    async def _bootstrap_cause(self) -> str | None:
        """Why the first bootstrap address does not answer (refused, unknown host, timeout),
        or None when a plain TCP connection works (then the Kafka handshake is the problem)."""
        first = self.servers[0]
        host, _, port = first.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 3.0)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            return f"cannot reach {first}: {reason}"
        writer.close()
        return None

    async def _broker_up(self, producer: AIOKafkaProducer) -> bool:
        client = producer.client
        nodes = [b.nodeId for b in client.cluster.brokers()]
        for node in nodes:
            if await client.ready(node):
                return True
        if not nodes:
            return bool(await client.force_metadata_update())
        return False

    async def _watch(self) -> None:
        """aiokafka reconnects on demand; this keeps one connection tried (with backoff) so
        health() tells the truth while idle too."""
        delays = self.backoff.delays()
        while self.producer is not None and not self._closed:
            try:
                up = await self._broker_up(self.producer)
            except Exception as exc:
                up = False
                self._detail = repr(exc)
            if up:
                if self._state is ConnState.DISCONNECTED:
                    # Topics may have gone meanwhile (deleted, or a broker without storage):
                    # check again before the next send instead of trusting the cache.
                    self._known.clear()
                    with contextlib.suppress(KafkaError, OSError):
                        await self.producer.client.force_metadata_update()
                    self._reconnects += 1
                    self.log.info("broker %s: connected again", self.name)
                self._state = ConnState.CONNECTED
                self._detail = ""
                delays = self.backoff.delays()
                await asyncio.sleep(0.5)
                continue
            if self._state is ConnState.CONNECTED:
                self.log.warning("broker %s: no connection to any broker", self.name)
                self._detail = self._detail or "no connection to any broker"
            self._state = ConnState.DISCONNECTED
            await asyncio.sleep(await anext(delays, self.backoff.maximum))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(s.close() for s in list(self.sources)), return_exceptions=True)
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self.producer is not None:
            # stop() flushes what is queued; bounded so a dead broker cannot hang close.
            try:
                await asyncio.wait_for(self.producer.stop(), self.opts.request_timeout_ms / 1000)
            except TimeoutError:
                self.log.warning("broker %s: close timed out with sends pending", self.name)
        if self._admin is not None:
            await self._admin.close()
        self._state = ConnState.CLOSED
        self._detail = "closed"

    def counters(self) -> dict[str, int]:
        return {
            "unconfirmed_failures": self.unconfirmed_failures,
            "corrupt_batches": self.corrupt_batches,
        }

    def health(self) -> Health:
        return Health(
            self._state,
            self._detail,
            self._reconnects,
            subscribed=all(s.assigned for s in self.sources),
        )

    def max_payload(self) -> int | None:
        return self.opts.max_request_size

    # -- source -------------------------------------------------------------------------

    def subscribe(self, sub: Subscription) -> AsyncGenerator[list[Delivery], None]:
        return self._deliveries(sub)

    async def _deliveries(self, sub: Subscription) -> AsyncGenerator[list[Delivery], None]:
        if self._closed:
            return
        source = _Source(self, sub)
        self.sources.add(source)
        try:
            async for batch in source.deliveries():
                yield batch
        finally:
            await source.close()

    # -- target -------------------------------------------------------------------------

    async def _missing_topics(self, producer: AIOKafkaProducer, topics: list[str]) -> set[str]:
        # allow_auto_topic_creation=False: asking must not create (brokers default to create).
        client = producer.client
        node = client.get_random_node()
        response = await client.send(node, MetadataRequest(topics, False))
        missing = set()
        for entry in response.to_object()["topics"]:
            if entry["error_code"] == _UNKNOWN_TOPIC:
                missing.add(entry["topic"])
            elif entry["error_code"] == 0:
                self._known.add(entry["topic"])
        return missing

    async def _create(self, topics: set[str]) -> dict[str, str]:
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(
                bootstrap_servers=self.servers,
                client_id=self.opts.client_id,
                request_timeout_ms=self.opts.request_timeout_ms,
                **self.client_security(),
            )
            await self._admin.start()
        new = [NewTopic(t, self.opts.partitions, self.opts.replication_factor) for t in topics]
        response = await self._admin.create_topics(new)
        failed = {}
        for entry in response.topic_errors:
            topic, code = entry[0], entry[1]
            if code in (0, _TOPIC_EXISTS):
                self._known.add(topic)
                self.log.info("broker %s: created topic %s", self.name, topic)
            else:
                failed[topic] = f"cannot create topic {topic!r}: error {code} {entry[-1] or ''}"
        return failed

    async def _ensure_topics(self, producer: AIOKafkaProducer, topics: set[str]) -> dict[str, str]:
        """Topics of the batch that cannot be used, with the reason."""
        bad = {t: "invalid Kafka topic name" for t in topics if not _TOPIC_NAME.fullmatch(t)}
        ask = sorted(topics - bad.keys())
        if not ask:
            return bad
        missing = await self._missing_topics(producer, ask)
        if not missing:
            return bad
        if not self.opts.create_topics:
            bad.update((t, "unknown topic (create_topics is off)") for t in missing)
            return bad
        bad.update(await self._create(missing))
        # The producer may hold stale partitions of a topic that was just (re)created.
        await producer.client.force_metadata_update()
        return bad

    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        producer = self.producer
        if producer is None or self._closed:
            raise PublishError(f"broker {self.name}: not connected", retriable=True)
        if self._state is ConnState.DISCONNECTED:
            raise PublishError(f"broker {self.name} unreachable: {self._detail}", retriable=True)
        opts = options if isinstance(options, KafkaTargetOptions) else self._default_target
        known = self._known
        unknown = {m.topic for m in messages if m.topic not in known}
        refused: dict[str, str] = {}
        if unknown:
            try:
                refused = await self._ensure_topics(producer, unknown)
            except _TRANSIENT as exc:
                raise PublishError(f"broker {self.name}: {exc!r}", retriable=True) from exc
            except KafkaError as exc:
                raise PublishError(
                    f"broker {self.name}: topic lookup: {exc!r}", retriable=exc.retriable
                ) from exc
        results: list[PublishError | None] | None = None
        n = len(messages)
        # Records go out as whole batches per partition (aiokafka's per-record send costs a
        # coroutine, a future and a partitioner call each), in order within each partition.
        groups: dict[tuple[str, int], list[int]] = {}
        fixed = opts.partition
        limit = self.opts.max_request_size
        counts: dict[str, int] = {}
        encoded: list[list[tuple[str, bytes]]] = [_NO_HEADERS] * n
        # Consecutive records of one topic and key (a route's usual stream) share their
        # partition and group: looked up once per run.  Records without a key stay on one
        # partition per call, as the Java client's sticky partitioner keeps them per batch.
        last: tuple[str, bytes | None] | None = None
        members: list[int] = []
        for i, m in enumerate(messages):
            topic = m.topic
            if refused and topic in refused:
                results = results or [None] * n
                results[i] = PublishError(f"kafka {topic!r}: {refused[topic]}", retriable=False)
                continue
            headers, hsize = self._headers(m)
            size = len(m.payload) + len(m.key or b"") + _RECORD_OVERHEAD + hsize
            if size > limit:
                results = results or [None] * n
                results[i] = PublishError(
                    f"kafka {topic!r}: record of about {size} bytes over max_request_size {limit}",
                    retriable=False,
                )
                continue
            encoded[i] = headers
            if last is None or topic != last[0] or m.key != last[1]:
                nparts = counts.get(topic)
                if nparts is None:
                    try:
                        nparts = counts[topic] = len(await producer.partitions_for(topic))
                    except (KafkaError, *_TRANSIENT) as exc:
                        raise PublishError(f"broker {self.name}: {exc!r}", retriable=True) from exc
                if fixed is not None:
                    if fixed >= nparts:
                        results = results or [None] * n
                        results[i] = PublishError(
                            f"kafka {topic!r}: no partition {fixed} (it has {nparts})",
                            retriable=False,
                        )
                        continue
                    part = fixed
                else:
                    part = self._partition(topic, m.key, nparts)
                members = groups.setdefault((topic, part), [])
                last = (topic, m.key)
            members.append(i)
        sent: list[tuple[list[int], asyncio.Future[Any]]] = []
        try:
            for (topic, part), members in groups.items():
                if len(members) <= _SMALL_RUN:
                    for i in members:
                        m = messages[i]
                        ts = None if m.timestamp is None else round(m.timestamp * 1000)
                        fut = await producer.send(
                            topic, m.payload, m.key, part, ts, encoded[i] or None
                        )
                        sent.append(([i], fut))
                    continue
                builder = producer.create_batch()
                batch: list[int] = []
                for i in members:
                    m = messages[i]
                    ts = None if m.timestamp is None else round(m.timestamp * 1000)
                    headers = encoded[i]
                    if (
                        builder.append(key=m.key, value=m.payload, timestamp=ts, headers=headers)
                        is None
                    ):
                        # Full: send it and start the next (the first record always fits).
                        fut = await producer.send_batch(builder, topic, partition=part)
                        sent.append((batch, fut))
                        builder = producer.create_batch()
                        batch = []
                        builder.append(key=m.key, value=m.payload, timestamp=ts, headers=headers)
                    batch.append(i)
                sent.append((batch, await producer.send_batch(builder, topic, partition=part)))
        except (KafkaError, *_TRANSIENT) as exc:
            if not sent:
                raise PublishError(f"broker {self.name}: {exc!r}", retriable=True) from exc
            # Batches already handed over are tracked below; the rest may be retried.
            queued = {i for batch, _ in sent for i in batch}
            results = results or [None] * n
            for members in groups.values():
                for i in members:
                    if i not in queued:
                        results[i] = PublishError(
                            f"kafka {messages[i].topic!r}: {exc!r}", retriable=True
                        )
        if not confirm:
            for _, fut in sent:
                fut.add_done_callback(self._report_late)
            return results
        if sent:
            await asyncio.wait([f for _, f in sent])
        failed = 0
        for batch, fut in sent:
            err = fut.exception()
            if err is None:
                continue
            failed += len(batch)
            results = results or [None] * n
            retriable = isinstance(err, _TRANSIENT) or bool(getattr(err, "retriable", False))
            for i in batch:
                results[i] = PublishError(
                    f"kafka {messages[i].topic!r}: {err!r}", retriable=retriable
                )
        if (
            results is not None
            and failed == n
            and all(r is not None and r.retriable for r in results)
        ):
            raise PublishError(
                f"broker {self.name}: nothing confirmed: {results[0]}", retriable=True
            )
        return results

    def _partition(self, topic: str, key: bytes | None, nparts: int) -> int:
        """The default partitioner's choice (murmur2 of the key, as the Java client), cached
        per key: a route's keys are its topics, a handful that repeat."""
        if key is None:
            return random.randrange(nparts)
        cached = self._partitions.get((topic, key))
        if cached is not None and cached[0] == nparts:
            return cached[1]
        part = (int(murmur2(key)) & 0x7FFFFFFF) % nparts
        if len(self._partitions) >= _CACHE_MAX:
            self._partitions.clear()
        self._partitions[(topic, key)] = (nparts, part)
        return part

    def _headers(self, m: Message) -> tuple[list[tuple[str, bytes]], int]:
        """Record headers and about what they add to a record; a header list shared by many
        messages is encoded (and measured) once."""
        h = m.headers
        if h is None or (
            m.content_type is not None
            or m.correlation_id is not None
            or m.reply_to is not None
            or m.message_id is not None
        ):
            return _sized(_record_headers(m) or [])
        encoded = self._header_cache.get(h)
        if encoded is None:
            encoded = self._header_cache.put(h, _sized(_record_headers(m) or []))
        return encoded

    def _report_late(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is None:
            return
        self.unconfirmed_failures += 1
        self.log.error("broker %s: unconfirmed send failed: %r", self.name, fut.exception())
