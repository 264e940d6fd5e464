"""NATS wire details the NATS adapter needs and nats-py does not give: header blocks that keep
repeated names, the named message fields carried in headers, and publish frames built in bulk.

Pure functions, no I/O.  nats-py parses headers into a dict (a repeated name keeps only its
last value) and builds one frame per awaited call, so the adapter reads and writes the
``NATS/1.0`` block itself.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime

from flowbridge.adapters.base import Headers, Message, PerHeaders

HDR_LINE = b"NATS/1.0\r\n"
CRLF = b"\r\n"

CONTENT_TYPE = "Content-Type"
CORRELATION_ID = "Correlation-Id"
CORRELATION_ID_ENCODING = "Correlation-Id-Encoding"
MSG_ID = "Nats-Msg-Id"
TIMESTAMP = "Timestamp"
EXPECTED_STREAM = "Nats-Expected-Stream"

# Lower-cased names of the headers lifted into Message fields on receipt.  Matching ignores
# case because other clients canonicalise names (Go's textproto turns ``content-type`` into
# ``Content-Type``).
_NAMED = {
    "content-type": 0,
    "correlation-id": 1,
    "correlation-id-encoding": 2,
    "nats-msg-id": 3,
    "timestamp": 4,
}

# A header name is an HTTP token: printable ASCII without separators that break the line.
_BAD_NAME = re.compile(r"[^!-9;-~]")
# Subjects: no whitespace or control characters anywhere, no empty tokens.
_BAD_SUBJECT = re.compile(r"[\x00-\x20\x7f]|^\.|\.$|\.\.")


class WireError(ValueError):
    """A message that NATS cannot carry; the reason names the offending part."""


def subject_problem(subject: str, *, publish: bool) -> str | None:
    """Why ``subject`` is no valid NATS subject (None when it is).  Published subjects must
    be literal: a ``*`` or ``>`` token would be taken as a wildcard by subscribers."""
    if not subject:
        return "empty subject"
    if _BAD_SUBJECT.search(subject):
        return f"subject {subject!r} has whitespace, a control character or an empty token"
    if publish and ("*" in subject or ">" in subject):
        for token in subject.split("."):
            if token in ("*", ">"):
                return f"subject {subject!r} has a wildcard token; publishing needs a literal"
    return None


_SECOND: list[tuple[int, str]] = [(-1, "")]  # the last second formatted, and its text


def format_timestamp(ts: float) -> str:
    """POSIX seconds as ISO 8601 UTC with milliseconds and ``Z``.

    Messages of a burst share their second: its text is formatted once (datetime formatting
    per message was a fifth of a Kafka -> NATS route's CPU)."""
    sec, ms = divmod(round(ts * 1000), 1000)
    last, text = _SECOND[0]
    if sec != last:
        text = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _SECOND[0] = (sec, text)
    return f"{text}{ms:03d}Z"


def parse_timestamp(text: str) -> float | None:
    """Inverse of :func:`format_timestamp`; any ISO 8601 text with an offset is accepted.
    None when it is not a timestamp with a zone (the header then stays a plain header)."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return dt.timestamp()


_STAMP: list[tuple[float, bytes]] = [(-1.0, b"")]  # the last timestamp and its header line
_LINES: dict[tuple[str, str], bytes] = {}
_LINES_MAX = 4096


def _line(block: bytearray, name: str, value: str) -> None:
    # The same few headers repeat on every message (the bridge's own, a topic's): validate and
    # encode each distinct line once.
    line = _LINES.get((name, value))
    if line is None:
        if _BAD_NAME.search(name) or not name:
            raise WireError(f"header name {name!r} is not a token (empty, space, ':' or non-ASCII)")
        if "\r" in value or "\n" in value:
            raise WireError(f"header {name!r}: value has CR or LF, which NATS headers cannot carry")
        line = b"%s: %s\r\n" % (name.encode("ascii"), value.encode("utf-8", "surrogateescape"))
        if len(_LINES) >= _LINES_MAX:
            _LINES.clear()
        _LINES[(name, value)] = line
    block += line


def encode_headers(msg: Message, extra: Headers | None = None) -> bytes | None:
    """The ``NATS/1.0`` header block for ``msg`` (named fields first, then ``msg.headers`` in
    order, repeats kept), or None when there is nothing to send.  Raises WireError."""
    headers = msg.headers
    if (
        not headers
        and not extra
        and msg.content_type is None
        and msg.correlation_id is None
        and msg.message_id is None
        and msg.timestamp is None
    ):
        return None
    block = bytearray(HDR_LINE)
    if msg.content_type is not None:
        _line(block, CONTENT_TYPE, msg.content_type)
    if msg.correlation_id is not None:
        cid = msg.correlation_id
        try:
            text = cid.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\r" in text or "\n" in text or text != text.strip():
            # Bytes a text header cannot carry exactly travel base64-encoded, flagged.
            _line(block, CORRELATION_ID, base64.b64encode(cid).decode("ascii"))
            _line(block, CORRELATION_ID_ENCODING, "base64")
        else:
            _line(block, CORRELATION_ID, text)
    if msg.message_id is not None:
        _line(block, MSG_ID, msg.message_id)
    if msg.timestamp is not None:
        # Not through the line cache: nearly every millisecond has a line of its own; the
        # last one is kept, as records of a burst share their millisecond.
        ts = msg.timestamp
        last, line = _STAMP[0]
        if ts != last:
            line = b"Timestamp: %s\r\n" % format_timestamp(ts).encode()
            _STAMP[0] = (ts, line)
        block += line
    if extra:
        for name, value in extra:
            _line(block, name, value)
    if headers:
        block += _lines(headers)
    block += CRLF
    return bytes(block)


_LISTS: PerHeaders[bytes] = PerHeaders(_LINES_MAX)


def _lines(headers: Headers) -> bytes:
    encoded = _LISTS.get(headers)
    if encoded is None:
        block = bytearray()
        for name, value in headers:
            _line(block, name, value)
        encoded = _LISTS.put(headers, bytes(block))
    return encoded


def status_of(raw: bytes) -> tuple[int, str] | None:
    """``(code, description)`` of a status header block (``NATS/1.0 503``), else None."""
    if len(raw) < 12 or raw[8] != 0x20:
        return None
    end = raw.find(CRLF)
    parts = raw[9:end].decode("utf-8", "replace").split(" ", 1)
    try:
        code = int(parts[0])
    except ValueError:
        return None
    return code, (parts[1] if len(parts) > 1 else "")


def decode_headers(raw: bytes, msg: Message) -> None:
    """Fill ``msg`` from a received header block: named fields lifted (the first of each
    name), every other line kept in ``msg.headers`` in order."""
    headers: Headers = []
    named: list[str | None] = [None] * 5
    for line in raw.split(CRLF)[1:]:
        if not line:
            continue
        name_b, sep, value_b = line.partition(b":")
        if not sep:
            continue
        name = name_b.strip().decode("ascii", "surrogateescape")
        value = value_b.strip().decode("utf-8", "surrogateescape")
        slot = _NAMED.get(name.lower())
        if slot is not None and named[slot] is None:
            named[slot] = value
            continue
        headers.append((name, value))
    content_type, cid, cid_encoding, msg_id, ts = named
    if content_type is not None:
        msg.content_type = content_type
    if cid is not None:
        if cid_encoding is not None and cid_encoding.lower() == "base64":
            try:
                msg.correlation_id = base64.b64decode(cid, validate=True)
            except (binascii.Error, ValueError):
                # Not decodable: keep both as they came rather than guess.
                headers.append((CORRELATION_ID, cid))
                headers.append((CORRELATION_ID_ENCODING, cid_encoding))
                cid_encoding = None
        else:
            msg.correlation_id = cid.encode("utf-8", "surrogateescape")
            if cid_encoding is not None:
                headers.append((CORRELATION_ID_ENCODING, cid_encoding))
    elif cid_encoding is not None:
        headers.append((CORRELATION_ID_ENCODING, cid_encoding))
    if msg_id is not None:
        msg.message_id = msg_id
    if ts is not None:
        parsed = parse_timestamp(ts)
        if parsed is None:
            headers.append((TIMESTAMP, ts))
        else:
            msg.timestamp = parsed
    if headers:
        msg.headers = headers


def pub_head(out: bytearray, subject: bytes, reply: bytes, hdr: bytes | None, size: int) -> None:
    """Append what a PUB/HPUB frame has before a payload of ``size`` bytes: its line and
    header block (the payload and CRLF follow)."""
    if hdr is None:
        out += b"PUB %s %s%d\r\n" % (subject, reply, size)
    else:
        n = len(hdr)
        out += b"HPUB %s %s%d %d\r\n%s" % (subject, reply, n, n + size, hdr)


def pub_frame(
    out: bytearray, subject: bytes, reply: bytes, hdr: bytes | None, payload: bytes
) -> None:
    """Append one PUB/HPUB frame to ``out``."""
    # One formatting operation per frame: fewer interpreter steps than appending its parts.
    if hdr is None:
        out += b"PUB %s %s%d\r\n%s\r\n" % (subject, reply, len(payload), payload)
    else:
        n = len(hdr)
        out += b"HPUB %s %s%d %d\r\n%s%s\r\n" % (subject, reply, n, n + len(payload), hdr, payload)
