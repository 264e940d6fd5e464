"""The suites beside the per-case table: bursts and memory (``burst.py``), scale-out
(``scaleout.py``), latency through Kafka (``kafka_latency.py``) and across a slow link
(``wan.py``).  They run on a full run, or when ``--only`` names them (``--only burst``,
``--only scale``, ``--only kafka-latency``, ``--only wan``; with ``--quick``, their quick
variants)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import burst, kafka_latency, scaleout, wan
from benchmarks.run import Brokers, Plan

Rows = list[dict[str, Any]]

SUITES: dict[str, tuple[Callable[[Plan, Brokers, Path], list[Any]], Callable[[Rows], str]]] = {
    "burst": (burst.run_burst, burst.markdown),
    "scale-out": (scaleout.run_scaleout, scaleout.markdown),
    "kafka-latency": (kafka_latency.run_kafka_latency, kafka_latency.markdown),
    "wan": (wan.run_wan, wan.markdown),
}


def selected(plan: Plan) -> list[str]:
    if not plan.only:
        return [] if plan.quick else list(SUITES)
    return [name for name in SUITES if any(o.lower() in name for o in plan.only)]


def run(plan: Plan, b: Brokers, workdir: Path) -> dict[str, Rows]:
    return {name: [asdict(r) for r in SUITES[name][0](plan, b, workdir)] for name in selected(plan)}


def markdown(extra: dict[str, Rows]) -> str:
    return "".join("\n" + SUITES[name][1](rows) for name, rows in extra.items() if rows)
