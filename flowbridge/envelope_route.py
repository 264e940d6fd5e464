"""What a route does with NATSBridge envelopes (msg_envelope_v1 bodies).

``auto`` (the default) carries every body byte for byte and, when the body is an envelope,
also puts its fields on the target's native carriers (message id, correlation id, reply-to,
content type, time), so native consumers can filter and de-duplicate without parsing JSON.
``require`` dead-letters bodies that are not valid envelopes; ``wrap`` turns plain bodies into
one-payload envelopes; ``unwrap`` delivers a one-payload envelope's content natively; ``off``
never looks at bodies.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Literal, TypeGuard

from flowbridge.adapters.base import Message
from flowbridge.envelope import Envelope, EnvelopeError, Payload, json_bytes
from flowbridge.errors import TopicError
from flowbridge.fileserver import FileServer
from flowbridge.topics import translate_topic

EnvelopeMode = Literal["auto", "off", "require", "wrap", "unwrap"]

CONTENT_TYPES = {
    "text": "text/plain; charset=utf-8",
    "dictionary": "application/json",
    "jsontable": "application/json",
    "arrowtable": "application/vnd.apache.arrow.stream",
}
ENVELOPE_CONTENT_TYPE = "application/json"


def _is_uuid(text: str | None) -> TypeGuard[str]:
    """msg_id must be a UUID: another message id is kept on the native carrier only."""
    if not text:
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def looks_like_envelope(payload: bytes) -> bool:
    """A cheap test before parsing: most bodies are not JSON objects at all."""
    return payload.startswith(b"{") and b'"payloads"' in payload and b'"msg_id"' in payload


def with_fields(m: Message, env: Envelope) -> Message:
    """``m`` with the envelope's fields on the native carriers it does not already set."""
    ts: float | None = m.timestamp
    if ts is None:
        try:
            ts = env.time
        except EnvelopeError:
            ts = None
    return replace(
        m,
        message_id=m.message_id or env.msg_id or None,
        correlation_id=m.correlation_id
        if m.correlation_id is not None
        else (env.correlation_id.encode() or None),
        reply_to=m.reply_to or env.reply_to or None,
        content_type=m.content_type or ENVELOPE_CONTENT_TYPE,
        timestamp=ts,
    )


def transform(
    m: Message,
    mode: EnvelopeMode,
    *,
    payload_type: str = "binary",
    dataname: str = "body",
    sender_name: str = "flowbridge",
) -> Message:
    """The message a route forwards for ``m``; raises ``EnvelopeError`` (naming the field)
    when ``require``/``unwrap`` get something that is not a valid envelope."""
    if mode == "off":
        return m
    envelope: Envelope | None = None
    if looks_like_envelope(m.payload):
        try:
            envelope = Envelope.from_json(m.payload)
        except EnvelopeError:
            if mode in ("require", "unwrap"):
                raise
    if envelope is None:
        if mode in ("require", "unwrap"):
            raise EnvelopeError("", "the body is not a msg_envelope_v1 JSON object")
        if mode == "wrap":
            envelope = Envelope(
                send_to=m.topic,
                sender_name=sender_name,
                payloads=[Payload.direct(dataname, payload_type, m.payload)],
            )
            if _is_uuid(m.message_id):
                envelope.msg_id = m.message_id
            return with_fields(replace(m, payload=envelope.to_json(), content_type=None), envelope)
        return m
    if mode != "unwrap":
        return with_fields(m, envelope)
    if len(envelope.payloads) != 1:
        raise EnvelopeError(
            "payloads", f"unwrap needs exactly one payload, got {len(envelope.payloads)}"
        )
    p = envelope.payloads[0]
    if p.transport != "direct":
        raise EnvelopeError("payloads[0].transport", "a link payload cannot be unwrapped here")
    raw = p.direct_bytes()
    p.verify(raw)
    out = with_fields(replace(m, content_type=None), envelope)
    return replace(
        out,
        payload=raw,
        content_type=CONTENT_TYPES.get(p.payload_type, "application/octet-stream"),
    )


def translate_reply_to(payload: bytes, source: str, target: str) -> bytes:
    """An envelope body whose ``reply_to`` names a topic of ``source``, rewritten so that it
    names the same topic in ``target`` (a responder there replies where a reverse route can
    carry the answer back).  Any other body, or a name the target cannot carry, is returned
    unchanged."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(obj, dict):
        return payload
    reply = obj.get("reply_to")
    if not isinstance(reply, str) or not reply:
        return payload
    try:
        obj["reply_to"] = translate_topic(reply, source, target)
    except TopicError:
        return payload
    return json_bytes(obj)


async def offload(m: Message, limit: int, fileserver: FileServer) -> Message:
    """``m`` made to fit ``limit`` bytes through the file server: an envelope's direct
    payloads move to links, largest first; any other body becomes a one-payload link envelope.
    Raises ``EnvelopeError`` when even that does not fit."""
    envelope: Envelope | None = None
    if looks_like_envelope(m.payload):
        try:
            envelope = Envelope.from_json(m.payload)
        except EnvelopeError:
            envelope = None
    if envelope is None:
        url = await fileserver.upload(m.payload, "body")
        envelope = Envelope(
            send_to=m.topic,
            sender_name="flowbridge",
            payloads=[Payload.link("body", "binary", url, m.payload)],
        )
        if _is_uuid(m.message_id):
            envelope.msg_id = m.message_id
    else:
        direct = sorted(
            (i for i, p in enumerate(envelope.payloads) if p.transport == "direct"),
            key=lambda i: -envelope.payloads[i].size,
        )
        for i in direct:
            if len(envelope.to_json()) <= limit:
                break
            p = envelope.payloads[i]
            raw = p.direct_bytes()
            url = await fileserver.upload(raw, p.dataname or "payload")
            linked = Payload.link(p.dataname, p.payload_type, url, raw, metadata=p.metadata)
            linked.id = p.id
            envelope.payloads[i] = linked
    body = envelope.to_json()
    if len(body) > limit:
        raise EnvelopeError("", f"{len(body)} bytes even with every payload linked; limit {limit}")
    return with_fields(replace(m, payload=body, content_type=None), envelope)
