"""The engine on the in-memory broker: routing, acks after confirm, dead letters, loops."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flowbridge import engine
from flowbridge.adapters.base import Message, Options, PublishOutcome
from flowbridge.adapters.memory import (
    MemoryAmqp,
    MemoryBroker,
    MemoryKafka,
    MemoryMqtt,
    MemoryMqtt311,
    MemoryNats,
)
from flowbridge.config import load
from flowbridge.engine import DEAD_REASON, SOURCE_TOPIC, VIA, Bridge

REGISTRY = {"nats": MemoryNats, "mqtt": MemoryMqtt, "amqp": MemoryAmqp, "kafka": MemoryKafka}


@pytest.fixture(autouse=True)
def _fresh_brokers() -> None:
    MemoryBroker.reset()


class Running:
    def __init__(self, bridge: Bridge, stop: asyncio.Event) -> None:
        self.bridge = bridge
        self.stop = stop


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def _start(
        yaml_text: str, mqtt311: bool = False, registry: dict[str, Any] | None = None
    ) -> Running:
        path = tmp_path / "m.yaml"
        path.write_text(textwrap.dedent(yaml_text))
        registry = dict(registry or REGISTRY)
        if mqtt311:
            registry["mqtt"] = MemoryMqtt311
        bridge = Bridge(load([str(path)], environ={}, registry=registry))
        stop = asyncio.Event()
        running.append((stop, asyncio.ensure_future(bridge.run(stop))))
        await asyncio.sleep(0.05)  # routes subscribe
        return Running(bridge, stop)

    yield _start
    for stop, _ in running:
        stop.set()
    await asyncio.gather(*(task for _, task in running))


def broker(host: str) -> MemoryBroker:
    return MemoryBroker.get(f"x://{host}")


async def settle(cond: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


TWO = """
brokers:
  edge: {url: "mqtt://edge"}
  core: {url: "nats://core"}
"""


async def test_mqtt_to_nats_translates_and_marks_provenance(
    start: Callable[..., Awaitable[Running]],
) -> None:
    run = await start(
        TWO
        + """
routes:
  - name: up
    from: {broker: edge, filter: "sensors/#"}
    to: [{broker: core}]
"""
    )
    broker("edge").deliver(Message("sensors/a.b/t", b"21.5", [("unit", "C"), ("unit", "K")]))
    await settle(lambda: len(broker("core").published) == 1)
    out = broker("core").published[0]
    assert out.topic == "sensors.a//b.t"
    assert out.payload == b"21.5"
    assert out.headers is not None
    assert out.headers[:2] == [("unit", "C"), ("unit", "K")]
    assert (VIA, "flowbridge sensors.a//b.t") in out.headers
    assert (SOURCE_TOPIC, "sensors/a.b/t") in out.headers
    queue = broker("edge").queues[0]
    await settle(lambda: queue.acked == [1])
    assert run.bridge.stats()["up"].forwarded == 1


@pytest.mark.parametrize("mqtt311", [False, True])
async def test_bidirectional_pair_has_no_echo(
    start: Callable[..., Awaitable[Running]], mqtt311: bool
) -> None:
    run = await start(
        TWO
        + """
routes:
  - name: up
    from: {broker: edge, filter: "x/#"}
    to: [{broker: core}]
  - name: down
    from: {broker: core, filter: "x.>"}
    to: [{broker: edge}]
""",
        mqtt311=mqtt311,
    )
    broker("edge").deliver(Message("x/1", b"from-mqtt"))
    broker("core").deliver(Message("x.2", b"from-nats"))
    await settle(lambda: len(broker("core").published) == 2 and len(broker("edge").published) == 2)
    await asyncio.sleep(0.1)  # any echo would show up now
    assert [m.payload for m in broker("core").published] == [b"from-nats", b"from-mqtt"]
    assert [m.payload for m in broker("edge").published] == [b"from-mqtt", b"from-nats"]
    stats = run.bridge.stats()
    assert stats["up"].echo_suppressed == 1
    assert stats["down"].echo_suppressed == 1


async def test_mirror_across_four_brokers_delivers_once_each(
    start: Callable[..., Awaitable[Running]],
) -> None:
    names = {
        "m": ("mqtt://m", "t/#"),
        "n": ("nats://n", "t.>"),
        "a": ("amqp://a", "t.#"),
        "k": ("kafka://k", "t.#"),
    }
    routes = []
    for src, (_, flt) in names.items():
        for dst in names:
            if dst != src:
                routes.append(
                    f"  - {{name: {src}-{dst}, from: {{broker: {src}, filter: '{flt}'}}, "
                    f"to: [{{broker: {dst}}}]}}"
                )
    brokers = "\n".join(f"  {n}: {{url: '{u}'}}" for n, (u, _) in names.items())
    await start(f"brokers:\n{brokers}\nroutes:\n" + "\n".join(routes))
    broker("m").deliver(Message("t/from-m", b"1"))
    broker("n").deliver(Message("t.from-n", b"2"))
    await settle(lambda: all(len(broker(n).published) == 2 for n in names))
    await asyncio.sleep(0.1)
    for n in names:
        assert sorted(m.payload for m in broker(n).published) == [b"1", b"2"], n
    assert [m.topic for m in broker("k").published] == ["t.from-m", "t.from-n"]


async def test_unrepresentable_topic_goes_to_dead_letter(
    start: Callable[..., Awaitable[Running]],
) -> None:
    run = await start(
        TWO
        + """
routes:
  - name: down
    from: {broker: core, filter: "in.>"}
    to: [{broker: edge}]
    dead_letter: {broker: core, topic: "dead.down"}
"""
    )
    broker("core").deliver(Message("in.a+b", b"x"))  # '+' cannot be in an MQTT topic
    broker("core").deliver(Message("in.ok", b"y"))
    await settle(lambda: any(m.topic == "dead.down" for m in broker("core").published))
    dead = next(m for m in broker("core").published if m.topic == "dead.down")
    assert dead.payload == b"x"
    assert dead.headers is not None
    reason = dict(dead.headers)[DEAD_REASON]
    assert "'+'" in reason
    assert [m.topic for m in broker("edge").published] == ["in/ok"]
    assert run.bridge.stats()["down"].dead_lettered["topic not representable"] == 1
    await settle(lambda: broker("core").queues[0].acked == [1, 2])


async def test_dead_letters_name_their_own_messages_in_a_mixed_batch(
    start: Callable[..., Awaitable[Running]],
) -> None:
    """One batch, two targets: an echo held back, a name one target cannot carry, a message
    the other refuses; each dead letter is the message it is about, and the rest arrive."""
    run = await start(
        """
brokers:
  edge: {url: "mqtt://edge"}
  core: {url: "nats://core"}
  small: {url: "nats://small", options: {max_payload: 4}}
routes:
  - name: fan
    from: {broker: core, filter: "in.>"}
    to: [{broker: edge}, {broker: small}]
    dead_letter: {broker: core, topic: "dead.fan"}
"""
    )
    src = broker("core")
    src.deliver(Message("in.echo", b"e", [(VIA, "flowbridge in.echo")]))
    src.deliver(Message("in.a+b", b"plus"))  # '+' cannot be in an MQTT topic
    src.deliver(Message("in.big", b"too large"))  # over small's max_payload
    src.deliver(Message("in.ok", b"ok"))
    await settle(lambda: len([m for m in src.published if m.topic == "dead.fan"]) == 2)
    dead = {
        m.payload: dict(m.headers or [])[DEAD_REASON]
        for m in src.published
        if m.topic == "dead.fan"
    }
    assert dead.keys() == {b"plus", b"too large"}
    assert dead[b"plus"].startswith("edge: topic not representable")
    assert dead[b"too large"].startswith("small: too large")
    assert [(m.topic, m.payload) for m in broker("edge").published] == [
        ("in/big", b"too large"),
        ("in/ok", b"ok"),
    ]
    assert [(m.topic, m.payload) for m in broker("small").published] == [
        ("in.a+b", b"plus"),
        ("in.ok", b"ok"),
    ]
    st = run.bridge.stats()["fan"]
    assert st.echo_suppressed == 1
    assert st.received == 4


async def test_target_refusal_is_dead_lettered(start: Callable[..., Awaitable[Running]]) -> None:
    await start(
        """
brokers:
  edge: {url: "mqtt://edge"}
  core: {url: "nats://core", options: {max_payload: 4}}
routes:
  - name: up
    from: {broker: edge, filter: "#"}
    to: [{broker: core}]
    dead_letter: {broker: edge, topic: "dead/up"}
"""
    )
    broker("edge").deliver(Message("a", b"too large"))
    await settle(lambda: any(m.topic == "dead/up" for m in broker("edge").published))
    assert broker("core").published == []


async def test_at_least_once_holds_until_target_returns(
    start: Callable[..., Awaitable[Running]],
) -> None:
    run = await start(
        TWO
        + """
routes:
  - name: up
    from: {broker: edge, filter: "#"}
    to: [{broker: core}]
"""
    )
    broker("core").down = True
    broker("edge").deliver(Message("a", b"1"))
    await settle(lambda: run.bridge.stats()["up"].retries >= 2)
    assert broker("edge").queues[0].acked == []
    broker("core").down = False
    await settle(lambda: len(broker("core").published) == 1)
    await settle(lambda: broker("edge").queues[0].acked == [1])


async def test_at_most_once_counts_drops(start: Callable[..., Awaitable[Running]]) -> None:
    run = await start(
        TWO
        + """
routes:
  - name: up
    from: {broker: edge, filter: "#"}
    to: [{broker: core}]
    delivery: at-most-once
"""
    )
    broker("core").down = True
    broker("edge").deliver(Message("a", b"1"))
    await settle(lambda: run.bridge.stats()["up"].dropped["core unavailable"] == 1)


async def test_dollar_topics_stay_out_of_catch_all(
    start: Callable[..., Awaitable[Running]],
) -> None:
    run = await start(
        TWO
        + """
routes:
  - name: down
    from: {broker: core, filter: ">"}
    to: [{broker: edge}]
"""
    )
    broker("core").deliver(Message("$JS.API.INFO", b"x"))
    broker("core").deliver(Message("a.b", b"y"))
    await settle(lambda: len(broker("edge").published) == 1)
    assert broker("edge").published[0].topic == "a/b"
    assert run.bridge.stats()["down"].filtered == 1


async def test_templates_and_kafka_keys(start: Callable[..., Awaitable[Running]]) -> None:
    await start(
        """
brokers:
  edge: {url: "mqtt://edge"}
  log: {url: "kafka://log"}
routes:
  - name: archive
    from: {broker: edge, filter: "sensors/+/temp"}
    to: [{broker: log}, {broker: log, topic: "rooms.{2}"}]
"""
    )
    broker("edge").deliver(Message("sensors/room 1/temp", b"1"))
    await settle(lambda: len(broker("log").published) == 2)
    first, second = broker("log").published
    assert first.topic == "sensors.room__20_1.temp"
    assert second.topic == "rooms.room__20_1"
    assert first.key == second.key == b"sensors/room 1/temp"  # the real topic, not the filter


async def test_reload_keeps_unchanged_routes_and_swaps_the_rest(
    start: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    run = await start(
        TWO
        + """
routes:
  - name: up
    from: {broker: edge, filter: "u/#"}
    to: [{broker: core}]
  - name: down
    from: {broker: core, filter: "d.>"}
    to: [{broker: edge}]
"""
    )
    up_runner = run.bridge._runners["up"]
    broker("edge").deliver(Message("u/1", b"1"))
    await settle(lambda: len(broker("core").published) == 1)
    new = tmp_path / "new.yaml"
    new.write_text(
        TWO
        + """
routes:
  - name: up
    from: {broker: edge, filter: "u/#"}
    to: [{broker: core}]
  - name: down
    from: {broker: core, filter: "e.>"}
    to: [{broker: edge}]
  - name: extra
    from: {broker: edge, filter: "x/#"}
    to: [{broker: core}]
"""
    )
    changes = await run.bridge.reload(load([str(new)], environ={}, registry=REGISTRY))
    assert changes == ["restarted down", "started extra"]
    assert run.bridge._runners["up"] is up_runner  # untouched: no loss, no duplicate
    await asyncio.sleep(0.05)
    broker("edge").deliver(Message("u/2", b"2"))
    broker("edge").deliver(Message("x/3", b"3"))
    broker("core").deliver(Message("d.4", b"4"))  # no longer routed
    broker("core").deliver(Message("e.5", b"5"))
    await settle(lambda: len(broker("core").published) == 5 and len(broker("edge").published) == 4)
    await asyncio.sleep(0.05)
    # u/2 and x/3 were bridged; d.4 and e.5 were published on core directly.
    assert sorted(m.payload for m in broker("core").published) == [b"1", b"2", b"3", b"4", b"5"]
    assert [m.topic for m in broker("edge").published][-1] == "e/5"
    assert up_runner.stats.forwarded == 2


async def test_reply_to_is_translated_for_the_target(
    start: Callable[..., Awaitable[Running]],
) -> None:
    await start(
        TWO
        + """
routes:
  - name: req
    from: {broker: core, filter: "svc.>"}
    to: [{broker: edge}]
"""
    )
    broker("core").deliver(Message("svc.time", b"?", reply_to="_INBOX.ab.c1"))
    await settle(lambda: len(broker("edge").published) == 1)
    assert broker("edge").published[0].reply_to == "_INBOX/ab/c1"


class HoldingSource(MemoryNats):
    """A source that, like a JetStream consumer, holds what it received until the route
    takes it, and loses what it still holds once its iterator ends (the broker would hand
    it out again only after ack_wait, behind newer messages)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.items: list[Message] = []
        self.event = asyncio.Event()
        self.interrupted = False
        self.open = False
        self.lost: list[Message] = []
        self.drained: list[bool] = []  # whether the iterator was still open at each drain

    async def subscribe(self, sub: Any) -> AsyncIterator[list[Any]]:  # type: ignore[override]
        self.open = True
        try:
            while True:
                if self.items:
                    taken, self.items = self.items, []
                    yield taken
                    continue
                if self.interrupted:
                    self.interrupted = False
                    yield []
                    continue
                self.event.clear()
                await self.event.wait()
        finally:
            self.open = False
            self.lost += self.items
            self.items = []

    def interrupt(self, route: str) -> bool:
        self.interrupted = True
        self.event.set()
        return True

    async def drain(self, route: str) -> list[Any]:
        self.drained.append(self.open)
        taken, self.items = self.items, []
        return taken


async def test_a_stop_while_waiting_leaves_the_source_open_for_drain(
    start: Callable[..., Awaitable[Running]],
) -> None:
    """A route stopped while it waits asks its source to end the wait, so the source's
    iterator is still open when ``drain`` takes what it holds, and that is forwarded
    (cancelling the wait would end the iterator first, and what it held would be lost)."""
    run = await start(
        TWO
        + """
routes:
  - name: up
    from: {broker: core, filter: ">"}
    to: [{broker: edge}]
""",
        registry={**REGISTRY, "nats": HoldingSource},
    )
    source = run.bridge.adapters["core"]
    assert isinstance(source, HoldingSource)
    await settle(lambda: source.open)
    run.stop.set()
    source.items.append(Message("a", b"held"))  # arrives as the route stops
    await settle(lambda: source.drained != [])
    assert source.drained == [True]
    await settle(lambda: [m.payload for m in broker("edge").published] == [b"held"])
    await settle(lambda: not source.open)
    assert source.lost == []


class _GatedNats(MemoryNats):
    """A target that writes at once and confirms each publish only when the test says so."""

    gates: ClassVar[list[asyncio.Future[None]]] = []
    active: ClassVar[int] = 0
    most: ClassVar[int] = 0  # publishes awaiting their confirm at once, at most
    fail: ClassVar[bool] = False

    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        if _GatedNats.fail:
            raise RuntimeError("a bug in an adapter")
        out = await super().publish(messages, confirm=confirm, options=options)
        gate = asyncio.get_running_loop().create_future()
        _GatedNats.gates.append(gate)
        _GatedNats.active += 1
        _GatedNats.most = max(_GatedNats.most, _GatedNats.active)
        try:
            await gate
        finally:
            _GatedNats.active -= 1
        return out


@pytest.fixture
def gated() -> dict[str, Any]:
    _GatedNats.gates = []
    _GatedNats.active = _GatedNats.most = 0
    _GatedNats.fail = False
    return {**REGISTRY, "nats": _GatedNats}


def _piped(depth: int) -> str:
    return (
        TWO
        + f"""
routes:
  - name: up
    from: {{broker: edge, filter: "#"}}
    to: [{{broker: core}}]
    pipeline: {depth}
"""
    )


async def test_a_pipelined_route_writes_ahead_and_acks_in_order(
    start: Callable[..., Awaitable[Running]], gated: dict[str, Any]
) -> None:
    await start(_piped(3), registry=gated)
    edge, core = broker("edge"), broker("core")
    for k in range(1, 4):  # one batch each: the next is delivered once this one is written
        edge.deliver(Message(f"t{k}", b"x"))
        await settle(lambda k=k: len(_GatedNats.gates) == k)
    assert [m.topic for m in core.published] == ["t1", "t2", "t3"]  # none confirmed yet
    edge.deliver(Message("t4", b"x"))
    await asyncio.sleep(0.1)
    assert len(core.published) == 3  # three batches in flight: the fourth waits
    _GatedNats.gates[2].set_result(None)
    _GatedNats.gates[1].set_result(None)
    await asyncio.sleep(0.05)
    assert edge.queues[0].acked == []  # confirmed, but the first is not
    _GatedNats.gates[0].set_result(None)
    await settle(lambda: edge.queues[0].acked == [1, 2, 3])
    await settle(lambda: len(_GatedNats.gates) == 4)
    _GatedNats.gates[3].set_result(None)
    await settle(lambda: edge.queues[0].acked == [1, 2, 3, 4])
    assert [m.topic for m in core.published] == ["t1", "t2", "t3", "t4"]
    assert _GatedNats.most == 3


async def test_without_pipeline_a_batch_waits_for_the_confirm_before(
    start: Callable[..., Awaitable[Running]], gated: dict[str, Any]
) -> None:
    await start(_piped(1), registry=gated)
    edge, core = broker("edge"), broker("core")
    edge.deliver(Message("t1", b"x"))
    await settle(lambda: len(_GatedNats.gates) == 1)
    edge.deliver(Message("t2", b"x"))
    await asyncio.sleep(0.1)
    assert [m.topic for m in core.published] == ["t1"]
    _GatedNats.gates[0].set_result(None)
    await settle(lambda: len(_GatedNats.gates) == 2)
    _GatedNats.gates[1].set_result(None)
    await settle(lambda: broker("edge").queues[0].acked == [1, 2])
    assert _GatedNats.most == 1


async def test_a_pipelined_batch_that_raises_ends_the_route_at_once(
    tmp_path: Path, gated: dict[str, Any]
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(_piped(4))
    bridge = Bridge(load([str(path)], environ={}, registry=gated))
    run = asyncio.ensure_future(bridge.run(asyncio.Event()))
    await asyncio.sleep(0.05)
    _GatedNats.fail = True
    broker("edge").deliver(Message("t1", b"x"))  # then nothing more comes
    with pytest.raises(RuntimeError, match="a bug in an adapter"):
        await asyncio.wait_for(run, 2.0)
    assert broker("edge").queues == [] or broker("edge").queues[0].acked == []


@pytest.mark.parametrize("depth", [1, 3])
async def test_a_batch_given_up_at_shutdown_is_left_unacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """The target stays down past the shutdown grace: the bridge stops without acking what
    it never delivered, so the source redelivers it."""
    monkeypatch.setattr(engine, "SHUTDOWN_GRACE", 0.3)
    path = tmp_path / "m.yaml"
    path.write_text(_piped(depth))
    bridge = Bridge(load([str(path)], environ={}, registry=REGISTRY))
    stop = asyncio.Event()
    run = asyncio.ensure_future(bridge.run(stop))
    await asyncio.sleep(0.05)
    broker("core").down = True
    edge = broker("edge")
    edge.deliver(Message("t1", b"x"))
    await settle(lambda: bridge.stats()["up"].retries >= 1)
    queue = edge.queues[0]
    stop.set()
    await asyncio.wait_for(run, 5.0)
    assert broker("core").published == []
    assert queue.acked == []
