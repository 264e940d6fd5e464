"""Bursts and memory: ``python -m benchmarks --only burst``.

Per route (the NATS->NATS rewrite at-most-once and the JetStream -> Kafka at-least-once cases
of ``run.py``), one flowbridge process (with ``--http``, for its counters) and two phases:

1. steady: a fixed 5,000 msg/s for a few seconds, well within what the route carries; the
   bridge's RSS (``VmRSS``, sampled every 20 ms) over that phase is the baseline;
2. burst: a block of messages as fast as the generator sends them (at least ten times the
   rate the route drains them at, which is printed beside it); peak ``VmRSS`` over the burst
   and ``VmHWM``, and where every message went: delivered (distinct sequence numbers at the
   subscriber), dropped as the bridge counted it (``/api/status``), and unaccounted (neither:
   lost before the bridge saw it, e.g. a broker cutting off a slow consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.run import (
    CLK_TCK,
    PY,
    ROOT,
    Brokers,
    Case,
    End,
    Plan,
    Sub,
    _fmt,
    cases,
    gen,
    run_pub,
    say,
    terminate,
)
from tests.support.brokers import free_port, wait_port

STEADY_RATE = 5_000.0
SIZE = 100


class RssWatch:
    """``VmRSS`` of one process every 20 ms; ``phase()`` starts a new peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self, field: str) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, self.read("VmRSS"))

    def phase(self) -> int:
        """The peak since the last call (kB); a new phase starts from the current RSS."""
        peak = max(self.peak_kb, self.read("VmRSS"))
        self.peak_kb = self.read("VmRSS")
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class HttpBridge:
    """``python -m flowbridge run -c FILE --http 127.0.0.1:PORT`` in its own process."""

    def __init__(self, mapping: str, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        cfg = workdir / f"{name}.yaml"
        cfg.write_text(mapping)
        cmd = [PY, "-m", "flowbridge", "run", "-c", str(cfg), "--log-level", "warning"]
        cmd += ["--http", f"127.0.0.1:{self.port}"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_port(self.port, timeout=30, proc=self.proc)
        self.rss = RssWatch(self.proc.pid)
        self.hwm_kb = 0

    def cpu_seconds(self) -> float:
        """utime + stime so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while self.get("/readyz")[0] != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"bridge not ready within {within}s: {self.tail()}")
            time.sleep(0.1)

    def route(self) -> dict[str, Any]:
        doc = json.loads(self.get("/api/status")[1])
        out: dict[str, Any] = doc["routes"][0]
        out["reconnects"] = sum(b["reconnects"] for b in doc["brokers"])
        return out

    def stop(self) -> None:
        self.rss.stop()
        self.hwm_kb = self.rss.read("VmHWM")  # the whole run's peak, while /proc still has it
        terminate(self.proc)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]


@dataclass
class BurstResult:
    case: str
    mode: str
    size: int
    error: str = ""
    steady_rate: float | None = None
    steady_delivered_pct: float | None = None
    steady_rss_mb: float | None = None
    burst_count: int = 0
    burst_rate: float | None = None  # the publisher's
    drain_rate: float | None = None  # what the route delivered per second meanwhile
    delivered: int = 0
    stored: int | None = None  # JetStream source: what the stream took of the burst
    dropped: int = 0  # counted by the bridge
    unaccounted: int = 0
    dups: int = 0
    reconnects: int = 0
    burst_rss_mb: float | None = None  # peak VmRSS over the burst
    hwm_mb: float | None = None  # VmHWM at the end (the whole run)


BURST_CASES = (
    ("NATS->NATS rewrite", "at-most-once"),
    ("NATS->Kafka", "at-most-once"),
    ("NATS->Kafka", "at-least-once"),
)


def run_burst(plan: Plan, b: Brokers, workdir: Path) -> list[BurstResult]:
    out: list[BurstResult] = []
    count = 250_000 if plan.quick else 400_000
    for case in cases(b, SIZE):
        if (case.name, case.mode) not in BURST_CASES:
            continue
        say(f"burst {case.name} {case.mode} {SIZE} B")
        r = measure_burst(b, case, count, workdir)
        out.append(r)
        say(line(r))
    return out


def _url(b: Brokers, end: End) -> str:
    return b.urls[end.proto]


def measure_burst(b: Brokers, case: Case, count: int, workdir: Path) -> BurstResult:
    res = BurstResult(case.name, case.mode, SIZE, burst_count=count)
    bridge: HttpBridge | None = None
    src, dst = case.pub, case.sub
    try:
        for step in case.setup:
            step()
        bridge = HttpBridge(case.flowbridge, workdir, f"burst-{case.tag}")
        bridge.wait_ready()
        # -- steady
        steady_n = int(STEADY_RATE * 4)
        run = uuid.uuid4().hex[:8]
        sub = Sub(gen("sub", dst, _url(b, dst), run, steady_n, idle=3.0, first=40.0))
        try:
            bridge.rss.phase()
            run_pub(gen("pub", src, _url(b, src), run, steady_n, size=SIZE, rate=STEADY_RATE), 60)
            got = sub.result(60)
        finally:
            sub.kill()
        res.steady_rss_mb = bridge.rss.phase() / 1024
        res.steady_rate = STEADY_RATE
        res.steady_delivered_pct = 100.0 * got["unique"] / steady_n
        before = bridge.route()
        stream = _stream_of(case)
        seq0 = js_last_seq(b, stream) if stream else 0
        # -- burst
        run = uuid.uuid4().hex[:8]
        sub = Sub(gen("sub", dst, _url(b, dst), run, count, idle=15.0, first=40.0))
        try:
            pub = run_pub(gen("pub", src, _url(b, src), run, count, size=SIZE), 120)
            got = sub.result(300)
        finally:
            sub.kill()
        after = _settled(bridge, before["received"] + before["dropped_total"] + count)
        res.burst_rss_mb = bridge.rss.phase() / 1024
        res.hwm_mb = bridge.rss.read("VmHWM") / 1024
        secs = (pub["t_sent"] - pub["t_start"]) / 1e9
        res.burst_rate = count / secs if secs > 0 else None
        if got["unique"] > 1 and got["t_last"] > pub["t_start"]:
            res.drain_rate = got["unique"] / ((got["t_last"] - pub["t_start"]) / 1e9)
        res.delivered = got["unique"]
        res.dups = got["dups"]
        res.dropped = after["dropped_total"] - before["dropped_total"]
        # A JetStream source has what its stream stored: a core NATS publish the server could
        # not ingest never became part of the source (nats-server sheds them, unacknowledged).
        if stream:
            res.stored = js_last_seq(b, stream) - seq0
        had = count if res.stored is None else res.stored
        res.unaccounted = had - res.delivered - res.dropped
        res.reconnects = after["reconnects"]
        if bridge.proc.poll() is not None:
            res.error = "bridge exited: " + bridge.tail()
    except Exception as exc:  # one broken case must not end the run: report it
        res.error = f"{type(exc).__name__}: {exc}"
        if bridge is not None:
            res.error += "\n" + bridge.tail()
    finally:
        if bridge is not None:
            bridge.stop()
    return res


def _stream_of(case: Case) -> str | None:
    """The JetStream stream a case's route reads, None for core NATS."""
    if case.pub.proto != "nats" or case.mode != "at-least-once":
        return None
    return case.pub.topic.split(".", 1)[0]


def js_last_seq(b: Brokers, stream: str) -> int:
    async def query() -> int:
        import nats  # noqa: PLC0415

        nc = await nats.connect(b.nats)
        try:
            info = await nc.jetstream().stream_info(stream)
            return int(info.state.last_seq)
        finally:
            await nc.close()

    return asyncio.run(query())


def _settled(bridge: HttpBridge, total: int, within: float = 30.0) -> dict[str, Any]:
    """The route's counters once everything sent was received or dropped and nothing is in
    flight (or ``within`` s passed: whatever is missing then is unaccounted)."""
    deadline = time.monotonic() + within
    while True:
        r = bridge.route()
        done = r["received"] + r["dropped_total"] >= total and r["in_flight"] == 0
        if done or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def line(r: BurstResult) -> str:
    if r.error:
        return f"    ERROR {r.error.splitlines()[0][:160]}"
    ratio = r.burst_rate / r.drain_rate if r.burst_rate and r.drain_rate else None
    return (
        f"    steady {_fmt(r.steady_rate)} msg/s: {_fmt(r.steady_delivered_pct, '.2f')}% "
        f"delivered, RSS {_fmt(r.steady_rss_mb, '.1f')} MB | burst {r.burst_count} msgs at "
        f"{_fmt(r.burst_rate)} msg/s ({_fmt(ratio, '.0f')}x the {_fmt(r.drain_rate)} msg/s "
        f"drained): "
        + ("" if r.stored is None else f"stored by the stream {r.stored}, ")
        + f"delivered {r.delivered}, dropped (counted) {r.dropped}, unaccounted "
        f"{r.unaccounted}, dups {r.dups}; peak RSS {_fmt(r.burst_rss_mb, '.1f')} MB, "
        f"VmHWM {_fmt(r.hwm_mb, '.1f')} MB"
        + (f"; {r.reconnects} reconnect(s)" if r.reconnects else "")
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The "Bursts and memory" section of results.md (empty when the suite did not run)."""
    if not rows:
        return ""
    out = [
        "## Bursts and memory\n",
        "One flowbridge process per route: first a steady 5,000 msg/s (its RSS is the "
        "baseline), then a block of messages as fast as the generator sends them. "
        "`x drain` is the burst's rate over the rate the route delivered meanwhile; "
        "`dropped` is what the bridge counted (`flowbridge_route_dropped_total`); "
        "`stored` is what a JetStream source's stream took of the burst (nats-server sheds "
        "core NATS publishes it cannot ingest; they never reach the bridge); `unaccounted` "
        "is what the source had and was neither delivered nor counted.\n",
        "| route | delivery | steady msg/s | steady delivered | steady RSS | burst msgs | "
        "burst msg/s | x drain | stored | delivered | dropped | unaccounted | dups | "
        "burst peak RSS | VmHWM |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        if r["error"]:
            err = r["error"].splitlines()[0][:120].replace("|", "/")
            out.append(f"| {r['case']} | {r['mode']} | ERROR: {err} ||||||||||||")
            continue
        ratio = r["burst_rate"] / r["drain_rate"] if r["burst_rate"] and r["drain_rate"] else None
        out.append(
            f"| {r['case']} | {r['mode']} | {_fmt(r['steady_rate'])} | "
            f"{_fmt(r['steady_delivered_pct'], '.2f')}% | {_fmt(r['steady_rss_mb'], '.0f')} MB | "
            f"{r['burst_count']} | {_fmt(r['burst_rate'])} | {_fmt(ratio, '.0f')}x | "
            f"{'-' if r.get('stored') is None else r['stored']} | "
            f"{r['delivered']} | {r['dropped']} | {r['unaccounted']} | {r['dups']} | "
            f"{_fmt(r['burst_rss_mb'], '.0f')} MB | {_fmt(r['hwm_mb'], '.0f')} MB |"
        )
    return "\n".join(out) + "\n"
