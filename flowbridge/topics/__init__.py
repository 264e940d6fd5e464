"""The unified topic model and one codec per protocol (pure code, no I/O).

``translate_topic`` / ``translate_filter`` go native -> unified -> native.  Translations are
cached (bounded), so the router can call them per message.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

from flowbridge.errors import TopicError
from flowbridge.topics import amqp, kafka, mqtt, nats
from flowbridge.topics.model import MULTI, SINGLE, Filter, Topic, Wildcard

PROTOCOLS = ("mqtt", "nats", "amqp", "kafka")

_CODECS: dict[str, ModuleType] = {"mqtt": mqtt, "nats": nats, "amqp": amqp, "kafka": kafka}


def codec(protocol: str) -> ModuleType:
    try:
        return _CODECS[protocol]
    except KeyError:
        raise TopicError(
            protocol, "", f"unknown protocol; expected one of {', '.join(PROTOCOLS)}"
        ) from None


def parse_topic(name: str, protocol: str) -> Topic:
    topic: Topic = codec(protocol).decode_topic(name)
    return topic


def parse_filter(text: str, protocol: str) -> Filter:
    f: Filter = codec(protocol).decode_filter(text)
    return f


def encode_topic(topic: Topic, protocol: str) -> str:
    name: str = codec(protocol).encode_topic(topic)
    return name


def encode_level(level: str, protocol: str) -> str:
    """One level written for ``protocol`` (for templates that place a level)."""
    text: str = codec(protocol).encode_level(level)
    return text


def encode_filter(f: Filter, protocol: str) -> list[str]:
    subs: list[str] = codec(protocol).encode_filter(f)
    return subs


@lru_cache(maxsize=65536)
def translate_topic(name: str, source: str, target: str) -> str:
    """``name`` of protocol ``source`` as the same topic in protocol ``target``.

    Raises ``TopicError`` when ``name`` is invalid for ``source`` or ``target`` cannot
    carry it; never returns a different topic.
    """
    return encode_topic(parse_topic(name, source), target)


def translate_filter(text: str, source: str, target: str) -> list[str]:
    """The native subscription(s) in ``target`` that receive exactly the topics matching
    ``text`` in ``source`` (Kafka: anchored regular expressions over topic names).

    One exception, applied by flowbridge's router: NATS and AMQP cannot express MQTT's rule
    that a filter starting with a wildcard skips ``$`` topics, so their subscriptions may
    receive such topics and the router drops them.
    """
    return list(_translate_filter(text, source, target))


@lru_cache(maxsize=4096)
def _translate_filter(text: str, source: str, target: str) -> tuple[str, ...]:
    return tuple(encode_filter(parse_filter(text, source), target))


__all__ = [
    "MULTI",
    "PROTOCOLS",
    "SINGLE",
    "Filter",
    "Topic",
    "TopicError",
    "Wildcard",
    "codec",
    "encode_filter",
    "encode_level",
    "encode_topic",
    "parse_filter",
    "parse_topic",
    "translate_filter",
    "translate_topic",
]
