"""The small contract every broker adapter implements.

A source yields *batches* of deliveries (one await per batch, not per message); each delivery
carries its own ack, and a message that needs none is its own delivery.  A target publishes
batches and says, per message, what went wrong.  Adapters own their connection, reconnect
with backoff and restore their subscriptions; they never import each other.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import enum
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from flowbridge.errors import PublishError

Headers = list[tuple[str, str]]
"""Free-form headers: ordered, names may repeat (all values are kept)."""

V = TypeVar("V")


class PerHeaders(Generic[V]):
    """What an adapter derives from a header list that many messages share (a route gives
    all messages of a topic one list), computed once per list.  Keyed by the list's identity;
    an entry holds its list, so the id cannot be taken by another list while cached."""

    __slots__ = ("_entries", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self._entries: dict[int, tuple[Headers, V]] = {}
        self.limit = limit

    def get(self, headers: Headers) -> V | None:
        entry = self._entries.get(id(headers))
        return entry[1] if entry is not None and entry[0] is headers else None

    def put(self, headers: Headers, value: V) -> V:
        if len(self._entries) >= self.limit:
            self._entries.clear()
        self._entries[id(headers)] = (headers, value)
        return value


@dataclass(slots=True)
class Message:
    """One message as flowbridge carries it between protocols.

    ``topic`` is the name in the protocol of the adapter that produced it (source) or must
    use it (target).  The optional fields are the native carriers every protocol has in
    some form; ``None`` means absent, so the hot path skips them cheaply.  ``headers`` may
    be shared by many messages (the engine gives all messages of a topic one list): nobody
    changes a message's headers in place, and adapters may cache their encoding by identity.
    """

    topic: str
    payload: bytes
    headers: Headers | None = None
    content_type: str | None = None
    correlation_id: bytes | None = None
    reply_to: str | None = None
    message_id: str | None = None
    timestamp: float | None = None  # POSIX seconds
    key: bytes | None = None  # Kafka record key
    retain: bool = False  # MQTT retained flag

    # A received message that needs no acknowledgement (core NATS, MQTT QoS 0, JetStream
    # without acks) is its own delivery: sources hand it out as it is, one object less per
    # message, and it reads as a Delivery with nothing to settle.
    settler: ClassVar[None] = None

    @property
    def message(self) -> Message:
        return self

    def ack(self) -> None:
        """Nothing to acknowledge."""


class Settler(Protocol):
    """Whatever acknowledges deliveries to the broker; batches acks as it sees fit."""

    def ack(self, token: Any) -> None: ...


@dataclass(slots=True)
class Delivery:
    """A received message and the means to acknowledge it.

    ``ack()`` never blocks: the adapter batches acknowledgements (multiple acks, offset
    commits) and keeps the order its protocol requires.  A delivery that is never acked is
    redelivered by the broker after a reconnect or restart (at-least-once).
    """

    message: Message
    settler: Settler | None = None
    token: Any = None

    def ack(self) -> None:
        if self.settler is not None:
            self.settler.ack(self.token)


Incoming = Delivery | Message
"""What a source hands out: a Delivery to acknowledge, or a Message that needs no ack."""


class Options(BaseModel):
    """Base of every adapter's option models: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a route asks of its source.

    ``filters`` are native filters (``translate_filter`` output for the source protocol).
    ``durable`` asks for at-least-once: persistent session / durable queue / durable
    consumer / committed offsets, acked only through ``Delivery.ack``.
    ``max_in_flight`` bounds the deliveries handed out and not yet acked (prefetch, MQTT
    receive maximum, fetch batch).  ``options`` are the route's source options for this
    protocol: an instance of the adapter's ``SourceOptions``, validated at load time.
    ``drops`` is where a source counts, by reason, messages it received and had to discard
    itself (an at-most-once buffer overflowing): the route's own ``dropped`` counters, so
    every such loss shows in its metrics.
    """

    route: str
    filters: tuple[str, ...]
    durable: bool
    max_in_flight: int = 1000
    group: str | None = None
    options: Options = field(default_factory=Options)
    drops: collections.Counter[str] | None = field(default=None, compare=False)


class ConnState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass(slots=True)
class Health:
    state: ConnState
    detail: str = ""
    reconnects: int = 0
    subscribed: bool = True  # every requested subscription is active on the broker

    @property
    def ok(self) -> bool:
        return self.state is ConnState.CONNECTED and self.subscribed


PublishOutcome = Sequence[PublishError | None] | None
"""``None``: every message is accepted (and confirmed when asked).  Otherwise one entry per
message: ``None`` for accepted, a ``PublishError`` for one the target refused."""


class Adapter(abc.ABC):
    """One broker connection used by every route that names the broker.

    Each adapter declares three option models, validated by the config loader at load time:
    ``BrokerOptions`` (``brokers.NAME.options``), ``SourceOptions`` (a route's
    ``from.options``) and ``TargetOptions`` (a route target's ``options``).
    """

    protocol: ClassVar[str]
    BrokerOptions: ClassVar[type[Options]] = Options
    SourceOptions: ClassVar[type[Options]] = Options
    TargetOptions: ClassVar[type[Options]] = Options

    def __init__(self, name: str, url: str, options: Options, backoff: Backoff) -> None:
        self.name = name
        self.url = url
        self.options = options
        self.backoff = backoff
        self.log = logging.getLogger(f"flowbridge.broker.{name}")

    @property
    def supports_headers(self) -> bool:
        """Whether messages carry headers and properties (not MQTT 3.1.1)."""
        return True

    @classmethod
    def check_source(cls, options: Options, *, durable: bool) -> str | None:
        """A cross-field problem of a route source (e.g. at-least-once where the protocol
        cannot acknowledge), reported at load time; None when fine."""
        return None

    @classmethod
    def check_target(cls, options: Options, *, confirm: bool) -> str | None:
        """Likewise for a route target."""
        return None

    @classmethod
    def reads_replies(cls, options: Options) -> bool:
        """Whether a source with these options carries the replies to this broker's
        request-reply targets (see ``replies_needed``)."""
        return False

    @classmethod
    def replies_needed(cls, options: Options) -> str | None:
        """For a target whose requests are answered through the adapter itself: the problem
        to report at load time when no route of the same broker ``reads_replies`` (``{broker}``
        stands for the broker's name); None for other targets."""
        return None

    def counters(self) -> dict[str, int]:
        """The adapter's own event counters by name (a copy), for metrics and status."""
        return {}

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect, retrying with exponential backoff as configured; raises ``ConnectError``
        when the configured attempts are exhausted.  Later losses are recovered in the
        background."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending acks and publishes, then disconnect.  Idempotent."""

    @abc.abstractmethod
    def subscribe(self, sub: Subscription) -> AsyncGenerator[Sequence[Incoming], None]:
        """Batches of deliveries for ``sub``, across reconnects, until ``close``."""

    @abc.abstractmethod
    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        """Publish in order; ``options`` is the route target's validated ``TargetOptions``
        (None: defaults).  With ``confirm`` return only once the broker confirmed every
        message.  Raises ``PublishError(retriable=True)`` when the broker cannot be reached
        (nothing of the batch is known to be delivered), ``PublishError(retriable=False)``
        never: per-message refusals are returned."""

    def interrupt(self, route: str) -> bool:
        """A route is stopping while it waits for its next batch: make that wait end (with an
        empty batch when nothing came) and keep the subscription, so ``drain`` still finds
        what it holds.  False when the source cannot: the route then cancels its wait, which
        ends the source's iterator."""
        return False

    async def drain(self, route: str) -> Sequence[Incoming]:
        """A route is stopping: stop fetching for it and return what its source received
        and has not handed out yet, which the route forwards and acks before it closes.
        Only sources whose broker would redeliver those out of order need this (JetStream);
        the others leave them unacked, and the broker hands them out again in order."""
        return []

    @abc.abstractmethod
    def health(self) -> Health: ...

    def max_payload(self) -> int | None:
        """Largest body the target accepts, when the protocol tells or config sets it."""
        return None

    async def wait_connected(self, within: float | None = None) -> bool:
        """True once connected, False when closed or ``within`` seconds passed (polls;
        adapters may override with an event)."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while self.health().state is not ConnState.CONNECTED:
            if self.health().state is ConnState.CLOSED:
                return False
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential reconnect backoff: ``initial`` doubled up to ``maximum``; ``attempts``
    None retries forever."""

    initial: float = 0.1
    maximum: float = 5.0
    attempts: int | None = None

    def delays(self) -> AsyncIterator[float]:
        return _delays(self)


async def _delays(b: Backoff) -> AsyncIterator[float]:
    delay = b.initial
    n = 0
    while b.attempts is None or n < b.attempts:
        yield delay
        n += 1
        delay = min(delay * 2, b.maximum)
