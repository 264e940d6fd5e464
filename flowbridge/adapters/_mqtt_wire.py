"""A compact MQTT 3.1.1 / 5.0 codec and one-connection asyncio client.

The codec is pure (bytes in, packets out) and incremental: ``Parser.feed`` takes whatever
the socket delivered and returns every complete packet.  ``MqttConnection`` is an asyncio
``Protocol``: outgoing packets are buffered and written once per loop iteration, incoming
PUBLISH packets are handed over as one list per read, and acks for received messages are
queued by the owner (so they can wait until a downstream target confirmed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from flowbridge.errors import FlowbridgeError

log = logging.getLogger("flowbridge.mqtt")

V311 = 4
V5 = 5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
)

MAX_REMAINING = 268_435_455  # largest value a 4-byte variable integer holds
_CACHE_MAX = 4096  # topics and property blocks a parser remembers
_SHORT_PROPS = 32  # property blocks up to this size are decoded once and shared
_JOIN_FROM = 65536  # an incomplete packet this large is collected in parts

# MQTT 5 property identifiers used by name in the adapter.
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROP_KIND: dict[int, int] = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT,
    0x11: _U32, 0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip

Props = dict[int, Any]
"""MQTT 5 properties by identifier; User Property (0x26) is a list of (name, value) pairs
in order, Subscription Identifier (0x0B) a list of ints (it may repeat); others one value."""

CONNACK_REASONS_311 = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
REASONS_5 = {
    0x04: "disconnect with will message",
    0x10: "no matching subscribers",
    0x11: "no subscription existed",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x92: "packet identifier not found",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


def reason_text(code: int) -> str:
    return f"0x{code:02X} {REASONS_5.get(code, 'unknown reason')}"


class MqttError(FlowbridgeError):
    """An MQTT protocol-level failure (refused connect, broken connection, bad packet)."""


class MalformedPacket(MqttError, ValueError):
    """Bytes that are not a valid MQTT packet; the connection cannot continue."""


class ConnectRefused(MqttError):
    """CONNACK with a failure code; ``reason_code`` is the raw code of the protocol."""

    def __init__(self, reason_code: int, text: str) -> None:
        self.reason_code = reason_code
        super().__init__(text)


class ConnectionLost(MqttError):
    """The connection ended while a request waited for its reply."""


# ---------------------------------------------------------------------------- packets


@dataclass(slots=True)
class Connect:
    client_id: str
    version: int = V5
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    properties: Props = field(default_factory=dict)
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False
    will_properties: Props = field(default_factory=dict)


@dataclass(slots=True)
class Connack:
    session_present: bool
    reason_code: int = 0
    properties: Props = field(default_factory=dict)


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Props | None = None


@dataclass(slots=True)
class _Ack:
    packet_id: int
    reason_code: int = 0
    properties: Props = field(default_factory=dict)


class PubAck(_Ack):
    __slots__ = ()


class PubRec(_Ack):
    __slots__ = ()


class PubRel(_Ack):
    __slots__ = ()


class PubComp(_Ack):
    __slots__ = ()


_ACK_TYPES: dict[type[_Ack], int] = {
    PubAck: PUBACK,
    PubRec: PUBREC,
    PubRel: PUBREL,
    PubComp: PUBCOMP,
}


@dataclass(slots=True)
class SubTopic:
    filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    topics: list[SubTopic]
    properties: Props = field(default_factory=dict)


@dataclass(slots=True)
class Suback:
    packet_id: int
    reason_codes: list[int]
    properties: Props = field(default_factory=dict)


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: Props = field(default_factory=dict)


@dataclass(slots=True)
class Unsuback:
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)
    properties: Props = field(default_factory=dict)


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class PingResp:
    pass


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Props = field(default_factory=dict)


@dataclass(slots=True)
class Auth:
    reason_code: int = 0
    properties: Props = field(default_factory=dict)


Packet = (
    Connect
    | Connack
    | Publish
    | _Ack
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)

# ---------------------------------------------------------------------------- encoding

_U16S = struct.Struct("!H")
_U32S = struct.Struct("!I")


def encode_varint(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"variable byte integer out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    if len(b) > 0xFFFF:
        raise ValueError(f"string longer than 65535 bytes: {s[:40]!r}...")
    return _U16S.pack(len(b)) + b


def _bin(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _U16S.pack(len(b)) + b


def encode_props(props: Props | None) -> bytes:
    """Properties with their length prefix (``b"\\x00"`` when there are none)."""
    if not props:
        return b"\x00"
    out = bytearray()
    for pid, value in props.items():
        kind = _PROP_KIND.get(pid)
        if kind is None:
            raise ValueError(f"unknown MQTT 5 property 0x{pid:02X}")
        if kind == _PAIR:
            for name, val in value:
                out += b"\x26" + _str(name) + _str(val)
            continue
        if kind == _VARINT and isinstance(value, list):
            for v in value:
                out += bytes((pid,)) + encode_varint(v)
            continue
        out.append(pid)
        if kind == _BYTE:
            out.append(value)
        elif kind == _U16:
            out += _U16S.pack(value)
        elif kind == _U32:
            out += _U32S.pack(value)
        elif kind == _VARINT:
            out += encode_varint(value)
        elif kind == _STR:
            out += _str(value)
        else:
            out += _bin(value)
    return encode_varint(len(out)) + out


def _fixed(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    *,
    dup: bool = False,
    packet_id: int = 0,
    props: bytes | None = None,
) -> bytes:
    """PUBLISH with pre-encoded properties (``props`` None for MQTT 3.1.1)."""
    first = 0x30 | (qos << 1) | retain | (dup << 3)
    return _publish_head(topic, len(payload), first, packet_id, props) + payload


def _publish_head(topic: str, size: int, first: int, packet_id: int, props: bytes | None) -> bytes:
    """Everything of a PUBLISH before its payload of ``size`` bytes (``first``: its first byte,
    type and flags)."""
    t = topic.encode()
    head = _U16S.pack(len(t)) + t
    if (first >> 1) & 3:
        head += _U16S.pack(packet_id)
    if props is not None:
        head += props
    return bytes((first,)) + encode_varint(len(head) + size) + head


def encode(packet: Packet, version: int = V5) -> bytes:
    v5 = version == V5
    if isinstance(packet, Publish):
        props = encode_props(packet.properties) if v5 else None
        return encode_publish(
            packet.topic,
            packet.payload,
            packet.qos,
            packet.retain,
            dup=packet.dup,
            packet_id=packet.packet_id,
            props=props,
        )
    if isinstance(packet, _Ack):
        kind = _ACK_TYPES[type(packet)]
        first = (kind << 4) | (0x02 if kind == PUBREL else 0)
        body = _U16S.pack(packet.packet_id)
        if v5 and (packet.reason_code or packet.properties):
            body += bytes((packet.reason_code,))
            if packet.properties:
                body += encode_props(packet.properties)
        return _fixed(first, body)
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    if isinstance(packet, Connack):
        body = bytes((int(packet.session_present), packet.reason_code))
        if v5:
            body += encode_props(packet.properties)
        return _fixed(CONNACK << 4, body)
    if isinstance(packet, Subscribe):
        sub = bytearray(_U16S.pack(packet.packet_id))
        if v5:
            sub += encode_props(packet.properties)
        for t in packet.topics:
            opts = t.qos
            if v5:
                opts |= (t.no_local << 2) | (t.retain_as_published << 3) | (t.retain_handling << 4)
            sub += _str(t.filter) + bytes((opts,))
        return _fixed(0x82, bytes(sub))
    if isinstance(packet, Suback):
        body = _U16S.pack(packet.packet_id)
        if v5:
            body += encode_props(packet.properties)
        return _fixed(SUBACK << 4, body + bytes(packet.reason_codes))
    if isinstance(packet, Unsubscribe):
        body = _U16S.pack(packet.packet_id)
        if v5:
            body += encode_props(packet.properties)
        return _fixed(0xA2, body + b"".join(_str(f) for f in packet.filters))
    if isinstance(packet, Unsuback):
        body = _U16S.pack(packet.packet_id)
        if v5:
            body += encode_props(packet.properties) + bytes(packet.reason_codes)
        return _fixed(UNSUBACK << 4, body)
    if isinstance(packet, PingReq):
        return b"\xc0\x00"
    if isinstance(packet, PingResp):
        return b"\xd0\x00"
    if isinstance(packet, Disconnect):
        if not v5 or (packet.reason_code == 0 and not packet.properties):
            return b"\xe0\x00"
        return _fixed(0xE0, bytes((packet.reason_code,)) + encode_props(packet.properties))
    if isinstance(packet, Auth):
        return _fixed(0xF0, bytes((packet.reason_code,)) + encode_props(packet.properties))
    raise TypeError(f"not an MQTT packet: {packet!r}")


def _encode_connect(p: Connect) -> bytes:
    v5 = p.version == V5
    flags = 0x02 if p.clean_start else 0
    if p.will_topic is not None:
        flags |= 0x04 | (p.will_qos << 3) | (p.will_retain << 5)
    if p.password is not None:
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    body = bytearray(_str("MQTT") + bytes((p.version, flags)) + _U16S.pack(p.keepalive))
    if v5:
        body += encode_props(p.properties)
    body += _str(p.client_id)
    if p.will_topic is not None:
        if v5:
            body += encode_props(p.will_properties)
        body += _str(p.will_topic) + _bin(p.will_payload)
    if p.username is not None:
        body += _str(p.username)
    if p.password is not None:
        body += _bin(p.password)
    return _fixed(CONNECT << 4, bytes(body))


# ---------------------------------------------------------------------------- decoding


class _Reader:
    """Cursor over one packet body; every read is bounds-checked."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | bytearray, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise MalformedPacket("packet shorter than its fields")

    def byte(self) -> int:
        self.need(1)
        self.pos += 1
        return self.buf[self.pos - 1]

    def u16(self) -> int:
        self.need(2)
        v: int = _U16S.unpack_from(self.buf, self.pos)[0]
        self.pos += 2
        return v

    def u32(self) -> int:
        self.need(4)
        v: int = _U32S.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def varint(self) -> int:
        value = shift = 0
        for _ in range(4):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def bin(self) -> bytes:
        n = self.u16()
        self.need(n)
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def str(self) -> str:
        raw = self.bin()
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacket(f"string is not valid UTF-8: {raw[:40]!r}") from exc

    def rest(self) -> bytes:
        out = bytes(self.buf[self.pos : self.end])
        self.pos = self.end
        return out

    def props(self) -> Props:
        n = self.varint()
        self.need(n)
        end = self.pos + n
        props: Props = {}
        while self.pos < end:
            pid = self.varint()
            kind = _PROP_KIND.get(pid)
            if kind is None:
                raise MalformedPacket(f"unknown property identifier 0x{pid:02X}")
            if kind == _PAIR:
                props.setdefault(USER_PROPERTY, []).append((self.str(), self.str()))
            elif kind == _VARINT:
                props.setdefault(pid, []).append(self.varint())
            elif pid in props:
                raise MalformedPacket(f"property 0x{pid:02X} given twice")
            elif kind == _BYTE:
                props[pid] = self.byte()
            elif kind == _U16:
                props[pid] = self.u16()
            elif kind == _U32:
                props[pid] = self.u32()
            elif kind == _STR:
                props[pid] = self.str()
            else:
                props[pid] = self.bin()
        if self.pos != end:
            raise MalformedPacket("properties overrun their length")
        return props


class Parser:
    """Incremental decoder: ``feed`` bytes as they arrive, get complete packets back.

    ``version`` decides how version-dependent packets (acks, PUBLISH) are read; a CONNECT
    sets it from its protocol level.  ``max_packet_size`` bounds what is buffered.
    """

    def __init__(self, version: int = V5, max_packet_size: int = MAX_REMAINING + 5) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        self._rest = b""  # an incomplete packet from the end of the previous chunk
        self._parts: list[bytes] = []  # or the chunks of a large one so far
        self._have = 0
        self._want = 0  # its size, while collecting
        # A stream repeats its topics and, on MQTT 5, its short property blocks (a broker adds
        # the same subscription identifier to every message): each is decoded once.  The
        # property dicts are shared between packets and must not be changed.
        self._topics: dict[bytes, str] = {}
        self._props: dict[bytes, Props] = {}
        # The last QoS 0 PUBLISH whose head can be reused (see ``feed``): its head (the bytes
        # up to the payload), that head's length, the packet's size, topic, retain flag and
        # (shared) properties.
        self._head: tuple[bytes, int, int, str, bool, Props | None] = (b"", 0, 0, "", False, None)

    @property
    def buffered(self) -> int:
        return len(self._rest) + self._have

    def feed(self, data: bytes) -> list[Packet]:
        if self._want:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._want:
                return []
            data = b"".join(self._parts)
            self._parts = []
            self._want = self._have = 0
        elif self._rest:
            data = self._rest + data
            self._rest = b""
        out: list[Packet] = []
        pos = 0
        size = len(data)
        v5 = self.version == V5
        topics = self._topics
        known = self._props
        # A stream of QoS 0 messages of one topic and size repeats the same bytes up to the
        # payload (fixed header, topic, short property block): such a packet is recognised
        # by that head and split without decoding it again.
        head, skip, total, last_topic, last_retain, last_props = self._head
        try:
            while size - pos >= 2:
                if head and data.startswith(head, pos) and pos + total <= size:
                    payload = data[pos + skip : pos + total]
                    out.append(Publish(last_topic, payload, 0, last_retain, False, 0, last_props))
                    pos += total
                    continue
                first = data[pos]
                # Remaining length, inline: this loop runs once per packet.
                length = shift = 0
                i = pos + 1
                while True:
                    if i >= size:
                        return out
                    b = data[i]
                    length |= (b & 0x7F) << shift
                    i += 1
                    if not b & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MalformedPacket("remaining length longer than 4 bytes")
                end = i + length
                if end - pos > self.max_packet_size:
                    raise MalformedPacket(
                        f"packet of {end - pos} bytes exceeds maximum {self.max_packet_size}"
                    )
                if end > size:
                    return out
                if first >> 4 != PUBLISH:
                    out.append(self._other(first >> 4, first, data, i, end))
                    pos = end
                    continue
                qos = (first >> 1) & 3
                if qos == 3:
                    raise MalformedPacket("PUBLISH with QoS 3")
                if i + 2 > end:
                    raise MalformedPacket("PUBLISH shorter than its topic")
                j = i + 2 + ((data[i] << 8) | data[i + 1])
                if j > end:
                    raise MalformedPacket("PUBLISH topic overruns the packet")
                raw = data[i + 2 : j]
                topic = topics.get(raw)
                if topic is None:
                    try:
                        topic = raw.decode()
                    except UnicodeDecodeError as exc:
                        raise MalformedPacket("PUBLISH topic is not valid UTF-8") from exc
                    if len(topics) >= _CACHE_MAX:
                        topics.clear()
                    topics[raw] = topic
                pid = 0
                if qos:
                    if j + 2 > end:
                        raise MalformedPacket("PUBLISH without packet identifier")
                    pid = (data[j] << 8) | data[j + 1]
                    if pid == 0:
                        raise MalformedPacket("PUBLISH with packet identifier 0")
                    j += 2
                props = None
                if v5:
                    if j >= end:
                        raise MalformedPacket("PUBLISH without its properties length")
                    plen = data[j]
                    if plen < 0x80 and plen <= _SHORT_PROPS and j + 1 + plen <= end:
                        block = data[j : j + 1 + plen]
                        props = known.get(block)
                        if props is None:
                            props = _Reader(block).props()
                            if len(known) >= _CACHE_MAX:
                                known.clear()
                            known[block] = props
                        j += 1 + plen
                    else:
                        r = _Reader(data, j, end)
                        props = r.props()
                        j = r.pos
                retain = bool(first & 1)
                out.append(Publish(topic, data[j:end], qos, retain, bool(first & 8), pid, props))
                if not qos and (props is None or (plen < 0x80 and plen <= _SHORT_PROPS)):
                    head, skip, total = data[pos:j], j - pos, end - pos
                    last_topic, last_retain, last_props = topic, retain, props
                    self._head = (head, skip, total, topic, retain, props)
                pos = end
            return out
        finally:
            if pos < size:
                self._keep(data[pos:] if pos else data)

    def _keep(self, rest: bytes) -> None:
        """Hold an incomplete packet; a large one is collected in parts and joined once, not
        copied again with every chunk that arrives."""
        length = shift = 0
        for k in range(1, min(len(rest), 5)):
            length |= (rest[k] & 0x7F) << shift
            if not rest[k] & 0x80:
                want = k + 1 + length
                if want > _JOIN_FROM:
                    self._parts = [rest]
                    self._have = len(rest)
                    self._want = want
                    return
                break
            shift += 7
        self._rest = rest

    def _other(self, kind: int, first: int, buf: bytes, i: int, end: int) -> Packet:
        flags = first & 0x0F
        expected = 0x02 if kind in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0
        if flags != expected:
            raise MalformedPacket(f"packet type {kind} with reserved flags 0x{flags:X}")
        r = _Reader(bytes(buf[i:end]))
        v5 = self.version == V5
        pkt: Packet
        if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            pid = r.u16()
            code = r.byte() if v5 and r.pos < r.end else 0
            props = r.props() if v5 and r.pos < r.end else {}
            cls = {PUBACK: PubAck, PUBREC: PubRec, PUBREL: PubRel, PUBCOMP: PubComp}[kind]
            pkt = cls(pid, code, props)
        elif kind == CONNACK:
            flags = r.byte()
            if flags & 0xFE:
                raise MalformedPacket("CONNACK with reserved flags")
            code = r.byte()
            pkt = Connack(bool(flags & 1), code, r.props() if v5 and r.pos < r.end else {})
        elif kind == SUBACK:
            pid = r.u16()
            props = r.props() if v5 else {}
            pkt = Suback(pid, list(r.rest()), props)
        elif kind == UNSUBACK:
            pid = r.u16()
            props = r.props() if v5 else {}
            pkt = Unsuback(pid, list(r.rest()) if v5 else [], props)
        elif kind == PINGREQ:
            pkt = PingReq()
        elif kind == PINGRESP:
            pkt = PingResp()
        elif kind == DISCONNECT:
            code = r.byte() if v5 and r.pos < r.end else 0
            pkt = Disconnect(code, r.props() if v5 and r.pos < r.end else {})
        elif kind == AUTH:
            code = r.byte() if r.pos < r.end else 0
            pkt = Auth(code, r.props() if r.pos < r.end else {})
        elif kind == CONNECT:
            pkt = self._connect(r)
        elif kind == SUBSCRIBE:
            pid = r.u16()
            props = r.props() if v5 else {}
            topics = []
            while r.pos < r.end:
                flt = r.str()
                o = r.byte()
                if o & 3 == 3 or (o & 0xC0) or (not v5 and o & 0xFC):
                    raise MalformedPacket(f"bad subscription options 0x{o:02X} for {flt!r}")
                topics.append(SubTopic(flt, o & 3, bool(o & 4), bool(o & 8), (o >> 4) & 3))
            if not topics:
                raise MalformedPacket("SUBSCRIBE without topic filters")
            pkt = Subscribe(pid, topics, props)
        elif kind == UNSUBSCRIBE:
            pid = r.u16()
            props = r.props() if v5 else {}
            filters = []
            while r.pos < r.end:
                filters.append(r.str())
            if not filters:
                raise MalformedPacket("UNSUBSCRIBE without topic filters")
            pkt = Unsubscribe(pid, filters, props)
        else:
            raise MalformedPacket(f"reserved packet type {kind}")
        if r.pos != r.end:
            raise MalformedPacket(f"packet type {kind} has {r.end - r.pos} trailing bytes")
        return pkt

    def _connect(self, r: _Reader) -> Connect:
        if r.str() != "MQTT":
            raise MalformedPacket("CONNECT protocol name is not MQTT")
        version = r.byte()
        if version not in (V311, V5):
            raise MalformedPacket(f"unsupported protocol level {version}")
        self.version = version
        v5 = version == V5
        flags = r.byte()
        if flags & 1:
            raise MalformedPacket("CONNECT reserved flag set")
        keepalive = r.u16()
        props = r.props() if v5 else {}
        p = Connect(r.str(), version, bool(flags & 2), keepalive, properties=props)
        if flags & 4:
            if v5:
                p.will_properties = r.props()
            p.will_topic = r.str()
            p.will_payload = r.bin()
            p.will_qos = (flags >> 3) & 3
            p.will_retain = bool(flags & 0x20)
        if flags & 0x80:
            p.username = r.str()
        if flags & 0x40:
            p.password = r.bin()
        return p


# ---------------------------------------------------------------------------- client


def topic_matches(flt: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest); ``$`` topics only match
    filters that name their first level; ``$share/GROUP/`` is stripped."""
    if flt.startswith("$share/"):
        flt = flt.split("/", 2)[2] if flt.count("/") >= 2 else ""
    if flt == topic:
        return True
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    fl = flt.split("/")
    tl = topic.split("/")
    for n, part in enumerate(fl):
        if part == "#":
            return True
        if n >= len(tl) or (part != "+" and part != tl[n]):
            return False
    return len(fl) == len(tl)


class _Pending:
    """An outgoing QoS 1/2 publish waiting for PUBACK / PUBCOMP."""

    __slots__ = ("future", "qos")

    def __init__(self, future: asyncio.Future[int], qos: int) -> None:
        self.future = future
        self.qos = qos


class MqttConnection(asyncio.Protocol):
    """One network connection: CONNECT handshake, publishes with flow control, acks.

    ``on_publish`` receives every PUBLISH of one read as a list; the owner acks QoS 1/2
    messages with ``queue_ack`` in arrival order.  ``on_lost`` is called once when the
    connection ends, after every waiting request failed with ``ConnectionLost``.
    """

    def __init__(
        self,
        *,
        version: int,
        on_publish: Callable[[MqttConnection, list[Publish]], None],
        on_lost: Callable[[MqttConnection, Exception | None], None],
    ) -> None:
        self.version = version
        self.on_publish = on_publish
        self.on_lost = on_lost
        self.parser = Parser(version)
        self.transport: asyncio.Transport | None = None
        self.connack: Connack | None = None
        self.closed = False
        self.close_reason: Exception | None = None
        self.server_receive_max = 65535
        self.max_packet_size: int | None = None
        self.keepalive = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._connack_fut: asyncio.Future[Connack] = loop.create_future()
        self._out: list[bytes] = []
        self._heads: dict[tuple[str, bool, bytes | None, int], bytes] = {}
        self._flush_scheduled = False
        self._requests: dict[int, asyncio.Future[list[int]]] = {}
        self._inflight: dict[int, _Pending] = {}
        self._next_id = 0
        self._id_free = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._last_read = loop.time()
        self._paused = False
        self._ping_task: asyncio.Task[None] | None = None
        self._eof: asyncio.Future[None] | None = None  # the broker closed after DISCONNECT

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            packets = self.parser.feed(data)
        except MalformedPacket as exc:
            log.warning("malformed packet from broker: %s", exc)
            self._abort(exc)
            return
        publishes: list[Publish] = []
        for p in packets:
            if isinstance(p, Publish):
                publishes.append(p)
            else:
                self._control(p)
        if publishes:
            self.on_publish(self, publishes)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._eof is not None and not self._eof.done():
            self._eof.set_result(None)
        self._abort(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- control packets

    def _control(self, p: Packet) -> None:
        if isinstance(p, PubAck | PubComp):
            pend = self._inflight.pop(p.packet_id, None)
            if pend is not None and not pend.future.done():
                pend.future.set_result(p.reason_code)
            self._id_free.set()
        elif isinstance(p, PubRec):
            pend = self._inflight.get(p.packet_id)
            if p.reason_code >= 0x80:
                self._inflight.pop(p.packet_id, None)
                if pend is not None and not pend.future.done():
                    pend.future.set_result(p.reason_code)
                self._id_free.set()
            else:
                self._send(encode(PubRel(p.packet_id), self.version))
        elif isinstance(p, PubRel):
            # Ours to complete at once: the message was already handed over at PUBLISH.
            self._send(encode(PubComp(p.packet_id), self.version))
        elif isinstance(p, Suback | Unsuback):
            fut = self._requests.pop(p.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(p.reason_codes)
            self._id_free.set()
        elif isinstance(p, Connack):
            if not self._connack_fut.done():
                self._connack_fut.set_result(p)
        elif isinstance(p, PingResp):
            pass
        elif isinstance(p, Disconnect):
            text = reason_text(p.reason_code)
            if REASON_STRING in p.properties:
                text += f" ({p.properties[REASON_STRING]})"
            log.warning("broker disconnected: %s", text)
            self._abort(ConnectionLost(f"broker sent DISCONNECT: {text}"))
        else:
            self._abort(MalformedPacket(f"unexpected packet from broker: {type(p).__name__}"))

    # -- writing

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            self.transport.writelines(self._out)
        self._out = []

    def queue_ack(self, packet_id: int, qos: int) -> None:
        """PUBACK (QoS 1) or PUBREC (QoS 2) for a received message; written in one batch
        with everything queued in the same loop iteration."""
        self._send(bytes((0x40 if qos == 1 else 0x50, 2, packet_id >> 8, packet_id & 0xFF)))

    # -- handshake

    async def handshake(self, connect: Connect, reply_timeout: float) -> Connack:
        assert self.transport is not None
        self.keepalive = connect.keepalive
        self.transport.write(encode(connect, self.version))
        try:
            connack = await asyncio.wait_for(asyncio.shield(self._connack_fut), reply_timeout)
        except TimeoutError:
            self._abort(ConnectionLost("no CONNACK in time"))
            raise ConnectionLost(f"no CONNACK within {reply_timeout}s") from None
        if connack.reason_code:
            if self.version == V5:
                text = reason_text(connack.reason_code)
                if REASON_STRING in connack.properties:
                    text += f" ({connack.properties[REASON_STRING]})"
            else:
                text = CONNACK_REASONS_311.get(connack.reason_code, str(connack.reason_code))
            self._abort(None)
            raise ConnectRefused(connack.reason_code, f"connection refused: {text}")
        self.connack = connack
        props = connack.properties
        self.server_receive_max = props.get(RECEIVE_MAXIMUM, 65535)
        self.max_packet_size = props.get(MAXIMUM_PACKET_SIZE)
        self.keepalive = props.get(SERVER_KEEP_ALIVE, connect.keepalive)
        if self.keepalive:
            self._ping_task = asyncio.create_task(self._pinger(), name="mqtt-keepalive")
        return connack

    async def _pinger(self) -> None:
        interval = max(self.keepalive / 2, 0.5)
        while not self.closed:
            await asyncio.sleep(interval)
            if self.closed:
                return
            silent = self._loop.time() - self._last_read
            # A paused reader cannot see PINGRESP: only judge the link while reading.
            if not self._paused and silent > self.keepalive * 1.5:
                self._abort(ConnectionLost(f"no data from broker for {silent:.1f}s"))
                return
            self._send(b"\xc0\x00")

    def _abort(self, exc: Exception | None, *, graceful: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = exc
        if self.transport is not None:
            if graceful:
                self.transport.close()  # lets the buffered DISCONNECT out first
            else:
                self.transport.abort()
        err = ConnectionLost(f"connection lost: {exc}" if exc else "connection closed")
        if not self._connack_fut.done():
            self._connack_fut.set_exception(err)
            self._connack_fut.exception()  # retrieved here; handshake re-raises its own
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(err)
        for pend in self._inflight.values():
            if not pend.future.done():
                pend.future.set_exception(err)
        self._requests.clear()
        self._id_free.set()
        self._can_write.set()
        if self._ping_task is not None and self._ping_task is not asyncio.current_task():
            self._ping_task.cancel()
        self.on_lost(self, exc)

    # -- reading flow control

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self._last_read = self._loop.time()
            self.transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def awaiting_replies(self) -> bool:
        """True while a request of ours waits for the broker (reading must go on)."""
        return bool(self._inflight or self._requests)

    # -- packet identifiers

    def _take_id(self) -> int | None:
        if len(self._inflight) + len(self._requests) >= 65535:
            return None
        n = self._next_id
        while True:
            n = n % 65535 + 1
            if n not in self._inflight and n not in self._requests:
                self._next_id = n
                return n

    async def _wait_id(self) -> int:
        while True:
            if self.closed:
                raise ConnectionLost(f"connection lost: {self.close_reason}")
            pid = self._take_id()
            if pid is not None:
                return pid
            self.flush()
            self._id_free.clear()
            await self._id_free.wait()

    # -- requests

    async def publish(
        self, items: Iterable[tuple[str, bytes, int, bool, bytes | None]]
    ) -> list[asyncio.Future[int] | None]:
        """Send ``(topic, payload, qos, retain, props)`` items in order, written in batches.
        Returns per item the future of its PUBACK/PUBCOMP reason code (None for QoS 0).
        Waits only when the broker's receive maximum or the socket buffer is full."""
        out: list[asyncio.Future[int] | None] = []
        inflight = self._inflight
        heads = self._heads
        for topic, payload, qos, retain, props in items:
            if self.closed:
                raise ConnectionLost(f"connection lost: {self.close_reason}")
            if not self._can_write.is_set():
                self.flush()
                await self._can_write.wait()
            if not qos:
                # A stream's QoS 0 packets differ in their payload alone: the head (fixed
                # header, topic, properties) is encoded once per topic, flags, properties
                # and payload size, and the payload is written as it is, not copied.
                key = (topic, retain, props, len(payload))
                head = heads.get(key)
                if head is None:
                    if len(heads) >= _CACHE_MAX:
                        heads.clear()
                    first = 0x31 if retain else 0x30
                    head = heads[key] = _publish_head(topic, len(payload), first, 0, props)
                self._send(head)
                self._out.append(payload)
                out.append(None)
                continue
            while len(inflight) >= self.server_receive_max:
                self.flush()
                self._id_free.clear()
                await self._id_free.wait()
                if self.closed:
                    raise ConnectionLost(f"connection lost: {self.close_reason}")
            pid = self._take_id() or await self._wait_id()
            fut: asyncio.Future[int] = self._loop.create_future()
            inflight[pid] = _Pending(fut, qos)
            self._send(encode_publish(topic, payload, qos, retain, packet_id=pid, props=props))
            out.append(fut)
        return out

    def release(self, packet_ids: Iterable[int]) -> list[asyncio.Future[int]]:
        """Send PUBREL for QoS 2 publishes of an earlier connection of the same session,
        so the broker frees those identifiers before they are used again."""
        futs = []
        for pid in packet_ids:
            fut: asyncio.Future[int] = self._loop.create_future()
            self._inflight[pid] = _Pending(fut, 2)
            self._send(encode(PubRel(pid), self.version))
            futs.append(fut)
        return futs

    def inflight_qos2(self) -> list[int]:
        return [pid for pid, p in self._inflight.items() if p.qos == 2]

    async def _request(self, build: Callable[[int], Packet], reply_timeout: float) -> list[int]:
        pid = await self._wait_id()
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._requests[pid] = fut
        self._send(encode(build(pid), self.version))
        try:
            return await asyncio.wait_for(fut, reply_timeout)
        finally:
            self._requests.pop(pid, None)

    async def subscribe(
        self, topics: Sequence[SubTopic], props: Props | None = None, reply_timeout: float = 10.0
    ) -> list[int]:
        """SUBSCRIBE and wait for SUBACK; returns one reason code per filter."""
        codes = await self._request(
            lambda pid: Subscribe(pid, list(topics), props or {}), reply_timeout
        )
        if len(codes) != len(topics):
            raise MalformedPacket(f"SUBACK with {len(codes)} codes for {len(topics)} filters")
        return codes

    async def unsubscribe(self, filters: Sequence[str], reply_timeout: float = 10.0) -> list[int]:
        return await self._request(lambda pid: Unsubscribe(pid, list(filters)), reply_timeout)

    async def disconnect(
        self, reason_code: int = 0, props: Props | None = None, *, linger: float = 1.0
    ) -> None:
        """Send DISCONNECT and wait (up to ``linger`` s) for the broker to close the socket:
        only then has it processed the acks sent before, so a session taken over right after
        does not get those messages again."""
        if self.closed or self.transport is None:
            return
        self._send(encode(Disconnect(reason_code, props or {}), self.version))
        self.flush()
        self._eof = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._eof), linger)
        self._abort(None, graceful=True)


async def open_connection(
    host: str,
    port: int,
    connect: Connect,
    *,
    on_publish: Callable[[MqttConnection, list[Publish]], None],
    on_lost: Callable[[MqttConnection, Exception | None], None],
    reply_timeout: float = 10.0,
    ssl: Any = None,
) -> tuple[MqttConnection, Connack]:
    """TCP connect, CONNECT, wait for CONNACK; raises ``ConnectRefused``/``OSError``."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: MqttConnection(version=connect.version, on_publish=on_publish, on_lost=on_lost),
            host,
            port,
            ssl=ssl,
        ),
        reply_timeout,
    )
    connack = await proto.handshake(connect, reply_timeout)
    return proto, connack
