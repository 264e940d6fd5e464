"""Scale-out: ``python -m benchmarks --only scale``.

The same route run by one flowbridge process, then by two processes sharing it through the
route's ``group`` (NATS sources join one queue group, MQTT sources one shared subscription,
``$share/GROUP/...``), in the same run against the same brokers.  Each time the publisher
sends a block as fast as the route takes it (at most ``WINDOW`` messages ahead of the
subscriber, as in the throughput runs); msg/s at the subscriber (distinct sequence numbers),
delivered, duplicates, how the messages split between the processes, and the ratio of the
two rates.  Each process has its own NATS connection name and MQTT client id, as a real
deployment's replicas would.
"""

from __future__ import annotations

import subprocess
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.burst import HttpBridge
from benchmarks.run import (
    ROOT,
    WINDOW_MSGS,
    Brokers,
    End,
    Plan,
    Sub,
    _fmt,
    gen,
    run_pub,
    say,
)

SIZE = 100


@dataclass(frozen=True)
class ScaleCase:
    name: str
    pub: End
    sub: End
    route: str  # the route's from/to, with {group}


def scale_cases(b: Brokers) -> list[ScaleCase]:
    t = uuid.uuid4().hex[:6]
    return [
        ScaleCase(
            "NATS->NATS rewrite",
            End("nats", f"in.sc{t}.x"),
            End("nats", f"out.sc{t}.x"),
            f"""\
            from: {{broker: nats, filter: "in.sc{t}.*", group: "g{t}"}}
            to: {{broker: nats, topic: "out.{{2}}.{{3}}"}}
            """,
        ),
        ScaleCase(
            "MQTT->NATS",
            End("mqtt", f"scale/m{t}", 0),
            End("nats", f"scale.m{t}"),
            f"""\
            from: {{broker: mqtt, filter: "scale/m{t}", group: "g{t}", options: {{qos: 0}}}}
            to: {{broker: nats}}
            """,
        ),
    ]


def mapping(b: Brokers, case: ScaleCase, replica: int) -> str:
    tag = uuid.uuid4().hex[:6]
    return textwrap.dedent(
        f"""\
        bridge: {{id: bench}}
        brokers:
          nats: {{url: "{b.nats}", options: {{name: "fb-scale-{replica}"}}}}
          mqtt:
            url: "{b.mqtt}"
            options: {{version: "5", client_id: "fb-scale-{tag}-{replica}"}}
        routes:
          - name: scale
            delivery: at-most-once
        """
    ) + textwrap.indent(textwrap.dedent(case.route), "    ")


@dataclass
class ScaleResult:
    case: str
    mode: str
    size: int
    procs: int
    error: str = ""
    count: int = 0
    msgs_per_s: float | None = None
    delivered_pct: float | None = None
    dups: int = 0
    split: list[int] = field(default_factory=list)  # messages each process received
    cpu_pct: list[float] = field(default_factory=list)  # each process, over the block
    rss_mb: list[float] = field(default_factory=list)  # each process's VmHWM


def run_scaleout(plan: Plan, b: Brokers, workdir: Path) -> list[ScaleResult]:
    out: list[ScaleResult] = []
    count = 200_000 if plan.quick else 400_000
    for case in scale_cases(b):
        for procs in (1, 2):
            say(f"scale-out {case.name} at-most-once {SIZE} B, {procs} process(es)")
            r = measure_scale(b, case, procs, count, workdir)
            out.append(r)
            say(line(r, out))
    return out


def _url(b: Brokers, end: End) -> str:
    return {"nats": b.nats, "mqtt": b.mqtt}[end.proto]


def measure_scale(
    b: Brokers, case: ScaleCase, procs: int, count: int, workdir: Path
) -> ScaleResult:
    res = ScaleResult(case.name, "at-most-once", SIZE, procs, count=count)
    bridges: list[HttpBridge] = []
    try:
        for i in range(procs):
            name = f"scale-{case.pub.topic.replace('/', '.')}-{procs}-{i}"
            bridges.append(HttpBridge(mapping(b, case, i), workdir, name))
        for br in bridges:
            br.wait_ready()
        _probe(b, case, procs)
        before = [br.route()["received"] for br in bridges]
        cpu0 = [br.cpu_seconds() for br in bridges]
        t0 = time.monotonic()
        run = uuid.uuid4().hex[:8]
        progress = workdir / f"progress-{run}"
        sub = Sub(
            gen(
                "sub",
                case.sub,
                _url(b, case.sub),
                run,
                count,
                idle=3.0,
                first=40.0,
                progress=progress,
            )
        )
        try:
            pub = run_pub(
                gen(
                    "pub",
                    case.pub,
                    _url(b, case.pub),
                    run,
                    count,
                    size=SIZE,
                    progress=progress,
                    window=WINDOW_MSGS,
                ),
                120,
            )
            got = sub.result(240)
        finally:
            sub.kill()
            progress.unlink(missing_ok=True)
        wall = time.monotonic() - t0
        res.cpu_pct = [
            100 * (br.cpu_seconds() - c) / wall for br, c in zip(bridges, cpu0, strict=True)
        ]
        res.delivered_pct = 100.0 * got["unique"] / count
        res.dups = got["dups"]
        if got["unique"] > 1 and got["t_last"] > pub["t_start"]:
            res.msgs_per_s = got["unique"] / ((got["t_last"] - pub["t_start"]) / 1e9)
        res.split = [br.route()["received"] - n for br, n in zip(bridges, before, strict=True)]
        for br in bridges:
            if br.proc.poll() is not None:
                res.error = "bridge exited: " + br.tail()
    except Exception as exc:  # one broken case must not end the run: report it
        res.error = f"{type(exc).__name__}: {exc}"
        for br in bridges:
            res.error += "\n" + br.tail()
    finally:
        for br in bridges:
            br.stop()
            res.rss_mb.append(br.hwm_kb / 1024)
    return res


def _probe(b: Brokers, case: ScaleCase, procs: int) -> None:
    """Messages go through every process (queue group / shared subscription in place): a
    trickle until the subscriber has seen a few per process."""
    run = "probe" + uuid.uuid4().hex[:3]
    need = 10 * procs
    sub = Sub(gen("sub", case.sub, _url(b, case.sub), run, 2000, need=need, first=40.0))
    pub = subprocess.Popen(
        gen("pub", case.pub, _url(b, case.pub), run, 2000, size=64, rate=50),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        got = sub.result(60)
    finally:
        pub.kill()
        pub.wait()
        sub.kill()
    if got["unique"] < need:
        raise RuntimeError(f"only {got['unique']} of {need} probe messages came through")


def line(r: ScaleResult, done: list[ScaleResult]) -> str:
    if r.error:
        return f"    {r.procs} process(es): ERROR {r.error.splitlines()[0][:160]}"
    return (
        f"    {r.procs} process(es): {_fmt(r.msgs_per_s):>8} msg/s, delivered "
        f"{_fmt(r.delivered_pct, '.2f')}%, dups {r.dups}, split {r.split}, CPU "
        f"{', '.join(f'{c:.0f}%' for c in r.cpu_pct)}, peak RSS "
        f"{', '.join(f'{m:.0f}' for m in r.rss_mb) or '-'} MB{_ratio(r, done)}"
    )


def _ratio(r: ScaleResult, done: list[ScaleResult]) -> str:
    one = next((o for o in done if o.case == r.case and o.procs == 1 and not o.error), None)
    if r.procs == 1 or one is None or not one.msgs_per_s or not r.msgs_per_s:
        return ""
    return f"; {r.msgs_per_s / one.msgs_per_s:.2f}x one process"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The "Scale-out" section of results.md (empty when the suite did not run)."""
    if not rows:
        return ""
    out = [
        "## Scale-out\n",
        "The same route in one flowbridge process and in two sharing it (route `group`: a "
        "NATS queue group, an MQTT shared subscription), same brokers, same run; a block of "
        "messages as fast as the route takes them (the publisher at most 20,000 messages "
        "ahead of the subscriber). `split` is what each process took.\n",
        "| route | delivery | size | processes | msg/s | delivered | dups | split | bridge CPU "
        "| peak RSS | vs one process |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        if r["error"]:
            err = r["error"].splitlines()[0][:120].replace("|", "/")
            out.append(
                f"| {r['case']} | {r['mode']} | {r['size']} B | {r['procs']} | ERROR: {err} |||||||"
            )
            continue
        one = next(
            (o for o in rows if o["case"] == r["case"] and o["procs"] == 1 and not o["error"]),
            None,
        )
        ratio = "-"
        if r["procs"] > 1 and one and one["msgs_per_s"] and r["msgs_per_s"]:
            ratio = f"{r['msgs_per_s'] / one['msgs_per_s']:.2f}x"
        out.append(
            f"| {r['case']} | {r['mode']} | {r['size']} B | {r['procs']} | "
            f"{_fmt(r['msgs_per_s'])} | {_fmt(r['delivered_pct'], '.2f')}% | {r['dups']} | "
            f"{' / '.join(str(n) for n in r['split'])} | "
            f"{' / '.join(f'{c:.0f}%' for c in r['cpu_pct'])} | "
            f"{' / '.join(f'{m:.0f}' for m in r['rss_mb'])} MB | {ratio} |"
        )
    return "\n".join(out) + "\n"
