"""AMQP request-reply without a broker: the options a mapping file may use (with the real
adapters, as ``flowbridge run`` loads them) and the bounded map of pending requests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from flowbridge import config
from flowbridge.adapters._rpc import PendingReplies
from flowbridge.adapters.amqp import AmqpSourceOptions, AmqpTargetOptions
from flowbridge.errors import ConfigError

BROKERS = """\
brokers:
  core: {url: "nats://127.0.0.1:4222"}
  edge: {url: "mqtt://127.0.0.1:1883"}
  rabbit: {url: "amqp://guest:guest@127.0.0.1:5672/"}
routes:
"""

REQUESTS = """\
  - name: requests
    from: {broker: core, filter: "svc.>"}
    to: [{broker: rabbit, topic: rpc_queue, options: {exchange: "", rpc: true, rpc_timeout: 5}}]
"""

REPLIES = """\
  - name: replies
    from: {broker: rabbit, filter: "_INBOX.#", options: {replies: true}}
    to: [{broker: core}]
"""


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(text))
    return config.load([str(path)], environ={})


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return [p.split("m.yaml:", 1)[1] for p in info.value.problems]


# --------------------------------------------------------------------------- options


def test_rpc_mapping_loads_and_replies_default_to_at_most_once(tmp_path: Path) -> None:
    cfg = load(tmp_path, BROKERS + REQUESTS + REPLIES)
    requests, replies = cfg.routes
    target = requests.targets[0].options
    assert isinstance(target, AmqpTargetOptions)
    assert (target.rpc, target.rpc_timeout, target.exchange) == (True, 5.0, "")
    source = replies.source.options
    assert isinstance(source, AmqpSourceOptions)
    assert source.replies
    assert replies.delivery == "at-most-once"  # direct reply-to cannot acknowledge
    assert replies.subscription().filters == ("_INBOX.#",)


def test_replies_refuse_at_least_once(tmp_path: Path) -> None:
    text = (
        BROKERS
        + REQUESTS
        + REPLIES.replace(
            "to: [{broker: core}]", "to: [{broker: core}]\n    delivery: at-least-once"
        )
    )
    assert problems(tmp_path, text) == [
        "12: routes[1].delivery: at-least-once is not possible here: replies: true reads "
        "RabbitMQ direct reply-to, which is never acknowledged (no-ack): a reply lost in a "
        "crash is not redelivered"
    ]


def test_replies_take_no_queue_options(tmp_path: Path) -> None:
    text = BROKERS + REQUESTS + REPLIES.replace("{replies: true}", "{replies: true, queue: q}")
    assert problems(tmp_path, text) == [
        "10: routes[1].from.options: replies: true reads RabbitMQ direct reply-to, not a "
        "queue: queue cannot be set with it"
    ]


def test_rpc_timeout_needs_rpc_and_must_be_positive(tmp_path: Path) -> None:
    text = BROKERS + REQUESTS.replace("rpc: true, rpc_timeout: 5", "rpc_timeout: 5") + REPLIES
    assert problems(tmp_path, text) == [
        "8: routes[0].to[0].options: rpc_timeout is only used with rpc: true"
    ]
    text = BROKERS + REQUESTS.replace("rpc_timeout: 5", "rpc_timeout: 0") + REPLIES
    assert problems(tmp_path, text) == [
        "8: routes[0].to[0].options.rpc_timeout: Input should be greater than 0"
    ]


def test_rpc_target_needs_a_route_for_its_replies(tmp_path: Path) -> None:
    assert problems(tmp_path, BROKERS + REQUESTS) == [
        "8: routes[0].to[0].options: rpc: true needs a route that carries the replies back: "
        "from: {broker: rabbit, filter: '#', options: {replies: true}}"
    ]
    # A replies route of another AMQP broker does not carry them.
    other = BROKERS.replace("routes:", '  rabbit2: {url: "amqp://127.0.0.1:5673/"}\nroutes:')
    text = other + REQUESTS + REPLIES.replace("broker: rabbit,", "broker: rabbit2,")
    assert len(problems(tmp_path, text)) == 1


def test_rpc_max_pending_is_a_broker_option(tmp_path: Path) -> None:
    text = BROKERS.replace('5672/"}', '5672/", options: {rpc_max_pending: 0}}') + REQUESTS + REPLIES
    assert problems(tmp_path, text) == [
        "4: brokers.rabbit.options.rpc_max_pending: Input should be greater than or equal to 1"
    ]


# --------------------------------------------------------------------------- pending map

OWNER = object()


def test_take_restores_reply_to_and_correlation_once() -> None:
    m = PendingReplies(10)
    m.add("a", "_INBOX.x", None, timeout=1, owner=OWNER, now=0)
    m.add("b", "resp.c1", b"\xff\x00", timeout=1, owner=OWNER, now=0)
    assert len(m) == 2
    b = m.take("b")
    assert b is not None
    assert (b.reply_to, b.correlation_id) == ("resp.c1", b"\xff\x00")
    assert m.take("b") is None  # a second reply with that id is unknown
    assert m.take("nope") is None
    assert len(m) == 1
    assert (m.expired, m.evicted) == (0, 0)


def test_entries_expire_at_their_deadline_and_are_counted() -> None:
    m = PendingReplies(10)
    m.add("a", "t.a", None, timeout=1, owner=OWNER, now=0)
    m.add("b", "t.b", None, timeout=1, owner=OWNER, now=0.5)
    assert m.next_deadline() == 1
    assert m.expire(0.99) == []
    assert [e.reply_to for e in m.expire(1.0)] == ["t.a"]
    assert m.next_deadline() == 1.5
    assert m.take("a") is None
    assert [e.reply_to for e in m.expire(10)] == ["t.b"]
    assert (len(m), m.expired, m.next_deadline()) == (0, 2, None)


def test_different_timeouts_expire_independently() -> None:
    m = PendingReplies(10)
    m.add("long", "t.long", None, timeout=30, owner=OWNER, now=0)
    m.add("short", "t.short", None, timeout=1, owner=OWNER, now=0.1)
    # The short one is not held back by the older, longer one.
    assert m.next_deadline() == pytest.approx(1.1)
    assert [e.reply_to for e in m.expire(2)] == ["t.short"]
    assert m.next_deadline() == 30
    assert m.take("long") is not None


def test_full_map_evicts_the_oldest_across_timeouts() -> None:
    m = PendingReplies(3)
    m.add("a", "t.a", None, timeout=30, owner=OWNER, now=1)
    m.add("b", "t.b", None, timeout=1, owner=OWNER, now=2)
    m.add("c", "t.c", None, timeout=30, owner=OWNER, now=3)
    evicted = m.add("d", "t.d", None, timeout=1, owner=OWNER, now=4)
    assert evicted is not None
    assert evicted.reply_to == "t.a"
    evicted = m.add("e", "t.e", None, timeout=30, owner=OWNER, now=5)
    assert evicted is not None
    assert evicted.reply_to == "t.b"
    assert (len(m), m.evicted, m.expired) == (3, 2, 0)
    assert m.take("a") is None
    assert {k for k in "cde" if m.take(k) is not None} == {"c", "d", "e"}


def test_map_never_holds_more_than_its_limit() -> None:
    m = PendingReplies(100)
    for i in range(10_000):
        m.add(str(i), "t", None, timeout=float(i % 3 + 1), owner=OWNER, now=i * 0.001)
        assert len(m) <= 100
    assert m.evicted == 10_000 - 100


def test_entries_of_a_closed_channel_count_as_expired() -> None:
    old, new = object(), object()
    m = PendingReplies(10)
    m.add("a", "t.a", None, timeout=1, owner=old, now=0)
    m.add("b", "t.b", None, timeout=5, owner=old, now=0)
    m.add("c", "t.c", None, timeout=1, owner=new, now=0)
    assert sorted(e.reply_to for e in m.drop_owner(old)) == ["t.a", "t.b"]
    assert (len(m), m.expired) == (1, 2)
    assert m.take("c") is not None


def test_discarded_requests_are_not_counted() -> None:
    m = PendingReplies(10)
    m.add("a", "t.a", None, timeout=1, owner=OWNER, now=0)
    m.discard("a")
    assert (len(m), m.expired, m.evicted) == (0, 0, 0)
    assert m.expire(100) == []


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PendingReplies(0)
