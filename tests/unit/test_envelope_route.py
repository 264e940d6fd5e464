"""Envelope-aware routes on the in-memory broker: auto, require, wrap, unwrap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from flowbridge.adapters.base import Message
from flowbridge.adapters.memory import MemoryBroker
from flowbridge.engine import DEAD_REASON
from flowbridge.envelope import Envelope, Payload
from flowbridge.envelope_route import looks_like_envelope, transform
from tests.unit.test_engine import TWO, Running, broker, settle, start  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_brokers() -> None:
    MemoryBroker.reset()


ENV = Envelope(
    send_to="/chat/room1",
    sender_name="msghandler",
    reply_to="replies.room1",
    payloads=[Payload.direct("message", "text", b"Hello!")],
)


def route(mode: str) -> str:
    return (
        TWO
        + f"""
routes:
  - name: r
    from: {{broker: edge, filter: "in/#"}}
    to: [{{broker: core}}]
    envelope: {{mode: {mode}, payload_type: text}}
    dead_letter: {{broker: core, topic: "dead"}}
"""
    )


def test_transform_auto_maps_fields_and_keeps_bytes() -> None:
    body = ENV.to_json()
    out = transform(Message("in/x", body), "auto")
    assert out.payload == body
    assert out.message_id == ENV.msg_id
    assert out.correlation_id == ENV.correlation_id.encode()
    assert out.reply_to == "replies.room1"
    assert out.content_type == "application/json"
    assert out.timestamp == pytest.approx(ENV.time)
    plain = Message("in/x", b'{"temperature": 21}')
    assert transform(plain, "auto") is plain
    assert not looks_like_envelope(b"21.5")


async def test_auto_route_carries_envelope_fields(
    start: Callable[..., Awaitable[Running]],  # noqa: F811
) -> None:
    await start(route("auto"))
    no_reply = Envelope(send_to="/x", sender_name="s", payloads=ENV.payloads)
    broker("edge").deliver(Message("in/a", ENV.to_json()))
    broker("edge").deliver(Message("in/b", b"plain"))
    broker("edge").deliver(Message("in/c", no_reply.to_json()))
    await settle(lambda: len(broker("core").published) == 3)
    env_out, plain_out, same_out = broker("core").published
    assert env_out.message_id == ENV.msg_id
    # The reply topic is written for the target protocol (MQTT level "replies.room1").
    crossed = Envelope.from_json(env_out.payload)
    assert crossed.reply_to == "replies//room1"
    assert env_out.reply_to == "replies//room1"
    assert crossed.to_dict() | {"reply_to": ENV.reply_to} == ENV.to_dict()
    assert same_out.payload == no_reply.to_json()  # otherwise byte for byte
    assert plain_out.payload == b"plain"
    assert plain_out.message_id is None


async def test_require_dead_letters_non_envelopes(
    start: Callable[..., Awaitable[Running]],  # noqa: F811
) -> None:
    await start(route("require"))
    broken = json.loads(ENV.to_json())
    broken["payloads"][0]["size"] = "six"
    broker("edge").deliver(Message("in/a", b"plain"))
    broker("edge").deliver(Message("in/b", json.dumps(broken).encode()))
    broker("edge").deliver(Message("in/c", ENV.to_json()))
    await settle(lambda: len(broker("core").published) == 3)
    dead = [m for m in broker("core").published if m.topic == "dead"]
    assert len(dead) == 2
    reasons = [dict(m.headers or [])[DEAD_REASON] for m in dead]
    assert "not a msg_envelope_v1" in reasons[0]
    assert "payloads[0].size" in reasons[1]
    assert [m.topic for m in broker("core").published if m.topic != "dead"] == ["in.c"]


async def test_wrap_and_unwrap(start: Callable[..., Awaitable[Running]]) -> None:  # noqa: F811
    await start(
        TWO
        + """
routes:
  - name: wrap
    from: {broker: edge, filter: "w/#"}
    to: [{broker: core}]
    envelope: {mode: wrap, payload_type: text, dataname: reading}
  - name: unwrap
    from: {broker: edge, filter: "u/#"}
    to: [{broker: core}]
    envelope: {mode: unwrap}
"""
    )
    broker("edge").deliver(Message("w/t", b"21.5"))
    broker("edge").deliver(Message("u/t", ENV.to_json()))
    await settle(lambda: len(broker("core").published) == 2)
    await asyncio.sleep(0)
    by_topic = {m.topic: m for m in broker("core").published}
    wrapped = Envelope.from_json(by_topic["w.t"].payload)
    assert wrapped.send_to == "w/t"
    assert [(p.dataname, p.payload_type, p.direct_bytes()) for p in wrapped.payloads] == [
        ("reading", "text", b"21.5")
    ]
    assert by_topic["w.t"].message_id == wrapped.msg_id
    unwrapped = by_topic["u.t"]
    assert unwrapped.payload == b"Hello!"
    assert unwrapped.content_type == "text/plain; charset=utf-8"
    assert unwrapped.message_id == ENV.msg_id


async def test_oversize_is_offloaded_through_the_file_server(
    start: Callable[..., Awaitable[Running]],  # noqa: F811
) -> None:
    from flowbridge.fileserver import PlikStore  # noqa: PLC0415
    from flowbridge.smart import smartreceive  # noqa: PLC0415

    async with PlikStore() as store:
        run = await start(
            f"""
bridge: {{fileserver: "{store.url}"}}
brokers:
  edge: {{url: "mqtt://edge"}}
  core: {{url: "nats://core", options: {{max_payload: 2000}}}}
routes:
  - name: r
    from: {{broker: edge, filter: "in/#"}}
    to: [{{broker: core}}]
"""
        )
        big = bytes(range(256)) * 40  # 10,240 bytes: over the target's 2,000
        mid = "0b6f3c6e-5d0a-4b8e-9a51-6f1f2a3b4c5d"
        broker("edge").deliver(Message("in/big", big, message_id=mid))
        broker("edge").deliver(Message("in/small", b"ok"))
        await settle(lambda: len(broker("core").published) == 2)
        linked, small = broker("core").published
        assert small.payload == b"ok"
        assert len(linked.payload) <= 2000
        assert linked.message_id == mid
        items, env = await smartreceive(linked.payload, fileserver=store.url)
        assert items == [("body", big, "binary")]
        assert env.payloads[0].transport == "link"
        assert run.bridge.stats()["r"].offloaded == 1
