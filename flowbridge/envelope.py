"""msg_envelope_v1: the NATSBridge envelope, its payloads and their serialization (no I/O).

An envelope is the whole message body: UTF-8 JSON with routing fields and a list of payloads.
Each payload is serialized by its type (text -> UTF-8, dictionary/jsontable -> JSON,
arrowtable -> Arrow IPC stream, image/audio/video/binary -> raw bytes) and then travels
``direct`` (base64 of the serialized bytes in ``data``) or as a ``link`` (a URL to the bytes on
a file server).  ``size`` is the serialized length before base64 and ``metadata["sha256"]`` the
hex SHA-256 of the serialized bytes; both are checked on receipt.

Parsing is strict about types and names the offending field (``payloads[1].size: expected an
integer``); keys this version does not know are kept and written back unchanged, so an
envelope from a newer peer passes through without loss.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from flowbridge.errors import FlowbridgeError

PAYLOAD_TYPES: Final = (
    "text",
    "dictionary",
    "arrowtable",
    "jsontable",
    "image",
    "audio",
    "video",
    "binary",
)
BINARY_TYPES: Final = frozenset({"image", "audio", "video", "binary"})
TRANSPORTS: Final = ("direct", "link")
ENCODINGS: Final = ("none", "json", "base64", "arrow-ipc")
MSG_PURPOSES: Final = ("ACK", "NACK", "updateStatus", "shutdown", "chat")  # known, not exclusive
CONTENT_TYPE: Final = "application/json"
SHA256_KEY: Final = "sha256"
"""Payload metadata key holding the hex SHA-256 of the serialized bytes."""

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class EnvelopeError(FlowbridgeError, ValueError):
    """An envelope or payload that breaks msg_envelope_v1; ``field`` is the path of the
    offending field (``payloads[1].size``), ``correlation_id`` the envelope's when known."""

    def __init__(self, field: str, reason: str, *, correlation_id: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.correlation_id = correlation_id
        where = f"{field}: " if field else ""
        tag = f" (correlation_id {correlation_id})" if correlation_id else ""
        super().__init__(f"{where}{reason}{tag}")


class IntegrityError(EnvelopeError):
    """The payload bytes do not match the size or SHA-256 the sender declared."""


# ---- time ------------------------------------------------------------------------------


def format_timestamp(ts: float) -> str:
    """POSIX seconds as ISO 8601 UTC with milliseconds and ``Z``."""
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_timestamp(text: str) -> float:
    """ISO 8601 text as POSIX seconds.  ``Z`` or an offset is expected; a time without zone
    (what some peers' UTC clocks print) is read as UTC.  Raises ValueError."""
    if not text:
        raise ValueError("empty timestamp")
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    dt = datetime.fromisoformat(iso)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ---- serialization ---------------------------------------------------------------------


def _pyarrow() -> Any:
    try:
        return importlib.import_module("pyarrow")
    except ImportError:
        raise EnvelopeError(
            "payload_type", "arrowtable needs pyarrow (pip install 'flowbridge[arrow]')"
        ) from None


def json_bytes(value: Any) -> bytes:
    # Compact, UTF-8, no NaN/Infinity (not JSON, and other peers' parsers reject them).
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def serialize(data: Any, payload_type: str) -> bytes:
    """The bytes ``data`` travels as for ``payload_type``; raises EnvelopeError (field
    ``data``) when the value does not fit the type."""
    if payload_type == "text":
        if not isinstance(data, str):
            raise EnvelopeError("data", f"text expects str, got {type(data).__name__}")
        return data.encode("utf-8")
    if payload_type == "dictionary":
        if not isinstance(data, Mapping):
            raise EnvelopeError("data", f"dictionary expects a mapping, got {type(data).__name__}")
        return _json_value_bytes(dict(data))
    if payload_type == "jsontable":
        if isinstance(data, Mapping | str | bytes) or not isinstance(data, Sequence):
            raise EnvelopeError("data", "jsontable expects a sequence of mappings")
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise EnvelopeError(f"data[{i}]", "jsontable rows must be mappings")
        return _json_value_bytes([dict(row) for row in data])
    if payload_type == "arrowtable":
        pa = _pyarrow()
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if not isinstance(data, pa.Table):
            raise EnvelopeError(
                "data", f"arrowtable expects a pyarrow Table, got {type(data).__name__}"
            )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data)
        return bytes(sink.getvalue().to_pybytes())
    if payload_type in BINARY_TYPES:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise EnvelopeError("data", f"{payload_type} expects bytes, got {type(data).__name__}")
        return bytes(data)
    raise EnvelopeError("payload_type", f"unknown payload type {payload_type!r}")


def _json_value_bytes(value: Any) -> bytes:
    try:
        return json_bytes(value)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError("data", f"not JSON-serializable: {exc}") from exc


def deserialize(raw: bytes, payload_type: str) -> Any:
    """The value ``raw`` stands for: str, dict, list of dicts, pyarrow.Table or bytes."""
    if payload_type in BINARY_TYPES:
        return raw
    if payload_type == "text":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError("data", f"text payload is not UTF-8: {exc}") from exc
    if payload_type in ("dictionary", "jsontable"):
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise EnvelopeError("data", f"{payload_type} payload is not JSON: {exc}") from exc
        _check_json_shape(value, payload_type, "data")
        return value
    if payload_type == "arrowtable":
        pa = _pyarrow()
        try:
            with pa.ipc.open_stream(pa.py_buffer(raw)) as reader:
                return reader.read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise EnvelopeError(
                "data", f"arrowtable payload is not an Arrow IPC stream: {exc}"
            ) from exc
    raise EnvelopeError("payload_type", f"unknown payload type {payload_type!r}")


def _check_json_shape(value: Any, payload_type: str, where: str) -> None:
    if payload_type == "dictionary" and not isinstance(value, dict):
        raise EnvelopeError(where, "dictionary payload must be a JSON object")
    if payload_type == "jsontable" and not (
        isinstance(value, list) and all(isinstance(row, dict) for row in value)
    ):
        raise EnvelopeError(where, "jsontable payload must be a JSON array of objects")


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# ---- model -----------------------------------------------------------------------------


@dataclass(slots=True)
class Payload:
    """msg_payload_v1.  ``data`` is the base64 text (direct/base64 and arrow-ipc), the JSON
    value (direct/json), the plain text (direct/none) or the URL (link)."""

    dataname: str
    payload_type: str
    transport: str
    encoding: str
    size: int
    data: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def direct(
        cls,
        dataname: str,
        payload_type: str,
        raw: bytes,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Payload:
        """A direct payload of already serialized bytes, base64 in ``data``."""
        meta = dict(metadata or {})
        meta[SHA256_KEY] = sha256_hex(raw)
        return cls(
            dataname,
            payload_type,
            "direct",
            "base64",
            len(raw),
            base64.b64encode(raw).decode("ascii"),
            meta,
        )

    @classmethod
    def link(
        cls,
        dataname: str,
        payload_type: str,
        url: str,
        raw: bytes,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Payload:
        """A link payload for ``raw`` already uploaded to ``url``."""
        meta = dict(metadata or {})
        meta[SHA256_KEY] = sha256_hex(raw)
        return cls(dataname, payload_type, "link", "none", len(raw), url, meta)

    @property
    def sha256(self) -> str | None:
        value = self.metadata.get(SHA256_KEY)
        return value if isinstance(value, str) else None

    def direct_bytes(self) -> bytes:
        """The serialized bytes of a direct payload, before any check."""
        if self.transport != "direct":
            raise EnvelopeError("transport", "a link payload's bytes are on the file server")
        if self.encoding in ("base64", "arrow-ipc"):
            try:
                return base64.b64decode(self.data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise EnvelopeError("data", f"invalid base64: {exc}") from exc
        if self.encoding == "json":
            # Peers that write the JSON value inline: its bytes are its compact serialization.
            return _json_value_bytes(self.data)
        assert isinstance(self.data, str)
        return self.data.encode("utf-8")

    def verify(self, raw: bytes) -> None:
        """Check ``raw`` against the declared size and SHA-256 (when declared).  An inline JSON
        value's size is what its writer's serializer produced, which may differ in
        whitespace, so only its checksum (over the compact form) is checked."""
        exact = self.encoding != "json" or self.transport == "link"
        if exact and len(raw) != self.size:
            raise IntegrityError("size", f"declared {self.size} bytes, got {len(raw)}")
        expected = self.sha256
        if expected is not None and sha256_hex(raw) != expected.lower():
            raise IntegrityError(f"metadata.{SHA256_KEY}", "SHA-256 of the payload does not match")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "dataname": self.dataname,
            "payload_type": self.payload_type,
            "transport": self.transport,
            "encoding": self.encoding,
            "size": self.size,
            "data": self.data,
            "metadata": self.metadata,
        }
        out.update(self.extra)
        return out


@dataclass(slots=True)
class Envelope:
    """msg_envelope_v1.  ``timestamp`` keeps the text as written (``time`` reads it)."""

    send_to: str
    sender_name: str
    payloads: list[Payload] = field(default_factory=list)
    msg_purpose: str = "chat"
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    msg_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timestamp: str = ""
    sender_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    receiver_name: str = ""
    receiver_id: str = ""
    reply_to: str = ""
    reply_to_msg_id: str = ""
    broker_url: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.timestamp:
            self.timestamp = format_timestamp(datetime.now(UTC).timestamp())

    @property
    def time(self) -> float:
        """``timestamp`` as POSIX seconds."""
        return parse_timestamp(self.timestamp)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "correlation_id": self.correlation_id,
            "msg_id": self.msg_id,
            "timestamp": self.timestamp,
            "send_to": self.send_to,
            "msg_purpose": self.msg_purpose,
            "sender_name": self.sender_name,
            "sender_id": self.sender_id,
            "receiver_name": self.receiver_name,
            "receiver_id": self.receiver_id,
            "reply_to": self.reply_to,
            "reply_to_msg_id": self.reply_to_msg_id,
            "broker_url": self.broker_url,
            "metadata": self.metadata,
            "payloads": [p.to_dict() for p in self.payloads],
        }
        out.update(self.extra)
        return out

    def to_json(self) -> bytes:
        """The message body: compact UTF-8 JSON."""
        return json_bytes(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> Envelope:
        return _parse_envelope(obj)

    @classmethod
    def from_json(cls, body: bytes | str) -> Envelope:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise EnvelopeError("", f"not a JSON document: {exc}") from exc
        return _parse_envelope(obj)


parse = Envelope.from_json


# ---- strict parsing --------------------------------------------------------------------

_ENVELOPE_FIELDS: Final = (
    "correlation_id",
    "msg_id",
    "timestamp",
    "send_to",
    "msg_purpose",
    "sender_name",
    "sender_id",
    "receiver_name",
    "receiver_id",
    "reply_to",
    "reply_to_msg_id",
    "broker_url",
    "metadata",
    "payloads",
)
# Absent optional fields mean empty; the identity and routing fields must be present.
_REQUIRED: Final = frozenset(
    {"correlation_id", "msg_id", "timestamp", "send_to", "sender_name", "payloads"}
)
_PAYLOAD_FIELDS: Final = (
    "id",
    "dataname",
    "payload_type",
    "transport",
    "encoding",
    "size",
    "data",
    "metadata",
)


class _Reader:
    def __init__(self, obj: Mapping[str, Any], prefix: str, corr: str | None) -> None:
        self.obj = obj
        self.prefix = prefix
        self.corr = corr

    def error(self, name: str, reason: str) -> EnvelopeError:
        return EnvelopeError(f"{self.prefix}{name}", reason, correlation_id=self.corr)

    def text(self, name: str, *, required: bool, nonempty: bool = False) -> str:
        if name not in self.obj:
            if required:
                raise self.error(name, "missing")
            return ""
        value = self.obj[name]
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_kind(value)}")
        if nonempty and not value:
            raise self.error(name, "must not be empty")
        return value

    def uuid(self, name: str, *, required: bool, empty_ok: bool) -> str:
        value = self.text(name, required=required)
        if value == "" and (empty_ok or name not in self.obj):
            return value
        if not _UUID.fullmatch(value):
            raise self.error(name, f"expected a UUID, got {value!r}")
        return value

    def choice(self, name: str, options: Sequence[str]) -> str:
        value = self.text(name, required=True)
        if value not in options:
            raise self.error(name, f"expected one of {', '.join(options)}, got {value!r}")
        return value

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.obj.get(name, {})
        if value is None:
            return {}  # some peers write null for an empty map
        if not isinstance(value, dict):
            raise self.error(name, f"expected an object, got {_kind(value)}")
        return value

    def extra(self, known: Sequence[str]) -> dict[str, Any]:
        return {k: v for k, v in self.obj.items() if k not in known}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _parse_envelope(obj: Any) -> Envelope:
    if not isinstance(obj, dict):
        raise EnvelopeError("", f"an envelope is a JSON object, got {_kind(obj)}")
    corr = obj.get("correlation_id") if isinstance(obj.get("correlation_id"), str) else None
    r = _Reader(obj, "", corr)
    for name in _REQUIRED:
        if name not in obj:
            raise r.error(name, "missing")
    timestamp = r.text("timestamp", required=True)
    try:
        parse_timestamp(timestamp)
    except ValueError:
        raise r.error("timestamp", f"expected ISO 8601 UTC, got {timestamp!r}") from None
    raw_payloads = obj["payloads"]
    if not isinstance(raw_payloads, list):
        raise r.error("payloads", f"expected an array, got {_kind(raw_payloads)}")
    return Envelope(
        correlation_id=r.uuid("correlation_id", required=True, empty_ok=False),
        msg_id=r.uuid("msg_id", required=True, empty_ok=False),
        timestamp=timestamp,
        send_to=r.text("send_to", required=True, nonempty=True),
        msg_purpose=r.text("msg_purpose", required=False),
        sender_name=r.text("sender_name", required=True, nonempty=True),
        sender_id=r.uuid("sender_id", required=False, empty_ok=True),
        receiver_name=r.text("receiver_name", required=False),
        receiver_id=r.uuid("receiver_id", required=False, empty_ok=True),
        reply_to=r.text("reply_to", required=False),
        reply_to_msg_id=r.text("reply_to_msg_id", required=False),
        broker_url=r.text("broker_url", required=False),
        metadata=r.mapping("metadata"),
        payloads=[_parse_payload(p, i, corr) for i, p in enumerate(raw_payloads)],
        extra=r.extra(_ENVELOPE_FIELDS),
    )


def _parse_payload(obj: Any, index: int, corr: str | None) -> Payload:
    prefix = f"payloads[{index}]."
    if not isinstance(obj, dict):
        raise EnvelopeError(
            f"payloads[{index}]", f"expected an object, got {_kind(obj)}", correlation_id=corr
        )
    r = _Reader(obj, prefix, corr)
    for name in _PAYLOAD_FIELDS:
        if name != "metadata" and name not in obj:
            raise r.error(name, "missing")
    pid = r.uuid("id", required=True, empty_ok=False)
    dataname = r.text("dataname", required=True)
    payload_type = r.choice("payload_type", PAYLOAD_TYPES)
    transport = r.choice("transport", TRANSPORTS)
    encoding = r.choice("encoding", ENCODINGS)
    size = obj["size"]
    if isinstance(size, float) and size.is_integer() and math.isfinite(size):
        size = int(size)  # a JSON number written as 6.0 by some serializers
    if not isinstance(size, int) or isinstance(size, bool):
        raise r.error("size", "expected an integer")
    if size < 0:
        raise r.error("size", "must not be negative")
    metadata = r.mapping("metadata")
    sha = metadata.get(SHA256_KEY)
    if sha is not None and not (isinstance(sha, str) and _HEX64.fullmatch(sha.lower())):
        raise r.error(f"metadata.{SHA256_KEY}", "expected 64 hex digits")
    data = obj["data"]
    if transport == "link":
        if not isinstance(data, str) or not data.lower().startswith(("http://", "https://")):
            raise r.error("data", "a link payload's data must be an http(s) URL")
    elif encoding == "json":
        if payload_type not in ("dictionary", "jsontable"):
            raise r.error("encoding", f"json encoding cannot carry a {payload_type} payload")
        try:
            _check_json_shape(data, payload_type, f"{prefix}data")
        except EnvelopeError as exc:
            raise r.error("data", exc.reason) from None
    elif encoding == "arrow-ipc" and payload_type != "arrowtable":
        raise r.error("encoding", f"arrow-ipc encoding cannot carry a {payload_type} payload")
    elif not isinstance(data, str):
        raise r.error("data", f"expected a string, got {_kind(data)}")
    return Payload(
        id=pid,
        dataname=dataname,
        payload_type=payload_type,
        transport=transport,
        encoding=encoding,
        size=size,
        data=data,
        metadata=metadata,
        extra=r.extra(_PAYLOAD_FIELDS),
    )
