"""Prometheus metrics, read from the bridge's own counters at scrape time.

Nothing here runs per message: the engine keeps plain integers in ``RouteStats`` and the
adapters report ``Health``; a scrape copies them (``Snapshot``, cheap, on the event loop) and
builds the metric families from the copy, which the HTTP server does in a worker thread so a
large scrape never stalls forwarding.  Routes restarted by a reload start from zero again,
which Prometheus treats as an ordinary counter reset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from flowbridge.adapters.base import ConnState, Health
from flowbridge.engine import LATENCY_BUCKETS, RouteStats

if TYPE_CHECKING:
    from flowbridge.config import Config
    from flowbridge.engine import Bridge

# prometheus-client's process, platform and GC collectors: read-only, fine in any thread.
STANDARD: tuple[Collector, ...] = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)
_STATES = tuple(s.value for s in ConnState)
_BUCKET_LABELS = tuple(f"{b:g}" for b in LATENCY_BUCKETS)


def used_brokers(config: Config) -> list[str]:
    """Brokers some route reads, writes or dead-letters to (the ones readiness covers)."""
    names: set[str] = set()
    for r in config.routes:
        names.add(r.source.broker)
        names.update(t.broker for t in r.targets)
        if r.dead_letter is not None:
            names.add(r.dead_letter.broker)
    return sorted(names)


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The bridge's counters at one instant, safe to read from another thread."""

    config: Config  # frozen models, swapped whole by a reload
    stats: dict[str, RouteStats]  # copies
    health: dict[str, Health]  # fresh objects from each adapter
    ready: bool
    echo_evicted: int
    counters: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # by broker

    @classmethod
    def of(cls, bridge: Bridge) -> Snapshot:
        config = bridge.config
        stats = {
            name: dataclasses.replace(
                st,
                dead_lettered=st.dead_lettered.copy(),
                dropped=st.dropped.copy(),
                latency_counts=list(st.latency_counts),
            )
            for name, st in bridge.stats().items()
        }
        health = {
            name: bridge.adapters[name].health()
            for name in used_brokers(config)
            if name in bridge.adapters
        }
        counters = {
            name: bridge.adapters[name].counters()
            for name in used_brokers(config)
            if name in bridge.adapters
        }
        return cls(config, stats, health, bridge.ready()[0], bridge.echo.evicted, counters)


class BridgeCollector:
    """A prometheus-client collector over one running ``Bridge``."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not depend on the bridge's state.
        return families(
            dataclasses.replace(Snapshot.of(self.bridge), stats={}, health={}, counters={})
        )

    def collect(self) -> Iterator[Metric]:
        return families(Snapshot.of(self.bridge))


class FixedCollector:
    """The families of one snapshot, plus other collectors (process metrics) to render in a
    worker thread: ``generate_latest(FixedCollector(...))``."""

    def __init__(self, snapshot: Snapshot, others: Iterable[Collector] = STANDARD) -> None:
        self.snapshot = snapshot
        self.others = list(others)

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot)
        for c in self.others:
            yield from c.collect()


def families(snap: Snapshot) -> Iterator[Metric]:
    """Every ``flowbridge_*`` metric family of ``snap``."""
    stats = snap.stats
    route_counters = {
        "received": ("messages_in", "Messages taken from the route's source"),
        "forwarded": (
            "messages_out",
            "Messages accepted by a target (one per target of the route)",
        ),
        "bytes_in": ("bytes_in", "Payload bytes taken from the route's source"),
        "bytes_out": ("bytes_out", "Payload bytes accepted by the route's targets"),
        "echo_suppressed": (
            "echo_suppressed",
            "Messages the bridge itself published that came back and were not forwarded",
        ),
        "filtered": ("filtered", "'$' topics a leading wildcard must not match"),
        "offloaded": (
            "offloaded",
            "Messages too large for a target, sent as link envelopes via the file server",
        ),
        "retries": ("retries", "Publish attempts repeated while a target was unreachable"),
    }
    for attr, (name, doc) in route_counters.items():
        fam = CounterMetricFamily(f"flowbridge_route_{name}", doc, labels=["route"])
        for route, st in stats.items():
            fam.add_metric([route], getattr(st, attr))
        yield fam

    dead = CounterMetricFamily(
        "flowbridge_route_dead_lettered",
        "Messages a target refused, sent to the dead-letter target or discarded when the "
        "route has none",
        labels=["route", "reason"],
    )
    dropped = CounterMetricFamily(
        "flowbridge_route_dropped",
        "Messages given up (an at-most-once source's intake buffer full, at-most-once "
        "target unreachable, dead-letter target refused)",
        labels=["route", "reason"],
    )
    in_flight = GaugeMetricFamily(
        "flowbridge_route_in_flight",
        "Messages of the route's current batch not yet confirmed by every target",
        labels=["route"],
    )
    latency = HistogramMetricFamily(
        "flowbridge_route_forward_latency_seconds",
        "From taking a batch off the source to every target confirming it, per message",
        labels=["route"],
    )
    for route, st in stats.items():
        for reason, n in sorted(st.dead_lettered.items()):
            dead.add_metric([route, reason], n)
        for reason, n in sorted(st.dropped.items()):
            dropped.add_metric([route, reason], n)
        in_flight.add_metric([route], st.in_flight)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for label, n in zip(_BUCKET_LABELS, st.latency_counts, strict=False):
            cumulative += n
            buckets.append((label, cumulative))
        buckets.append(("+Inf", sum(st.latency_counts)))
        latency.add_metric([route], buckets, st.latency_sum)
    yield dead
    yield dropped
    yield in_flight
    yield latency
    yield from _broker_families(snap)


def _broker_families(snap: Snapshot) -> Iterator[Metric]:
    stats = snap.stats
    brokers = list(snap.health)
    msgs_in: dict[str, int] = dict.fromkeys(brokers, 0)
    bytes_in: dict[str, int] = dict.fromkeys(brokers, 0)
    msgs_out: dict[str, int] = dict.fromkeys(brokers, 0)
    bytes_out: dict[str, int] = dict.fromkeys(brokers, 0)
    for route in snap.config.routes:
        st = stats.get(route.name)
        if st is None:
            continue
        if route.source.broker in msgs_in:
            msgs_in[route.source.broker] += st.received
            bytes_in[route.source.broker] += st.bytes_in
        for target, n in st.forwarded_to.items():
            if target in msgs_out:
                msgs_out[target] += n
                bytes_out[target] += st.bytes_to[target]
    for name, values, doc in (
        ("messages_in", msgs_in, "Messages routes took from this broker"),
        ("bytes_in", bytes_in, "Payload bytes routes took from this broker"),
        (
            "messages_out",
            msgs_out,
            "Messages this broker accepted from routes",
        ),
        (
            "bytes_out",
            bytes_out,
            "Payload bytes this broker accepted from routes",
        ),
    ):
        fam = CounterMetricFamily(f"flowbridge_broker_{name}", doc, labels=["broker"])
        for broker, v in values.items():
            fam.add_metric([broker], v)
        yield fam

    reconnects = CounterMetricFamily(
        "flowbridge_broker_reconnects",
        "Connections re-established after a loss",
        labels=["broker"],
    )
    connected = GaugeMetricFamily(
        "flowbridge_broker_connected", "1 while connected to the broker", labels=["broker"]
    )
    state = GaugeMetricFamily(
        "flowbridge_broker_state",
        "1 for the connection's current state, 0 for the others",
        labels=["broker", "state"],
    )
    subscribed = GaugeMetricFamily(
        "flowbridge_broker_subscribed",
        "1 when every subscription the routes asked of the broker is active",
        labels=["broker"],
    )
    up = GaugeMetricFamily(
        "flowbridge_broker_ready",
        "1 when the broker is connected and subscribed (what /readyz requires)",
        labels=["broker"],
    )
    for broker, h in snap.health.items():
        reconnects.add_metric([broker], h.reconnects)
        connected.add_metric([broker], 1 if h.state is ConnState.CONNECTED else 0)
        for s in _STATES:
            state.add_metric([broker, s], 1 if h.state.value == s else 0)
        subscribed.add_metric([broker], 1 if h.subscribed else 0)
        up.add_metric([broker], 1 if h.ok else 0)
    events = CounterMetricFamily(
        "flowbridge_broker_events",
        "Events an adapter counts itself, by name (e.g. AMQP rpc_expired: RPC requests "
        "that got no reply in time)",
        labels=["broker", "event"],
    )
    for broker, counts in snap.counters.items():
        for event, n in sorted(counts.items()):
            events.add_metric([broker, event], n)
    yield events
    yield reconnects
    yield connected
    yield state
    yield subscribed
    yield up

    ready = GaugeMetricFamily(
        "flowbridge_ready", "1 when every broker a route needs is connected and subscribed"
    )
    ready.add_metric([], 1 if snap.ready else 0)
    yield ready
    evicted = CounterMetricFamily(
        "flowbridge_echo_guard_evicted",
        "Expected echoes forgotten before they came back (guard full): possible duplicates",
    )
    evicted.add_metric([], snap.echo_evicted)
    yield evicted


def build_registry(bridge: Bridge, *, process: bool = True) -> CollectorRegistry:
    """A registry of the bridge's metrics (and, with ``process``, the standard process, GC
    and platform metrics), separate from prometheus-client's global one."""
    registry = CollectorRegistry()
    registry.register(BridgeCollector(bridge))
    if process:
        for collector in STANDARD:
            registry.register(collector)
    return registry
