"""A target across a slow link: ``python -m benchmarks --only wan``.

MQTT QoS 1 -> flowbridge -> NATS, at-least-once, with the bridge reaching nats-server through
a relay that holds every byte DELAY_MS in each direction (a WAN round trip of twice that);
the subscriber reads nats-server directly.  At 1,000 msg/s of 100 B, one-way latency of the
route as it is by default (one batch in flight: a message that arrives while a batch waits
for its confirm waits too) against the same route with ``pipeline: DEPTH``, alternating;
``direct`` is MQTT's own pub -> sub, so the floor of a bridged path is direct + DELAY_MS.
Medians of the runs.

``python -m benchmarks.wan --listen PORT --to HOST:PORT --delay-ms D`` runs the relay alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.kafka_latency import LatencyResult, med
from benchmarks.run import (
    LAT_RATE,
    PY,
    ROOT,
    Brokers,
    End,
    Plan,
    _readline,
    cases,
    say,
    start,
    terminate,
)
from tests.support.brokers import free_port, host_port
from tests.support.proxy import TcpProxy

DELAY_MS = 5.0
DEPTH = 16  # more than the batches one round trip holds at 1,000 msg/s
COUNT = 3000


# --------------------------------------------------------------------------- the relay


class _DelayedLink(TcpProxy):
    """The shared test relay, each chunk written ``delay`` after it was read, in order
    (reading goes on meanwhile, so the link adds latency, not a bandwidth limit)."""

    def __init__(self, upstream: tuple[str, int], port: int, delay: float) -> None:
        super().__init__(upstream, port)
        self.delay = delay

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_broker: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=4096)

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await queue.put((loop.time() + self.delay, data))
        await queue.put((0.0, b""))
        with contextlib.suppress(ConnectionError):
            await sender
        writer.close()


async def _relay(listen: int, upstream: tuple[str, int], delay: float) -> None:
    await _DelayedLink(upstream, listen, delay).start()
    print("READY", flush=True)
    await asyncio.Event().wait()  # until the process is terminated


# --------------------------------------------------------------------------- the suite


def run_wan(plan: Plan, b: Brokers, workdir: Path) -> list[LatencyResult]:
    port = free_port()
    host, nats_port = host_port(b.nats, 4222)
    cmd = [PY, "-m", "benchmarks.wan", "--listen", str(port), "--to", f"{host}:{nats_port}"]
    link = subprocess.Popen(
        [*cmd, "--delay-ms", str(DELAY_MS)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    piped = f"flowbridge-p{DEPTH}"
    notes = {
        "direct": "MQTT pub -> MQTT sub, no bridge, no slow link",
        "flowbridge": "one batch in flight (the default)",
        piped: f"pipeline: {DEPTH}",
    }
    out = {impl: LatencyResult(impl, note) for impl, note in notes.items()}
    url = b.urls
    try:
        if _readline(link, 10).strip() != "READY":
            raise RuntimeError("the delay relay did not start")
        for n in range(max(plan.repeat, 3)):
            for impl in notes:
                say(f"wan run {n + 1}: {impl}")
                case = next(
                    c for c in cases(b, 100) if (c.name, c.mode) == ("MQTT->NATS", "at-least-once")
                )
                case = replace(
                    case,
                    flowbridge=case.flowbridge.replace(
                        f'url: "{b.nats}"', f'url: "nats://127.0.0.1:{port}"'
                    ),
                )
                src = case.pub
                dst = case.sub if impl != "direct" else End(src.proto, src.topic, src.qos)
                out[impl].measure(
                    lambda case=case, impl=impl: start(b, case, impl, workdir, probe=True),
                    src,
                    dst,
                    url,
                    COUNT,
                )
    finally:
        terminate(link)
    return list(out.values())


def markdown(rows: list[dict[str, Any]]) -> str:
    """The "Across a slow link" section of results.md (empty when the suite did not run)."""
    if not rows:
        return ""
    out = [
        "## Across a slow link\n",
        f"MQTT QoS 1 -> NATS at-least-once, the bridge reaching nats-server through a relay "
        f"that delays each direction by {DELAY_MS:.0f} ms; {COUNT} messages of 100 B at "
        f"{LAT_RATE:.0f} msg/s, each variant alternating; medians of the runs. The floor of "
        f"a bridged path is direct + {DELAY_MS:.0f} ms.\n",
        "| route | p50 (us) | p99 (us) | p99.9 (us) | p50 / p99 over the floor | runs' p50 |",
        "|" + "---|" * 6,
    ]
    direct = next((r for r in rows if r["impl"] == "direct" and r["p50_us"]), None)
    floor50 = statistics.median(direct["p50_us"]) + DELAY_MS * 1000 if direct else None
    floor99 = statistics.median(direct["p99_us"]) + DELAY_MS * 1000 if direct else None
    for r in rows:
        if r["error"] and not r["p50_us"]:
            out.append(f"| {r['impl']} | ERROR: {r['error'][:100]} |||||")
            continue
        over = "-"
        if r["impl"] != "direct" and floor50 is not None and floor99 is not None:
            p50, p99 = statistics.median(r["p50_us"]), statistics.median(r["p99_us"])
            over = f"+{p50 - floor50:.0f} / +{p99 - floor99:.0f}"
        runs = ", ".join(f"{v:.0f}" for v in r["p50_us"])
        out.append(
            f"| {r['impl']} ({r['note']}) | {med(r['p50_us'])} | {med(r['p99_us'])} | "
            f"{med(r['p999_us'])} | {over} | {runs} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wan")
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--to", required=True, help="HOST:PORT")
    ap.add_argument("--delay-ms", type=float, default=DELAY_MS)
    args = ap.parse_args()
    upstream = host_port(f"tcp://{args.to}", 4222)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay(args.listen, upstream, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
