"""Load generators, one process each: ``python -m benchmarks.gen pub|sub ...``.

NATS, MQTT and AMQP use raw sockets (pre-encoded frames written in large chunks, a minimal
frame parser on the receiving side; AMQP frames encoded with pamqp) so the generator is never
the slowest part; Kafka uses aiokafka with linger.  Every payload starts with ``run id
(8 bytes) | sequence (u64) | CLOCK_MONOTONIC ns (u64)``: the subscriber counts distinct
sequences of its run (losses, duplicates) and, in latency mode, the one-way latency of each message.

A subscriber prints ``READY`` once subscribed, then one JSON line with its result; a
publisher prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import select
import socket
import struct
import sys
import time
from typing import Any
from urllib.parse import urlsplit

# The fetch wait of every Kafka consumer in the benchmark (this subscriber, both bridges, the
# forwarder): Tansu answers a fetch only when its wait runs out, so a longer one would be
# latency no Kafka broker adds.
KAFKA_FETCH_WAIT_MS = 5

HEAD = struct.Struct(">8sQQ")
MAX_LATENCIES = 200_000  # latency samples kept (bounded memory)


def payload(run: bytes, seq: int, size: int, ts: int | None = None) -> bytes:
    head = HEAD.pack(run, seq, time.monotonic_ns() if ts is None else ts)
    return head + b"x" * max(0, size - HEAD.size)


def _hostport(url: str, default: int) -> tuple[str, int]:
    p = urlsplit(url)
    return p.hostname or "127.0.0.1", p.port or default


# --------------------------------------------------------------------------- the counter


class Counter:
    """Distinct sequences of one run, duplicates, timing and (optionally) latencies."""

    def __init__(self, run: bytes, count: int, latency: bool, need: int = 0) -> None:
        self.run = run
        self.count = count
        self.need = need or count
        self.seen = bytearray(count)
        self.unique = 0
        self.dups = 0
        self.foreign = 0
        self.t_first = 0
        self.t_last = 0
        self.latency = latency
        self.lat: list[int] = []

    def add(self, buf: bytes | bytearray | memoryview, off: int, now: int) -> None:
        run, seq, ts = HEAD.unpack_from(buf, off)
        if run != self.run or seq >= self.count:
            self.foreign += 1
            return
        if self.seen[seq]:
            self.dups += 1
            return
        self.seen[seq] = 1
        self.unique += 1
        if not self.t_first:
            self.t_first = now
        self.t_last = now
        if self.latency and len(self.lat) < MAX_LATENCIES:
            self.lat.append(now - ts)

    @property
    def done(self) -> bool:
        return self.unique >= self.need

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unique": self.unique,
            "dups": self.dups,
            "foreign": self.foreign,
            "t_first": self.t_first,
            "t_last": self.t_last,
        }
        if self.latency and self.lat:
            lat = sorted(self.lat)
            n = len(lat)
            out["lat_us"] = {
                q: lat[min(n - 1, int(n * f))] / 1000.0
                for q, f in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))
            }
            out["lat_samples"] = n
        return out


class Progress:
    """A subscriber's count of distinct messages, shared with its publisher through an 8-byte
    file: a publisher given ``--window N`` stays at most N messages ahead of it, so a route
    slower than the publisher is measured at the rate it sustains, not overrun (a source
    without flow control, core NATS or MQTT QoS 0, would otherwise lose what no buffer
    holds).  Without a file it does nothing."""

    def __init__(self, path: str | None) -> None:
        self.map: mmap.mmap | None = None
        if path:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < 8:
                    os.ftruncate(fd, 8)
                self.map = mmap.mmap(fd, 8)
            finally:
                os.close(fd)

    def set(self, n: int) -> None:
        if self.map is not None:
            struct.pack_into("<Q", self.map, 0, n)

    def get(self) -> int:
        return struct.unpack_from("<Q", self.map, 0)[0] if self.map is not None else 0

    def gate(self, upto: int, window: int) -> None:
        """Wait until sending up to message ``upto`` keeps within ``window`` of the
        subscriber (0: no window)."""
        if not window or self.map is None:
            return
        deadline = time.monotonic() + 30
        while upto - self.get() > window and time.monotonic() < deadline:
            time.sleep(0.0002)


class Stopper:
    """When a subscriber gives up: everything seen, ``idle`` s without news after the first
    message, or ``first`` s without any message.  Each check also publishes the count to
    ``progress``."""

    def __init__(
        self, c: Counter, idle: float, first: float, progress: Progress | None = None
    ) -> None:
        self.c = c
        self.progress = progress
        self.idle = idle
        self.start = time.monotonic()
        self.first = first
        self.last_unique = 0
        self.last_change = self.start

    def stop(self) -> bool:
        if self.c.done:
            return True
        now = time.monotonic()
        if self.c.unique != self.last_unique:
            self.last_unique = self.c.unique
            if self.progress is not None:
                self.progress.set(self.c.unique)
            self.last_change = now
            return False
        if self.c.unique == 0:
            return now - self.start > self.first
        return now - self.last_change > self.idle


def ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- NATS (raw)


def _nats_connect(url: str) -> socket.socket:
    s = socket.create_connection(_hostport(url, 4222))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    f.readline()  # INFO
    opts = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1, "echo": True}
    s.sendall(b"CONNECT " + json.dumps(opts).encode() + b"\r\nPING\r\n")
    while True:
        line = f.readline()
        if line.startswith(b"PONG"):
            break
        if line.startswith(b"-ERR") or not line:
            raise RuntimeError(f"NATS refused: {line!r}")
    f.close()
    return s


def _nats_wait_pong(s: socket.socket) -> None:
    s.sendall(b"PING\r\n")
    buf = b""
    while b"PONG" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("NATS closed")
        buf = buf[-8:] + chunk


def nats_pub(a: argparse.Namespace) -> dict[str, Any]:
    s = _nats_connect(a.url)
    subj = a.topic.encode()
    head = b"PUB " + subj + b" %d\r\n" % a.size
    t0 = time.monotonic_ns()
    if a.rate:
        _paced(a, lambda seq: s.sendall(head + payload(a.run, seq, a.size) + b"\r\n"))
    else:
        chunk = 2000 if a.size < 1000 else 100
        pad = b"x" * max(0, a.size - HEAD.size)
        progress = Progress(a.progress)
        for start in range(0, a.count, chunk):
            progress.gate(min(a.count, start + chunk), a.window)
            ts = time.monotonic_ns()
            s.sendall(
                b"".join(
                    head + HEAD.pack(a.run, seq, ts) + pad + b"\r\n"
                    for seq in range(start, min(a.count, start + chunk))
                )
            )
    t1 = time.monotonic_ns()
    _nats_wait_pong(s)
    s.close()
    return {"sent": a.count, "t_start": t0, "t_sent": t1}


def nats_sub(a: argparse.Namespace) -> dict[str, Any]:
    s = _nats_connect(a.url)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.sendall(b"SUB " + a.topic.encode() + b" 1\r\n")
    _nats_wait_pong(s)
    ready()
    c = Counter(a.run, a.count, a.latency, a.need)
    stop = Stopper(c, a.idle, a.first, Progress(a.progress))
    buf = bytearray()
    s.settimeout(0.2)
    while not stop.stop():
        try:
            data = s.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        now = time.monotonic_ns()
        buf += data
        pos = 0
        n = len(buf)
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            op = buf[pos : pos + 4]
            if op == b"MSG ":
                size = int(buf[buf.rfind(b" ", pos, nl) + 1 : nl])
                body = nl + 2
                if body + size + 2 > n:
                    break
                c.add(buf, body, now)
                pos = body + size + 2
            elif op == b"HMSG":
                sp = buf.rfind(b" ", pos, nl)
                total = int(buf[sp + 1 : nl])
                hdr = int(buf[buf.rfind(b" ", pos, sp) + 1 : sp])
                body = nl + 2
                if body + total + 2 > n:
                    break
                c.add(buf, body + hdr, now)
                pos = body + total + 2
            else:
                if op == b"PING":
                    s.sendall(b"PONG\r\n")
                elif op == b"-ERR":
                    raise RuntimeError(bytes(buf[pos:nl]).decode())
                pos = nl + 2
        del buf[:pos]
    s.close()
    return c.result()


# --------------------------------------------------------------------------- MQTT 3.1.1 (raw)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_connect(url: str, client_id: str) -> socket.socket:
    s = socket.create_connection(_hostport(url, 1883))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
    s.sendall(b"\x10" + _varint(len(body)) + body)
    ack = s.recv(4)
    if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
        raise RuntimeError(f"MQTT CONNACK refused: {ack!r}")
    return s


def _mqtt_frames(buf: bytearray) -> tuple[list[tuple[int, int, int]], int]:
    """Complete frames in ``buf``: (first byte, body start, body end); and bytes used."""
    frames: list[tuple[int, int, int]] = []
    pos = 0
    n = len(buf)
    while pos + 2 <= n:
        mult = 1
        length = 0
        i = pos + 1
        while True:
            if i >= n:
                return frames, pos
            b = buf[i]
            length += (b & 0x7F) * mult
            mult <<= 7
            i += 1
            if not b & 0x80:
                break
        if i + length > n:
            break
        frames.append((buf[pos], i, i + length))
        pos = i + length
    return frames, pos


def _publish_frame(topic: bytes, body: bytes, qos: int, pid: int) -> bytes:
    var = struct.pack(">H", len(topic)) + topic + (struct.pack(">H", pid) if qos else b"")
    return bytes([0x30 | (qos << 1)]) + _varint(len(var) + len(body)) + var + body


def mqtt_pub(a: argparse.Namespace) -> dict[str, Any]:
    s = _mqtt_connect(a.url, f"benchpub-{a.run.decode()}-{time.monotonic_ns() % 10**6}")
    topic = a.topic.encode()
    window = 1000
    outstanding = 0
    buf = bytearray()

    def read_acks(block: float | None) -> None:
        nonlocal outstanding
        r, _, _ = select.select([s], [], [], block)
        if not r:
            return
        data = s.recv(1 << 20)
        if not data:
            raise RuntimeError("MQTT broker closed the connection")
        buf.extend(data)
        frames, used = _mqtt_frames(buf)
        del buf[:used]
        outstanding -= sum(1 for f in frames if f[0] >> 4 == 4)

    pid = 0

    def next_pid() -> int:
        nonlocal pid
        pid = pid % 65535 + 1
        return pid

    t0 = time.monotonic_ns()
    if a.rate:

        def send(seq: int) -> None:
            nonlocal outstanding
            s.sendall(_publish_frame(topic, payload(a.run, seq, a.size), a.qos, next_pid()))
            if a.qos:
                outstanding += 1
                read_acks(0)

        _paced(a, send)
    else:
        pad = b"x" * max(0, a.size - HEAD.size)
        chunk = 500 if a.size < 1000 else 50
        progress = Progress(a.progress)
        seq = 0
        while seq < a.count:
            room = min(chunk, a.count - seq)
            progress.gate(seq + room, a.window)
            if a.qos:
                while outstanding + room > window:
                    read_acks(5.0)
                outstanding += room
            ts = time.monotonic_ns()
            s.sendall(
                b"".join(
                    _publish_frame(topic, HEAD.pack(a.run, k, ts) + pad, a.qos, next_pid())
                    for k in range(seq, seq + room)
                )
            )
            seq += room
    t1 = time.monotonic_ns()
    deadline = time.monotonic() + 30
    while outstanding > 0 and time.monotonic() < deadline:
        read_acks(1.0)
    # PINGRESP comes after the broker handled every earlier packet of this connection.
    s.sendall(b"\xc0\x00")
    while not any(f[0] == 0xD0 for f in _mqtt_frames(buf)[0]):
        r, _, _ = select.select([s], [], [], 10.0)
        if not r:
            break
        buf.extend(s.recv(1 << 20))
    s.sendall(b"\xe0\x00")
    s.close()
    return {"sent": a.count, "t_start": t0, "t_sent": t1, "unacked": outstanding}


def mqtt_sub(a: argparse.Namespace) -> dict[str, Any]:
    s = _mqtt_connect(a.url, f"benchsub-{a.run.decode()}-{time.monotonic_ns() % 10**6}")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    topic = a.topic.encode()
    body = b"\x00\x01" + struct.pack(">H", len(topic)) + topic + bytes([a.qos])
    s.sendall(b"\x82" + _varint(len(body)) + body)
    buf = bytearray()
    while True:
        buf.extend(s.recv(65536))
        frames, used = _mqtt_frames(buf)
        if any(f[0] == 0x90 for f in frames):
            del buf[:used]
            break
    ready()
    c = Counter(a.run, a.count, a.latency, a.need)
    stop = Stopper(c, a.idle, a.first, Progress(a.progress))
    s.settimeout(0.2)
    while not stop.stop():
        try:
            data = s.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        now = time.monotonic_ns()
        buf += data
        frames, used = _mqtt_frames(buf)
        acks = []
        for first, start, _end in frames:
            if first >> 4 != 3:
                continue
            tlen = (buf[start] << 8) | buf[start + 1]
            off = start + 2 + tlen
            if first & 0x06:
                acks.append(b"\x40\x02" + bytes(buf[off : off + 2]))
                off += 2
            c.add(buf, off, now)
        if acks:
            s.sendall(b"".join(acks))
        del buf[:used]
    s.sendall(b"\xe0\x00")
    s.close()
    return c.result()


# --------------------------------------------------------------------------- Kafka (aiokafka)


async def kafka_pub(a: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415

    p = AIOKafkaProducer(
        bootstrap_servers=urlsplit(a.url).netloc,
        acks=1,
        linger_ms=0 if a.rate else 5,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        enable_idempotence=False,
    )
    await p.start()
    try:
        t0 = time.monotonic_ns()
        if a.rate:
            loop = asyncio.get_running_loop()
            start = loop.time()
            pending = []
            for seq in range(a.count):
                delay = start + seq / a.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(await p.send(a.topic, payload(a.run, seq, a.size)))
            await asyncio.gather(*pending)
        else:
            pad = b"x" * max(0, a.size - HEAD.size)
            futs = []
            for seq in range(a.count):
                futs.append(await p.send(a.topic, HEAD.pack(a.run, seq, time.monotonic_ns()) + pad))
                if len(futs) >= 5000:
                    await asyncio.gather(*futs)
                    futs.clear()
            await asyncio.gather(*futs)
        t1 = time.monotonic_ns()
    finally:
        await p.stop()
    return {"sent": a.count, "t_start": t0, "t_sent": t1}


async def kafka_sub(a: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: PLC0415

    cons = AIOKafkaConsumer(
        bootstrap_servers=urlsplit(a.url).netloc,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_wait_ms=KAFKA_FETCH_WAIT_MS,
    )
    await cons.start()
    try:
        parts = cons.partitions_for_topic(a.topic)
        for _ in range(100):
            if parts:
                break
            await cons._client.force_metadata_update()
            await asyncio.sleep(0.1)
            parts = cons.partitions_for_topic(a.topic)
        if not parts:
            raise RuntimeError(f"Kafka topic {a.topic} has no partitions")
        tps = [TopicPartition(a.topic, p) for p in sorted(parts)]
        cons.assign(tps)
        if a.from_start:
            await cons.seek_to_beginning(*tps)
        else:
            await cons.seek_to_end(*tps)
        for tp in tps:
            await cons.position(tp)
        ready()
        c = Counter(a.run, a.count, a.latency, a.need)
        stop = Stopper(c, a.idle, a.first, Progress(a.progress))
        while not stop.stop():
            batch = await cons.getmany(timeout_ms=100, max_records=20000)
            now = time.monotonic_ns()
            for records in batch.values():
                for r in records:
                    c.add(r.value, 0, now)
    finally:
        await cons.stop()
    return c.result()


# --------------------------------------------------------------------------- AMQP (aiormq)


class _AmqpRaw:
    """A publishing AMQP 0-9-1 connection on a plain socket (frames encoded with pamqp, the
    protocol layer aiormq uses): aiormq's per-publish overhead caps it near 6k msg/s."""

    def __init__(self, url: str) -> None:
        from pamqp import commands as c  # noqa: PLC0415
        from pamqp import exceptions, frame, header  # noqa: PLC0415

        self.c, self.frame, self.partial = c, frame, exceptions.UnmarshalingException
        p = urlsplit(url)
        self.s = socket.create_connection((p.hostname or "127.0.0.1", p.port or 5672))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.s.sendall(frame.marshal(header.ProtocolHeader(), 0))
        self.expect(c.Connection.Start)
        auth = f"\0{p.username or 'guest'}\0{p.password or 'guest'}"
        self.send(c.Connection.StartOk(response=auth))
        tune = self.expect(c.Connection.Tune)
        self.frame_max = tune.frame_max or 131072
        self.send(c.Connection.TuneOk(tune.channel_max, self.frame_max, 0))
        vhost = (p.path or "/")[1:] or "/"
        self.send(c.Connection.Open(vhost))
        self.expect(c.Connection.OpenOk)
        self.send(c.Channel.Open(), 1)
        self.expect(c.Channel.OpenOk)

    def send(self, f: Any, channel: int = 0) -> None:
        self.s.sendall(self.frame.marshal(f, channel))

    def expect(self, kind: type) -> Any:
        while True:
            while True:
                try:
                    used, _, f = self.frame.unmarshal(self.buf)
                except self.partial:  # an incomplete frame: read more
                    chunk = self.s.recv(65536)
                    if not chunk:
                        raise RuntimeError("AMQP broker closed the connection") from None
                    self.buf += chunk
                    continue
                self.buf = self.buf[used:]
                break
            if isinstance(f, kind):
                return f
            if isinstance(f, self.c.Connection.Close | self.c.Channel.Close):
                raise ConnectionError(f"AMQP refused: {f!r}")

    def publish_frames(self, exchange: str, key: str, body: bytes) -> bytes:
        from pamqp import body as b  # noqa: PLC0415
        from pamqp import header  # noqa: PLC0415

        m = self.frame.marshal
        return (
            m(self.c.Basic.Publish(exchange=exchange, routing_key=key), 1)
            + m(header.ContentHeader(0, len(body), self.c.Basic.Properties()), 1)
            + m(b.ContentBody(body), 1)
        )

    def close(self) -> None:
        # A synchronous round trip: the broker has taken every earlier publish.
        self.send(self.c.Basic.Qos(prefetch_count=1), 1)
        self.expect(self.c.Basic.QosOk)
        self.send(self.c.Connection.Close(200, "bye", 0, 0))
        with contextlib.suppress(RuntimeError, OSError):
            self.expect(self.c.Connection.CloseOk)
        self.s.close()


def amqp_pub(a: argparse.Namespace) -> dict[str, Any]:
    conn = _AmqpRaw(a.url)
    # Publish frames are identical but for the body: encode once, patch the head per message.
    proto = conn.publish_frames("amq.topic", a.topic, payload(a.run, 0, a.size))
    at = proto.index(HEAD.pack(a.run, 0, 0)[:8] + struct.pack(">Q", 0))
    before, after = proto[:at], proto[at + HEAD.size :]
    t0 = time.monotonic_ns()
    if a.rate:
        _paced(
            a,
            lambda seq: conn.s.sendall(before + HEAD.pack(a.run, seq, time.monotonic_ns()) + after),
        )
    else:
        chunk = 1000 if a.size < 1000 else 50
        progress = Progress(a.progress)
        for start in range(0, a.count, chunk):
            progress.gate(min(a.count, start + chunk), a.window)
            ts = time.monotonic_ns()
            conn.s.sendall(
                b"".join(
                    before + HEAD.pack(a.run, seq, ts) + after
                    for seq in range(start, min(a.count, start + chunk))
                )
            )
    t1 = time.monotonic_ns()
    conn.close()
    return {"sent": a.count, "t_start": t0, "t_sent": t1}


def amqp_sub(a: argparse.Namespace) -> dict[str, Any]:
    conn = _AmqpRaw(a.url)
    c_ = conn.c
    conn.send(c_.Queue.Declare(queue="", exclusive=True, auto_delete=True), 1)
    queue = conn.expect(c_.Queue.DeclareOk).queue
    conn.send(c_.Queue.Bind(queue=queue, exchange="amq.topic", routing_key=a.topic), 1)
    conn.expect(c_.Queue.BindOk)
    conn.send(c_.Basic.Consume(queue=queue, no_ack=True), 1)
    conn.expect(c_.Basic.ConsumeOk)
    ready()
    s = conn.s
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    c = Counter(a.run, a.count, a.latency, a.need)
    stop = Stopper(c, a.idle, a.first, Progress(a.progress))
    buf = bytearray(conn.buf)
    body_next = False  # the next body frame starts a message (its first bytes: our head)
    s.settimeout(0.2)
    while not stop.stop():
        try:
            data = s.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        now = time.monotonic_ns()
        buf += data
        pos = 0
        n = len(buf)
        while pos + 7 <= n:
            kind = buf[pos]
            size = int.from_bytes(buf[pos + 3 : pos + 7])
            if pos + 8 + size > n:
                break
            if kind == 2:
                body_next = True
            elif kind == 3 and body_next:
                c.add(buf, pos + 7, now)
                body_next = False
            pos += 8 + size
        del buf[:pos]
    s.close()
    return c.result()


# --------------------------------------------------------------------------- common


def _paced(a: argparse.Namespace, send: Any) -> None:
    """``count`` sends at ``rate`` per second, each at its own slot (no bursts)."""
    start = time.monotonic()
    for seq in range(a.count):
        delay = start + seq / a.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        send(seq)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gen")
    ap.add_argument("role", choices=["pub", "sub"])
    ap.add_argument("--proto", required=True, choices=["nats", "mqtt", "kafka", "amqp"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--run", required=True, type=lambda v: v.encode().ljust(8, b"_")[:8])
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: as fast as possible")
    ap.add_argument("--qos", type=int, default=0)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--idle", type=float, default=2.0)
    ap.add_argument("--first", type=float, default=20.0)
    ap.add_argument("--from-start", action="store_true")
    ap.add_argument("--need", type=int, default=0, help="stop after this many (default: count)")
    ap.add_argument("--progress", help="file the subscriber writes its count to")
    ap.add_argument("--window", type=int, default=0, help="publisher: at most this many ahead")
    a = ap.parse_args(argv)
    sync = {("nats", "pub"): nats_pub, ("nats", "sub"): nats_sub}
    sync |= {("mqtt", "pub"): mqtt_pub, ("mqtt", "sub"): mqtt_sub}
    sync |= {("amqp", "pub"): amqp_pub, ("amqp", "sub"): amqp_sub}
    asyncs = {("kafka", "pub"): kafka_pub, ("kafka", "sub"): kafka_sub}
    key = (a.proto, a.role)
    if key in sync:
        result = sync[key](a)
    else:
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: PLC0415

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        result = asyncio.run(asyncs[key](a))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
