"""msg_envelope_v1: golden vectors, strict parsing, serialization of every payload type."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pytest

from flowbridge.envelope import (
    PAYLOAD_TYPES,
    Envelope,
    EnvelopeError,
    IntegrityError,
    Payload,
    deserialize,
    format_timestamp,
    parse,
    parse_timestamp,
    serialize,
    sha256_hex,
)
from flowbridge.smart import build_envelope, envelope_message, smartreceive

# The example of the wire-format reference, verbatim.
REFERENCE_EXAMPLE = """\
{"correlation_id":"a1b2c3d4-e5f6-4890-abcd-ef1234567890","msg_id":"b2c3d4e5-f6a7-4901-bcde-f12345678901",
 "timestamp":"2026-05-25T08:12:40.000Z","send_to":"/chat/room1","msg_purpose":"chat",
 "sender_name":"msghandler","sender_id":"c3d4e5f6-a7b8-4012-8def-123456789012",
 "receiver_name":"","receiver_id":"","reply_to":"","reply_to_msg_id":"","broker_url":"nats://localhost:4222",
 "metadata":{},
 "payloads":[
  {"id":"d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70","dataname":"message","payload_type":"text","transport":"direct",
   "encoding":"base64","size":6,"data":"SGVsbG8h","metadata":{}},
  {"id":"a7b8c9d0-e1f2-4a3b-8c4d-5e6f7a8b9c0d","dataname":"large_image","payload_type":"image","transport":"link",
   "encoding":"none","size":2048576,"data":"http://localhost:8080/file/ABC12/XYZ99/image.png","metadata":{}}]}
"""

# What flowbridge writes for one text payload, byte for byte (compact JSON, field order of
# the reference, sha256 of the serialized bytes in the payload metadata).
GOLDEN_OWN = (
    b'{"correlation_id":"11111111-1111-4111-8111-111111111111",'
    b'"msg_id":"22222222-2222-4222-8222-222222222222","timestamp":"2026-05-25T08:12:40.123Z",'
    b'"send_to":"chat.room1","msg_purpose":"chat","sender_name":"flowbridge",'
    b'"sender_id":"33333333-3333-4333-8333-333333333333","receiver_name":"","receiver_id":"",'
    b'"reply_to":"","reply_to_msg_id":"","broker_url":"","metadata":{},'
    b'"payloads":[{"id":"44444444-4444-4444-8444-444444444444","dataname":"message",'
    b'"payload_type":"text","transport":"direct","encoding":"base64","size":6,'
    b'"data":"SGVsbG8h","metadata":{"sha256":'
    b'"334d016f755cd6dc58c53a86e183882f8ec14f52fb05345887c8a5edd42c87b7"}}]}'
)


def test_reference_example_round_trips_to_equivalent_json() -> None:
    env = parse(REFERENCE_EXAMPLE)
    assert env.to_dict() == json.loads(REFERENCE_EXAMPLE)
    assert json.loads(env.to_json()) == json.loads(REFERENCE_EXAMPLE)
    assert env.send_to == "/chat/room1"
    assert env.time == parse_timestamp("2026-05-25T08:12:40Z")
    text, image = env.payloads
    assert text.direct_bytes() == b"Hello!"
    text.verify(b"Hello!")  # no checksum declared: size alone is checked
    assert deserialize(text.direct_bytes(), "text") == "Hello!"
    assert (image.transport, image.size) == ("link", 2048576)


def test_own_envelope_is_byte_exact() -> None:
    env = Envelope(
        send_to="chat.room1",
        sender_name="flowbridge",
        correlation_id="11111111-1111-4111-8111-111111111111",
        msg_id="22222222-2222-4222-8222-222222222222",
        timestamp="2026-05-25T08:12:40.123Z",
        sender_id="33333333-3333-4333-8333-333333333333",
        payloads=[Payload.direct("message", "text", b"Hello!")],
    )
    env.payloads[0].id = "44444444-4444-4444-8444-444444444444"
    assert env.to_json() == GOLDEN_OWN
    assert parse(GOLDEN_OWN).to_json() == GOLDEN_OWN


def test_unknown_keys_survive_a_round_trip() -> None:
    obj = json.loads(REFERENCE_EXAMPLE)
    obj["trace"] = {"span": 7}
    obj["payloads"][0]["checksum_alg"] = "none"
    assert parse(json.dumps(obj)).to_dict() == obj


def test_timestamps() -> None:
    assert format_timestamp(1779696760.123456) == "2026-05-25T08:12:40.123Z"
    assert parse_timestamp("2026-05-25T08:12:40.123Z") == pytest.approx(1779696760.123)
    assert parse_timestamp("2026-05-25T10:12:40.123+02:00") == pytest.approx(1779696760.123)
    # A peer's UTC clock printed without a zone is read as UTC.
    assert parse_timestamp("2026-05-25T08:12:40.123") == pytest.approx(1779696760.123)
    assert Envelope(send_to="a", sender_name="b").timestamp.endswith("Z")


def _table() -> Any:
    return pa.table({"id": [1, 2, 3], "name": ["a", "b", None], "x": [0.5, 1.5, 2.5]})


SAMPLES: dict[str, Any] = {
    "text": "Grüße, 世界 \U0001f600",
    "dictionary": {"a": 1, "nested": {"b": [1, 2.5, None, True]}, "ü": "ß"},
    "jsontable": [{"id": 1, "v": "x"}, {"id": 2, "v": None}],
    "image": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
    "audio": b"RIFF\x00\x01",
    "video": b"\x00\x00\x00\x18ftypmp42",
    "binary": bytes(range(256)) * 3,
}


@pytest.mark.parametrize("payload_type", PAYLOAD_TYPES)
def test_every_payload_type_round_trips(payload_type: str) -> None:
    data = _table() if payload_type == "arrowtable" else SAMPLES[payload_type]
    raw = serialize(data, payload_type)
    payload = Payload.direct("x", payload_type, raw)
    wire = parse(Envelope(send_to="t", sender_name="s", payloads=[payload]).to_json())
    back = wire.payloads[0]
    assert back.size == len(raw)
    assert back.metadata["sha256"] == sha256_hex(raw)
    got = back.direct_bytes()
    back.verify(got)
    value = deserialize(got, payload_type)
    if payload_type == "arrowtable":
        assert value.equals(data)
    else:
        assert value == data


async def test_items_round_trip_through_smartreceive_direct() -> None:
    items = [(t, _table() if t == "arrowtable" else SAMPLES[t], t) for t in PAYLOAD_TYPES]
    env = await build_envelope("t", items, threshold=10**9, msg_purpose="updateStatus")
    msg = envelope_message(env, "t")
    assert msg.content_type == "application/json"
    assert msg.message_id == env.msg_id
    assert msg.correlation_id == env.correlation_id.encode()
    assert msg.timestamp == pytest.approx(env.time)
    got, env2 = await smartreceive(msg)
    assert env2.msg_purpose == "updateStatus"
    assert [(n, t) for n, _, t in got] == [(t, t) for t in PAYLOAD_TYPES]
    for (_, value, t), (_, original, _) in zip(got, items, strict=True):
        assert value.equals(original) if t == "arrowtable" else value == original


async def test_peer_encodings_json_and_arrow_ipc_are_accepted() -> None:
    table = _table()
    ipc = serialize(table, "arrowtable")
    obj = json.loads(REFERENCE_EXAMPLE)
    obj["payloads"] = [
        {
            "id": "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70",
            "dataname": "cfg",
            "payload_type": "dictionary",
            "transport": "direct",
            "encoding": "json",
            "size": 17,  # the writer's own serialization: spaces included
            "data": {"k": [1, 2], "z": "y"},
            "metadata": {},
        },
        {
            "id": "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f71",
            "dataname": "rows",
            "payload_type": "jsontable",
            "transport": "direct",
            "encoding": "json",
            "size": 20,
            "data": [{"a": 1}, {"a": 2}],
            "metadata": {},
        },
        {
            "id": "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f72",
            "dataname": "tbl",
            "payload_type": "arrowtable",
            "transport": "direct",
            "encoding": "arrow-ipc",
            "size": len(ipc),
            "data": base64.b64encode(ipc).decode(),
            "metadata": {},
        },
        {
            "id": "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f73",
            "dataname": "note",
            "payload_type": "text",
            "transport": "direct",
            "encoding": "none",
            "size": 3,
            "data": "hé",
            "metadata": {},
        },
    ]
    items, _ = await smartreceive(json.dumps(obj).encode())
    assert items[0] == ("cfg", {"k": [1, 2], "z": "y"}, "dictionary")
    assert items[1] == ("rows", [{"a": 1}, {"a": 2}], "jsontable")
    assert items[2][1].equals(table)
    assert items[3] == ("note", "hé", "text")


async def test_tampered_payload_is_rejected_with_the_correlation_id() -> None:
    env = await build_envelope("t", [("m", b"original bytes", "binary")], threshold=10**9)
    obj = json.loads(env.to_json())
    obj["payloads"][0]["data"] = base64.b64encode(b"tampered bytes").decode()  # same size
    with pytest.raises(IntegrityError) as info:
        await smartreceive(json.dumps(obj).encode())
    assert info.value.field == "payloads[0].metadata.sha256"
    assert info.value.correlation_id == env.correlation_id
    assert env.correlation_id in str(info.value)

    obj = json.loads(env.to_json())
    obj["payloads"][0]["size"] = 13
    with pytest.raises(IntegrityError, match=r"payloads\[0\]\.size: declared 13 bytes, got 14"):
        await smartreceive(json.dumps(obj).encode())


def _bad(mutate: Any) -> str:
    obj = json.loads(REFERENCE_EXAMPLE)
    mutate(obj)
    with pytest.raises(EnvelopeError) as info:
        parse(json.dumps(obj))
    return str(info.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda o: o["payloads"][1].__setitem__("size", "2048576"),
            "payloads[1].size: expected an integer",
        ),
        (
            lambda o: o["payloads"][1].__setitem__("size", True),
            "payloads[1].size: expected an integer",
        ),
        (
            lambda o: o["payloads"][0].__setitem__("size", -1),
            "payloads[0].size: must not be negative",
        ),
        (
            lambda o: o["payloads"][0].__setitem__("payload_type", "blob"),
            "payloads[0].payload_type: expected one of",
        ),
        (
            lambda o: o["payloads"][0].__setitem__("transport", "inline"),
            "payloads[0].transport: expected one of",
        ),
        (
            lambda o: o["payloads"][0].__setitem__("encoding", "hex"),
            "payloads[0].encoding: expected one of",
        ),
        (lambda o: o["payloads"][0].pop("id"), "payloads[0].id: missing"),
        (
            lambda o: o["payloads"][0].__setitem__("id", "not-a-uuid"),
            "payloads[0].id: expected a UUID",
        ),
        (
            lambda o: o["payloads"][1].__setitem__("data", "file:///etc/passwd"),
            "payloads[1].data: a link payload's data must be an http(s) URL",
        ),
        (lambda o: o["payloads"][0].__setitem__("data", 5), "payloads[0].data: expected a string"),
        (
            lambda o: o["payloads"][0].__setitem__("metadata", []),
            "payloads[0].metadata: expected an object",
        ),
        (
            lambda o: o["payloads"][0].__setitem__("metadata", {"sha256": "abc"}),
            "payloads[0].metadata.sha256: expected 64 hex digits",
        ),
        (
            lambda o: o["payloads"][0].__setitem__("encoding", "json"),
            "payloads[0].encoding: json encoding cannot carry a text payload",
        ),
        (lambda o: o["payloads"].__setitem__(0, "x"), "payloads[0]: expected an object"),
        (lambda o: o.pop("msg_id"), "msg_id: missing"),
        (lambda o: o.__setitem__("send_to", ""), "send_to: must not be empty"),
        (lambda o: o.__setitem__("sender_name", 3), "sender_name: expected a string, got a number"),
        (lambda o: o.__setitem__("timestamp", "yesterday"), "timestamp: expected ISO 8601 UTC"),
        (lambda o: o.__setitem__("correlation_id", ""), "correlation_id: expected a UUID"),
        (lambda o: o.__setitem__("receiver_id", "someone"), "receiver_id: expected a UUID"),
        (lambda o: o.__setitem__("metadata", "x"), "metadata: expected an object"),
        (lambda o: o.__setitem__("payloads", {}), "payloads: expected an array"),
    ],
)
def test_strict_parsing_names_the_field(mutate: Any, message: str) -> None:
    assert message in _bad(mutate)


def test_errors_carry_the_correlation_id_and_optional_fields_default() -> None:
    assert "(correlation_id a1b2c3d4-e5f6-4890-abcd-ef1234567890)" in _bad(
        lambda o: o["payloads"][1].__setitem__("size", 1.5)
    )
    obj = json.loads(REFERENCE_EXAMPLE)
    for name in ("receiver_name", "receiver_id", "reply_to", "reply_to_msg_id", "broker_url"):
        del obj[name]
    obj["metadata"] = None
    env = parse(json.dumps(obj))
    assert (env.reply_to, env.metadata) == ("", {})
    with pytest.raises(EnvelopeError, match="not a JSON document"):
        parse(b"\xff")
    with pytest.raises(EnvelopeError, match="an envelope is a JSON object"):
        parse(b"[]")


def test_invalid_direct_data_is_reported() -> None:
    obj = copy.deepcopy(json.loads(REFERENCE_EXAMPLE))
    obj["payloads"][0]["data"] = "SGVsbG8h!!"
    with pytest.raises(EnvelopeError, match="invalid base64"):
        parse(json.dumps(obj)).payloads[0].direct_bytes()
    with pytest.raises(EnvelopeError, match="text payload is not UTF-8"):
        deserialize(b"\xff", "text")
    with pytest.raises(EnvelopeError, match="dictionary payload must be a JSON object"):
        deserialize(b"[1]", "dictionary")
    with pytest.raises(EnvelopeError, match="not an Arrow IPC stream"):
        deserialize(b"garbage", "arrowtable")


@pytest.mark.parametrize(
    ("data", "payload_type", "message"),
    [
        (b"x", "text", "text expects str"),
        ("x", "binary", "binary expects bytes"),
        ([1], "dictionary", "dictionary expects a mapping"),
        ({"a": 1}, "jsontable", "jsontable expects a sequence of mappings"),
        ([{"a": 1}, 2], "jsontable", "jsontable rows must be mappings"),
        ({"a": float("nan")}, "dictionary", "not JSON-serializable"),
        ({"a": object()}, "dictionary", "not JSON-serializable"),
        ([{"a": 1}], "arrowtable", "arrowtable expects a pyarrow Table"),
        ("x", "blob", "unknown payload type"),
    ],
)
def test_serialize_refuses_values_that_do_not_fit(
    data: Any, payload_type: str, message: str
) -> None:
    with pytest.raises(EnvelopeError, match=message):
        serialize(data, payload_type)
