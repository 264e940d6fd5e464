"""Latency through Kafka: ``python -m benchmarks --only kafka-latency``.

Tansu, the Kafka broker here, answers a fetch only when its wait runs out, so one latency
run of a Kafka path differs from the next by more than a bridge adds (p50 by about 0.5 ms,
p99 by several ms): a bridged path compared with Kafka's own, measured minutes apart, says
more about the broker's moment than about the bridge.  So each measurement here runs both at
the same moments: Kafka's own pub -> sub on a topic of its own, and beside it the bridged
path, each 3,000 messages of 100 B at 1,000 msg/s.  ``added`` is the bridged percentile less
the direct one of the same seconds; the medians over the runs are reported.

Both ways: into Kafka (NATS -> bridge -> Kafka) and out of it (Kafka -> bridge -> NATS),
through flowbridge (at-most-once), through the smallest nats-py / aiokafka forwarder
(``forwarder.py``: the floor of any bridge made of these client libraries) and through
mq-bridge.  Every measurement gets fresh topics (Tansu's fetch slows with each batch a topic
holds).
"""

from __future__ import annotations

import statistics
import subprocess
import threading
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
    kafka_create,
    latency_of,
    say,
    start,
    terminate,
)

COUNT = 3000
IMPLS = ("flowbridge", "forwarder", "mq-bridge")
# way -> the at-most-once case that carries it
WAYS = {"into Kafka": "NATS->Kafka", "out of Kafka": "Kafka->NATS"}


@dataclass
class LatencyResult:
    impl: str
    note: str
    error: str = ""
    p50_us: list[float] = field(default_factory=list)  # one per run
    p99_us: list[float] = field(default_factory=list)
    p999_us: list[float] = field(default_factory=list)
    way: str = ""
    # Kafka's own pub -> sub at the same moments as each run above
    direct_p50_us: list[float] = field(default_factory=list)
    direct_p99_us: list[float] = field(default_factory=list)

    def add(self, lat: dict[str, float]) -> None:
        self.p50_us.append(lat["p50"])
        self.p99_us.append(lat["p99"])
        self.p999_us.append(lat["p999"])
        say(f"    p50/p99/p99.9 {lat['p50']:.0f}/{lat['p99']:.0f}/{lat['p999']:.0f} us")

    def add_pair(self, lat: dict[str, float], direct: dict[str, float]) -> None:
        self.add(lat)
        self.direct_p50_us.append(direct["p50"])
        self.direct_p99_us.append(direct["p99"])
        say(
            f"    Kafka's own path at the same moments: p50/p99 "
            f"{direct['p50']:.0f}/{direct['p99']:.0f} us; added "
            f"{lat['p50'] - direct['p50']:+.0f}/{lat['p99'] - direct['p99']:+.0f} us"
        )

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

    def measure_beside_direct(
        self, begin: Callable[[], Any], src: End, dst: End, direct: End, b: Brokers
    ) -> None:
        """One run of the bridged path and, in the same seconds, Kafka's own on ``direct``."""
        url = b.urls
        carrier: Any = None
        got: dict[str, dict[str, float]] = {}
        failed: list[BaseException] = []

        def one(key: str, a: End, z: End) -> None:
            try:
                got[key] = latency_of(a, z, url, COUNT)
            except Exception as exc:  # reported below, beside the other side's result
                failed.append(exc)

        try:
            carrier = begin()
            kafka_create(b, direct.topic)
            sides = [
                threading.Thread(target=one, args=("bridged", src, dst)),
                threading.Thread(target=one, args=("direct", direct, direct)),
            ]
            for t in sides:
                t.start()
            for t in sides:
                t.join()
        except Exception as exc:  # one broken measurement must not end the run
            failed.append(exc)
        finally:
            if carrier is not None:
                carrier.stop()
        if failed:
            self.error = f"{type(failed[0]).__name__}: {failed[0]}"
            say(f"    ERROR {self.error[:160]}")
        else:
            self.add_pair(got["bridged"], got["direct"])
        time.sleep(0.2)


class _Forwarder:
    impl = "forwarder"

    def __init__(self, b: Brokers, src: End, dst: End) -> None:
        if src.proto == "kafka":  # out of Kafka
            args = [dst.topic, src.topic, "--from-kafka"]
        else:
            args = [src.topic, dst.topic]
        cmd = [PY, "-m", "benchmarks.forwarder", b.nats, b.kafka, *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        terminate(self.proc)


def run_kafka_latency(plan: Plan, b: Brokers, workdir: Path) -> list[LatencyResult]:
    try:
        import mq_bridge  # noqa: F401, PLC0415

        impls = IMPLS if plan.peer else IMPLS[:2]
    except ImportError:
        impls = IMPLS[:2]
    notes = {
        "flowbridge": "flowbridge, at-most-once",
        "forwarder": "nats-py + aiokafka, one call per message",
        "mq-bridge": "mq-bridge",
    }
    out = {(way, impl): LatencyResult(impl, notes[impl], way=way) for way in WAYS for impl in impls}
    url = b.urls
    for n in range(max(plan.repeat, 3)):
        for way, name in WAYS.items():
            for impl in impls:
                say(f"kafka-latency run {n + 1}: {way}, {impl}")
                case = next(c for c in cases(b, 100) if c.name == name and c.mode == "at-most-once")
                # Kafka's own path: the source topic of a fresh Kafka->NATS case
                own = next(c for c in cases(b, 100) if c.name == "Kafka->NATS").pub

                def begin(case: Case = case, impl: str = impl) -> Any:
                    if impl != "forwarder":
                        return start(b, case, impl, workdir, probe=True)
                    for step in case.setup:  # the case's topics (and streams)
                        step()
                    fwd = _Forwarder(b, case.pub, case.sub)
                    try:
                        _probe(fwd, case.pub, case.sub, url)
                    except Exception:
                        fwd.stop()
                        raise
                    return fwd

                out[way, impl].measure_beside_direct(begin, case.pub, case.sub, own, b)
    return list(out.values())


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def _diffs(r: dict[str, Any], q: str) -> list[float]:
    """Each run's bridged percentile less Kafka's own of the same seconds."""
    return [a - d for a, d in zip(r[f"{q}_us"], r[f"direct_{q}_us"], strict=True)]


def _added(r: dict[str, Any]) -> tuple[float, float] | None:
    if not r["direct_p50_us"]:
        return None
    return statistics.median(_diffs(r, "p50")), statistics.median(_diffs(r, "p99"))


def added_worst(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, str]]:
    """flowbridge's worst way: {"p50"/"p99": (added us, floor's added us, way)}."""
    worst: dict[str, tuple[float, float, str]] = {}
    for r in rows:
        got = _added(r) if r["impl"] == "flowbridge" else None
        if got is None:
            continue
        floor = next(
            (_added(f) for f in rows if f["impl"] == "forwarder" and f["way"] == r["way"]), None
        )
        for i, key in enumerate(("p50", "p99")):
            if key not in worst or got[i] > worst[key][0]:
                worst[key] = (got[i], floor[i] if floor else float("nan"), r["way"])
    return worst


def markdown(rows: list[dict[str, Any]]) -> str:
    """The "Latency through Kafka" section of results.md (empty when the suite did not run)."""
    if not rows:
        return ""
    out = [
        "## Latency through Kafka\n",
        f"{COUNT} messages of 100 B at {LAT_RATE:.0f} msg/s, each bridged run with Kafka's "
        "own pub -> sub (aiokafka, a topic of its own) in the same seconds; `added` is the "
        "bridged percentile less Kafka's own of the same seconds, the median over the runs. "
        "`forwarder` is the smallest nats-py / aiokafka forwarder: what any bridge made of "
        "these client libraries adds.\n",
        "| way | path | p50 / p99 / p99.9 (us) | Kafka's own, same moments: p50 / p99 (us) "
        "| added p50 / p99 (us) | runs' added p50 |",
        "|" + "---|" * 6,
    ]
    for r in rows:
        got = _added(r)
        added = f"{got[0]:+.0f} / {got[1]:+.0f}" if got else "-"
        runs = " / ".join(f"{v:+.0f}" for v in _diffs(r, "p50")) or r["error"][:80].replace(
            "|", "/"
        )
        way = r.get("way") or "-"
        out.append(
            f"| {way} | {r['note']} | {med(r['p50_us'])} / {med(r['p99_us'])} / "
            f"{med(r['p999_us'])} | {med(r['direct_p50_us'])} / {med(r['direct_p99_us'])} | "
            f"{added} | {runs} |"
        )
    return "\n".join(out) + "\n"
