"""MQTT 3.1.1 / 5 adapter on the native client in ``_mqtt_wire``.

One connection per broker serves every route.  Received QoS 1/2 messages are acked (PUBACK /
PUBREC) only when the route acks the delivery, always in the order the broker sent them, as
MQTT requires.  With MQTT 5 each route's subscription carries its own Subscription
Identifier (so messages are routed without matching topics) and No Local (so the bridge
never receives what it published itself).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import socket
import time
import zlib
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator

from flowbridge.adapters import _mqtt_wire as w
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
from flowbridge.errors import ConnectError, PublishError
from flowbridge.security import SecuredOptions, describe, security_of, tls_for

# Deliveries received for no registered route (e.g. a persistent session's backlog that
# arrives before the routes subscribed) wait this long for their route, then are acked and
# reported; at most this many wait.
ORPHAN_GRACE = 10.0
ORPHAN_LIMIT = 10_000
# Reading stops at a route's max_in_flight unless one of our own requests (a publish waiting
# for its PUBACK) needs the socket read; at this multiple it stops regardless.
HARD_FACTOR = 4
# Topics whose matching routes are remembered (filters are matched once per topic).
MATCH_CACHE = 10_000


class MqttBrokerOptions(SecuredOptions):
    version: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None  # default: stable per host and broker name
    keepalive: Annotated[int, Field(ge=0, le=65535)] = 30
    clean_start: bool = False  # False keeps the session (subscriptions, queued messages)
    session_expiry: Annotated[int, Field(ge=0)] = 3600  # MQTT 5: seconds the session outlives us
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 1000  # MQTT 5: unacked deliveries
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    # Our unconfirmed QoS 1/2 publishes at a time.  MQTT 5 brokers announce theirs; 3.1.1
    # cannot, and Mosquitto (max_inflight_messages, default 20) loses QoS 2 messages sent
    # beyond its window, so 3.1.1 defaults to 20.
    send_maximum: Annotated[int, Field(ge=1, le=65535)] | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        return {5: "5", "5.0": "5", 3.1: "3.1.1", "3.1": "3.1.1"}.get(v, v)


class MqttSourceOptions(Options):
    qos: Literal[0, 1, 2] = 1
    retain_as_published: bool = True  # MQTT 5: keep the publisher's RETAIN flag


class MqttTargetOptions(Options):
    qos: Literal[0, 1, 2] | None = None  # default: 1 when the route confirms, else 0
    retain: Literal["keep"] | bool = "keep"  # "keep": carry Message.retain
    message_expiry: Annotated[int, Field(ge=0)] | None = None  # MQTT 5 Message Expiry Interval


def format_timestamp(ts: float) -> str:
    """POSIX seconds as ISO 8601 UTC with milliseconds and ``Z``."""
    sec, ms = divmod(round(ts * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ms:03d}Z"


def parse_timestamp(text: str) -> float | None:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return calendar.timegm(dt.utctimetuple()) + dt.microsecond / 1e6


class _Left:
    """A message a stopped route had received and not taken: an orphan of that route."""

    __slots__ = ("msg", "sid")

    def __init__(self, msg: Message, sid: int) -> None:
        self.msg = msg
        self.sid = sid

    @property
    def topic(self) -> str:
        return self.msg.topic


class _Inbound:
    """A received QoS 1/2 PUBLISH awaiting acks from every route it was handed to."""

    __slots__ = ("gen", "packet_id", "qos", "refs")

    def __init__(self, packet_id: int, qos: int, refs: int, gen: int) -> None:
        self.packet_id = packet_id
        self.qos = qos
        self.refs = refs
        self.gen = gen


class _Route:
    """One subscribe() call: its filters on the broker and deliveries not yet taken."""

    def __init__(
        self, adapter: MqttAdapter, sub: Subscription, sid: int, opts: MqttSourceOptions
    ) -> None:
        self.adapter = adapter
        self.sub = sub
        self.sid = sid
        self.qos = opts.qos
        self.retain_as_published = opts.retain_as_published
        self.filters = [f"$share/{sub.group}/{f}" if sub.group else f for f in sub.filters]
        self.pending: list[Incoming] = []
        self.unacked = 0  # received with QoS >= 1 and not acked (pending or handed out)
        self.handed = 0  # handed to the route and not acked: bounded by max_in_flight
        self.wake = asyncio.Event()
        self.active = False  # subscribed in the broker's current session
        self.error: Exception | None = None
        self.alone = [self]  # the targets of a message for this route only (never changed)

    def ack(self, token: Any) -> None:
        self.unacked -= 1
        self.handed -= 1
        if self.pending and self.handed < self.sub.max_in_flight:
            self.wake.set()
        self.adapter._ack(token)

    def matches(self, topic: str) -> bool:
        return any(w.topic_matches(f, topic) for f in self.filters)


class MqttAdapter(Adapter):
    protocol = "mqtt"
    BrokerOptions = MqttBrokerOptions
    SourceOptions = MqttSourceOptions
    TargetOptions = MqttTargetOptions

    def __init__(self, name: str, url: str, options: Options, backoff: Backoff) -> None:
        super().__init__(name, url, options, backoff)
        opts = options if isinstance(options, MqttBrokerOptions) else MqttBrokerOptions()
        self.opts = opts
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.security = security_of(opts)
        self.tls_settings = tls_for(url, self.security)
        self.tls = self.tls_settings is not None
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password).encode() if parts.password is not None else None
        if (auth := self.security.auth) is not None:
            self.username = auth.username
            self.password = None  # read from the secret for each CONNECT
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.safe_url = f"{parts.scheme}://{netloc}"  # never log the password
        self.version = w.V5 if opts.version == "5" else w.V311
        self.client_id = opts.client_id or _default_client_id(name)
        self._conn: w.MqttConnection | None = None
        self._gen = 0
        self._order: deque[_Inbound] = deque()
        self._routes: dict[int, _Route] = {}
        self._match_cache: dict[str, list[_Route]] = {}
        self._by_props: dict[int, tuple[w.Props, list[_Route]]] = {}  # see _on_publish
        self._props_cache: PerHeaders[tuple[int | None, bytes]] = PerHeaders()
        self._shared_filters = False  # two routes subscribe to the same filter
        self._orphans: deque[tuple[float, w.Publish | _Left, _Inbound | None]] = deque()
        self._orphans_dropped = 0
        self._qos2_unreleased: list[int] = []
        self._state = ConnState.DISCONNECTED
        self._detail = ""
        self._reconnects = 0
        self._closed = False
        self._lost = asyncio.Event()
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # MQTT 3.1.1 has no properties, so it carries no headers.
    @property
    def supports_headers(self) -> bool:
        return self.version == w.V5

    @classmethod
    def check_source(cls, options: Options, *, durable: bool) -> str | None:
        if durable and isinstance(options, MqttSourceOptions) and options.qos == 0:
            return "qos 0 cannot be at-least-once: a durable MQTT source needs qos 1 or 2"
        return None

    @classmethod
    def check_target(cls, options: Options, *, confirm: bool) -> str | None:
        if confirm and isinstance(options, MqttTargetOptions) and options.qos == 0:
            return "qos 0 has no broker confirmation: a confirmed MQTT target needs qos 1 or 2"
        return None

    # ------------------------------------------------------------------ connection

    def _connect_packet(self) -> w.Connect:
        props: w.Props = {}
        if self.version == w.V5:
            props[w.RECEIVE_MAXIMUM] = self.opts.receive_maximum
            if self.opts.session_expiry:
                props[w.SESSION_EXPIRY] = self.opts.session_expiry
        return w.Connect(
            self.client_id,
            self.version,
            clean_start=self.opts.clean_start,
            keepalive=self.opts.keepalive,
            username=self.username,
            password=self._password(),
            properties=props,
        )

    def _password(self) -> bytes | None:
        auth = self.security.auth
        if auth is None or auth.password is None:
            return self.password
        return auth.password.get_secret_value().encode()

    async def _establish(self) -> None:
        self._state = ConnState.CONNECTING
        conn, connack = await w.open_connection(
            self.host,
            self.port,
            self._connect_packet(),
            on_publish=self._on_publish,
            on_lost=self._on_lost,
            reply_timeout=self.opts.connect_timeout,
            # A fresh context per connection: renewed certificate files are read again.
            ssl=None if self.tls_settings is None else self.tls_settings.context(),
        )
        if conn is not self._conn:
            self._adopt(conn)
        if self.version == w.V311:
            conn.server_receive_max = self.opts.send_maximum or 20
        elif self.opts.send_maximum:
            conn.server_receive_max = min(conn.server_receive_max, self.opts.send_maximum)
        if connack.session_present:
            if self._qos2_unreleased:
                for fut in conn.release(self._qos2_unreleased):
                    fut.add_done_callback(_consume)
        else:
            for route in self._routes.values():
                route.active = False
        self._qos2_unreleased = []
        self._lost.clear()
        self._state = ConnState.CONNECTED
        self._detail = ""
        self._connected.set()
        self.log.info(
            "connected to %s as %s (MQTT %s, session present: %s)",
            self.safe_url,
            self.client_id,
            self.opts.version,
            connack.session_present,
        )
        for route in list(self._routes.values()):
            if not route.active:
                await self._subscribe_route(route)

    def _adopt(self, conn: w.MqttConnection) -> None:
        # A new connection: acks owed on the old one are void (the broker redelivers).
        self._conn = conn
        self._gen += 1
        self._order.clear()

    def _on_lost(self, conn: w.MqttConnection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        self._qos2_unreleased = conn.inflight_qos2()
        self._connected.clear()
        if not self._closed:
            self._state = ConnState.DISCONNECTED
            self._detail = str(exc) if exc else "connection closed"
            self.log.warning("connection to %s lost: %s", self.safe_url, self._detail)
        self._lost.set()

    async def connect(self) -> None:
        if self._supervisor is not None:
            return
        failures = 0
        delays = self.backoff.delays()
        while True:
            try:
                await self._establish()
                break
            except (OSError, TimeoutError, w.MqttError) as exc:
                failures += 1
                self._state = ConnState.DISCONNECTED
                self._detail = describe(exc, self.security)
                delay = await anext(delays, None)
                if delay is None or (
                    self.backoff.attempts is not None and failures >= self.backoff.attempts
                ):
                    raise ConnectError(
                        f"broker {self.name} ({self.safe_url}): {self._detail}"
                    ) from exc
                self.log.warning(
                    "cannot connect to %s (%s), retry in %.1fs", self.safe_url, self._detail, delay
                )
                await asyncio.sleep(delay)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt-{self.name}")

    async def _supervise(self) -> None:
        """Reconnect after losses, forever, and settle orphaned deliveries."""
        while not self._closed:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel (close)
                # that arrives as the event is set.
                async with asyncio.timeout(ORPHAN_GRACE / 2):
                    await self._lost.wait()
            except TimeoutError:
                self._expire_orphans()
                continue
            if self._closed:
                return
            self._reconnects += 1
            delay = self.backoff.initial
            while not self._closed:
                try:
                    await self._establish()
                    break
                except (OSError, TimeoutError, w.MqttError) as exc:
                    self._state = ConnState.DISCONNECTED
                    cause = describe(exc, self.security)
                    self._detail = f"reconnecting: {cause}"
                    self.log.warning("reconnect to %s failed: %s", self.safe_url, cause)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff.maximum)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A kept session must not go on collecting messages for routes that are not
        # durable; durable ones keep their subscriptions (and queued messages).  Taken now:
        # the routes end once woken.
        transient = [f for r in self._routes.values() if not r.sub.durable for f in r.filters]
        for route in self._routes.values():
            route.wake.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._tasks):
            task.cancel()
        # Orphans end here: QoS 0 ones, and all of a session that ends with the connection,
        # are lost; said and counted (a kept session's QoS 1/2 ones come back).
        kept = self._session_kept
        lost = sum(1 for _, _, inbound in self._orphans if inbound is None or not kept)
        self._orphans.clear()
        if lost:
            self._orphans_dropped += lost
            self.log.warning("%d message(s) received for no route lost at close", lost)
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.flush()  # acks queued so far go out before DISCONNECT
            if transient and not self.opts.clean_start:
                with contextlib.suppress(w.MqttError, TimeoutError):
                    await conn.unsubscribe(transient, reply_timeout=2.0)
            await conn.disconnect()
        self._state = ConnState.CLOSED
        self._connected.clear()

    @property
    def _session_kept(self) -> bool:
        """The broker keeps the session (subscriptions, unacked messages) across connections."""
        return not self.opts.clean_start and (
            self.version != w.V5 or bool(self.opts.session_expiry)
        )

    def counters(self) -> dict[str, int]:
        # Messages received for no route (one that stopped or never came) and acked after
        # ORPHAN_GRACE: gone from this bridge, so they show in the broker's event metrics.
        return {"orphans_dropped": self._orphans_dropped}

    def health(self) -> Health:
        return Health(
            self._state,
            self._detail,
            self._reconnects,
            all(r.active for r in self._routes.values()),
        )

    async def wait_connected(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        if self._closed:
            return False
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def max_payload(self) -> int | None:
        conn = self._conn
        return conn.max_packet_size if conn is not None else None

    # ------------------------------------------------------------------ receiving

    def subscribe(self, sub: Subscription) -> AsyncGenerator[list[Incoming], None]:
        return self._deliveries(sub)

    async def _deliveries(self, sub: Subscription) -> AsyncGenerator[list[Incoming], None]:
        opts = sub.options if isinstance(sub.options, MqttSourceOptions) else MqttSourceOptions()
        if sub.durable:
            if opts.qos == 0:
                raise w.MqttError(f"route {sub.route}: a durable MQTT source needs qos 1 or 2")
            if not self._session_kept:
                raise w.MqttError(
                    f"route {sub.route}: durable needs a persistent session on broker "
                    f"{self.name} (clean_start false and, for MQTT 5, session_expiry > 0)"
                )
        sid = zlib.crc32(f"{sub.route}\0{sub.group}".encode()) % 268_435_454 + 1
        while sid in self._routes:
            sid = sid % 268_435_454 + 1
        route = _Route(self, sub, sid, opts)
        self._routes[sid] = route
        self._note_shared_filters()
        self._match_cache.clear()
        self._by_props.clear()
        try:
            self._adopt_orphans(route)
            if self._conn is not None and not self._conn.closed:
                await self._subscribe_route(route)
            while True:
                if route.error is not None:
                    raise route.error
                room = sub.max_in_flight - route.handed
                if route.pending and room > 0:
                    # Messages past the window stay here, unacked at the broker, until acks
                    # make room: the route never holds more than max_in_flight.
                    batch = route.pending[:room]
                    del route.pending[:room]
                    route.handed += sum(1 for d in batch if d.settler is not None)
                    conn = self._conn
                    if conn is not None and conn.paused:
                        self._update_flow()
                    yield batch
                    continue
                if self._closed:
                    return
                route.wake.clear()
                await route.wake.wait()
        finally:
            del self._routes[sid]
            if route.pending:
                # Received and never taken: kept as orphans, for the same route when it comes
                # back (a reload), in order, else acked after ORPHAN_GRACE and counted.  Left
                # unacked, a QoS 1/2 message would hold back every later ack on the connection
                # (they go out in order) and the broker's in-flight window with them.
                now = time.monotonic()
                for d in route.pending:
                    if isinstance(d, Delivery):
                        self._orphans.append((now, _Left(d.message, sid), d.token))
                    else:
                        self._orphans.append((now, _Left(d, sid), None))
                route.pending = []
            self._update_flow()  # this route's backlog may be what paused reading
            self._match_cache.clear()
            self._by_props.clear()
            self._note_shared_filters()
            conn = self._conn
            # A filter another route still uses stays subscribed (it is one subscription).
            in_use = {f for r in self._routes.values() for f in r.filters}
            gone = [f for f in route.filters if f not in in_use]
            if (
                gone
                and not sub.durable
                and not self._closed
                and conn is not None
                and not conn.closed
            ):
                task = asyncio.create_task(self._unsubscribe(conn, gone))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _unsubscribe(self, conn: w.MqttConnection, filters: list[str]) -> None:
        try:
            await conn.unsubscribe(filters)
        except (w.MqttError, TimeoutError) as exc:
            self.log.warning("unsubscribe %s failed: %s", filters, exc)

    async def _subscribe_route(self, route: _Route) -> None:
        conn = self._conn
        if conn is None or conn.closed or route.active:
            return
        v5 = self.version == w.V5
        topics = [
            w.SubTopic(
                f,
                route.qos,
                no_local=v5,
                retain_as_published=v5 and route.retain_as_published,
                retain_handling=1 if v5 else 0,
            )
            for f in route.filters
        ]
        props = {w.SUBSCRIPTION_ID: [route.sid]} if v5 else None
        try:
            codes = await conn.subscribe(topics, props)
        except (w.MqttError, TimeoutError) as exc:
            # Lost mid-request: the reconnect subscribes again.
            self.log.warning("subscribe %s: %s", route.filters, exc)
            return
        refused = [(f, c) for f, c in zip(route.filters, codes, strict=True) if c >= 0x80]
        if refused:
            text = ", ".join(f"{f!r} ({w.reason_text(c) if v5 else 'failure'})" for f, c in refused)
            route.error = w.MqttError(f"broker {self.name} refused subscription to {text}")
            route.wake.set()
            return
        granted = min(codes)
        if route.sub.durable and granted == 0:
            route.error = w.MqttError(
                f"broker {self.name} granted only qos 0 for {route.filters}: not at-least-once"
            )
            route.wake.set()
            return
        if conn is self._conn and not conn.closed:
            route.active = True
            self._update_flow()

    def _on_publish(self, conn: w.MqttConnection, packets: list[w.Publish]) -> None:
        if conn is not self._conn:
            self._adopt(conn)
        gen = self._gen
        routes = self._routes
        single = next(iter(routes.values())) if len(routes) == 1 else None
        woken: set[_Route] = set()
        last: _Route | None = None
        by_props = self._by_props
        # The previous packet's shared property block, its routes and whether it says
        # nothing of the message (a subscription identifier alone): a stream repeats it.
        run: w.Props | None = None
        targets: list[_Route] = []
        bare = False
        for p in packets:
            # Routes by property block: a broker gives a route's messages one shared block
            # (its subscription identifier), so the lookup is done once per block.
            props = p.properties
            if props is None or props is not run:
                hit = by_props.get(id(props)) if props else None
                if hit is not None and hit[0] is props:
                    targets = hit[1]
                    run = props
                else:
                    targets = self._targets(p, routes, single)
                    run = None
                    if props and (props.get(w.SUBSCRIPTION_ID) and not self._shared_filters):
                        if len(by_props) >= MATCH_CACHE:
                            by_props.clear()
                        by_props[id(props)] = (props, targets)
                        run = props
                bare = not props or (len(props) == 1 and w.SUBSCRIPTION_ID in props)
            inbound = None
            if p.qos:
                inbound = _Inbound(p.packet_id, p.qos, len(targets) or 1, gen)
                self._order.append(inbound)
            if not targets:
                self._orphans.append((time.monotonic(), p, inbound))
                continue
            msg = (
                Message(p.topic, p.payload, None, None, None, None, None, None, None, p.retain)
                if bare
                else self._message(p)
            )
            for route in targets:
                if inbound is None:
                    route.pending.append(msg)  # QoS 0: the message is its own delivery
                else:
                    route.pending.append(Delivery(msg, route, inbound))
                    route.unacked += 1
                if route is not last:  # each route is woken once per read
                    woken.add(route)
                    last = route
        for route in woken:
            route.wake.set()
        self._update_flow()

    def _note_shared_filters(self) -> None:
        seen: set[str] = set()
        shared = False
        for r in self._routes.values():
            for f in r.filters:
                shared = shared or f in seen
                seen.add(f)
        self._shared_filters = shared

    def _targets(
        self, p: w.Publish, routes: dict[int, _Route], single: _Route | None
    ) -> list[_Route]:
        props = p.properties
        if props:
            sids = props.get(w.SUBSCRIPTION_ID)
            if sids and not self._shared_filters:
                if len(sids) == 1:
                    route = routes.get(sids[0])
                    return route.alone if route is not None else []
                return [routes[s] for s in sids if s in routes]
        # Without identifiers (3.1.1), or when routes share a filter: a session holds one
        # subscription per filter, so the broker names only the route that subscribed last.
        topic = p.topic
        found = self._match_cache.get(topic)
        if found is None:
            if len(self._match_cache) >= MATCH_CACHE:
                self._match_cache.clear()
            if single is not None:
                found = [single] if single.matches(topic) else []
            else:
                found = [r for r in routes.values() if r.matches(topic)]
            self._match_cache[topic] = found
        return found

    def _message(self, p: w.Publish) -> Message:
        msg = Message(p.topic, p.payload, None, None, None, None, None, None, None, p.retain)
        props = p.properties
        # A subscription identifier alone (what most messages carry) says nothing of the message.
        if props and (len(props) > 1 or w.SUBSCRIPTION_ID not in props):
            msg.content_type = props.get(w.CONTENT_TYPE)
            msg.correlation_id = props.get(w.CORRELATION_DATA)
            msg.reply_to = props.get(w.RESPONSE_TOPIC)
            user = props.get(w.USER_PROPERTY)
            if user:
                headers = []
                for name, value in user:
                    if name == "message-id" and msg.message_id is None:
                        msg.message_id = value
                        continue
                    if name == "timestamp" and msg.timestamp is None:
                        ts = parse_timestamp(value)
                        if ts is not None:
                            msg.timestamp = ts
                            continue
                    headers.append((name, value))
                if headers:
                    msg.headers = headers
        return msg

    def _adopt_orphans(self, route: _Route) -> None:
        if not self._orphans:
            return
        keep: deque[tuple[float, w.Publish | _Left, _Inbound | None]] = deque()
        for item in self._orphans:
            _, p, inbound = item
            if isinstance(p, _Left):
                mine = p.sid == route.sid
            else:
                sids = (p.properties or {}).get(w.SUBSCRIPTION_ID)
                mine = route.sid in sids if sids else route.matches(p.topic)
            if not mine:
                keep.append(item)
                continue
            msg = p.msg if isinstance(p, _Left) else self._message(p)
            if inbound is None or inbound.gen != self._gen:
                if inbound is None:
                    route.pending.append(msg)
                continue  # a stale QoS 1/2 copy: the broker redelivers it
            route.pending.append(Delivery(msg, route, inbound))
            route.unacked += 1
        self._orphans = keep
        route.wake.set()

    def _expire_orphans(self) -> None:
        cutoff = time.monotonic() - ORPHAN_GRACE
        n = 0
        while self._orphans and self._orphans[0][0] < cutoff:
            _, p, inbound = self._orphans.popleft()
            if inbound is not None:
                self._ack(inbound)
            n += 1
        if n:
            self._orphans_dropped += n
            self.log.warning(
                "acked %d message(s) no route subscribes to any more (total %d); last topic %r",
                n,
                self._orphans_dropped,
                p.topic,
            )
            self._update_flow()

    def _ack(self, inbound: _Inbound) -> None:
        if inbound.gen != self._gen:
            return  # from before a reconnect: the broker redelivers it
        inbound.refs -= 1
        if inbound.refs:
            return
        order = self._order
        conn = self._conn
        if conn is None:
            return
        while order and order[0].refs <= 0:
            head = order.popleft()
            conn.queue_ack(head.packet_id, head.qos)
        if conn.paused:
            self._update_flow()

    def _update_flow(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        over = hard = False
        for route in self._routes.values():
            if not route.active:
                # Its backlog (orphans it adopted) must not stop reading before its SUBACK.
                continue
            n = max(len(route.pending), route.unacked)
            limit = route.sub.max_in_flight
            if n >= limit:
                over = True
                if n >= HARD_FACTOR * limit:
                    hard = True
        if len(self._orphans) >= ORPHAN_LIMIT:
            over = hard = True
        if hard or (over and not conn.awaiting_replies):
            conn.pause_reading()
        else:
            conn.resume_reading()

    # ------------------------------------------------------------------ publishing

    def _props(self, msg: Message, expiry: int | None) -> bytes:
        headers = msg.headers
        if (
            headers is not None
            and msg.content_type is None
            and msg.correlation_id is None
            and msg.reply_to is None
            and msg.message_id is None
            and msg.timestamp is None
        ):
            cached = self._props_cache.get(headers)
            if cached is not None and cached[0] == expiry:
                return cached[1]
            return self._props_cache.put(headers, (expiry, self._encode_props(msg, expiry)))[1]
        return self._encode_props(msg, expiry)

    def _encode_props(self, msg: Message, expiry: int | None) -> bytes:
        props: w.Props = {}
        if msg.content_type is not None:
            props[w.CONTENT_TYPE] = msg.content_type
        if msg.correlation_id is not None:
            props[w.CORRELATION_DATA] = msg.correlation_id
        if msg.reply_to is not None:
            props[w.RESPONSE_TOPIC] = msg.reply_to
        if expiry is not None:
            props[w.MESSAGE_EXPIRY] = expiry
        user: list[tuple[str, str]] = []
        if msg.message_id is not None:
            user.append(("message-id", msg.message_id))
        if msg.timestamp is not None:
            user.append(("timestamp", format_timestamp(msg.timestamp)))
        if msg.headers:
            user.extend(msg.headers)
        if user:
            props[w.USER_PROPERTY] = user
        return w.encode_props(props) if props else b"\x00"

    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        opts = options if isinstance(options, MqttTargetOptions) else MqttTargetOptions()
        qos = opts.qos if opts.qos is not None else (1 if confirm else 0)
        conn = self._conn
        if conn is None or conn.closed:
            raise PublishError(
                f"broker {self.name} ({self.safe_url}): not connected", retriable=True
            )
        v5 = self.version == w.V5
        limit = conn.max_packet_size
        errors: list[PublishError | None] = [None] * len(messages)
        items: list[tuple[str, bytes, int, bool, bytes | None]] = []
        index: list[int] = []
        for i, msg in enumerate(messages):
            retain = msg.retain if opts.retain == "keep" else opts.retain
            try:
                props = self._props(msg, opts.message_expiry) if v5 else None
            except ValueError as exc:  # a string property over 65535 bytes
                errors[i] = PublishError(f"{msg.topic!r}: {exc}", retriable=False)
                continue
            if limit is not None:
                size = _publish_size(msg, qos, props)
                if size > limit:
                    errors[i] = PublishError(
                        f"{msg.topic!r}: packet of {size} bytes exceeds broker {self.name}'s "
                        f"maximum packet size {limit}",
                        retriable=False,
                    )
                    continue
            items.append((msg.topic, msg.payload, qos, retain, props))
            index.append(i)
        try:
            futures = await conn.publish(items)
        except w.MqttError as exc:
            raise PublishError(f"broker {self.name}: {exc}", retriable=True) from exc
        if qos and confirm:
            self._update_flow()  # PUBACKs must be read even if routes are behind
            results = await asyncio.gather(*futures, return_exceptions=True)  # type: ignore[arg-type]
            self._update_flow()
            for i, res in zip(index, results, strict=True):
                if isinstance(res, BaseException):
                    raise PublishError(
                        f"broker {self.name}: {res} before every publish was confirmed",
                        retriable=True,
                    ) from res
                if res >= 0x80:
                    errors[i] = PublishError(
                        f"{messages[i].topic!r}: broker {self.name} refused: {w.reason_text(res)}",
                        retriable=False,
                    )
        elif qos:
            for fut in futures:
                if fut is not None:
                    fut.add_done_callback(_consume)
        return errors if any(e is not None for e in errors) else None


def _consume(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled():
        fut.exception()  # unconfirmed publishes: a lost connection is not an error here


def _publish_size(msg: Message, qos: int, props: bytes | None) -> int:
    remaining = 2 + len(msg.topic.encode()) + (2 if qos else 0) + len(msg.payload)
    if props is not None:
        remaining += len(props)
    return 1 + len(w.encode_varint(min(remaining, w.MAX_REMAINING))) + remaining


def _default_client_id(name: str) -> str:
    # Stable across restarts on one host, so a persistent session is found again.
    digest = hashlib.sha1(f"{socket.gethostname()}\0{name}".encode()).hexdigest()[:8]
    return f"flowbridge-{name[:20]}-{digest}"
