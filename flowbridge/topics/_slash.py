"""The level escaping shared by NATS subjects and AMQP routing keys.

Both use ``.`` between levels.  The rules extend nats-server's own MQTT mapping, so every
name it produces means the same here:

* a ``.`` inside a level is written ``//`` (nats-server >= 2.10);
* NATS only: an empty level is the token ``/`` (AMQP has empty words natively);
* characters the protocol cannot carry, and a level that is exactly a wildcard of the
  protocol (NATS ``*`` ``>``, AMQP ``*`` ``#``), are written ``/`` + two upper-case hex digits
  (``/20`` for a space, ``/2A`` for a literal ``*`` level);
* any other ``/`` is itself; it is written ``/2F`` only where it would otherwise be read
  as ``//`` or as an escape (or, in NATS, where the level is exactly ``/``).

nats-server never writes a ``/`` that is not part of ``//`` (or the empty-level token), so
the escapes live in names it cannot produce.  Every name decodes to one level sequence and
encodes back to itself; a name that is not in canonical form (``a/2Fb`` for ``a/b``) is
refused rather than silently renamed.
"""

from __future__ import annotations

from flowbridge.errors import TopicError

_HEX = "0123456789ABCDEF"


class SlashCodec:
    """Encodes and decodes single levels for one protocol."""

    def __init__(
        self,
        protocol: str,
        *,
        empty_token: str,
        hex_escaped: str,
        reserved_words: str,
        forbidden: str = "",
    ) -> None:
        self.protocol = protocol
        self.empty_token = empty_token
        # Characters always written as /HH, and everything an escape may stand for.
        self.hex_escaped = frozenset(hex_escaped)
        self.reserved_words = frozenset(reserved_words)
        self.escapable = frozenset(hex_escaped + reserved_words + "/")
        self.forbidden = forbidden

    def _is_escape(self, two: str) -> bool:
        return (
            len(two) == 2
            and two[0] in _HEX
            and two[1] in _HEX
            and chr(int(two, 16)) in self.escapable
        )

    def encode_level(self, level: str, name: str) -> str:
        if level == "":
            return self.empty_token
        if level in self.reserved_words or level == self.empty_token:
            return f"/{ord(level):02X}"
        for ch in self.forbidden:
            if ch in level:
                raise TopicError(
                    self.protocol,
                    name,
                    f"level {level!r} contains {ch!r}, which {self.protocol} cannot carry",
                )
        if "." not in level and "/" not in level and not (self.hex_escaped & set(level)):
            return level
        # Right to left, so each "/" can see what follows it in the output.
        pieces: list[str] = []
        after = ""  # the first characters of the output that follows
        for ch in reversed(level):
            if ch == ".":
                piece = "//"
            elif ch == "/":
                ambiguous = after.startswith("/") or self._is_escape(after[:2])
                piece = "/2F" if ambiguous else "/"
            elif ch in self.hex_escaped:
                piece = f"/{ord(ch):02X}"
            else:
                piece = ch
            pieces.append(piece)
            after = (piece + after)[:3]
        return "".join(reversed(pieces))

    def decode_level(self, token: str, name: str) -> str:
        if token == self.empty_token:
            return ""
        if token in self.reserved_words:
            raise TopicError(
                self.protocol,
                name,
                f"{token!r} is a wildcard here; a literal {token!r} level is "
                f"written {self.encode_level(token, name)!r}",
            )
        if "/" not in token:
            return token
        out: list[str] = []
        i = 0
        n = len(token)
        while i < n:
            ch = token[i]
            if ch != "/":
                out.append(ch)
                i += 1
            elif i + 1 < n and token[i + 1] == "/":
                out.append(".")
                i += 2
            elif self._is_escape(token[i + 1 : i + 3]):
                out.append(chr(int(token[i + 1 : i + 3], 16)))
                i += 3
            else:
                out.append("/")
                i += 1
        level = "".join(out)
        if self.encode_level(level, name) != token:
            raise TopicError(
                self.protocol,
                name,
                f"{token!r} is not in canonical form: it reads as level {level!r}, which is "
                f"written {self.encode_level(level, name)!r}",
            )
        return level
