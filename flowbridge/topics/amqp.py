"""AMQP 0-9-1 topic-exchange routing and binding keys: ``.`` between words, ``*`` one word,
``#`` zero or more words (anywhere in a binding key).

Empty words are native (``/foo`` <-> ``.foo``, as RabbitMQ's MQTT plugin maps them); a ``.``
inside a level is ``//`` and a literal ``*``/``#`` level is ``/2A``/``/23``, the same escapes
as NATS subjects (see ``_slash``), so ``a.b/c`` stays two levels instead of RabbitMQ's three.
"""

from __future__ import annotations

from flowbridge.errors import TopicError
from flowbridge.topics._slash import SlashCodec
from flowbridge.topics.model import MULTI, SINGLE, Element, Filter, Topic

PROTOCOL = "amqp"
MAX_BYTES = 255

_codec = SlashCodec(PROTOCOL, empty_token="", hex_escaped="", reserved_words="*#")


def _check_length(name: str) -> None:
    if len(name) * 4 > MAX_BYTES and len(name.encode()) > MAX_BYTES:
        raise TopicError(
            PROTOCOL, name[:40] + "...", f"longer than {MAX_BYTES} bytes (AMQP shortstr limit)"
        )


def decode_topic(name: str) -> Topic:
    _check_length(name)
    return Topic(tuple(_codec.decode_level(word, name) for word in name.split(".")))


def encode_level(level: str, name: str = "") -> str:
    return _codec.encode_level(level, name or level)


def encode_topic(topic: Topic) -> str:
    raw = ".".join(topic.levels)
    name = ".".join([_codec.encode_level(level, raw) for level in topic.levels])
    _check_length(name)
    return name


def decode_filter(text: str) -> Filter:
    _check_length(text)
    levels: list[Element] = []
    for word in text.split("."):
        if word == "*":
            levels.append(SINGLE)
        elif word == "#":
            levels.append(MULTI)
        else:
            levels.append(_codec.decode_level(word, text))
    return Filter(tuple(levels))


def encode_filter(f: Filter) -> list[str]:
    raw = repr(f.levels)
    words = []
    for level in f.levels:
        if level is SINGLE:
            words.append("*")
        elif level is MULTI:
            words.append("#")
        else:
            assert isinstance(level, str)
            words.append(_codec.encode_level(level, raw))
    name = ".".join(words)
    _check_length(name)
    return [name]
