"""The NATS target's frames: what the cached fast path writes is exactly what the general
encoder writes, whatever the order of topics, header lists, sizes and properties."""

from __future__ import annotations

import random
from typing import Any

import pytest

from flowbridge.adapters import _nats_wire as wire
from flowbridge.adapters.base import Backoff, Message
from flowbridge.adapters.nats import _BIG, NatsAdapter, NatsBrokerOptions


class FakeClient:
    """What ``_publish_core`` uses of nats-py's client; frames are collected in order."""

    max_payload = 1 << 20
    is_connected = True
    _transport = None
    _max_pending_size = 1 << 30

    def __init__(self) -> None:
        self.data = bytearray()
        self._pending: list[bytes] = []
        self._pending_data_size = 0

    async def _send_command(self, data: bytes) -> None:
        self._pending.append(bytes(data))
        self._pending_data_size += len(data)

    async def _flush_pending(self, force_flush: bool = False) -> None:
        for part in self._pending:
            self.data += part
        self._pending = []
        self._pending_data_size = 0


def reference(msgs: list[Message]) -> bytes:
    out = bytearray()
    for m in msgs:
        reply = m.reply_to.encode() + b" " if m.reply_to else b""
        wire.pub_frame(out, m.topic.encode(), reply, wire.encode_headers(m), m.payload)
    return bytes(out)


async def publish(adapter: NatsAdapter, nc: FakeClient, msgs: list[Message]) -> Any:
    outcome = await adapter._publish_core(nc, msgs, confirm=False)  # type: ignore[arg-type]
    await nc._flush_pending()
    return outcome


@pytest.mark.parametrize("seed", range(20))
async def test_frames_match_the_general_encoder(seed: int) -> None:
    rnd = random.Random(seed)
    adapter = NatsAdapter("n", "nats://127.0.0.1:4222", NatsBrokerOptions(), Backoff())
    # Shared header lists, as the engine gives a topic's messages; one list is (wrongly)
    # used for two topics, which must not confuse the cache.
    lists = [[("flowbridge-via", f"b t{k}"), ("x", str(k))] for k in range(3)]
    topics = ["t0", "t1", "t2"]
    sizes = [0, 1, 100, 100, 100, 1000, _BIG - 1, _BIG, _BIG + 5]
    batches = []
    for _ in range(6):
        batch = []
        for _ in range(rnd.randrange(1, 60)):
            k = rnd.randrange(3)
            m = Message(rnd.choice(topics) if rnd.random() < 0.2 else topics[k], b"")
            m.payload = bytes([rnd.randrange(256)]) * rnd.choice(sizes)
            roll = rnd.random()
            if roll < 0.6:
                m.headers = lists[k]
            elif roll < 0.7:
                m.headers = lists[k]
                m.reply_to = "_INBOX.r"
            elif roll < 0.8:
                m.headers = lists[k]
                m.content_type = "text/plain"
            elif roll < 0.9:
                m.headers = [("own", "list")]
            batch.append(m)
        batches.append(batch)
    nc = FakeClient()
    expected = b""
    for batch in batches:
        assert await publish(adapter, nc, batch) is None
        expected += reference(batch)
    assert bytes(nc.data) == expected


async def test_refusals_in_a_run_name_their_own_messages() -> None:
    adapter = NatsAdapter("n", "nats://127.0.0.1:4222", NatsBrokerOptions(), Backoff())
    nc = FakeClient()
    nc.max_payload = 300
    shared = [("flowbridge-via", "b t")]
    msgs = [Message("t", b"a" * n, shared) for n in (10, 10, 400, 10, 260, 10)]
    outcome = await publish(adapter, nc, msgs)
    assert outcome is not None
    refused = [i for i, r in enumerate(outcome) if r is not None]
    hdr = wire.encode_headers(msgs[0])
    assert hdr is not None
    # 400 and 260 bytes of payload plus the header block exceed 300 bytes.
    assert refused == [i for i, m in enumerate(msgs) if len(m.payload) + len(hdr) > 300]
    assert bytes(nc.data) == reference([m for i, m in enumerate(msgs) if i not in refused])


def test_timestamp_line_follows_each_message() -> None:
    # The last timestamp's line is reused: a change, or a return to an earlier value, is not.
    stamps = [1_700_000_000.001, 1_700_000_000.001, 1_700_000_000.002, 1_699_999_999.999]
    for ts in [*stamps, stamps[0], 0.0]:
        block = wire.encode_headers(Message("t", b"", timestamp=ts))
        assert block == b"NATS/1.0\r\nTimestamp: %s\r\n\r\n" % wire.format_timestamp(ts).encode()
    assert wire.format_timestamp(1_699_999_999.999) == "2023-11-14T22:13:19.999Z"
