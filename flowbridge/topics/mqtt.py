"""MQTT topic names and filters (3.1.1 and 5): ``/`` between levels, ``+`` and ``#``.

Every MQTT topic maps to the unified model level for level, unchanged: the MQTT namespace is
the reference the other protocols escape into.  So a unified level that contains ``/``, ``+``
or ``#`` (a NATS token ``a+b``, an AMQP word ``x/y``) has no MQTT name that would not already
belong to another topic: it is refused, never rewritten.
"""

from __future__ import annotations

from flowbridge.errors import TopicError
from flowbridge.topics.model import MULTI, SINGLE, Element, Filter, Topic

PROTOCOL = "mqtt"
MAX_BYTES = 65535


def _check_name(name: str) -> None:
    if name == "":
        raise TopicError(PROTOCOL, name, "empty; MQTT topics have at least one character")
    if "\x00" in name:
        raise TopicError(PROTOCOL, name, "contains U+0000 (NUL), which MQTT forbids")
    if len(name) * 4 > MAX_BYTES and len(name.encode()) > MAX_BYTES:
        raise TopicError(PROTOCOL, name[:40] + "...", f"longer than {MAX_BYTES} bytes")


def decode_topic(name: str) -> Topic:
    _check_name(name)
    for ch in "+#":
        if ch in name:
            raise TopicError(
                PROTOCOL, name, f"{ch!r} is a wildcard; MQTT forbids it in topic names"
            )
    return Topic(tuple(name.split("/")))


def encode_level(level: str, name: str = "") -> str:
    for ch in "/+#":
        if ch in level:
            what = "the level separator" if ch == "/" else "a wildcard"
            raise TopicError(
                PROTOCOL,
                name or level,
                f"level {level!r} contains {ch!r}, {what} in MQTT; every MQTT name that could "
                "stand for it already means another topic",
            )
    return level


def encode_topic(topic: Topic) -> str:
    name = "/".join(topic.levels)
    for level in topic.levels:
        encode_level(level, name)
    _check_name(name)
    return name


def decode_filter(text: str) -> Filter:
    _check_name(text)
    parts = text.split("/")
    levels: list[Element] = []
    for i, part in enumerate(parts):
        if part == "+":
            levels.append(SINGLE)
        elif part == "#":
            if i != len(parts) - 1:
                raise TopicError(PROTOCOL, text, f"'#' at level {i + 1} must be the last level")
            levels.append(MULTI)
        elif "+" in part or "#" in part:
            raise TopicError(
                PROTOCOL, text, f"level {i + 1} ({part!r}): '+' and '#' must fill a whole level"
            )
        else:
            levels.append(part)
    return Filter(tuple(levels))


def encode_filter(f: Filter) -> list[str]:
    parts: list[str] = []
    for i, level in enumerate(f.levels):
        if level is SINGLE:
            parts.append("+")
        elif level is MULTI:
            if i != len(f.levels) - 1:
                raise TopicError(
                    PROTOCOL,
                    repr(f.levels),
                    "a multi-level wildcard in the middle (AMQP '#') has no MQTT equivalent",
                )
            parts.append("#")
        else:
            assert isinstance(level, str)
            parts.append(encode_level(level))
    text = "/".join(parts)
    _check_name(text)
    return [text]
