"""Latency into Kafka: ``python -m benchmarks --only kafka-latency``.

At 1,000 msg/s of 100 B, one-way latency to an aiokafka subscriber through each way into
the broker, alternating so each sees the same moments of the machine: Kafka's own pub ->
sub, flowbridge NATS -> Kafka (at-most-once), the smallest nats-py -> aiokafka forwarder
(``forwarder.py``: the floor of a bridge made of these client libraries) and mq-bridge.
Every measurement gets a fresh topic (Tansu's fetch slows with each batch a topic holds).
Medians over the runs of each.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.run import (
    LAT_RATE,
    PY,
    ROOT,
    Brokers,
    Case,
    End,
    Plan,
    _probe,
    cases,
    latency_of,
    say,
    start,
    terminate,
)

COUNT = 3000
IMPLS = ("direct", "flowbridge", "forwarder", "mq-bridge")


@dataclass
class LatencyResult:
    impl: str
    note: str
    error: str = ""
    p50_us: list[float] = field(default_factory=list)  # one per run
    p99_us: list[float] = field(default_factory=list)
    p999_us: list[float] = field(default_factory=list)

    def add(self, lat: dict[str, float]) -> None:
        self.p50_us.append(lat["p50"])
        self.p99_us.append(lat["p99"])
        self.p999_us.append(lat["p999"])
        say(f"    p50/p99/p99.9 {lat['p50']:.0f}/{lat['p99']:.0f}/{lat['p999']:.0f} us")

    def measure(
        self, begin: Callable[[], Any], src: End, dst: End, url: dict[str, str], count: int
    ) -> None:
        """One run: ``begin`` starts what carries the messages (None: nothing), stopped after."""
        carrier: Any = None
        try:
            carrier = begin()
            self.add(latency_of(src, dst, url, count))
        except Exception as exc:  # one broken measurement must not end the run
            self.error = f"{type(exc).__name__}: {exc}"
            say(f"    ERROR {self.error[:160]}")
        finally:
            if carrier is not None:
                carrier.stop()
        time.sleep(0.2)


class _Forwarder:
    impl = "forwarder"

    def __init__(self, b: Brokers, src: End, dst: End) -> None:
        cmd = [PY, "-m", "benchmarks.forwarder", b.nats, b.kafka, src.topic, dst.topic]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        terminate(self.proc)


def run_kafka_latency(plan: Plan, b: Brokers, workdir: Path) -> list[LatencyResult]:
    try:
        import mq_bridge  # noqa: F401, PLC0415

        impls = IMPLS if plan.peer else IMPLS[:3]
    except ImportError:
        impls = IMPLS[:3]
    notes = {
        "direct": "aiokafka pub -> aiokafka sub, no bridge",
        "flowbridge": "NATS -> flowbridge -> Kafka, at-most-once",
        "forwarder": "NATS -> nats-py + aiokafka send() per message -> Kafka",
        "mq-bridge": "NATS -> mq-bridge -> Kafka",
    }
    out = {impl: LatencyResult(impl, notes[impl]) for impl in impls}
    url = b.urls
    for n in range(max(plan.repeat, 3)):
        for impl in impls:
            say(f"kafka-latency run {n + 1}: {impl}")
            case = next(
                c
                for c in cases(b, 100)
                if c.name == ("Kafka->NATS" if impl == "direct" else "NATS->Kafka")
                and c.mode == "at-most-once"
            )
            src = case.pub
            dst = case.sub if impl != "direct" else End(src.proto, src.topic, src.qos)

            def begin(case: Case = case, impl: str = impl, src: End = src, dst: End = dst) -> Any:
                if impl != "forwarder":
                    return start(b, case, impl, workdir, probe=True)
                for step in case.setup:
                    step()
                fwd = _Forwarder(b, src, dst)
                try:
                    _probe(fwd, src, dst, url)
                except Exception:
                    fwd.stop()
                    raise
                return fwd

            out[impl].measure(begin, src, dst, url, COUNT)
    return list(out.values())


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The "Latency into Kafka" section of results.md (empty when the suite did not run)."""
    if not rows:
        return ""
    out = [
        "## Latency into Kafka\n",
        f"{COUNT} messages of 100 B at {LAT_RATE:.0f} msg/s to an aiokafka subscriber, each "
        "way into the broker alternating, a fresh topic per measurement; medians of the runs "
        "(every run's p50 in the last column). `forwarder` is the smallest nats-py -> aiokafka "
        "forwarder: what any bridge made of these client libraries adds.\n",
        "| into Kafka | path | p50 (us) | p99 (us) | p99.9 (us) | p50 - direct | runs' p50 |",
        "|" + "---|" * 7,
    ]
    direct = next((r for r in rows if r["impl"] == "direct" and r["p50_us"]), None)
    base = statistics.median(direct["p50_us"]) if direct else None
    for r in rows:
        added = "-"
        if base is not None and r["impl"] != "direct" and r["p50_us"]:
            added = f"{statistics.median(r['p50_us']) - base:+.0f}"
        runs = " / ".join(f"{v:.0f}" for v in r["p50_us"]) or r["error"][:80].replace("|", "/")
        out.append(
            f"| {r['impl']} | {r['note']} | {med(r['p50_us'])} | {med(r['p99_us'])} | "
            f"{med(r['p999_us'])} | {added} | {runs} |"
        )
    return "\n".join(out) + "\n"
