"""Profile flowbridge on one case with py-spy: ``python -m benchmarks.profile [--case NAME]``.

Runs the case's bridge, attaches ``py-spy record`` to it while publishers send at full
speed, and prints the functions with the most samples (own time, and total time of
flowbridge's functions).  The raw collapsed stacks stay in ``results/profile-*.txt``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchmarks.run import RESULTS, ROOT, Bridge, Plan, brokers, cases, gen, say

PLAN = Plan(quick=True, counts={100: 0}, lat_count=0, sizes=(100,), peer=False, only=[])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    ap.add_argument("--case", default="NATS->NATS rewrite")
    ap.add_argument("--mode", default="at-most-once")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    RESULTS.mkdir(exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{args.case.replace('>', '').replace(' ', '_')}.txt"
    with brokers() as b:
        case = next(c for c in cases(b, args.size) if c.name == args.case and c.mode == args.mode)
        for step in case.setup:
            step()
        bridge = Bridge("flowbridge", case, logs)
        url = b.urls
        try:
            time.sleep(3)
            say(f"profiling flowbridge on {case.name} {case.mode} for {args.seconds:.0f} s")
            rec = subprocess.Popen(
                [
                    *(spy, "record", "--pid", str(bridge.proc.pid), "--format", "raw"),
                    *("--rate", "250", "--duration", str(int(args.seconds)), "-o", str(out)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + args.seconds
            sent = 0
            while time.monotonic() < deadline and rec.poll() is None:
                cmd = gen("pub", case.pub, url[case.pub.proto], uuid.uuid4().hex[:8], 50_000)
                subprocess.run([*cmd, "--size", str(args.size)], cwd=ROOT, check=True, timeout=60)
                sent += 50_000
            rec.wait(60)
        finally:
            bridge.stop()
    say(f"sent {sent} messages; stacks in {out}")
    report(out)
    return 0


def report(path: Path, top: int = 20) -> None:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        samples += k
        # Frames are "func (file:line)": own time per line, total time per function.
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in {fr.rsplit(":", 1)[0] + ")" for fr in frames}:
            if "flowbridge/" in f:
                total[f] += k
    print(f"\n{samples} samples; own time per line (top {top}):")
    for f, k in own.most_common(top):
        print(f"  {100 * k / samples:5.1f}%  {f}")
    print(f"\nflowbridge functions, total time incl. callees (top {top}):")
    for f, k in total.most_common(top):
        print(f"  {100 * k / samples:5.1f}%  {f}")


if __name__ == "__main__":
    raise SystemExit(main())
