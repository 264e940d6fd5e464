"""Metrics collector, status document and HTTP server over a bridge on the in-memory
brokers (no network but the server's own loopback socket)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from flowbridge.adapters.base import ConnState, Message
from flowbridge.adapters.memory import (
    MemoryAdapter,
    MemoryAmqp,
    MemoryBroker,
    MemoryKafka,
    MemoryMqtt,
    MemoryNats,
)
from flowbridge.config import load
from flowbridge.engine import LATENCY_BUCKETS, Bridge
from flowbridge.errors import FlowbridgeError
from flowbridge.metrics import build_registry
from flowbridge.ops import OpsServer, parse_address
from flowbridge.ops.status import RateMeter, public_url, scrub, status

REGISTRY = {"nats": MemoryNats, "mqtt": MemoryMqtt, "amqp": MemoryAmqp, "kafka": MemoryKafka}

MAPPING = """
brokers:
  edge: {url: "mqtt://edge"}
  core: {url: "nats://core", options: {max_payload: 8}}
  other: {url: "amqp://other"}
routes:
  - name: up
    from: {broker: edge, filter: "s/#"}
    to: [{broker: core}]
    dead_letter: {broker: edge, topic: "dead/up"}
  - name: fan
    from: {broker: core, filter: "f.>"}
    to: [{broker: edge}, {broker: other}]
  - name: lossy
    from: {broker: edge, filter: "l/#"}
    to: [{broker: other}]
    delivery: at-most-once
"""


@pytest.fixture(autouse=True)
def _fresh_brokers() -> None:
    MemoryBroker.reset()


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(MAPPING))
    b = Bridge(load([str(path)], environ={}, registry=REGISTRY))
    stop = asyncio.Event()
    task = asyncio.ensure_future(b.run(stop))
    await asyncio.sleep(0.05)  # routes subscribe
    yield b
    stop.set()
    await task


def mem(host: str) -> MemoryBroker:
    return MemoryBroker.get(f"x://{host}")


async def settle(cond: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


async def test_route_counters_bytes_and_latency(bridge: Bridge) -> None:
    reg = build_registry(bridge, process=False)
    for p in (b"1", b"22", b"333"):
        mem("edge").deliver(Message("s/a", p))
    await settle(lambda: len(mem("core").published) == 3)
    await settle(lambda: bridge.stats()["up"].in_flight == 0)
    assert value(reg, "flowbridge_route_messages_in_total", route="up") == 3
    assert value(reg, "flowbridge_route_messages_out_total", route="up") == 3
    assert value(reg, "flowbridge_route_bytes_in_total", route="up") == 6
    assert value(reg, "flowbridge_route_bytes_out_total", route="up") == 6
    assert value(reg, "flowbridge_route_in_flight", route="up") == 0
    name = "flowbridge_route_forward_latency_seconds"
    assert value(reg, f"{name}_count", route="up") == 3
    assert value(reg, f"{name}_bucket", route="up", le="+Inf") == 3
    assert value(reg, f"{name}_sum", route="up") > 0
    cumulative = [value(reg, f"{name}_bucket", route="up", le=f"{b:g}") for b in LATENCY_BUCKETS]
    assert cumulative == sorted(cumulative)
    assert cumulative[-1] == 3  # in-memory forwarding takes far less than 5 s
    # Scrapes read live counters: a later message shows without re-registering.
    mem("edge").deliver(Message("s/b", b"4"))
    await settle(lambda: value(reg, "flowbridge_route_messages_out_total", route="up") == 4)


async def test_dead_lettered_and_dropped_by_reason(bridge: Bridge) -> None:
    reg = build_registry(bridge, process=False)
    mem("edge").deliver(Message("s/big", b"more than eight bytes"))
    await settle(lambda: any(m.topic == "dead/up" for m in mem("edge").published))
    assert value(reg, "flowbridge_route_dead_lettered_total", route="up", reason="too large") == 1
    mem("other").down = True
    mem("edge").deliver(Message("l/x", b"gone"))
    await settle(lambda: sum(bridge.stats()["lossy"].dropped.values()) == 1)
    assert (
        value(reg, "flowbridge_route_dropped_total", route="lossy", reason="other unavailable") == 1
    )


async def test_broker_attribution_and_fan_out(bridge: Bridge) -> None:
    reg = build_registry(bridge, process=False)
    mem("edge").deliver(Message("s/a", b"abc"))
    mem("core").deliver(Message("f.x", b"xy"))
    await settle(lambda: bridge.stats()["fan"].forwarded == 2)
    await settle(lambda: bridge.stats()["up"].forwarded == 1)
    assert value(reg, "flowbridge_broker_messages_in_total", broker="edge") == 1
    assert value(reg, "flowbridge_broker_bytes_in_total", broker="edge") == 3
    assert value(reg, "flowbridge_broker_messages_in_total", broker="core") == 1
    assert value(reg, "flowbridge_broker_messages_out_total", broker="core") == 1
    assert value(reg, "flowbridge_broker_bytes_out_total", broker="core") == 3
    # "fan" has two target brokers: each is credited with what it accepted.
    assert value(reg, "flowbridge_route_messages_out_total", route="fan") == 2
    assert value(reg, "flowbridge_broker_messages_out_total", broker="other") == 1
    assert value(reg, "flowbridge_broker_bytes_out_total", broker="other") == 2


async def test_connection_state_and_readiness(bridge: Bridge) -> None:
    reg = build_registry(bridge, process=False)
    assert value(reg, "flowbridge_ready") == 1
    assert value(reg, "flowbridge_broker_connected", broker="core") == 1
    core = bridge.adapters["core"]
    assert isinstance(core, MemoryAdapter)
    core.state = ConnState.DISCONNECTED
    assert value(reg, "flowbridge_ready") == 0
    assert value(reg, "flowbridge_broker_connected", broker="core") == 0
    assert value(reg, "flowbridge_broker_ready", broker="core") == 0
    assert value(reg, "flowbridge_broker_ready", broker="edge") == 1
    states = {
        s.value: value(reg, "flowbridge_broker_state", broker="core", state=s.value)
        for s in ConnState
    }
    assert states == {"connecting": 0, "connected": 0, "disconnected": 1, "closed": 0}
    assert value(reg, "flowbridge_broker_reconnects_total", broker="core") == 0


async def test_exposition_parses_and_uses_only_declared_labels(bridge: Bridge) -> None:
    from prometheus_client import generate_latest  # noqa: PLC0415

    mem("edge").deliver(Message("s/big", b"more than eight bytes"))
    await settle(lambda: bool(bridge.recent_dead))
    text = generate_latest(build_registry(bridge)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {n: f for n, f in families.items() if n.startswith("flowbridge_")}
    assert len(ours) >= 20
    assert "process_cpu_seconds" in families
    for fam in ours.values():
        for s in fam.samples:
            assert set(s.labels) <= {"route", "broker", "reason", "state", "le"}, s


async def test_adapter_counters_are_broker_events(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = bridge.adapters["other"]
    counts = {"rpc_expired": 3, "rpc_requests": 7}
    monkeypatch.setattr(other, "counters", lambda: dict(counts))
    reg = build_registry(bridge, process=False)
    assert value(reg, "flowbridge_broker_events_total", broker="other", event="rpc_expired") == 3
    counts["rpc_expired"] = 4  # read at scrape time
    assert value(reg, "flowbridge_broker_events_total", broker="other", event="rpc_expired") == 4
    assert reg.get_sample_value("flowbridge_broker_events_total", {"broker": "core"}) is None
    doc = status(bridge, RateMeter())
    assert next(b for b in doc["brokers"] if b["name"] == "other")["counters"] == counts
    assert next(b for b in doc["brokers"] if b["name"] == "core")["counters"] == {}


def test_public_url_and_scrub_hide_secrets() -> None:
    assert public_url("amqp://guest:pw@h:5672/vh") == "amqp://guest:***@h:5672/vh"
    assert public_url("nats://s3cr3t@h:4222") == "nats://***@h:4222"
    assert public_url("mqtt://h:1883?password=x&qos=1") == "mqtt://h:1883?password=***&qos=1"
    assert public_url("kafka://a:9092,b:9092") == "kafka://a:9092,b:9092"
    assert public_url("http://u:pw@[::1") == "http://u:***@[::1"  # malformed, still masked
    text = scrub("connect amqp://u:pw@h:1 failed; token=abc&x=1 auth_key=zz")
    assert "pw" not in text
    assert "abc" not in text
    assert "zz" not in text
    assert "x=1" in text


def test_rate_meter_rates_and_restarts() -> None:
    from flowbridge.engine import RouteStats  # noqa: PLC0415

    meter = RateMeter(window=3)
    st = RouteStats()
    assert meter.rates() == {}
    meter.sample(0.0, {"r": st})
    st.received, st.forwarded, st.bytes_in, st.bytes_out = 10, 20, 100, 200
    meter.sample(2.0, {"r": st})
    assert meter.rates()["r"] == {"in": 5.0, "out": 10.0, "bytes_in": 50.0, "bytes_out": 100.0}
    restarted = RouteStats(received=1, forwarded=1)  # a reload restarted the route
    meter.sample(3.0, {"r": restarted})
    assert "r" not in meter.rates()
    restarted.received = 5
    meter.sample(4.0, {"r": restarted})
    assert meter.rates()["r"]["in"] == 4.0


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:9") == ("::1", 9)
    assert parse_address(":8080") == (None, 8080)
    for bad in ("8080", "h:", "h:x", "h:70000", "h:0"):
        with pytest.raises(FlowbridgeError, match="HOST:PORT"):
            parse_address(bad)


async def test_status_document(bridge: Bridge) -> None:
    mem("edge").deliver(Message("s/big", b"more than eight bytes"))
    await settle(lambda: bool(bridge.recent_dead))
    doc = status(bridge, RateMeter())
    json.dumps(doc)  # serialisable as is
    assert doc["ready"] is True
    assert [b["name"] for b in doc["brokers"]] == ["core", "edge", "other"]
    up = next(r for r in doc["routes"] if r["name"] == "up")
    assert up["source"] == {"broker": "edge", "protocol": "mqtt", "filter": "s/#"}
    assert up["delivery"] == "at-least-once"
    assert up["dead_lettered"] == {"too large": 1}
    assert doc["dead_letters"][0]["topic"] == "s/big"
    assert doc["dead_letters"][0]["target"] == "core"


# ---------------------------------------------------------------------------------------------
# The HTTP server itself: routing, probes and hostile input.


@pytest.fixture
async def server(bridge: Bridge) -> AsyncIterator[OpsServer]:
    async with OpsServer(bridge) as srv:
        await srv.start("127.0.0.1", 0)
        yield srv


async def raw(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return out


def head_status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


Get = Callable[[str], Awaitable[tuple[int, bytes]]]


@pytest.fixture
def get(server: OpsServer) -> Get:
    async def _get(path: str) -> tuple[int, bytes]:
        out = await raw(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, _, body = out.partition(b"\r\n\r\n")
        return head_status(head), body

    return _get


async def test_probes_follow_readiness(bridge: Bridge, get: Get) -> None:
    assert await get("/healthz") == (200, b"ok\n")
    code, body = await get("/readyz")
    assert (code, json.loads(body)) == (200, {"ready": True})
    core = bridge.adapters["core"]
    assert isinstance(core, MemoryAdapter)
    core.state = ConnState.DISCONNECTED
    code, body = await get("/readyz")
    assert code == 503
    assert json.loads(body)["brokers"] == {"core": "disconnected"}
    assert (await get("/healthz"))[0] == 200


async def test_readyz_says_stopping(bridge: Bridge) -> None:
    stopping = asyncio.Event()
    async with OpsServer(bridge, stopping=stopping) as srv:
        await srv.start("127.0.0.1", 0)
        stopping.set()
        out = await raw(srv.port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert head_status(out) == 503
        assert json.loads(out.partition(b"\r\n\r\n")[2])["stopping"] is True


async def test_metrics_status_and_page(get: Get) -> None:
    code, body = await get("/metrics")
    assert code == 200
    assert b'flowbridge_broker_connected{broker="core"} 1.0' in body
    code, body = await get("/api/status?x=1")
    assert code == 200
    assert json.loads(body)["routes"][0]["name"] == "up"
    code, body = await get("/")
    assert code == 200
    assert b"<title>flowbridge status</title>" in body
    assert b"http://" not in body
    assert b"https://" not in body  # self-contained: no external assets


async def test_openmetrics_negotiation(server: OpsServer) -> None:
    out = await raw(
        server.port,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    )
    assert b"Content-Type: application/openmetrics-text" in out
    assert out.rstrip().endswith(b"# EOF")


async def test_bad_requests(server: OpsServer) -> None:
    port = server.port
    assert head_status(await raw(port, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
    out = await raw(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert head_status(out) == 405
    assert b"Allow: GET, HEAD" in out
    assert head_status(await raw(port, b"garbage\r\n\r\n")) == 400
    assert head_status(await raw(port, b"GET http://x/ HTTP/1.1\r\n\r\n")) == 400
    assert head_status(await raw(port, b"GET / HTTP/2.0\r\n\r\n")) == 505
    assert head_status(await raw(port, b"GET / HTTP/1.1\r\nno colon\r\n\r\n")) == 400
    huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
    assert head_status(await raw(port, huge)) == 431
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n"
    assert head_status(await raw(port, many)) == 431
    assert await raw(port, b"GET / HTT") == b""  # client gave up mid-request: nothing sent
    out = await raw(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert head_status(out) == 200
    assert b"Content-Length: 3" in out
    assert out.endswith(b"\r\n\r\n")  # HEAD: no body
    # Still serving after all of that.
    assert head_status(await raw(port, b"GET /healthz HTTP/1.0\r\n\r\n")) == 200


async def test_slow_client_times_out(server: OpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import flowbridge.ops.server as srv  # noqa: PLC0415

    monkeypatch.setattr(srv, "READ_TIMEOUT", 0.2)
    out = await raw(server.port, b"GET / HTTP/1.1\r\n", half_close=False)
    assert head_status(out) == 408


async def test_handler_failure_is_500_and_server_survives(
    server: OpsServer, bridge: Bridge, get: Get, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(bridge, "stats", broken)
    assert (await get("/api/status"))[0] == 500
    monkeypatch.undo()
    assert (await get("/api/status"))[0] == 200


async def test_listen_failure_is_one_clear_error(server: OpsServer, bridge: Bridge) -> None:
    other = OpsServer(bridge)
    with pytest.raises(FlowbridgeError, match="cannot listen"):
        await other.start("127.0.0.1", server.port)
    await other.close()
