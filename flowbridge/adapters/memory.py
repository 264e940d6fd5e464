"""An in-process broker for unit tests of the router and engine (no network).

Brokers are shared by URL host; names and filters follow the adapter's ``protocol`` (one
subclass per protocol below).  Like a real broker without no-echo, a connection receives its
own publishes when it subscribed to them; ``MemoryMqtt311`` has no headers, as MQTT 3.1.1.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar
from urllib.parse import urlsplit

from flowbridge.adapters.base import (
    Adapter,
    ConnState,
    Delivery,
    Health,
    Message,
    Options,
    PublishOutcome,
    Subscription,
)
from flowbridge.errors import PublishError, TopicError
from flowbridge.topics import Topic, parse_filter, parse_topic


class MemoryOptions(Options):
    max_payload: int | None = None
    refuse_topics: tuple[str, ...] = ()  # names the broker rejects (per-message refusals)


@dataclass
class _Queue:
    filters: tuple[str, ...]
    protocol: str
    items: asyncio.Queue[Message]
    owner: MemoryAdapter
    unacked: int = 0
    acked: list[int] = field(default_factory=list)


class MemoryBroker:
    """All queues of one in-process broker; ``down`` makes publishes fail as if unreachable."""

    brokers: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self) -> None:
        self.queues: list[_Queue] = []
        self.published: list[Message] = []  # everything accepted, in order
        self.down = False

    @classmethod
    def get(cls, url: str) -> MemoryBroker:
        host = urlsplit(url).hostname or url
        return cls.brokers.setdefault(host, cls())

    @classmethod
    def reset(cls) -> None:
        cls.brokers.clear()

    def deliver(self, msg: Message) -> None:
        self.published.append(msg)
        for q in self.queues:
            if any(_matches(q.protocol, f, msg.topic) for f in q.filters):
                q.items.put_nowait(msg)


def _matches(protocol: str, flt: str, name: str) -> bool:
    if protocol == "kafka":
        return re.fullmatch(flt, name) is not None
    try:
        f = parse_filter(flt, protocol)
        t = parse_topic(name, protocol)
    except TopicError:
        return False
    if protocol in ("nats", "amqp") and t.levels[0].startswith("$"):
        # These brokers have no '$' rule: a leading wildcard matches '$' topics too.
        t = Topic(("x", *t.levels[1:]))
    return f.matches(t)


class _Settler:
    def __init__(self, queue: _Queue) -> None:
        self.queue = queue

    def ack(self, token: int) -> None:
        self.queue.acked.append(token)
        self.queue.unacked -= 1


class MemoryAdapter(Adapter):
    protocol: ClassVar[str] = "nats"
    BrokerOptions: ClassVar[type[Options]] = MemoryOptions

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.broker = MemoryBroker.get(self.url)
        self.state = ConnState.DISCONNECTED
        self._closed = asyncio.Event()

    async def connect(self) -> None:
        self.state = ConnState.CONNECTED

    async def close(self) -> None:
        self.state = ConnState.CLOSED
        self._closed.set()

    async def subscribe(self, sub: Subscription) -> AsyncGenerator[list[Delivery], None]:
        q = _Queue(sub.filters, self.protocol, asyncio.Queue(), self)
        self.broker.queues.append(q)
        settler = _Settler(q)
        seq = 0
        try:
            while not self._closed.is_set():
                getter = asyncio.ensure_future(q.items.get())
                closed = asyncio.ensure_future(self._closed.wait())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    closed.cancel()
                    return
                closed.cancel()
                batch = [getter.result()]
                while not q.items.empty() and len(batch) < sub.max_in_flight:
                    batch.append(q.items.get_nowait())
                out = []
                for m in batch:
                    seq += 1
                    q.unacked += 1
                    out.append(Delivery(m, settler if sub.durable else None, seq))
                yield out
        finally:
            self.broker.queues.remove(q)

    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        if self.broker.down:
            raise PublishError(f"broker {self.name} unreachable", retriable=True)
        opts = self.options
        assert isinstance(opts, MemoryOptions)
        errors: list[PublishError | None] = []
        failed = False
        for m in messages:
            if opts.max_payload is not None and len(m.payload) > opts.max_payload:
                errors.append(PublishError("too large", retriable=False))
                failed = True
            elif m.topic in opts.refuse_topics:
                errors.append(PublishError("refused by broker", retriable=False))
                failed = True
            else:
                bare = m
                if not self.supports_headers:
                    bare = replace(
                        m,
                        headers=None,
                        content_type=None,
                        correlation_id=None,
                        reply_to=None,
                        message_id=None,
                    )
                self.broker.deliver(bare)
                errors.append(None)
        await asyncio.sleep(0)
        return errors if failed else None

    def health(self) -> Health:
        return Health(self.state)

    def max_payload(self) -> int | None:
        opts = self.options
        assert isinstance(opts, MemoryOptions)
        return opts.max_payload


class MemoryNats(MemoryAdapter):
    protocol = "nats"


class MemoryMqtt(MemoryAdapter):
    protocol = "mqtt"


class MemoryMqtt311(MemoryAdapter):
    protocol = "mqtt"

    @property
    def supports_headers(self) -> bool:
        return False


class MemoryAmqp(MemoryAdapter):
    protocol = "amqp"


class MemoryKafka(MemoryAdapter):
    protocol = "kafka"
