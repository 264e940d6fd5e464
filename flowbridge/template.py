"""Target topic templates.

A route target names its topic in one of three ways:

* absent: the real topic, translated to the target protocol;
* a fixed native name (``flowbridge.audit``);
* a template: ``{topic}`` is the whole real topic in target syntax, ``{N}`` is level N of the
  real topic (1-based) encoded as ONE level of the target, ``{{`` and ``}}`` are literal braces.

Everything is checked once, at load: placeholders, level numbers against the source filter
(``{N}`` must exist in every topic the filter matches) and the static text against the target
protocol.  ``render`` then only joins precompiled parts.
"""

from __future__ import annotations

from functools import lru_cache

from flowbridge.errors import FlowbridgeError, TopicError
from flowbridge.topics import (
    Filter,
    Topic,
    Wildcard,
    encode_level,
    encode_topic,
    parse_topic,
    translate_topic,
)

# Level values standing in for wildcards when a sample topic is built from a filter.
SAMPLE_SINGLE = "any"
SAMPLE_MULTI = "more"

_WHOLE = 0  # part index meaning ``{topic}``; level numbers start at 1
# Native names rendered per template and remembered: topics repeat, and a hit costs a
# dictionary lookup instead of a parse and an encode.
CACHE_SIZE = 4096


class TemplateError(FlowbridgeError, ValueError):
    """A target topic template that cannot be compiled; ``reason`` says where and why."""

    def __init__(self, template: str, reason: str) -> None:
        self.template = template
        self.reason = reason
        super().__init__(f"{template!r}: {reason}")


def sample_topic(source_filter: Filter) -> Topic:
    """A topic the filter matches, with readable stand-ins for its wildcards."""
    levels = [
        level
        if isinstance(level, str)
        else SAMPLE_SINGLE
        if level is Wildcard.SINGLE
        else SAMPLE_MULTI
        for level in source_filter.levels
    ]
    return Topic(tuple(levels))


def _split(text: str) -> list[str | int]:
    """Literal text and placeholder numbers (``_WHOLE`` for ``{topic}``), adjacent text merged."""
    parts: list[str | int] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "{" and text.startswith("{{", i):
            buf.append("{")
            i += 2
        elif ch == "}" and text.startswith("}}", i):
            buf.append("}")
            i += 2
        elif ch == "}":
            raise TemplateError(
                text, f"unmatched '}}' at column {i + 1}; write '}}}}' for a literal brace"
            )
        elif ch == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise TemplateError(
                    text, f"unmatched '{{' at column {i + 1}; write '{{{{' for a literal brace"
                )
            name = text[i + 1 : end]
            if name == "topic":
                index = _WHOLE
            elif name.isascii() and name.isdigit():
                index = int(name)
                if index == 0:
                    raise TemplateError(text, "{0}: levels are numbered from 1")
            else:
                raise TemplateError(
                    text,
                    f"unknown placeholder {{{name}}} at column {i + 1}; "
                    "use {topic} or a level number such as {1}",
                )
            if buf:
                parts.append("".join(buf))
                buf.clear()
            parts.append(index)
            i = end + 1
        else:
            buf.append(ch)
            i += 1
    if buf:
        parts.append("".join(buf))
    return parts


class Template:
    """A compiled target topic for one route target.

    ``kind`` is ``"translate"`` (no topic given), ``"fixed"`` or ``"template"``.
    """

    __slots__ = ("_fixed", "_native", "_parts", "kind", "source", "target", "text")

    def __init__(
        self, text: str | None, *, source_filter: Filter, source: str, target: str
    ) -> None:
        self.text = text
        self.source = source
        self.target = target
        self._fixed: str | None = None
        self._parts: tuple[str | int, ...] = ()
        if text is None:
            self.kind = "translate"
            # Fails here, not per message, when the target cannot carry the filter's topics.
            self._check(self.render(sample_topic(source_filter)))
            return
        if text == "":
            raise TemplateError(text, "empty topic; leave 'topic' out to keep the real topic")
        parts = _split(text)
        if all(isinstance(p, str) for p in parts):
            self.kind = "fixed"
            self._fixed = "".join(str(p) for p in parts)
            self._check(self._fixed)
            return
        self.kind = "template"
        guaranteed = source_filter.min_levels
        for p in parts:
            if isinstance(p, int) and p > guaranteed:
                raise TemplateError(
                    text,
                    f"{{{p}}}: not every topic the source filter matches has {p} levels "
                    f"(it guarantees {guaranteed})",
                )
        self._parts = tuple(parts)
        self._check(self.render(sample_topic(source_filter)))
        self._native = lru_cache(maxsize=CACHE_SIZE)(self._render_native)

    def _check(self, rendered: str) -> None:
        try:
            parse_topic(rendered, self.target)
        except TopicError as exc:
            where = "" if self._fixed is not None else f" (rendered as {rendered!r})"
            raise TemplateError(
                self.text or rendered, f"not a valid {self.target} topic{where}: {exc.reason}"
            ) from exc

    @property
    def fixed(self) -> str | None:
        """The target topic when it never depends on the real topic."""
        return self._fixed

    def render(self, topic: Topic) -> str:
        """The target topic for ``topic`` (a topic the route's source filter matched).

        Raises ``TopicError`` when the target cannot carry this particular topic (a level
        holding the target's separator, a name too long): that message cannot be delivered
        and goes to the dead-letter target."""
        if self._fixed is not None:
            return self._fixed
        target = self.target
        if not self._parts:
            return encode_topic(topic, target)
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            elif part == _WHOLE:
                out.append(encode_topic(topic, target))
            else:
                out.append(encode_level(topic.levels[part - 1], target))
        return "".join(out)

    def render_native(self, name: str) -> str:
        """Like ``render`` for a native source topic name."""
        if self._fixed is not None:
            return self._fixed
        if not self._parts:
            return translate_topic(name, self.source, self.target)  # cached there
        return self._native(name)

    def _render_native(self, name: str) -> str:
        return self.render(parse_topic(name, self.source))

    def __repr__(self) -> str:
        return f"Template({self.text!r}, {self.source}->{self.target})"
