"""NATS subjects: ``.`` between tokens, ``*`` and ``>`` whole-token wildcards.

Identical to nats-server's MQTT gateway for every topic it accepts (``foo.bar/baz`` <->
``foo//bar.baz``, ``/foo`` <-> ``/.foo``, ``foo//bar`` <-> ``foo./.bar``); beyond it, what a
subject cannot hold is escaped instead of leaked (see ``_slash``): whitespace as ``/20``...,
a literal ``*`` or ``>`` level as ``/2A`` / ``/3E``.

``>`` matches one or more tokens, so an MQTT ``a/#`` (which also matches ``a``) needs two
subscriptions, ``a`` and ``a.>``.
"""

from __future__ import annotations

from flowbridge.errors import TopicError
from flowbridge.topics._slash import SlashCodec
from flowbridge.topics.model import MULTI, SINGLE, Element, Filter, Topic

PROTOCOL = "nats"
_WHITESPACE = " \t\n\r\f"

_codec = SlashCodec(
    PROTOCOL, empty_token="/", hex_escaped=_WHITESPACE, reserved_words="*>", forbidden="\ufffd"
)


def _tokens(name: str) -> list[str]:
    if name == "":
        raise TopicError(PROTOCOL, name, "empty subject")
    for ch in _WHITESPACE:
        if ch in name:
            raise TopicError(
                PROTOCOL, name, f"contains whitespace {ch!r}, invalid in NATS subjects"
            )
    if "\x00" in name or "\ufffd" in name:
        raise TopicError(PROTOCOL, name, "contains NUL or U+FFFD, invalid in NATS subjects")
    tokens = name.split(".")
    for i, token in enumerate(tokens):
        if token == "":
            raise TopicError(PROTOCOL, name, f"token {i + 1} is empty")
    return tokens


def decode_topic(name: str) -> Topic:
    levels = []
    for i, token in enumerate(_tokens(name)):
        if token in ("*", ">"):
            raise TopicError(PROTOCOL, name, f"token {i + 1} is the wildcard {token!r}")
        levels.append(_codec.decode_level(token, name))
    return Topic(tuple(levels))


def encode_level(level: str, name: str = "") -> str:
    return _codec.encode_level(level, name or level)


def encode_topic(topic: Topic) -> str:
    name = ".".join(topic.levels)
    return ".".join([_codec.encode_level(level, name) for level in topic.levels])


def decode_filter(text: str) -> Filter:
    tokens = _tokens(text)
    levels: list[Element] = []
    for i, token in enumerate(tokens):
        if token == "*":
            levels.append(SINGLE)
        elif token == ">":
            if i != len(tokens) - 1:
                raise TopicError(PROTOCOL, text, f"'>' at token {i + 1} must be the last token")
            # '>' needs at least one token; alone it matches every topic, like MQTT '#'.
            levels.extend((SINGLE, MULTI) if i else (MULTI,))
        else:
            levels.append(_codec.decode_level(token, text))
    return Filter(tuple(levels))


def encode_filter(f: Filter) -> list[str]:
    levels = f.levels
    name = repr(levels)
    if MULTI in levels[:-1]:
        raise TopicError(
            PROTOCOL, name, "a multi-level wildcard in the middle (AMQP '#') has no NATS equivalent"
        )
    if levels[-1] is not MULTI:
        return [".".join(_element(level, name) for level in levels)]
    # Trailing "+.../#": k single wildcards then MULTI.
    body = levels[:-1]
    k = 0
    while k < len(body) and body[len(body) - 1 - k] is SINGLE:
        k += 1
    fixed = [_element(level, name) for level in body[: len(body) - k]]
    if k:
        return [".".join([*fixed, *["*"] * (k - 1), ">"])]
    if not fixed:
        return [">"]
    return [".".join(fixed), ".".join([*fixed, ">"])]


def _element(level: Element, name: str) -> str:
    if level is SINGLE:
        return "*"
    assert isinstance(level, str)
    return _codec.encode_level(level, name)
