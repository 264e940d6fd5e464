"""flowbridge benchmark: ``python -m benchmarks [--quick] [--only SUBSTR] [--no-peer]``.

Per case (direction, delivery, payload size) and per implementation (``direct``: the same
publisher and subscriber on the source broker, no bridge; ``flowbridge``; ``mq-bridge``):

1. throughput: a fixed number of messages as fast as the route takes them (direct, the
   publisher runs free; through a bridge, about 2 s worth, the publisher at most a window
   ahead of the subscriber; for a Kafka source the topic is filled first and the bridge
   drains it); msg/s and MB/s at the subscriber, percent delivered (distinct sequence
   numbers), duplicates;
2. latency: a fixed 1,000 msg/s, one-way latency from the timestamp in each payload;
3. the bridge process's CPU (``/proc/PID/stat`` sampled during the throughput window) and
   peak RSS (``VmHWM``).

Every broker is the benchmark's own (free loopback ports); generators and bridges are
separate processes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.brokers import BenchMosquitto, NatsServer, RabbitMQ, Tansu
from benchmarks.gen import KAFKA_FETCH_WAIT_MS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
LAT_RATE = 1000.0


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- brokers


@dataclass
class Brokers:
    nats: str
    mqtt: str
    amqp: str
    kafka: str  # host:port

    @property
    def amqp_vhost(self) -> str:
        # lapin (mq-bridge) reads an empty path as vhost "", not "/"
        return self.amqp.rstrip("/") + "/%2f"

    @property
    def mqtt_tcp(self) -> str:
        return self.mqtt.replace("mqtt://", "tcp://")

    @property
    def urls(self) -> dict[str, str]:
        """The URL of each protocol's broker, as the load generators take it."""
        return {
            "nats": self.nats,
            "mqtt": self.mqtt,
            "amqp": self.amqp,
            "kafka": f"kafka://{self.kafka}",
        }


@contextlib.contextmanager
def brokers() -> Iterator[Brokers]:
    with contextlib.ExitStack() as stack:
        say("starting brokers of our own: nats-server, mosquitto, Tansu, RabbitMQ")
        nats = stack.enter_context(NatsServer())
        mqtt = stack.enter_context(BenchMosquitto())
        kafka = stack.enter_context(Tansu())
        rabbit = stack.enter_context(RabbitMQ())
        yield Brokers(nats.url, mqtt.url, rabbit.url, kafka.bootstrap)


def kafka_create(b: Brokers, topic: str) -> None:
    _admin_script(
        f"""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        a = AIOKafkaAdminClient(bootstrap_servers={b.kafka!r})
        await a.start()
        try:
            await a.create_topics([NewTopic({topic!r}, 1, 1)])
        finally:
            await a.close()
        """
    )


def js_stream(b: Brokers, name: str, subjects: list[str]) -> None:
    _admin_script(
        f"""
        import nats
        nc = await nats.connect({b.nats!r})
        await nc.jetstream().add_stream(name={name!r}, subjects={subjects!r}, storage="memory")
        await nc.close()
        """
    )


def amqp_queue(b: Brokers, queue: str, key: str) -> None:
    """A durable queue bound to amq.topic: mq-bridge's AMQP source reads a named queue and
    would declare a fanout exchange of the same name to bind it (amq.topic is a topic one)."""
    _admin_script(
        f"""
        import aiormq
        conn = await aiormq.connect({b.amqp!r})
        ch = await conn.channel()
        await ch.queue_declare({queue!r}, durable=True)
        await ch.queue_bind({queue!r}, "amq.topic", routing_key={key!r})
        await conn.close()
        """
    )


def _admin_script(body: str) -> None:
    code = "import asyncio\nasync def main():\n" + textwrap.indent(textwrap.dedent(body), "    ")
    code += "\nasyncio.run(main())\n"
    subprocess.run([PY, "-c", code], check=True, timeout=60, cwd=ROOT)


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class End:
    proto: str
    topic: str
    qos: int = 0


@dataclass
class Case:
    name: str  # e.g. "MQTT->NATS"
    mode: str  # "at-most-once" | "at-least-once"
    tag: str
    pub: End
    sub: End
    flowbridge: str  # mapping file text
    peer: dict[str, Any] | None  # mq-bridge route, None when it cannot express it
    peer_note: str = ""
    prefill: bool = False  # Kafka source: fill the topic, then let the bridge drain it
    setup: list[Callable[[], None]] = field(default_factory=list)
    peer_setup: list[Callable[[], None]] = field(default_factory=list)


def _fb(b: Brokers, route: str, *, durable: bool, size: int) -> str:
    # At-least-once, the unacked window is what a route carries per round trip: 4,000 small
    # messages, 1,000 large ones (10 MB either way).
    window = (4000 if size < 1000 else 1000) if durable else 1000
    client = f"fb-{uuid.uuid4().hex[:8]}"
    return textwrap.dedent(
        f"""\
        bridge: {{id: bench}}
        brokers:
          nats: {{url: "{b.nats}"}}
          mqtt: {{url: "{b.mqtt}", options: {{version: "5", client_id: "{client}"}}}}
          amqp: {{url: "{b.amqp}"}}
          kafka:
            url: "kafka://{b.kafka}"
            options:
              session_timeout_ms: 3000
              heartbeat_interval_ms: 500
              # lz4 batches, as mq-bridge writes them by default: the same bytes to Tansu
              compression: lz4
              fetch_max_wait_ms: {KAFKA_FETCH_WAIT_MS}
        routes:
          - name: bench
            delivery: {"at-least-once" if durable else "at-most-once"}
            max_in_flight: {window}
        """
    ) + textwrap.indent(textwrap.dedent(route), "    ")


def cases(b: Brokers, size: int) -> list[Case]:
    out: list[Case] = []

    def tag(short: str) -> str:
        return f"{short}{size}x{uuid.uuid4().hex[:6]}"

    mqtt_in = {"url": b.mqtt_tcp, "protocol": "v5"}
    nats_core = {"url": b.nats, "no_jetstream": True}
    for mode, qos in (("at-most-once", 0), ("at-least-once", 1)):
        durable = qos == 1
        t = tag("mn")
        out.append(
            Case(
                "MQTT->NATS",
                mode,
                t,
                End("mqtt", f"bench/{t}", qos),
                End("nats", f"bench.{t}"),
                _fb(
                    b,
                    f"""\
                    from: {{broker: mqtt, filter: "bench/{t}", options: {{qos: {qos}}}}}
                    to: {{broker: nats}}
                    """,
                    durable=durable,
                    size=size,
                ),
                {
                    "input": {"mqtt": {**mqtt_in, "topic": f"bench/{t}", "qos": qos}},
                    "output": {"nats": {**nats_core, "subject": f"bench.{t}"}},
                },
            )
        )
    t = tag("nm")
    out.append(
        Case(
            "NATS->MQTT",
            "at-most-once",
            t,
            End("nats", f"bench.{t}"),
            End("mqtt", f"bench/{t}"),
            _fb(
                b,
                f"""\
                from: {{broker: nats, filter: "bench.{t}"}}
                to: {{broker: mqtt, options: {{qos: 0}}}}
                """,
                durable=False,
                size=size,
            ),
            {
                "input": {
                    "nats": {
                        **nats_core,
                        "subject": f"bench.{t}",
                        "subscriber_mode": True,
                        "stream": "unused",
                    }
                },
                "output": {"mqtt": {"url": b.mqtt_tcp, "topic": f"bench/{t}", "qos": 0}},
            },
        )
    )
    t = tag("nn")
    out.append(
        Case(
            "NATS->NATS rewrite",
            "at-most-once",
            t,
            End("nats", f"in.{t}.x"),
            End("nats", f"out.{t}.x"),
            _fb(
                b,
                f"""\
                from: {{broker: nats, filter: "in.{t}.*"}}
                to: {{broker: nats, topic: "out.{{2}}.{{3}}"}}
                """,
                durable=False,
                size=size,
            ),
            {
                "input": {
                    "nats": {
                        **nats_core,
                        "subject": f"in.{t}.*",
                        "subscriber_mode": True,
                        "stream": "unused",
                    }
                },
                "output": {"nats": {**nats_core, "subject": f"out.{t}.x"}},
            },
            peer_note="mq-bridge cannot rewrite subjects: fixed target subject",
        )
    )
    t = tag("nk")
    out.append(
        Case(
            "NATS->Kafka",
            "at-most-once",
            t,
            End("nats", f"bench.{t}"),
            End("kafka", f"bench.{t}"),
            _fb(
                b,
                f"""\
                from: {{broker: nats, filter: "bench.{t}"}}
                to: {{broker: kafka}}
                """,
                durable=False,
                size=size,
            ),
            {
                "input": {
                    "nats": {
                        **nats_core,
                        "subject": f"bench.{t}",
                        "subscriber_mode": True,
                        "stream": "unused",
                    }
                },
                "output": {"kafka": {"url": b.kafka, "topic": f"bench.{t}", "delayed_ack": True}},
            },
            setup=[lambda t=t: kafka_create(b, f"bench.{t}")],  # type: ignore[misc]
        )
    )
    t = tag("jk")
    out.append(
        Case(
            "NATS->Kafka",
            "at-least-once",
            t,
            End("nats", f"js{t}.x"),
            End("kafka", f"bench.{t}"),
            _fb(
                b,
                f"""\
                from:
                  broker: nats
                  filter: "js{t}.>"
                  options: {{jetstream: {{stream: "js{t}"}}}}
                to: {{broker: kafka, topic: "bench.{t}"}}
                """,
                durable=True,
                size=size,
            ),
            {
                "input": {"nats": {"url": b.nats, "subject": f"js{t}.>", "stream": f"js{t}"}},
                "output": {"kafka": {"url": b.kafka, "topic": f"bench.{t}"}},
            },
            peer_note="JetStream durable consumer -> Kafka acks",
            setup=[
                lambda t=t: kafka_create(b, f"bench.{t}"),  # type: ignore[misc]
                lambda t=t: js_stream(b, f"js{t}", [f"js{t}.>"]),  # type: ignore[misc]
            ],
        )
    )
    for mode in ("at-most-once", "at-least-once"):
        durable = mode == "at-least-once"
        t = tag("kn")
        dst = f"kt{t}.x" if durable else f"bench.{t}"
        target = (
            f'{{broker: nats, topic: "{dst}", options: {{jetstream: true}}}}'
            if durable
            else "{broker: nats}"
        )
        setup: list[Callable[[], None]] = [lambda t=t: kafka_create(b, f"bench.{t}")]  # type: ignore[misc]
        nats_out: dict[str, Any] = {"url": b.nats, "subject": dst}
        if durable:
            setup.append(lambda t=t: js_stream(b, f"kt{t}", [f"kt{t}.>"]))  # type: ignore[misc]
            nats_out["stream"] = f"kt{t}"
        else:
            nats_out["no_jetstream"] = True
        out.append(
            Case(
                "Kafka->NATS",
                mode,
                t,
                End("kafka", f"bench.{t}"),
                End("nats", dst),
                _fb(
                    b,
                    f"""\
                    from:
                      broker: kafka
                      filter: "bench.{t}"
                      group: "g{t}"
                      options: {{start: earliest}}
                    to: {target}
                    """,
                    durable=durable,
                    size=size,
                ),
                {
                    "input": {
                        "kafka": {
                            "url": b.kafka,
                            "topic": f"bench.{t}",
                            "group_id": f"p{t}",
                            "consumer_options": [
                                ["auto.offset.reset", "earliest"],
                                ["fetch.wait.max.ms", str(KAFKA_FETCH_WAIT_MS)],
                            ],
                        }
                    },
                    "output": {"nats": nats_out},
                },
                peer_note="JetStream publish with ack" if durable else "",
                prefill=True,
                setup=setup,
            )
        )
    for mode, qos in (("at-most-once", 0), ("at-least-once", 1)):
        durable = qos == 1
        t = tag("ma")
        out.append(
            Case(
                "MQTT->AMQP",
                mode,
                t,
                End("mqtt", f"bench/{t}", qos),
                End("amqp", f"bench.{t}"),
                _fb(
                    b,
                    f"""\
                    from: {{broker: mqtt, filter: "bench/{t}", options: {{qos: {qos}}}}}
                    to: {{broker: amqp}}
                    """,
                    durable=durable,
                    size=size,
                ),
                {
                    "input": {"mqtt": {**mqtt_in, "topic": f"bench/{t}", "qos": qos}},
                    "output": {
                        "amqp": {
                            "url": b.amqp_vhost,
                            "exchange": "amq.topic",
                            "queue": f"bench.{t}",
                            "no_declare_queue": True,
                            "delayed_ack": not durable,
                            "no_persistence": not durable,
                        }
                    },
                },
            )
        )
    for mode in ("at-most-once", "at-least-once"):
        durable = mode == "at-least-once"
        t = tag("ak")
        out.append(
            Case(
                "AMQP->Kafka",
                mode,
                t,
                End("amqp", f"bench.{t}"),
                End("kafka", f"bench.{t}"),
                _fb(
                    b,
                    f"""\
                    from: {{broker: amqp, filter: "bench.{t}"}}
                    to: {{broker: kafka}}
                    """,
                    durable=durable,
                    size=size,
                ),
                {
                    "input": {
                        "amqp": {
                            "url": b.amqp_vhost,
                            "queue": f"bench.{t}",
                            "prefetch_count": 1000,
                        }
                    },
                    "output": {
                        "kafka": {"url": b.kafka, "topic": f"bench.{t}", "delayed_ack": not durable}
                    },
                },
                peer_note="named queue bound to amq.topic beforehand",
                setup=[lambda t=t: kafka_create(b, f"bench.{t}")],  # type: ignore[misc]
                peer_setup=[lambda t=t: amqp_queue(b, f"bench.{t}", f"bench.{t}")],  # type: ignore[misc]
            )
        )
    return out


# --------------------------------------------------------------------------- processes


class Sampler:
    """CPU time and peak RSS of one process, sampled every 50 ms from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[int, float]] = []  # (monotonic ns, cpu seconds)
        self.hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            self.samples.append((time.monotonic_ns(), cpu))
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
        except (OSError, IndexError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def stop(self) -> None:
        self._read()
        self._stop.set()
        self._thread.join()

    def cpu_percent(self, t0: int, t1: int) -> float | None:
        before = [s for s in self.samples if s[0] <= t0]
        after = [s for s in self.samples if s[0] >= t1]
        if not before or not after:
            return None
        a, b = before[-1], after[0]
        return 100.0 * (b[1] - a[1]) / ((b[0] - a[0]) / 1e9)


def terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bridge:
    """flowbridge (``python -m flowbridge run -c FILE``) or mq-bridge in a process."""

    def __init__(self, impl: str, case: Case, workdir: Path) -> None:
        self.impl = impl
        self.log = workdir / f"{impl}-{case.tag}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if impl.startswith("flowbridge"):
            cfg = workdir / f"{case.tag}-{impl}.yaml"
            text = case.flowbridge
            if impl.startswith("flowbridge-p"):  # the same route with ``pipeline: N``
                depth = impl.removeprefix("flowbridge-p")
                line = re.compile(r"^( +)(max_in_flight: \d+)$", re.MULTILINE)
                text = line.sub(rf"\1\2\n\1pipeline: {depth}", text, count=1)
            cfg.write_text(text)
            cmd = [PY, "-m", "flowbridge", "run", "-c", str(cfg), "--log-level", "warning"]
        else:
            cmd = [PY, "-m", "benchmarks.peer", json.dumps(case.peer)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        self.sampler = Sampler(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.sampler.stop()
        terminate(self.proc)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]


def gen(role: str, end: End, url: str, run: str, count: int, **kw: Any) -> list[str]:
    cmd = [PY, "-m", "benchmarks.gen", role, "--proto", end.proto, "--url", url]
    cmd += ["--topic", end.topic, "--count", str(count), "--run", run, "--qos", str(end.qos)]
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


class Sub:
    def __init__(self, cmd: list[str], timeout: float = 60) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = _readline(self.proc, timeout)
        if line.strip() != "READY":
            self.proc.kill()
            raise RuntimeError(f"subscriber did not start: {line!r}")

    def result(self, timeout: float) -> dict[str, Any]:
        line = _readline(self.proc, timeout)
        self.proc.wait(5)
        if not line:
            raise RuntimeError("subscriber gave no result")
        out: dict[str, Any] = json.loads(line)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    box: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    t = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        proc.kill()
        raise RuntimeError(f"no answer from {proc.args!r} within {timeout}s")
    return box[0]


def latency_of(
    src: End, dst: End, url: dict[str, str], count: int, size: int = 100
) -> dict[str, float]:
    """One run of ``count`` messages at LAT_RATE from ``src`` to ``dst``: p50/p99/p999 (us)."""
    run = uuid.uuid4().hex[:8]
    sub = Sub(gen("sub", dst, url[dst.proto], run, count, idle=3.0, latency=True))
    try:
        run_pub(gen("pub", src, url[src.proto], run, count, size=size, rate=LAT_RATE), 120)
        lat: dict[str, float] = sub.result(60)["lat_us"]
    finally:
        sub.kill()
    return lat


def run_pub(cmd: list[str], timeout: float) -> dict[str, Any]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"publisher failed: {p.stderr[-800:]}")
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------- one measurement


@dataclass
class Result:
    case: str
    mode: str
    size: int
    impl: str  # direct | flowbridge | mq-bridge
    note: str = ""
    error: str = ""
    count: int = 0
    delivered_pct: float | None = None
    dups: int = 0
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    pub_rate: float | None = None  # the publisher's own send rate in the throughput run
    lat_delivered_pct: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    lat_samples: int = 0
    cpu_pct: float | None = None
    rss_mb: float | None = None
    rates: list[float | None] = field(default_factory=list)  # every repeat's msg/s
    lat_runs: list[list[float]] = field(default_factory=list)  # every repeat's p50/p99/p999
    # direct rows: the target broker's own pub -> sub, measured at the same moments
    target_p50_us: float | None = None
    target_p99_us: float | None = None


@dataclass
class Plan:
    quick: bool
    counts: dict[int, int]
    lat_count: int
    sizes: tuple[int, ...]
    peer: bool
    only: list[str]
    repeat: int = 1
    mode: str | None = None  # only this delivery mode
    pipeline: int = 1  # above 1: at-least-once cases also run flowbridge-pN, alternating


def median_run(runs: list[Result]) -> Result:
    """The run with the median rate (errors only when every run failed); every run's rate
    is kept in ``rates``."""
    ok = sorted((r for r in runs if not r.error), key=lambda r: r.msgs_per_s or 0.0)
    chosen = ok[len(ok) // 2] if ok else runs[-1]
    chosen.rates = [r.msgs_per_s for r in runs]
    lat = [r for r in ok if r.p50_us is not None and r.p99_us is not None and r.p999_us]
    if lat:  # each percentile the median of the runs', not the one run of the median rate
        chosen.lat_runs = [[r.p50_us or 0.0, r.p99_us or 0.0, r.p999_us or 0.0] for r in lat]
        chosen.p50_us, chosen.p99_us, chosen.p999_us = _medians(chosen.lat_runs)
    return chosen


def _medians(runs: list[list[float]]) -> list[float]:
    """The median of each position over the runs (p50, p99, p999 apart)."""
    return [statistics.median(v) for v in zip(*runs, strict=True)]


# A throughput run should last about this long: at 200k msg/s a run of 50,000 messages took
# a quarter of a second, and two runs of one bridge differed by 30%.
WINDOW_S = 2.0
# How far a publisher may run ahead of its subscriber through a bridge: 20,000 messages of
# 100 B, 1,638 of 10 KB.  Far more than a route needs in flight to run at full speed (a
# millisecond's worth is a few hundred), well within what each bridge buffers.
WINDOW_MSGS = 20_000
WINDOW_BYTES = 16 << 20


def bridged_count(plan: Plan, size: int, direct: Result) -> int:
    """Messages per bridged throughput run: about ``WINDOW_S`` at the direct rate, within an
    eighth of the size's count and the count itself."""
    cap = plan.counts[size]
    return max(cap // 8, min(cap, round((direct.msgs_per_s or 0.0) * WINDOW_S)))


def measure(
    plan: Plan,
    b: Brokers,
    case: Case,
    *,
    size: int,
    impl: str,
    workdir: Path,
    count: int | None = None,
) -> Result:
    url = b.urls
    n = count or plan.counts[size]
    res = Result(case.name, case.mode, size, impl, count=n)
    if impl == "mq-bridge":
        res.note = case.peer_note
    # Tansu scans a topic's record batches on every fetch, so its latency grows with each
    # batch a topic holds (2.4 ms p50 on a new topic, 8.2 ms after four latency runs of
    # 2,000 single-record batches): every Kafka measurement gets topics of its own, and its
    # latency phase new ones again, behind a bridge started for them.
    kafka = "kafka" in (case.pub.proto, case.sub.proto)
    if kafka:
        case = renew(b, case, size)
    src = case.pub
    dst = case.sub if impl != "direct" else End(src.proto, src.topic, src.qos)
    bridge: Bridge | None = None
    rss_kb = 0
    run = uuid.uuid4().hex[:8]
    progress = workdir / f"progress-{run}"
    try:
        fill = (
            (lambda: run_pub(gen("pub", src, url[src.proto], run, n, size=size), 120))
            if case.prefill
            else None
        )
        bridge = start(b, case, impl, workdir, probe=not case.prefill, before=fill)
        # -- throughput
        sub = Sub(
            gen(
                "sub",
                dst,
                url[dst.proto],
                run,
                n,
                idle=3.0,
                first=45.0,
                from_start=impl == "direct" and case.prefill,
                progress=progress,
            )
        )
        try:
            # Through a bridge the publisher stays within a window of the subscriber: the
            # rate is what the route sustains with nothing lost (bursts are their own suite).
            # Direct, it runs free: its rate there is the generators' own ceiling.
            window = 0 if impl == "direct" else min(WINDOW_MSGS, WINDOW_BYTES // size)
            pub = (
                None
                if case.prefill
                else run_pub(
                    gen(
                        "pub",
                        src,
                        url[src.proto],
                        run,
                        n,
                        size=size,
                        progress=progress,
                        window=window,
                    ),
                    180,
                )
            )
            got = sub.result(240)
        finally:
            sub.kill()
        t_end = got["t_last"]
        t_start = got["t_first"] if pub is None else pub["t_start"]
        res.delivered_pct = 100.0 * got["unique"] / n
        res.dups = got["dups"]
        if got["unique"] > 1 and t_end > t_start:
            secs = (t_end - t_start) / 1e9
            k = got["unique"] - (1 if pub is None else 0)
            res.msgs_per_s = k / secs
            res.mb_per_s = k * size / secs / 1e6
        if pub is not None and pub["t_sent"] > pub["t_start"]:
            res.pub_rate = n / ((pub["t_sent"] - pub["t_start"]) / 1e9)
        if bridge is not None and t_end > t_start:
            time.sleep(0.12)  # a CPU sample after the window closes
            res.cpu_pct = bridge.sampler.cpu_percent(t_start, t_end)
        # -- latency at a fixed rate
        if kafka:
            if bridge is not None:
                bridge.stop()
                rss_kb = bridge.sampler.hwm_kb
                bridge = None
            case = renew(b, case, size)
            src = case.pub
            dst = case.sub if impl != "direct" else End(src.proto, src.topic, src.qos)
            bridge = start(b, case, impl, workdir, probe=True)
        lrun = uuid.uuid4().hex[:8]
        m = plan.lat_count
        sub = Sub(gen("sub", dst, url[dst.proto], lrun, m, idle=3.0, first=20.0, latency=True))
        try:
            run_pub(gen("pub", src, url[src.proto], lrun, m, size=size, rate=LAT_RATE), 120)
            got = sub.result(60)
        finally:
            sub.kill()
        res.lat_delivered_pct = 100.0 * got["unique"] / m
        lat = got.get("lat_us")
        if lat:
            res.p50_us, res.p99_us, res.p999_us = lat["p50"], lat["p99"], lat["p999"]
            res.lat_samples = got["lat_samples"]
        if bridge is not None and not bridge.alive():
            res.error = "bridge exited: " + bridge.tail()
    except Exception as exc:  # one broken case must not end the run: report it
        res.error = f"{type(exc).__name__}: {exc}"
        if bridge is not None:
            res.error += "\n" + bridge.tail()
    finally:
        if bridge is not None:
            bridge.stop()
            rss_kb = max(rss_kb, bridge.sampler.hwm_kb)
        res.rss_mb = rss_kb / 1024 or None
        progress.unlink(missing_ok=True)
    return res


def renew(b: Brokers, case: Case, size: int) -> Case:
    """The same case on topics, streams and groups of its own."""
    return next(c for c in cases(b, size) if (c.name, c.mode) == (case.name, case.mode))


def direct_latency(plan: Plan, b: Brokers, proto: str, mode: str, size: int) -> list[float]:
    """One latency run of a broker's own pub -> sub (the source End of a case reading from
    ``proto`` in ``mode``, or any mode), on topics of its own: p50/p99/p999 (us)."""
    found = [c for c in cases(b, size) if c.pub.proto == proto]
    case = next((c for c in found if c.mode == mode), found[0])
    src = case.pub
    if proto == "kafka":
        kafka_create(b, src.topic)
    url = b.urls
    lat = latency_of(src, End(src.proto, src.topic, src.qos), url, plan.lat_count, size)
    return [lat["p50"], lat["p99"], lat["p999"]]


def start(
    b: Brokers,
    case: Case,
    impl: str,
    workdir: Path,
    *,
    probe: bool,
    before: Callable[[], object] | None = None,
) -> Bridge | None:
    """Set up the case's topics, run ``before`` (a prefill) and start its bridge (None:
    direct); with ``probe``, wait until a message goes through."""
    url = b.urls
    if impl == "direct":
        if case.pub.proto == "kafka":
            kafka_create(b, case.pub.topic)
    else:
        for step in case.setup:
            step()
        for step in case.peer_setup if impl == "mq-bridge" else []:
            step()
    if before is not None:
        before()
    if impl == "direct":
        return None
    bridge = Bridge(impl, case, workdir)
    if probe:
        try:
            _probe(bridge, case.pub, case.sub, url)
        except Exception:
            bridge.stop()
            raise
    return bridge


def _probe(bridge: Bridge, src: End, dst: End, url: dict[str, str]) -> None:
    """Wait until a message goes through (subscriptions, groups and sessions in place)."""
    run = "probe" + uuid.uuid4().hex[:3]
    sub = Sub(gen("sub", dst, url[dst.proto], run, 800, need=1, first=40.0))
    pub = subprocess.Popen(
        gen("pub", src, url[src.proto], run, 800, size=64, rate=20),
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
    if not got["unique"]:
        raise RuntimeError(f"nothing came through {bridge.impl} within 40 s")


# --------------------------------------------------------------------------- main


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _us_per_msg(r: Result) -> float | None:
    if r.cpu_pct is None or not r.msgs_per_s:
        return None
    return r.cpu_pct * 1e4 / r.msgs_per_s


def line(r: Result) -> str:
    if r.error:
        return f"    {r.impl:<10} ERROR {r.error.splitlines()[0][:160]}"
    return (
        f"    {r.impl:<10} {_fmt(r.msgs_per_s):>8} msg/s {_fmt(r.mb_per_s, '.1f'):>6} MB/s "
        f"delivered {_fmt(r.delivered_pct, '.2f')}% dups {r.dups}  "
        f"lat p50/p99/p99.9 {_fmt(r.p50_us)}/{_fmt(r.p99_us)}/{_fmt(r.p999_us)} us  "
        f"cpu {_fmt(r.cpu_pct)}% ({_fmt(_us_per_msg(r), '.1f')} us/msg) "
        f"rss {_fmt(r.rss_mb, '.1f')} MB  "
        f"(pub {_fmt(r.pub_rate)} msg/s)"
    )


QUICK_CASES = {
    ("MQTT->NATS", "at-most-once"),
    ("NATS->NATS rewrite", "at-most-once"),
    ("NATS->Kafka", "at-least-once"),
    ("Kafka->NATS", "at-least-once"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the target cases, 100 B, ~1-2 min")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        help="run cases (or the burst / scale-out suites) whose name contains",
    )
    ap.add_argument("--mode", choices=["at-most-once", "at-least-once"], help="only this mode")
    ap.add_argument("--size", type=int, choices=[100, 10_240], help="only this payload size")
    ap.add_argument("--no-peer", action="store_true", help="skip mq-bridge")
    ap.add_argument(
        "--count",
        type=int,
        help="messages per direct run, 100 B (bridged: ~2 s at the direct rate, at most this)",
    )
    ap.add_argument(
        "--repeat", type=int, help="runs per bridge and case, median reported (quick: 3, else 1)"
    )
    ap.add_argument(
        "--pipeline",
        type=int,
        default=1,
        help="also run at-least-once cases with the route option pipeline: N (alternating)",
    )
    args = ap.parse_args(argv)
    plan = Plan(
        quick=args.quick,
        counts={100: args.count or (200_000 if args.quick else 400_000), 10_240: 20_000},
        lat_count=2_000 if args.quick else 3_000,
        sizes=(args.size,) if args.size else (100,) if args.quick else (100, 10_240),
        peer=not args.no_peer,
        only=args.only,
        repeat=max(1, args.repeat or (3 if args.quick else 1)),
        mode=args.mode,
        pipeline=args.pipeline,
    )
    peer_ok = ""
    if plan.peer:
        try:
            import mq_bridge  # noqa: PLC0415

            peer_ok = f"mq-bridge {mq_bridge.__version__}"
        except ImportError as exc:
            peer_ok = ""
            say(f"mq-bridge NOT available ({exc}): `pip install mq-bridge`; peer columns empty")
    started = time.monotonic()
    results: list[Result] = []
    RESULTS.mkdir(exist_ok=True)
    workdir = RESULTS / "logs"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with brokers() as b:
        direct: dict[tuple[str, int, int, bool], Result] = {}
        for size in plan.sizes:
            for case in cases(b, size):
                if plan.quick and (case.name, case.mode) not in QUICK_CASES:
                    continue
                if plan.only and not any(o.lower() in case.name.lower() for o in plan.only):
                    continue
                if plan.mode and case.mode != plan.mode:
                    continue
                say(f"{case.name} {case.mode} {size} B")
                key = (case.pub.proto, case.pub.qos, size, case.prefill)
                if key not in direct:
                    direct[key] = measure(plan, b, case, size=size, impl="direct", workdir=workdir)
                base = Result(**{**asdict(direct[key]), "case": case.name, "mode": case.mode})
                base.note = f"{case.pub.proto} pub -> {case.pub.proto} sub, no bridge"
                results.append(base)
                say(line(base))
                impls = ["flowbridge"] + (["mq-bridge"] if plan.peer and peer_ok else [])
                if plan.pipeline > 1 and case.mode == "at-least-once":
                    impls.insert(1, f"flowbridge-p{plan.pipeline}")
                impls = [i for i in impls if i != "mq-bridge" or case.peer is not None]
                # Repeats alternate the bridges, so both see the same moments of a noisy
                # machine; each reports its median run.
                runs: dict[str, list[Result]] = {impl: [] for impl in impls}
                n = bridged_count(plan, size, direct[key])
                # Latency baselines are measured in every repeat beside the bridges, at the
                # same moments of the machine: the source broker's own path and the target's.
                target = case.sub.proto if case.sub.proto != case.pub.proto else None
                src_lat: list[list[float]] = []
                dst_lat: list[list[float]] = []
                for _ in range(plan.repeat):
                    try:
                        src_lat.append(direct_latency(plan, b, case.pub.proto, case.mode, size))
                        if target is not None:
                            dst_lat.append(direct_latency(plan, b, target, case.mode, size))
                    except Exception as exc:  # the bridges still run; the baseline says so
                        say(f"    direct latency ERROR {type(exc).__name__}: {exc}")
                    for impl in impls:
                        r = measure(plan, b, case, size=size, impl=impl, workdir=workdir, count=n)
                        runs[impl].append(r)
                        say(line(r))
                if src_lat:
                    base.lat_runs = src_lat
                    base.p50_us, base.p99_us, base.p999_us = _medians(src_lat)
                    if dst_lat:
                        base.target_p50_us, base.target_p99_us, _ = _medians(dst_lat)
                    say(
                        f"    direct latency, median of {len(src_lat)}: p50/p99 "
                        f"{base.p50_us:.0f}/{base.p99_us:.0f} us"
                        + (
                            f"; {target} own path {base.target_p50_us:.0f}/"
                            f"{base.target_p99_us:.0f} us"
                            if base.target_p50_us is not None and base.target_p99_us is not None
                            else ""
                        )
                    )
                for impl in impls:
                    r = median_run(runs[impl])
                    results.append(r)
                    if plan.repeat > 1:
                        say(f"    {impl} median of {plan.repeat}: {_fmt(r.msgs_per_s)} msg/s")
        from benchmarks import extra  # noqa: PLC0415  (imports this module)

        suites = extra.run(plan, b, workdir)
    elapsed = time.monotonic() - started
    from benchmarks import report  # noqa: PLC0415

    meta = {
        "command": "python -m benchmarks" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{_cpu_model()}, Linux {platform.release()}, Python {platform.python_version()}",
        "peer": peer_ok or "mq-bridge not installed",
        "elapsed_s": round(elapsed),
        "quick": plan.quick,
        "counts": plan.counts,
        "latency": f"{plan.lat_count} messages at {LAT_RATE:.0f} msg/s",
        "repeat": plan.repeat,
    }
    paths = report.write(RESULTS, meta, [asdict(r) for r in results], suites)
    print()
    print(paths["md"].read_text())
    say(f"done in {elapsed:.0f} s: {', '.join(str(p) for p in paths.values())}")
    return 0


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
