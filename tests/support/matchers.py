"""Reference matchers: each protocol's own wildcard semantics on native strings, written
from the protocols' specifications and independent of flowbridge's topic model."""

from __future__ import annotations

import re


def mqtt_match(flt: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7: '+' one level, '#' the rest including the parent level;
    a filter starting with a wildcard does not match a topic starting with '$'."""
    f = flt.split("/")
    t = topic.split("/")
    if f[0] in ("+", "#") and topic.startswith("$"):
        return False
    for i, part in enumerate(f):
        if part == "#":
            return True  # '#' is last by validity
        if i >= len(t):
            return False
        if part != "+" and part != t[i]:
            return False
    return len(f) == len(t)


def nats_match(flt: str, subject: str) -> bool:
    """NATS: '*' one token, '>' one or more trailing tokens."""
    f = flt.split(".")
    t = subject.split(".")
    for i, part in enumerate(f):
        if part == ">":
            return len(t) > i
        if i >= len(t):
            return False
        if part != "*" and part != t[i]:
            return False
    return len(f) == len(t)


def amqp_match(binding: str, key: str) -> bool:
    """RabbitMQ topic exchange: '*' exactly one word, '#' zero or more words, anywhere."""
    b = binding.split(".")
    k = key.split(".")

    def go(i: int, j: int) -> bool:
        if i == len(b):
            return j == len(k)
        if b[i] == "#":
            return any(go(i + 1, m) for m in range(j, len(k) + 1))
        if j == len(k):
            return False
        return (b[i] == "*" or b[i] == k[j]) and go(i + 1, j + 1)

    return go(0, 0)


def kafka_filter_match(flt: str, name: str) -> bool:
    """A Kafka route filter: '.'-separated levels with '+' (one) and '#' (zero or more)."""
    b = flt.split(".")
    k = name.split(".")
    if b[0] in ("+", "#") and name.startswith("__24_"):
        return False

    def go(i: int, j: int) -> bool:
        if i == len(b):
            return j == len(k)
        if b[i] == "#":
            return any(go(i + 1, m) for m in range(j, len(k) + 1))
        if j == len(k):
            return False
        return (b[i] == "+" or b[i] == k[j]) and go(i + 1, j + 1)

    return go(0, 0)


def kafka_regex_match(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None


NATIVE_MATCH = {
    "mqtt": mqtt_match,
    "nats": nats_match,
    "amqp": amqp_match,
    "kafka": kafka_regex_match,
}
"""How a native subscription of each protocol selects names (Kafka: pattern subscriptions)."""

SOURCE_MATCH = {**NATIVE_MATCH, "kafka": kafka_filter_match}
"""How a route's source filter, as written in the mapping file, selects names."""
