"""The unified topic model: a topic is a tuple of levels, a filter a tuple of levels and
wildcards.  Pure values, validated on construction, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flowbridge.errors import TopicError


class Wildcard(enum.Enum):
    """``SINGLE`` matches exactly one level; ``MULTI`` matches zero or more levels (MQTT ``#``,
    AMQP ``#``), so ``a/#`` also matches ``a``."""

    SINGLE = "+"
    MULTI = "#"

    def __repr__(self) -> str:
        return self.value


SINGLE = Wildcard.SINGLE
MULTI = Wildcard.MULTI

Element = str | Wildcard


def _check_level(level: str, name: object) -> None:
    if "\x00" in level:
        raise TopicError(
            "unified", repr(name), "a level contains U+0000 (NUL), which no protocol carries"
        )


@dataclass(frozen=True, slots=True)
class Topic:
    """A concrete topic: one or more levels, each any text without NUL (empty allowed)."""

    levels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise TopicError("unified", "", "a topic has at least one level")
        for level in self.levels:
            if not isinstance(level, str):
                raise TopicError("unified", repr(self.levels), f"level {level!r} is not text")
            _check_level(level, self.levels)


@dataclass(frozen=True, slots=True)
class Filter:
    """A subscription filter.  Wildcards may stand anywhere (AMQP allows ``#`` mid-key);
    protocols that cannot express a placement say so when encoding.

    Runs of adjacent wildcards are normalised (``#/+`` == ``+/#``, ``#/#`` == ``#``) so that
    equal filters compare equal.  Like MQTT, flowbridge never lets a filter that starts with
    a wildcard match a topic whose first level starts with ``$`` (``$SYS``, ``$JS``...).
    """

    levels: tuple[Element, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise TopicError("unified", "", "a filter has at least one level")
        for level in self.levels:
            if isinstance(level, str):
                _check_level(level, self.levels)
            elif not isinstance(level, Wildcard):
                raise TopicError("unified", repr(self.levels), f"level {level!r} is not text")
        object.__setattr__(self, "levels", _normalise(self.levels))

    @property
    def min_levels(self) -> int:
        """How many levels every matching topic has at least (its leading fixed part and
        single-level wildcards)."""
        n = 0
        for level in self.levels:
            if level is MULTI:
                break
            n += 1
        return n

    @property
    def is_literal(self) -> bool:
        return not any(isinstance(level, Wildcard) for level in self.levels)

    def matches(self, topic: Topic) -> bool:
        levels = topic.levels
        if isinstance(self.levels[0], Wildcard) and levels[0].startswith("$"):
            return False
        return _match(self.levels, 0, levels, 0)


def _normalise(levels: tuple[Element, ...]) -> tuple[Element, ...]:
    out: list[Element] = []
    i = 0
    while i < len(levels):
        level = levels[i]
        if not isinstance(level, Wildcard):
            out.append(level)
            i += 1
            continue
        singles = 0
        multi = False
        while i < len(levels) and isinstance(levels[i], Wildcard):
            if levels[i] is MULTI:
                multi = True
            else:
                singles += 1
            i += 1
        out.extend([SINGLE] * singles)
        if multi:
            out.append(MULTI)
    return tuple(out)


def _match(f: tuple[Element, ...], i: int, t: tuple[str, ...], j: int) -> bool:
    while i < len(f):
        level = f[i]
        if level is MULTI:
            if i == len(f) - 1:
                return True
            # Mid-filter MULTI (AMQP): try every split; filters are short.
            return any(_match(f, i + 1, t, k) for k in range(j, len(t) + 1))
        if j >= len(t):
            return False
        if level is not SINGLE and level != t[j]:
            return False
        i += 1
        j += 1
    return j == len(t)
