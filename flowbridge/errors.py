"""One error root for everything flowbridge raises on purpose."""

from __future__ import annotations


class FlowbridgeError(Exception):
    """Root of flowbridge's own errors."""


class TopicError(FlowbridgeError, ValueError):
    """A topic or filter that is invalid for its protocol or cannot be carried by the target.

    ``protocol`` is the protocol whose rules were broken, ``name`` the offending name and
    ``reason`` says which character or level and why.
    """

    def __init__(self, protocol: str, name: str, reason: str) -> None:
        self.protocol = protocol
        self.name = name
        self.reason = reason
        super().__init__(f"{protocol} {name!r}: {reason}")


class ConfigError(FlowbridgeError):
    """A mapping file that cannot be loaded; each entry of ``problems`` is one
    ``FILE:LINE: key.path: what is wrong`` line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ConnectError(FlowbridgeError):
    """A broker could not be reached; the message names the broker, its URL and the cause."""


class PublishError(FlowbridgeError):
    """A target refused or could not confirm a message."""

    def __init__(self, reason: str, *, retriable: bool) -> None:
        self.reason = reason
        self.retriable = retriable
        super().__init__(reason)
