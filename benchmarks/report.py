"""Benchmark results as JSON, a Markdown table (with the product targets checked) and a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _f(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _size(n: int) -> str:
    return f"{n // 1024} KB" if n >= 1024 else f"{n} B"


def _key(r: Row) -> tuple[str, str, int]:
    return (r["case"], r["mode"], r["size"])


def _find(rows: list[Row], key: tuple[str, str, int], impl: str) -> Row | None:
    for r in rows:
        if _key(r) == key and r["impl"] == impl and not r["error"]:
            return r
    return None


def _direct(rows: list[Row], proto: str, mode: str, size: int) -> Row | None:
    """A broker's own pub -> sub row (of a case with that source), of ``mode`` if measured."""
    found = [
        r
        for r in rows
        if r["impl"] == "direct"
        and not r["error"]
        and r["size"] == size
        and r["case"].split("->")[0] == proto
    ]
    return next((r for r in found if r["mode"] == mode), found[0] if found else None)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def cpu_per_msg(r: Row) -> float | None:
    """Bridge CPU time per message forwarded (us): what the bridge itself costs, readable
    even on a machine whose other processes share its cores."""
    if r.get("cpu_pct") is None or not r.get("msgs_per_s"):
        return None
    return float(r["cpu_pct"]) * 1e4 / float(r["msgs_per_s"])


def table(rows: list[Row]) -> str:
    head = (
        "| direction | delivery | size | impl | msg/s | MB/s | delivered | dups | "
        "lat p50 / p99 / p99.9 (us) | added p50 / p99 (us) | bridge CPU | CPU us/msg | "
        "peak RSS | flowbridge / mq-bridge |\n|" + "---|" * 14
    )
    out = [head]
    for r in rows:
        key = _key(r)
        if r["error"]:
            err = r["error"].splitlines()[0][:120].replace("|", "/")
            out.append(
                f"| {r['case']} | {r['mode']} | {_size(r['size'])} | {r['impl']} | "
                f"ERROR: {err} ||||||||||"
            )
            continue
        base = _find(rows, key, "direct")
        added = "-"
        if r["impl"] != "direct" and base and r["p50_us"] is not None and base["p50_us"]:
            added = f"{r['p50_us'] - base['p50_us']:+.0f} / {r['p99_us'] - base['p99_us']:+.0f}"
        ratio = "-"
        if r["impl"] == "flowbridge":
            peer = _find(rows, key, "mq-bridge")
            if peer:
                ratio = f"{_ratio(r['msgs_per_s'], peer['msgs_per_s'])}x rate"
                mine, theirs = cpu_per_msg(r), cpu_per_msg(peer)
                if mine and theirs:
                    ratio += f", {_ratio(mine, theirs)}x CPU/msg"
        lat = f"{_f(r['p50_us'])} / {_f(r['p99_us'])} / {_f(r['p999_us'])}"
        out.append(
            f"| {r['case']} | {r['mode']} | {_size(r['size'])} | {r['impl']} | "
            f"{_f(r['msgs_per_s'])} | {_f(r['mb_per_s'], '.1f')} | "
            f"{_f(r['delivered_pct'], '.2f')}% | {r['dups']} | {lat} | {added} | "
            f"{_f(r['cpu_pct'])}{'%' if r['cpu_pct'] is not None else ''} | "
            f"{_f(cpu_per_msg(r), '.1f')} | "
            f"{_f(r['rss_mb'], '.0f')}{' MB' if r['rss_mb'] else ''} | {ratio} |"
        )
    return "\n".join(out)


def targets(rows: list[Row], suites: dict[str, list[Row]] | None = None) -> str:
    """The product targets, checked against this run (n/a when the case did not run)."""
    lines = ["| target | measured | met |", "|---|---|---|"]

    def check(name: str, measured: str, ok: bool | None) -> None:
        lines.append(f"| {name} | {measured} | {'n/a' if ok is None else 'yes' if ok else 'NO'} |")

    k = ("MQTT->NATS", "at-most-once", 100)
    fb, peer = _find(rows, k, "flowbridge"), _find(rows, k, "mq-bridge")
    check(
        "MQTT->NATS at-most-once 100 B: rate >= mq-bridge, 100% delivered",
        f"{_f(fb and fb['msgs_per_s'])} vs {_f(peer and peer['msgs_per_s'])} msg/s, "
        f"{_f(fb and fb['delivered_pct'], '.2f')}%",
        None
        if not fb or not peer
        else fb["msgs_per_s"] >= peer["msgs_per_s"] and fb["delivered_pct"] >= 100.0,
    )
    fb = _find(rows, ("NATS->NATS rewrite", "at-most-once", 100), "flowbridge")
    check(
        "NATS->NATS rewrite >= 200k msg/s, zero loss",
        f"{_f(fb and fb['msgs_per_s'])} msg/s, {_f(fb and fb['delivered_pct'], '.2f')}%",
        None if not fb else fb["msgs_per_s"] >= 200_000 and fb["delivered_pct"] >= 100.0,
    )
    for case in ("Kafka->NATS", "NATS->Kafka"):
        fb = _find(rows, (case, "at-least-once", 100), "flowbridge")
        check(
            f"{case} at-least-once >= 50k msg/s",
            f"{_f(fb and fb['msgs_per_s'])} msg/s, {_f(fb and fb['delivered_pct'], '.2f')}%",
            None if not fb else fb["msgs_per_s"] >= 50_000 and fb["delivered_pct"] >= 100.0,
        )
    # Kafka directions are reported apart: their latency is mostly the Kafka client's
    # batching and fetch waits (and Tansu's), which a latency budget of 0.3 ms cannot hold.
    worst: dict[tuple[bool, str], tuple[float, str]] = {}
    rss: tuple[float, str] | None = None
    for r in rows:
        if r["impl"] != "flowbridge" or r["error"]:
            continue
        where = f"{r['case']} {r['mode']} {_size(r['size'])}"
        kafka = "Kafka" in r["case"]
        base = _find(rows, _key(r), "direct")
        if base and r["p50_us"] is not None and base["p50_us"] is not None:
            for q in ("p50", "p99"):
                added = (r[f"{q}_us"] - base[f"{q}_us"], where)
                worst[(kafka, q)] = max(worst.get((kafka, q), added), added)
        if r["rss_mb"]:
            rss = max(rss or (r["rss_mb"], where), (r["rss_mb"], where))
    for kafka in (False, True):
        for q, limit in (("p50", 300), ("p99", 1000)):
            w = worst.get((kafka, q))
            check(
                f"added latency at 1k msg/s: {q} <= {limit} us over direct, worst "
                + ("Kafka direction" if kafka else "direction without Kafka"),
                f"{_f(w and w[0], '+.0f')} us ({w[1] if w else '-'})",
                None if w is None else w[0] <= limit,
            )
    # A bridged message crosses both brokers, and a Kafka consumer waits out the broker's fetch
    # cycle whatever feeds it: read against the slower of the two brokers' own direct paths
    # (pub -> sub on the source broker, pub -> sub on the target broker), the figure says
    # what the bridge adds beyond the hop it cannot avoid.
    hop_worst: dict[tuple[bool, str], tuple[float, str]] = {}
    for r in rows:
        if r["impl"] != "flowbridge" or r["error"] or r["p50_us"] is None:
            continue
        source, target = r["case"].split(" ")[0].split("->")
        ends = [_direct(rows, proto, r["mode"], r["size"]) for proto in (source, target)]
        base = _find(rows, _key(r), "direct")
        if base and base["p50_us"] is not None:  # this case's own baselines, same moments
            ends = [base]
            if base.get("target_p50_us") is not None:
                ends.append({"p50_us": base["target_p50_us"], "p99_us": base["target_p99_us"]})
        if any(e is None or e["p50_us"] is None for e in ends):
            continue
        where = f"{r['case']} {r['mode']} {_size(r['size'])}"
        kafka = "Kafka" in r["case"]
        for q in ("p50", "p99"):
            slower = max(e[f"{q}_us"] for e in ends if e is not None)
            added = (r[f"{q}_us"] - slower, where)
            hop_worst[(kafka, q)] = max(hop_worst.get((kafka, q), added), added)
    for kafka in (False, True):
        for q, limit in (("p50", 300), ("p99", 1000)):
            w = hop_worst.get((kafka, q))
            check(
                f"added latency at 1k msg/s: {q} <= {limit} us over the slower direct path "
                "(source or target broker's own pub -> sub), worst "
                + ("Kafka direction" if kafka else "direction without Kafka"),
                f"{_f(w and w[0], '+.0f')} us ({w[1] if w else '-'})",
                None if w is None else w[0] <= limit,
            )
    # The kafka-latency suite: each bridged run beside Kafka's own path in the same seconds,
    # and the smallest forwarder of these client libraries as the floor.
    from benchmarks.kafka_latency import added_worst  # noqa: PLC0415

    paired = added_worst((suites or {}).get("kafka-latency", []))
    for q, limit in (("p50", 300), ("p99", 1000)):
        got = paired.get(q)
        check(
            f"added latency at 1k msg/s: {q} <= {limit} us over Kafka's own path in the same "
            "seconds, worst way (kafka-latency suite)",
            "- us"
            if got is None
            else f"{got[0]:+.0f} us ({got[2]}); the smallest nats-py / aiokafka forwarder "
            f"{got[1]:+.0f} us",
            None if got is None else got[0] <= limit,
        )
    # Per direction, 100 B: how many meet the budget (the worst alone hides the rest).
    for q, limit in (("p50", 300), ("p99", 1000)):
        met, missed = 0, []
        for r in rows:
            if r["impl"] != "flowbridge" or r["error"] or r["size"] != 100 or "Kafka" in r["case"]:
                continue
            base = _find(rows, _key(r), "direct")
            if not base or r[f"{q}_us"] is None or base[f"{q}_us"] is None:
                continue
            added = r[f"{q}_us"] - base[f"{q}_us"]
            if added <= limit:
                met += 1
            else:
                missed.append(f"{r['case']} {r['mode']} {added:+.0f}")
        check(
            f"added latency at 1k msg/s: {q} <= {limit} us over direct, 100 B, per direction "
            "without Kafka",
            f"{met} of {met + len(missed)} met" + (f"; not: {', '.join(missed)}" if missed else ""),
            None if met + len(missed) == 0 else not missed,
        )
    steady = [b["steady_rss_mb"] for b in (suites or {}).get("burst", []) if b["steady_rss_mb"]]
    check(
        "bridge RSS <= 80 MB steady (the burst suite's steady phase, largest)",
        f"{_f(max(steady) if steady else None, '.0f')} MB",
        None if not steady else max(steady) <= 80,
    )
    check(
        "bridge peak RSS <= 80 MB in the full-speed throughput runs (largest)",
        f"{_f(rss and rss[0], '.0f')} MB ({rss[1] if rss else '-'})",
        None if rss is None else rss[0] <= 80,
    )
    return "\n".join(lines)


def markdown(
    meta: dict[str, Any], rows: list[Row], suites: dict[str, list[Row]] | None = None
) -> str:
    ceilings = sorted(
        {
            (r["mode"], r["size"], r["note"].split(" ", 1)[0], r["pub_rate"], r["msgs_per_s"])
            for r in rows
            if r["impl"] == "direct" and not r["error"]
        },
        key=lambda c: (c[2], c[0], c[1]),
    )
    gen = ["| generator | delivery | size | publisher alone-ish send rate | pub -> sub direct |"]
    gen.append("|---|---|---|---|---|")
    for mode, size, proto, pub, direct in ceilings:
        gen.append(f"| {proto} | {mode} | {_size(size)} | {_f(pub)} msg/s | {_f(direct)} msg/s |")
    return (
        f"# flowbridge benchmark results\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}\n- machine: {meta['machine']}\n"
        f"- peer: {meta['peer']}\n- throughput runs: direct {meta['counts']} messages per "
        "payload size, the publisher free; bridged about 2 s at the direct rate (the `count` "
        "of each row in results.json), the publisher at most 20,000 messages or 16 MiB ahead "
        f"of the subscriber; latency: {meta['latency']}\n"
        f"- runs per bridge and case: {meta.get('repeat', 1)} (the median run is reported; "
        "every run's rate is in results.json)\n"
        f"- wall time: {meta['elapsed_s']} s\n\n"
        "## Targets\n\n" + targets(rows, suites) + "\n\n## All cases\n\n"
        "`direct` is the same publisher and subscriber on the source broker with no bridge: "
        "its throughput measured once per source, its latency in every repeat of the case, "
        "beside the bridges (and the target broker's own path with it, for the targets "
        "checked against the slower path). Latency figures are medians over the runs, each "
        "percentile apart. `added` is the bridge's latency minus direct. CPU is the bridge "
        "process over the throughput window (100% = one core), and per message forwarded "
        "(CPU us/msg: what the bridge costs, comparable even when other processes share the "
        "cores); RSS is its peak (VmHWM).\n\n" + table(rows) + "\n\n## Load generator ceilings\n\n"
        "The publisher's send rate in the direct run (a Kafka source is pre-filled, so it has "
        "none) and what one subscriber takes directly: bridged rates below these are the "
        "bridge's, not the generators'.\n\n" + "\n".join(gen) + "\n"
    )


def chart(path: Path, rows: list[Row]) -> bool:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    keys: list[tuple[str, str, int]] = []
    for r in rows:
        if _key(r) not in keys:
            keys.append(_key(r))
    impls = ["direct", "flowbridge", "mq-bridge"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(keys) * 0.9), 9))
    width = 0.27
    for i, impl in enumerate(impls):
        rate, p99 = [], []
        for k in keys:
            found = _find(rows, k, impl)
            rate.append((found and found["msgs_per_s"]) or 0)
            p99.append(((found and found["p99_us"]) or 0) / 1000)
        xs = [j + (i - 1) * width for j in range(len(keys))]
        ax1.bar(xs, rate, width, label=impl)
        ax2.bar(xs, p99, width, label=impl)
    labels = [f"{c}\n{m.replace('at-', '')}\n{_size(s)}" for c, m, s in keys]
    for ax, title in ((ax1, "throughput (msg/s)"), (ax2, "latency p99 at 1k msg/s (ms)")):
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        ax.legend()
    ax1.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(
    outdir: Path, meta: dict[str, Any], rows: list[Row], suites: dict[str, list[Row]] | None = None
) -> dict[str, Path]:
    from benchmarks import extra  # noqa: PLC0415

    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"json": outdir / "results.json", "md": outdir / "results.md"}
    paths["json"].write_text(
        json.dumps({"meta": meta, "results": rows, **(suites or {})}, indent=1)
    )
    paths["md"].write_text(markdown(meta, rows, suites) + extra.markdown(suites or {}))
    png = outdir / "results.png"
    if chart(png, rows):
        paths["png"] = png
    return paths
