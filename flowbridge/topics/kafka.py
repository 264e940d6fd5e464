"""Kafka topic names: ``[A-Za-z0-9._-]{1,249}``, no wildcards.

A unified topic becomes its levels joined by ``.``.  Inside a level, letters, digits and
``-`` are themselves; every other character is written ``__`` + its code point in lower-case
hex + ``_`` (``/`` -> ``__2f_``, space -> ``__20_``, ``$`` -> ``__24_``), and ``_`` is itself
unless it would start such an escape, then it is ``__5f_``.  So ``sensor_1.temp-c`` is the
same name in every protocol, and ``home/living room`` <-> ``home.living__20_room``.  Names
that cannot be written in 249 characters (or would be ``.`` / ``..``) are refused.

Filters become Python regular expressions over Kafka names (what a pattern subscription
takes).  A route reading from Kafka writes its filter with ``.`` between levels and the
unified wildcards ``+`` and ``#``, which no Kafka name can contain: ``sensors.+.temperature``.
"""

from __future__ import annotations

import re

from flowbridge.errors import TopicError
from flowbridge.topics.model import MULTI, SINGLE, Element, Filter, Topic, Wildcard

PROTOCOL = "kafka"
MAX_LENGTH = 249

_VALID = re.compile(r"[A-Za-z0-9._-]+")
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPE_AT = re.compile(r"__([0-9a-f]+)_")
_LEVEL_RE = r"[A-Za-z0-9_-]*"
_DOLLAR = "__24_"


def _check_name(name: str) -> None:
    if not name:
        raise TopicError(PROTOCOL, name, "empty topic name")
    if len(name) > MAX_LENGTH:
        raise TopicError(
            PROTOCOL, name[:40] + "...", f"{len(name)} characters; Kafka allows {MAX_LENGTH}"
        )
    if name in (".", ".."):
        raise TopicError(PROTOCOL, name, "Kafka forbids the topic names '.' and '..'")
    if not _VALID.fullmatch(name):
        bad = next(ch for ch in name if not _VALID.fullmatch(ch))
        raise TopicError(PROTOCOL, name, f"{bad!r} is not allowed; Kafka names use [A-Za-z0-9._-]")


def encode_level(level: str, name: str = "") -> str:
    if all(ch in _PLAIN for ch in level):
        return level
    pieces: list[str] = []
    after = ""  # the output that follows, right to left, so "_" can see what comes next
    for ch in reversed(level):
        if ch in _PLAIN:
            piece = ch
        elif ch == "_":
            piece = "__5f_" if _ESCAPE_AT.match("_" + after) else "_"
        else:
            piece = f"__{ord(ch):x}_"
        pieces.append(piece)
        after = piece + after
    return "".join(reversed(pieces))


def _decode_level(token: str, name: str) -> str:
    if "__" not in token:
        return token
    out: list[str] = []
    i = 0
    while i < len(token):
        m = _ESCAPE_AT.match(token, i) if token[i] == "_" else None
        code = int(m.group(1), 16) if m else -1
        if m and 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
            out.append(chr(code))
            i = m.end()
        else:
            out.append(token[i])
            i += 1
    level = "".join(out)
    if encode_level(level) != token:
        raise TopicError(
            PROTOCOL,
            name,
            f"{token!r} is not in canonical form: it reads as level {level!r}, which is written "
            f"{encode_level(level)!r}",
        )
    return level


def decode_topic(name: str) -> Topic:
    _check_name(name)
    return Topic(tuple(_decode_level(token, name) for token in name.split(".")))


def encode_topic(topic: Topic) -> str:
    name = ".".join([encode_level(level) for level in topic.levels])
    _check_name(name)
    return name


def decode_filter(text: str) -> Filter:
    """``.``-separated levels; ``+`` is one level, ``#`` zero or more."""
    if not text:
        raise TopicError(PROTOCOL, text, "empty filter")
    levels: list[Element] = []
    for i, part in enumerate(text.split(".")):
        if part == "+":
            levels.append(SINGLE)
        elif part == "#":
            levels.append(MULTI)
        elif "+" in part or "#" in part:
            raise TopicError(
                PROTOCOL, text, f"level {i + 1} ({part!r}): '+' and '#' must fill a whole level"
            )
        else:
            if part and not _VALID.fullmatch(part):
                bad = next(ch for ch in part if not _VALID.fullmatch(ch))
                raise TopicError(PROTOCOL, text, f"{bad!r} is not allowed in a Kafka name")
            levels.append(_decode_level(part, text))
    return Filter(tuple(levels))


def encode_filter(f: Filter) -> list[str]:
    """One anchored regular expression matching exactly the Kafka names of matching topics."""
    levels = f.levels
    guard = f"(?!{_DOLLAR})" if isinstance(levels[0], Wildcard) else ""
    return ["^" + guard + _regex(levels, first=True) + "$"]


def _regex(levels: tuple[Element, ...], *, first: bool) -> str:
    """Regex for ``levels``; with ``first`` the text starts at a level, otherwise every level
    is preceded by a ``.``."""
    out: list[str] = []
    for i, level in enumerate(levels):
        sep = "" if first and i == 0 else r"\."
        if level is MULTI:
            rest = levels[i + 1 :]
            if first and i == 0:
                # Zero levels: the rest starts the name; one or more: they do.
                many = _LEVEL_RE + r"(?:\." + _LEVEL_RE + ")*"
                if not rest:
                    return many
                return (
                    "(?:" + many + _regex(rest, first=False) + "|" + _regex(rest, first=True) + ")"
                )
            out.append(r"(?:\." + _LEVEL_RE + ")*")
        elif level is SINGLE:
            out.append(sep + _LEVEL_RE)
        else:
            assert isinstance(level, str)
            out.append(sep + re.escape(encode_level(level)))
    return "".join(out)
