"""The bridge engine: one task per route, one connection per broker.

A route takes a batch from its source, computes each target's name once per message,
publishes one batch per target, dead-letters what a target refuses, and only then acks the
batch (at-least-once) -- so the source's own unacked window is the backpressure and no
queue in between can grow.  Order is kept because a route never has two batches in flight.

Loops: every message the bridge publishes where the target has headers carries
``flowbridge-via: <bridge id> <topic>``; a route drops (and acks) a message that arrives on
the very topic its own via header names.
Where the target has no headers (MQTT 3.1.1) the engine remembers, for a short while, what it
published to a topic that one of its own routes subscribes to, and that route drops exactly
that many copies when they come back.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowbridge.adapters.base import (
    Adapter,
    ConnState,
    Headers,
    Incoming,
    Message,
    Options,
    PublishOutcome,
)
from flowbridge.config import Config, DeadLetter, Route, Target
from flowbridge.envelope import EnvelopeError
from flowbridge.envelope_route import looks_like_envelope, offload, transform, translate_reply_to
from flowbridge.errors import ConfigError, FlowbridgeError, PublishError, TopicError
from flowbridge.fileserver import FileServer, FileServerError, from_url
from flowbridge.security import redact_url
from flowbridge.template import Template
from flowbridge.topics import MULTI, SINGLE, Filter, parse_topic, translate_topic

log = logging.getLogger("flowbridge.engine")

VIA = "flowbridge-via"
SOURCE_PROTOCOL = "flowbridge-source-protocol"
SOURCE_TOPIC = "flowbridge-source-topic"
DEAD_REASON = "flowbridge-dead-reason"
DEAD_ROUTE = "flowbridge-dead-route"
_OWN = frozenset((SOURCE_PROTOCOL, SOURCE_TOPIC))

SHUTDOWN_GRACE = 10.0
_PLANS_MAX = 65536  # per target: source topics whose target name and headers are cached


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass
class RouteStats:
    """Counters of one route, read by the metrics endpoint and the status page."""

    received: int = 0
    forwarded: int = 0  # messages accepted by a target (one per target)
    bytes_in: int = 0
    bytes_out: int = 0
    forwarded_to: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_to: collections.Counter[str] = field(default_factory=collections.Counter)  # by broker
    echo_suppressed: int = 0
    offloaded: int = 0  # too large for a target: sent as a link envelope via the file server
    filtered: int = 0  # '$' topics a leading wildcard must not match
    dead_lettered: collections.Counter[str] = field(default_factory=collections.Counter)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: int = 0
    in_flight: int = 0
    # Forwarding latency (batch taken from the source -> every target confirmed), per message.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float, n: int) -> None:
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        self.latency_counts[i] += n
        self.latency_sum += seconds * n


class EchoGuard:
    """What the bridge published to header-less brokers, awaited back on its own routes.

    Bounded: entries expire after ``ttl`` seconds and the oldest go when ``limit`` is hit."""

    def __init__(self, ttl: float = 30.0, limit: int = 100_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._counts: dict[tuple[str, str, int], int] = {}
        self._order: collections.deque[tuple[float, tuple[str, str, int]]] = collections.deque()
        self.evicted = 0

    def expect(self, route: str, topic: str, payload: bytes) -> None:
        key = (route, topic, hash(payload))
        self._counts[key] = self._counts.get(key, 0) + 1
        self._order.append((time.monotonic() + self.ttl, key))
        self._expire()

    def consume(self, route: str, topic: str, payload: bytes) -> bool:
        if not self._counts:
            return False
        key = (route, topic, hash(payload))
        n = self._counts.get(key)
        if not n:
            return False
        if n == 1:
            del self._counts[key]
        else:
            self._counts[key] = n - 1
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        order = self._order
        while order and (order[0][0] < now or len(order) > self.limit):
            deadline, key = order.popleft()
            n = self._counts.get(key)
            if n:
                if deadline >= now:
                    self.evicted += 1
                if n == 1:
                    del self._counts[key]
                else:
                    self._counts[key] = n - 1


class _OnceLog:
    """Log a problem the first time it happens for a route; count the rest."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, level: int, route: str, kind: str, msg: str, *args: Any) -> None:
        if (route, kind) in self._seen:
            return
        self._seen.add((route, kind))
        log.log(level, msg + " (further ones are counted, not logged)", *args)


@dataclass
class _Target:
    spec: Target
    adapter: Adapter
    template: Template
    options: Options
    headers: bool
    keyed: bool
    watchers: list[tuple[str, Filter, str]]  # routes reading this broker without headers
    plans: dict[str, tuple[str, Headers, bytes | None]] = field(default_factory=dict)


class RouteRunner:
    def __init__(self, bridge: Bridge, route: Route) -> None:
        self.bridge = bridge
        self.route = route
        self.name = route.name
        self.source = bridge.adapters[route.source.broker]
        self.protocol = route.source.protocol
        self.confirm = route.durable
        self.depth = route.pipeline
        self.stats = RouteStats()
        levels = route.source.filter.levels
        # NATS and AMQP subscriptions cannot skip '$' topics themselves.
        self.dollar_guard = levels[0] in (SINGLE, MULTI) and self.protocol in ("nats", "amqp")
        self.guard_echo = not self.source.supports_headers
        self.targets = [
            _Target(
                spec=t,
                adapter=bridge.adapters[t.broker],
                template=t.template,
                options=t.options,
                headers=bridge.adapters[t.broker].supports_headers,
                keyed=t.protocol == "kafka",
                watchers=bridge.watchers(t.broker),
            )
            for t in route.targets
        ]
        via = bridge.config.bridge.id
        # "<bridge id> <topic it was published to>": an echo comes back on that very topic,
        # while a reply whose sender copied the request's headers (nats-py's respond() does)
        # arrives elsewhere and is forwarded.
        self.via = via + " "
        self.envelope = route.envelope
        self.envelope_args = {
            "payload_type": route.envelope.payload_type,
            "dataname": route.envelope.dataname,
            "sender_name": route.envelope.sender_name,
        }
        dl = route.dead_letter
        self.dead_letter: DeadLetter | None = dl
        self.dead_adapter = bridge.adapters[dl.broker] if dl else None

    def refresh(self) -> None:
        """Recompute what depends on other routes (after a reload)."""
        for t in self.targets:
            t.watchers = self.bridge.watchers(t.spec.broker)

    def describe(self) -> str:
        parts = [
            f"{t.spec.broker} ({t.spec.protocol}"
            + (f", topic {t.spec.topic!r})" if t.spec.topic else ")")
            for t in self.targets
        ]
        return (
            f"route {self.name}: {self.route.source.broker} ({self.protocol}) subscribes "
            f"{list(self.route.source.subscriptions)} -> {', '.join(parts)} [{self.route.delivery}]"
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.bridge.connected(self.route)
        log.info("%s", self.describe())
        batches = self.source.subscribe(self.route.subscription(self.stats.dropped))
        # The batch is awaited directly (no task and wait per batch: small batches come
        # often); a stop interrupts only that wait, never a batch being forwarded.
        task = asyncio.current_task()
        assert task is not None
        waiting = [False]

        def interrupt(_: object) -> None:
            # Cancelling the wait would run the source iterator's cleanup before ``drain``
            # could take what it holds: a source that can end the wait itself does.
            if waiting[0] and not self.source.interrupt(self.name):
                task.cancel(_STOP)

        def failed(t: asyncio.Task[None]) -> None:
            # A pipelined batch that raised ends the route now, not when the next batch comes.
            if waiting[0] and not t.cancelled() and t.exception() is not None:
                task.cancel(_FAILED)

        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(interrupt)
        piped: collections.deque[asyncio.Task[None]] = collections.deque()  # oldest first
        try:
            while not stop.is_set():
                waiting[0] = True
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError as exc:
                    if (stop.is_set() and exc.args == (_STOP,)) or exc.args == (_FAILED,):
                        task.uncancel()
                        break  # a failed batch raises below
                    raise
                finally:
                    waiting[0] = False
                if not batch:
                    continue
                if self.depth == 1:
                    await self.handle(batch, stop)
                    continue
                # Pipelined: this batch is written while those before it wait for their
                # confirms; each acks only after the one before it did.
                after = piped[-1] if piped else None
                piped.append(asyncio.create_task(self.handle(batch, stop, after)))
                piped[-1].add_done_callback(failed)
                while piped and (len(piped) >= self.depth or piped[0].done()):
                    await piped.popleft()
            while piped:
                await piped.popleft()
            if self.confirm:
                # What the source already received goes out too, so a restart or reload
                # resumes where this left off, in order.
                rest = await self.source.drain(self.name)
                if rest:
                    await self.handle(rest, stop)
        finally:
            for t in piped:  # only left when the route failed
                t.cancel()
            stopping.remove_done_callback(interrupt)
            stopping.cancel()
            with contextlib.suppress(Exception):
                await batches.aclose()

    async def handle(
        self,
        batch: Sequence[Incoming],
        stop: asyncio.Event | None = None,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """Forward one batch; returns once every message is delivered or dead-lettered, then
        acks the batch (after the batch ``after`` was acked: sources take acks in order)."""
        st = self.stats
        started = time.monotonic()
        n = len(batch)
        st.received += n
        st.in_flight += n
        dead: list[tuple[int, str, str]] = []  # (batch index, target, reason)
        via = self.via
        # Checks most routes never need, decided once per batch.
        env_mode = self.envelope.mode
        screen = self.guard_echo or self.dollar_guard or env_mode not in ("off", "auto")
        auto = env_mode == "auto"  # the default: only a body that opens with '{' is looked at
        msgs: list[Message] = []  # what goes on to the targets, in batch order
        kept: list[int] | None = None  # their batch indices, once one was held back
        nbytes = 0
        acks = False  # whether any delivery has an ack (a message alone has none)
        for i, d in enumerate(batch):
            if type(d) is Message:
                m = d
            else:
                m = d.message
                acks = True
            payload = m.payload
            nbytes += len(payload)
            headers = m.headers
            if headers is not None and (VIA, via + m.topic) in headers:
                st.echo_suppressed += 1
                passed = None
            else:
                look = screen or (auto and payload and payload[0] == 123)  # '{'
                passed = self._screen(i, m, dead) if look else m
            if passed is None:
                if kept is None:
                    kept = list(range(i))
                continue
            if kept is not None:
                kept.append(i)
            msgs.append(passed)
        st.bytes_in += nbytes
        sends = []
        for t in self.targets:
            out, index = self._outgoing(t, msgs, kept, dead)
            if self.bridge.fileserver is not None:
                out, index = await self._offload(t, out, index, dead)
            if out:
                sends.append(self._publish(t, out, index, dead, stop))
        held = False  # a target given up at shutdown: the batch stays unacked, redelivered
        if len(sends) == 1:
            held = await sends[0]  # no task per target: one loop turn less per batch
        elif sends:
            held = any(await asyncio.gather(*sends))
        if dead:
            held = await self._dead_letter(batch, dead, stop) or held
        if after is not None:
            await after
        if acks and not held:
            for d in batch:
                d.ack()
        st.in_flight -= n
        st.observe(time.monotonic() - started, n)

    def _screen(self, i: int, m: Message, dead: list[tuple[int, str, str]]) -> Message | None:
        """Echoes of header-less brokers, '$' topics a leading wildcard must not match and
        envelope handling; None when the message goes no further (counted)."""
        st = self.stats
        if self.guard_echo and self.bridge.echo.consume(self.name, m.topic, m.payload):
            st.echo_suppressed += 1
            return None
        if self.dollar_guard and m.topic.startswith("$"):
            st.filtered += 1
            return None
        env_mode = self.envelope.mode
        if env_mode != "off" and (env_mode != "auto" or m.payload.startswith(b"{")):
            try:
                return transform(m, env_mode, **self.envelope_args)
            except EnvelopeError as exc:
                dead.append((i, "envelope", f"not a valid envelope: {exc}"))
                return None
        return m

    def _outgoing(
        self,
        t: _Target,
        msgs: list[Message],
        kept: list[int] | None,
        dead: list[tuple[int, str, str]],
    ) -> tuple[list[Message], list[int] | None]:
        """The messages for one target, and their batch indices when they are not simply
        0..n-1 (None)."""
        out: list[Message] = []
        plans = t.plans
        index: list[int] | None = None
        carries = t.headers
        protocol = self.protocol
        cross = t.spec.protocol != protocol
        envelopes = self.envelope.mode != "off"
        # A batch is mostly runs of one topic: its plan is looked up once per run.
        last: str | None = None
        name = ""
        own: Headers = []
        key: bytes | None = None
        for k, m in enumerate(msgs):
            topic = m.topic
            if topic is not last:
                plan = plans.get(topic)
                if plan is None:
                    try:
                        plan = self._plan(t, topic)
                    except TopicError as exc:
                        i = kept[k] if kept is not None else k
                        dead.append((i, t.spec.broker, f"topic not representable: {exc}"))
                        if index is None:
                            index = kept[:k] if kept is not None else list(range(k))
                        last = None
                        continue
                last = topic
                name, own, key = plan
            if not carries:
                out.append(Message(name, m.payload, None, retain=m.retain))
            else:
                headers = m.headers
                reply = m.reply_to
                payload = m.payload
                # A message without headers shares the plan's list: adapters never change a
                # message's headers, and can cache their encoding.
                mine = own if not headers else [*(h for h in headers if h[0] not in _OWN), *own]
                if reply is not None and cross:
                    reply = self._reply_name(reply, t.spec.protocol)
                    if envelopes and looks_like_envelope(payload):
                        payload = translate_reply_to(payload, protocol, t.spec.protocol)
                out.append(
                    Message(
                        name,
                        payload,
                        mine,
                        m.content_type,
                        m.correlation_id,
                        reply,
                        m.message_id,
                        m.timestamp,
                        key if m.key is None else m.key,
                        m.retain,
                    )
                )
            if index is not None:
                index.append(kept[k] if kept is not None else k)
        return out, (index if index is not None else kept)

    async def _offload(
        self,
        t: _Target,
        out: list[Message],
        index: list[int] | None,
        dead: list[tuple[int, str, str]],
    ) -> tuple[list[Message], list[int] | None]:
        """Messages larger than the target takes go as link envelopes via the file server."""
        limit = t.adapter.max_payload()
        fileserver = self.bridge.fileserver
        if limit is None or fileserver is None or not any(len(m.payload) > limit for m in out):
            return out, index
        sent: list[Message] = []
        where: list[int] = []
        for k, m in enumerate(out):
            i = index[k] if index is not None else k
            link = m
            if len(m.payload) > limit:
                try:
                    link = await offload(m, limit, fileserver)
                except (EnvelopeError, FileServerError) as exc:
                    dead.append((i, t.spec.broker, f"too large, offload failed: {exc}"))
                    continue
                self.stats.offloaded += 1
            sent.append(link)
            where.append(i)
        return sent, where

    def _plan(self, t: _Target, topic: str) -> tuple[str, Headers, bytes | None]:
        """What a source topic becomes on a target: its name there, the bridge's own headers
        for it, and the Kafka key (the real topic, never the route's filter).  Computed once
        per topic; raises TopicError when the target cannot name it."""
        name = t.template.render_native(topic)
        own: Headers = [
            (VIA, self.via + name),
            (SOURCE_PROTOCOL, self.protocol),
            (SOURCE_TOPIC, topic),
        ]
        plan = (name, own, topic.encode() if t.keyed else None)
        if len(t.plans) >= _PLANS_MAX:
            t.plans.clear()
        t.plans[topic] = plan
        return plan

    def _reply_name(self, reply: str, target: str) -> str | None:
        """A reply topic in the target's protocol, so a responder there answers somewhere a
        reverse route can carry back; None (counted) when the target cannot name it."""
        try:
            return translate_topic(reply, self.protocol, target)
        except TopicError:
            self.stats.dropped["reply-to not representable"] += 1
            return None

    async def _publish(
        self,
        t: _Target,
        msgs: list[Message],
        index: list[int] | None,
        dead: list[tuple[int, str, str]],
        stop: asyncio.Event | None,
    ) -> bool:
        """Publish to one target; True when an at-least-once batch was given up (shutdown)."""
        if t.watchers:
            self._expect_echoes(t, msgs)
        outcome = await self._send(t.adapter, msgs, t.options, t.spec.broker, stop)
        if outcome is _GAVE_UP:
            return self.confirm  # at-most-once, the drop was counted: nothing to hold
        st = self.stats
        broker = t.spec.broker
        if outcome is None:
            size = sum(len(m.payload) for m in msgs)
            st.forwarded += len(msgs)
            st.bytes_out += size
            st.forwarded_to[broker] += len(msgs)
            st.bytes_to[broker] += size
            return False
        assert isinstance(outcome, Sequence)
        for k, err in enumerate(outcome):
            if err is None:
                size = len(msgs[k].payload)
                st.forwarded += 1
                st.bytes_out += size
                st.forwarded_to[broker] += 1
                st.bytes_to[broker] += size
            else:
                dead.append((index[k] if index is not None else k, broker, err.reason))
        return False

    def _expect_echoes(self, t: _Target, msgs: list[Message]) -> None:
        echo = self.bridge.echo
        for m in msgs:
            for route, flt, protocol in t.watchers:
                try:
                    if flt.matches(parse_topic(m.topic, protocol)):
                        echo.expect(route, m.topic, m.payload)
                except TopicError:
                    continue

    async def _send(
        self,
        adapter: Adapter,
        msgs: list[Message],
        options: Options | None,
        broker: str,
        stop: asyncio.Event | None,
    ) -> PublishOutcome | object:
        """Publish, holding the route while the target is unreachable (at-least-once), or
        counting the batch as dropped (at-most-once)."""
        delay = 0.1
        while True:
            try:
                outcome = await adapter.publish(msgs, confirm=self.confirm, options=options)
            except (PublishError, ConnectionError, OSError, TimeoutError) as exc:
                reason = exc.reason if isinstance(exc, PublishError) else repr(exc)
                if not self.confirm:
                    self.stats.dropped[f"{broker} unavailable"] += len(msgs)
                    self.bridge.once(
                        logging.WARNING,
                        self.name,
                        f"drop:{broker}",
                        "route %s: %d message(s) dropped, %s unavailable: %s",
                        self.name,
                        len(msgs),
                        broker,
                        reason,
                    )
                    return _GAVE_UP
                if stop is not None and stop.is_set() and self.bridge.abandon.is_set():
                    return _GAVE_UP  # shutdown grace over: leave them unacked for redelivery
                self.stats.retries += 1
                self.bridge.once(
                    logging.WARNING,
                    self.name,
                    f"hold:{broker}",
                    "route %s: %s unavailable (%s); holding %d message(s) until it returns",
                    self.name,
                    broker,
                    reason,
                    len(msgs),
                )
                await self._pause(adapter, delay, stop)
                delay = min(delay * 2, 5.0)
                continue
            return outcome

    async def _pause(self, adapter: Adapter, delay: float, stop: asyncio.Event | None) -> None:
        """Wait before a retry: until the target is back (at most ``delay``), or ``delay``
        when it refused while connected; the end of a stop's grace period cuts it short."""
        wait: asyncio.Future[Any]
        if adapter.health().state is ConnState.CONNECTED:
            wait = asyncio.ensure_future(asyncio.sleep(delay))
        else:
            wait = asyncio.ensure_future(adapter.wait_connected(within=delay))
        waits = {wait}
        if stop is not None and stop.is_set():
            waits.add(asyncio.ensure_future(self.bridge.abandon.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _dead_letter(
        self,
        batch: Sequence[Incoming],
        dead: list[tuple[int, str, str]],
        stop: asyncio.Event | None,
    ) -> bool:
        """Count, log and dead-letter; True when the dead-letter publish was given up."""
        now = time.time()
        for i, target, reason in dead:
            kind = reason.split(":", 1)[0]
            self.stats.dead_lettered[kind] += 1
            self.bridge.recent_dead.append(
                DeadLetterRecord(now, self.name, batch[i].message.topic, target, reason)
            )
            self.bridge.once(
                logging.ERROR,
                self.name,
                f"dead:{target}:{kind}",
                "route %s: message on %r not delivered to %s: %s%s",
                self.name,
                batch[i].message.topic,
                target,
                reason,
                "" if self.dead_letter else " (no dead_letter configured: discarded)",
            )
        if self.dead_letter is None or self.dead_adapter is None:
            return False
        msgs = []
        for i, target, reason in dead:
            m = batch[i].message
            headers = list(m.headers or ())
            headers += [
                (DEAD_REASON, f"{target}: {reason}"),
                (DEAD_ROUTE, self.name),
                (SOURCE_PROTOCOL, self.protocol),
                (SOURCE_TOPIC, m.topic),
                (VIA, self.via + self.dead_letter.topic),
            ]
            msgs.append(
                Message(
                    self.dead_letter.topic,
                    m.payload,
                    headers,
                    m.content_type,
                    m.correlation_id,
                    None,
                    m.message_id,
                    m.timestamp,
                )
            )
        outcome = await self._send(self.dead_adapter, msgs, None, self.dead_letter.broker, stop)
        if outcome is _GAVE_UP:
            return self.confirm
        if isinstance(outcome, list) and any(outcome):
            n = sum(1 for e in outcome if e)
            self.stats.dropped["dead letter refused"] += n
            log.error("route %s: dead-letter target refused %d message(s)", self.name, n)
        return False


_GAVE_UP = object()
_STOP = "route stopping"  # the cancel message of a stop interrupting the wait for a batch
_FAILED = "pipelined batch failed"  # the same, for a pipelined batch that raised


class Bridge:
    """Every broker connection and route of one configuration; ``reload`` swaps in a new one
    without touching the routes it leaves unchanged."""

    def __init__(self, config: Config, adapters: Mapping[str, Adapter] | None = None) -> None:
        self.config = config
        self.adapters: dict[str, Adapter] = dict(adapters or {})
        self._add_adapters(config)
        self.echo = EchoGuard()
        self.once = _OnceLog()
        self.abandon = asyncio.Event()
        self.recent_dead: collections.deque[DeadLetterRecord] = collections.deque(maxlen=100)
        url = config.bridge.fileserver
        self.fileserver: FileServer | None = from_url(url) if url else None
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._runners: dict[str, RouteRunner] = {}
        self._route_stop: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed: asyncio.Future[BaseException] | None = None
        self.stopped_stats: dict[str, RouteStats] = {}  # of routes stopped (at exit: all)

    @property
    def runners(self) -> list[RouteRunner]:
        return list(self._runners.values())

    def _add_adapters(self, config: Config) -> None:
        for name, broker in config.brokers.items():
            if name not in self.adapters:
                self.adapters[name] = broker.adapter(
                    name, broker.url, broker.options, broker.backoff
                )

    def watchers(self, broker: str) -> list[tuple[str, Filter, str]]:
        """Routes that read ``broker`` where echoes cannot be recognised by header."""
        if self.adapters[broker].supports_headers:
            return []
        return [
            (r.name, r.source.filter, r.source.protocol)
            for r in self.config.routes
            if r.source.broker == broker
        ]

    async def connected(self, route: Route) -> None:
        await asyncio.gather(*(self._connecting[n] for n in _brokers_of(route)))

    def ready(self) -> tuple[bool, dict[str, str]]:
        """Every broker a route needs is connected and subscribed; per broker, what is not."""
        problems: dict[str, str] = {}
        for name in sorted(_used(self.config)):
            h = self.adapters[name].health()
            if not h.ok:
                problems[name] = h.detail or (
                    h.state.value
                    if not h.subscribed or h.state.value != "connected"
                    else "not subscribed"
                )
        return not problems, problems

    def _watch(self, task: asyncio.Task[None]) -> None:
        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self._failed is None or self._failed.done():
                return
            exc = t.exception()
            if exc is not None:
                self._failed.set_result(exc)

        task.add_done_callback(done)

    def _connect_all(self, names: set[str]) -> None:
        for name in names:
            if name not in self._connecting:
                task = asyncio.ensure_future(self._connect(name))
                self._watch(task)
                self._connecting[name] = task

    def _start_route(self, route: Route) -> None:
        runner = RouteRunner(self, route)
        stop = asyncio.Event()
        task = asyncio.ensure_future(runner.run(stop))
        self._watch(task)
        self._runners[route.name] = runner
        self._route_stop[route.name] = stop
        self._tasks[route.name] = task

    async def _stop_routes(self, names: list[str]) -> None:
        """Stop intake of these routes; in-flight batches finish within the grace period."""
        for name in names:
            self._route_stop[name].set()
        tasks = [self._tasks[name] for name in names]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
            if late:
                self.abandon.set()
                _, late = await asyncio.wait(late, timeout=2.0)
                for task in late:
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.abandon.clear()  # routes stopped later (a reload) get their own grace
        for name in names:
            self.stopped_stats[name] = self._runners[name].stats
            del self._runners[name], self._route_stop[name], self._tasks[name]

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, run every route until ``stop`` is set, then shut down gracefully."""
        self._failed = asyncio.get_running_loop().create_future()
        self._connect_all(_used(self.config))
        for route in self.config.routes:
            self._start_route(route)
        waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        failed: asyncio.Future[Any] = self._failed
        try:
            await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            try:
                await self._stop_routes(list(self._runners))
            finally:
                for task in self._connecting.values():
                    task.cancel()
                await asyncio.gather(
                    *(a.close() for a in self.adapters.values()), return_exceptions=True
                )
        if self._failed.done():
            raise self._failed.result()

    async def reload(self, new: Config) -> list[str]:
        """Swap in ``new``: routes and brokers that did not change keep running untouched;
        the rest are stopped (in-flight batches finish) and started again.  Returns what
        changed, for the log."""
        old = self.config
        changed_brokers = {
            n
            for n, b in old.brokers.items()
            if n not in new.brokers or _broker_key(b) != _broker_key(new.brokers[n])
        }
        new_routes = {r.name: r for r in new.routes}
        stop = [
            r.name
            for r in old.routes
            if r.name not in new_routes
            or _route_key(r) != _route_key(new_routes[r.name])
            or _brokers_of(r) & changed_brokers
        ]
        await self._stop_routes(stop)
        for name in changed_brokers:
            task = self._connecting.pop(name, None)
            if task:
                task.cancel()
            adapter = self.adapters.pop(name, None)
            if adapter is not None:
                await adapter.close()
        self.config = new
        url = new.bridge.fileserver
        self.fileserver = from_url(url) if url else None
        self._add_adapters(new)
        self._connect_all(_used(new))
        started = [r.name for r in new.routes if r.name not in self._runners]
        for route in new.routes:
            if route.name in started:
                self._start_route(route)
        for runner in self._runners.values():
            runner.refresh()
        for name in set(self.adapters) - set(new.brokers):
            await self.adapters.pop(name).close()
        changes = [f"stopped {n}" for n in stop if n not in new_routes]
        changes += [f"restarted {n}" for n in stop if n in new_routes]
        changes += [f"started {n}" for n in started if n not in stop]
        changes += [f"reconnected {n}" for n in sorted(changed_brokers & set(new.brokers))]
        return changes

    async def _connect(self, name: str) -> None:
        adapter = self.adapters[name]
        await adapter.connect()
        log.info("broker %s connected (%s)", name, redact_url(adapter.url))

    def stats(self) -> dict[str, RouteStats]:
        return {name: r.stats for name, r in self._runners.items()}


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    time: float
    route: str
    topic: str
    target: str
    reason: str


def _brokers_of(route: Route) -> set[str]:
    names = {route.source.broker, *(t.broker for t in route.targets)}
    if route.dead_letter:
        names.add(route.dead_letter.broker)
    return names


def _used(config: Config) -> set[str]:
    used: set[str] = set()
    for r in config.routes:
        used |= _brokers_of(r)
    return used


def _broker_key(b: Any) -> tuple[Any, ...]:
    return (b.url, b.protocol, b.options, b.backoff)


def _route_key(r: Route) -> tuple[Any, ...]:
    s = r.source
    return (
        s.broker,
        s.filter_text,
        s.group,
        s.options,
        tuple((t.broker, t.topic, t.options) for t in r.targets),
        r.delivery,
        r.max_in_flight,
        r.dead_letter,
        r.envelope,
        r.pipeline,
    )


# ---------------------------------------------------------------------------------------------
# flowbridge run


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json  # noqa: PLC0415

        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries log every reconnect attempt with tracebacks; the adapters log one line.
    for noisy in ("aiokafka", "nats", "aiormq", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def default_mapping() -> str:
    from pathlib import Path  # noqa: PLC0415

    path = Path(__file__).resolve().parent.parent / "mappings" / "default.yaml"
    if not path.exists():
        raise FlowbridgeError(f"default mapping not found at {path}; pass -c FILE")
    return str(path)


def run_cli(args: Any) -> int:
    """``flowbridge run``: returns the process exit code."""
    setup_logging(args.log_level, args.log_format)
    try:
        import uvloop  # noqa: PLC0415

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_run(args))
    except ConfigError:
        raise
    except FlowbridgeError as exc:  # expected failures: one clear line, no traceback
        log.error("%s", exc)  # noqa: TRY400
        return 1


async def _run(args: Any) -> int:
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from flowbridge.config import load  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        files = list(args.config)
        environ = dict(os.environ)
        if not files:
            from flowbridge.embedded import embedded_brokers  # noqa: PLC0415

            brokers = await stack.enter_async_context(
                embedded_brokers(nats_port=args.nats_port or 4222, mqtt_port=args.mqtt_port or 1883)
            )
            environ["FLOWBRIDGE_NATS_URL"] = brokers.nats_url
            environ["FLOWBRIDGE_MQTT_URL"] = brokers.mqtt_url
            files = [default_mapping()]
            print(
                f"flowbridge: embedded brokers ready -- NATS {brokers.nats_url}, "
                f"MQTT {brokers.mqtt_url}; bridging every topic both ways (Ctrl-C to stop)",
                flush=True,
            )
        config = load(files, environ=environ)
        bridge = Bridge(config)
        # Everything built so far lives for the whole run: keep the collector off it, and let
        # the per-message objects pile up longer between young-generation passes.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 50)
        if getattr(args, "http", None):
            from flowbridge.ops import serve  # noqa: PLC0415  (prometheus-client only when asked)

            # Up before the brokers connect: /healthz answers and /readyz says what is missing.
            await stack.enter_async_context(serve(bridge, args.http, stopping=stop))
        reloads: set[asyncio.Task[None]] = set()

        def reload() -> None:
            task = asyncio.ensure_future(_reload(bridge, files, environ))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        watcher = asyncio.ensure_future(_watch(files, reload)) if args.watch else None
        try:
            await bridge.run(stop)
        finally:
            if watcher is not None:
                watcher.cancel()
        for name, st in bridge.stopped_stats.items():
            log.info(
                "route %s: received %d, forwarded %d, echoes suppressed %d, dead-lettered %d, "
                "dropped %d",
                name,
                st.received,
                st.forwarded,
                st.echo_suppressed,
                sum(st.dead_lettered.values()),
                sum(st.dropped.values()),
            )
    return 0


async def _reload(bridge: Bridge, files: list[str], environ: Mapping[str, str]) -> None:
    """Load the mapping files again and apply them; a file with errors changes nothing."""
    from flowbridge.config import load  # noqa: PLC0415

    try:
        config = load(files, environ=environ)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload rejected, the running routes stay: %s", problem)  # noqa: TRY400
        return
    changes = await bridge.reload(config)
    log.info("reloaded %s: %s", ", ".join(files), "; ".join(changes) or "nothing changed")


async def _watch(files: list[str], reload: Any, every: float = 1.0) -> None:
    """``--watch``: reload when a mapping file's modification time or size changes."""
    import os  # noqa: PLC0415

    def state() -> list[tuple[float, int] | None]:
        out: list[tuple[float, int] | None] = []
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime, st.st_size))
        return out

    last = state()
    while True:
        await asyncio.sleep(every)
        now = state()
        if now != last:
            last = now
            reload()
