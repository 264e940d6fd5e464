"""Mapping files: YAML in, one validated and frozen ``Config`` out.

Every problem is found at load time and reported as ``FILE:LINE: key.path: what is wrong``,
all of them at once, in a ``ConfigError``.  Line numbers come from the YAML node marks, kept
for every mapping key, mapping value and sequence item while the document is converted.

``${VAR}`` and ``${VAR:-default}`` are expanded in scalar values (``:-`` also applies when
VAR is set but empty, as in a shell); ``$${`` stands for a literal ``${``.  Several files
merge: their brokers and routes are unioned, and a name defined twice is an error.
"""

from __future__ import annotations

import collections
import difflib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, NamedTuple, TypeVar, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flowbridge.adapters import SCHEMES, adapter_class
from flowbridge.adapters.base import Adapter, Backoff, Options, Subscription
from flowbridge.errors import ConfigError, TopicError
from flowbridge.security import (
    SECRET_KEYS,
    TLS_SCHEMES,
    AuthSpec,
    Credentials,
    SecuredOptions,
    Security,
    TlsSettings,
    TlsSpec,
    redact_url,
    resolve_auth,
    resolve_tls,
    url_credentials,
)
from flowbridge.template import Template, TemplateError
from flowbridge.topics import Filter, parse_filter, parse_topic, translate_filter

AT_LEAST_ONCE: Final = "at-least-once"
AT_MOST_ONCE: Final = "at-most-once"
DeliveryMode = Literal["at-least-once", "at-most-once"]

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
_NAME_RE = re.compile(NAME_PATTERN)

Registry = Mapping[str, type[Adapter]]
Loc = tuple[str | int, ...]


# ---------------------------------------------------------------------------------------------
# File schema: what a mapping file may contain, before names are resolved.


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DeadLetterSpec(_Spec):
    broker: str
    topic: str = "flowbridge.dead"


class ReconnectSpec(_Spec):
    initial: float = Field(0.1, gt=0)
    max: float = Field(5.0, gt=0)
    attempts: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectSpec:
        if self.max < self.initial:
            raise ValueError(f"max ({self.max}) is below initial ({self.initial})")
        return self


class BridgeSpec(_Spec):
    id: str = Field("flowbridge", pattern=NAME_PATTERN)
    dead_letter: DeadLetterSpec | None = None
    # Where messages too large for a target go, as link-transport envelopes (Plik API
    # http(s)://..., or s3+http(s)://HOST/BUCKET).  None: they are dead-lettered.
    fileserver: str | None = Field(None, pattern=r"^(https?|s3\+https?)://")


class BrokerSpec(_Spec):
    url: str
    reconnect: ReconnectSpec = Field(default_factory=lambda: ReconnectSpec.model_validate({}))
    options: dict[str, Any] = Field(default_factory=dict)
    tls: TlsSpec | None = None  # also true (system CAs) or false
    auth: AuthSpec | None = None


class SourceSpec(_Spec):
    broker: str
    filter: str
    group: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class TargetSpec(_Spec):
    broker: str
    topic: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class EnvelopeSpec(_Spec):
    """How the route treats msg_envelope_v1 bodies (see flowbridge.envelope_route)."""

    mode: Literal["auto", "off", "require", "wrap", "unwrap"] = "auto"
    payload_type: Literal[
        "text", "dictionary", "arrowtable", "jsontable", "image", "audio", "video", "binary"
    ] = "binary"  # what ``wrap`` declares
    dataname: str = "body"
    sender_name: str = Field("flowbridge", min_length=1)


class RouteSpec(_Spec):
    # ``from`` and ``to`` are validated on their own (SourceSpec, TargetSpec) so that a
    # problem in one part of a route does not hide the problems of the others.
    name: str = Field(pattern=NAME_PATTERN)
    source: Any = Field(alias="from")
    to: Any
    delivery: DeliveryMode | None = None
    max_in_flight: int = Field(1000, ge=1, le=100_000)
    # Batches written before the oldest is confirmed (at-least-once); 1 keeps order on failure.
    pipeline: int = Field(1, ge=1, le=64)
    dead_letter: DeadLetterSpec | None = None
    envelope: EnvelopeSpec = Field(default_factory=lambda: EnvelopeSpec.model_validate({}))


_TOP_KEYS = ("bridge", "brokers", "routes")


# ---------------------------------------------------------------------------------------------
# The loaded configuration.


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


class DeadLetter(_Frozen):
    broker: str
    topic: str


class Bridge(_Frozen):
    id: str = "flowbridge"
    dead_letter: DeadLetter | None = None
    fileserver: str | None = None


class Broker(_Frozen):
    name: str
    url: str
    protocol: str
    adapter: type[Adapter]
    options: Options  # for adapters taking tls/auth, ``options.security`` holds both
    backoff: Backoff
    tls: TlsSettings | None = None  # None: plain
    auth: Credentials | None = None  # None: none, or those in the URL

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # The URL may hold a password or token: reprs (and str) show it masked.
        for key, value in super().__repr_args__():
            yield key, redact_url(value) if key == "url" else value


class Source(_Frozen):
    broker: str
    protocol: str
    filter_text: str
    filter: Filter
    subscriptions: tuple[str, ...]  # native filters, translate_filter(filter, proto, proto)
    group: str | None
    options: Options


class Target(_Frozen):
    broker: str
    protocol: str
    topic: str | None  # as written; None: the real topic translated
    template: Template
    options: Options


class Route(_Frozen):
    name: str
    source: Source
    targets: tuple[Target, ...]
    delivery: DeliveryMode
    max_in_flight: int
    dead_letter: DeadLetter | None
    origin: str  # FILE:LINE where the route is defined
    envelope: EnvelopeSpec = Field(default_factory=lambda: EnvelopeSpec.model_validate({}))
    pipeline: int = 1  # batches in flight to the targets at once

    @property
    def durable(self) -> bool:
        return self.delivery == AT_LEAST_ONCE

    def subscription(self, drops: collections.Counter[str] | None = None) -> Subscription:
        return Subscription(
            route=self.name,
            filters=self.source.subscriptions,
            durable=self.durable,
            max_in_flight=self.max_in_flight,
            group=self.source.group,
            options=self.source.options,
            drops=drops,
        )


class Config(_Frozen):
    bridge: Bridge
    brokers: dict[str, Broker]
    routes: tuple[Route, ...]
    files: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Reading YAML with line numbers.


@dataclass
class _Doc:
    file: str
    order: int
    data: Any = None
    key_lines: dict[Loc, int] = field(default_factory=dict)
    value_lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Loc) -> int:
        """Line of the key (or sequence item) at ``loc``, or of its nearest existing parent."""
        while loc:
            if loc in self.key_lines:
                return self.key_lines[loc]
            if loc in self.value_lines:
                return self.value_lines[loc]
            loc = loc[:-1]
        return 1

    def value_line(self, loc: Loc) -> int:
        return self.value_lines.get(loc) or self.line(loc)

    def where(self, loc: Loc) -> str:
        return f"{self.file}:{self.line(loc)}"


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Problems:
    def __init__(self) -> None:
        self._items: list[tuple[int, int, int, str]] = []
        self._silenced: set[tuple[int, Loc]] = set()

    def silence(self, doc: _Doc, loc: Loc) -> None:
        """No further problems under ``loc``: they would only echo one already reported."""
        self._silenced.add((doc.order, loc))

    def add(self, doc: _Doc, loc: Loc, message: str, *, line: int | None = None) -> None:
        if self._silenced and any(
            (doc.order, loc[:n]) in self._silenced for n in range(1, len(loc) + 1)
        ):
            return
        at = doc.line(loc) if line is None else line
        prefix = f"{format_loc(loc)}: " if loc else ""
        self._items.append((doc.order, at, len(self._items), f"{doc.file}:{at}: {prefix}{message}"))

    def raw(self, order: int, text: str) -> None:
        self._items.append((order, 0, len(self._items), text))

    def __bool__(self) -> bool:
        return bool(self._items)

    def lines(self) -> list[str]:
        return [text for *_, text in sorted(self._items)]


_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def expand(text: str, environ: Mapping[str, str]) -> str:
    """``${VAR}`` / ``${VAR:-default}`` / ``$${`` expansion; raises ``KeyError(VAR)`` for an
    unset variable without default and ``ValueError`` for a malformed reference."""

    def sub(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole == "$${":
            return "${"
        name = m.group(1)
        if name is None:
            raise ValueError(
                f"malformed '${{' at column {m.start() + 1}: write ${{NAME}} or "
                "${NAME:-default}, or $${ for a literal '${'"
            )
        value = environ.get(name)
        default = m.group(2)
        if default is not None and not value:
            return default
        if value is None:
            raise KeyError(name)
        return value

    return _VAR.sub(sub, text) if "${" in text else text


class _Reader:
    """Converts a composed YAML node tree to plain values, recording lines and expanding
    environment references."""

    def __init__(
        self, doc: _Doc, loader: yaml.SafeLoader, environ: Mapping[str, str], problems: _Problems
    ) -> None:
        self.doc = doc
        self.loader = loader
        self.environ = environ
        self.problems = problems
        self.active: set[int] = set()

    def value(self, node: yaml.Node, loc: Loc) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, loc)
        if id(node) in self.active:
            self.problems.add(self.doc, loc, "recursive YAML alias")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    self.doc.value_lines[(*loc, i)] = item.start_mark.line + 1
                    items.append(self.value(item, (*loc, i)))
                return items
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, loc)
        finally:
            self.active.discard(id(node))
        return None  # pragma: no cover - composer yields only the three node kinds

    def mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        merges = sum(1 for k, _ in node.value if k.tag == _MERGE_TAG)
        own = len(node.value) - merges
        if merges:
            self.loader.flatten_mapping(node)
        inherited = len(node.value) - own  # pairs from ``<<:`` come first and may be overridden
        out: dict[str, Any] = {}
        own_lines: dict[str, int] = {}
        for index, (key_node, value_node) in enumerate(node.value):
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.add(self.doc, loc, "a key must be text", line=key_line)
                continue
            key = str(key_node.value)
            sub = (*loc, key)
            if index >= inherited:
                if key in own_lines:
                    # Plain YAML keeps the last one silently; a mapping file means one of them.
                    self.problems.add(
                        self.doc,
                        sub,
                        f"duplicate key (first at line {own_lines[key]})",
                        line=key_line,
                    )
                    continue
                own_lines[key] = key_line
            self.doc.key_lines[sub] = key_line
            self.doc.value_lines[sub] = value_node.start_mark.line + 1
            out[key] = self.value(value_node, sub)
        return out

    def scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        if node.tag == _STR_TAG and "${" in node.value:
            line = node.start_mark.line + 1
            try:
                text = expand(node.value, self.environ)
            except KeyError as exc:
                self.problems.add(
                    self.doc,
                    loc,
                    f"environment variable {exc.args[0]} is not set "
                    f"(write ${{{exc.args[0]}:-default}} to give a default)",
                    line=line,
                )
                self.problems.silence(self.doc, loc)
                return None
            except ValueError as exc:
                self.problems.add(self.doc, loc, str(exc), line=line)
                self.problems.silence(self.doc, loc)
                return None
            if node.style is None and text != node.value.replace("$${", "${"):
                # An unquoted ``${PORT}`` takes the type its value would have had in place.
                tag: str = self.loader.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
                node = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark, node.style)
            else:
                return text
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problems.add(self.doc, loc, f"invalid value: {exc}", line=node.start_mark.line + 1)
            return None


def _read(path: str, order: int, environ: Mapping[str, str], problems: _Problems) -> _Doc | None:
    doc = _Doc(path, order)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        problems.raw(order, f"{path}: cannot read: {exc.strerror or exc}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problems.add(doc, (), f"not UTF-8 text (byte {raw[exc.start]:#04x})", line=line)
        return None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        problems.add(doc, (), f"invalid YAML: {what}", line=mark.line + 1 if mark else 1)
        return None
    except yaml.YAMLError as exc:
        problems.add(doc, (), f"invalid YAML: {exc}", line=1)
        return None
    try:
        doc.data = None if node is None else _Reader(doc, loader, environ, problems).value(node, ())
    finally:
        loader.dispose()
    return doc


# ---------------------------------------------------------------------------------------------
# Validation.


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """Keys the model accepts at ``loc`` (for "did you mean")."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None:
            return []
        fields = {(f.alias or name): f for name, f in current.model_fields.items()}
        if part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    if current is None:
        return []
    return [f.alias or name for name, f in current.model_fields.items()]


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _file_loc(data: Any, loc: Loc) -> Loc:
    """``loc`` as the file spells it: drops the list index pydantic adds when a single
    mapping stands for a one-item list (``to: {broker: x}``)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(part, int) and not isinstance(node, list):
            continue
        out.append(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return tuple(out)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def _report_validation(
    exc: ValidationError,
    model: type[BaseModel],
    data: Any,
    *,
    doc_of: _Doc | Callable[[Loc], _Doc],
    base: Loc,
    problems: _Problems,
) -> None:
    for err in exc.errors():
        loc = _file_loc(data, tuple(err["loc"]))
        doc = doc_of if isinstance(doc_of, _Doc) else doc_of(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            known = _known_keys(model, loc[:-1])
            hint = did_you_mean(key, known) or (
                f"; known keys: {', '.join(known)}" if known else ""
            )
            problems.add(doc, (*base, *loc), f"unknown key{hint}")
        elif kind == "missing":
            problems.add(doc, (*base, *loc[:-1]), f"missing required key '{loc[-1]}'")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            value = err.get("input")
            if SECRET_KEYS.intersection(str(part) for part in loc):
                # Never echo what stands where a secret belongs.
                if kind.endswith("_type"):
                    msg += " (quote it)"
            elif kind.endswith(("_type", "_parsing")) or kind in {
                "literal_error",
                "string_pattern_mismatch",
            }:
                msg = f"{msg}; got {_describe(value)}"
            if kind == "string_type" and value is None and loc and loc[-1] in {"filter", "topic"}:
                msg += " (quote filters and topics that start with '#', '*' or '>')"
            problems.add(doc, (*base, *loc), msg, line=doc.value_line((*base, *loc)))


M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def _validate(model: type[M], data: Any, doc: _Doc, base: Loc, problems: _Problems) -> M | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        _report_validation(exc, model, data, doc_of=doc, base=base, problems=problems)
        return None


def mask_url(url: str) -> str:
    return redact_url(url)


def check_url(url: str) -> str:
    """The protocol of a broker URL; raises ``ValueError`` saying what is wrong."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"malformed URL {mask_url(url)!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if not scheme or "://" not in url:
        raise ValueError(
            f"{mask_url(url)!r} is not a URL; write SCHEME://HOST[:PORT] with SCHEME one of "
            f"{', '.join(SCHEMES)}"
        )
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown scheme '{scheme}'{did_you_mean(scheme, list(SCHEMES))}; "
            f"known: {', '.join(SCHEMES)}"
        )
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ValueError(f"{mask_url(url)!r} has no host")
    # Kafka bootstrap lists: kafka://h1:9092,h2:9092
    for host in hosts.split(","):
        try:
            port = urlsplit(f"//{host}").port
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            raise ValueError(f"{mask_url(url)!r}: bad port in '{host}'") from None
        if not name:
            raise ValueError(f"{mask_url(url)!r}: empty host in '{host}'")
        if port == 0:
            raise ValueError(f"{mask_url(url)!r}: port 0 in '{host}'")
    return SCHEMES[scheme]


class _Endpoint(NamedTuple):
    """What routes need of a broker, known once its URL is valid."""

    protocol: str
    adapter: type[Adapter]


@dataclass
class _RouteParts:
    route: RouteSpec | None
    source: SourceSpec | None
    targets: list[tuple[Loc, TargetSpec | None]]


@dataclass
class _Item(Generic[T]):
    name: str
    spec: T
    doc: _Doc
    loc: Loc
    raw: Any


def _adapter(protocol: str, registry: Registry | None) -> type[Adapter]:
    if registry is not None:
        return registry[protocol]
    return adapter_class(protocol)


class _Loader:
    def __init__(self, environ: Mapping[str, str], registry: Registry | None) -> None:
        self.environ = environ
        self.registry = registry
        self.problems = _Problems()
        self.docs: list[_Doc] = []
        self.bridge: dict[str, tuple[Any, _Doc]] = {}
        self.brokers: dict[str, _Item[BrokerSpec | None]] = {}
        self.routes: dict[str, _Item[_RouteParts]] = {}
        self.resolved: dict[str, Broker] = {}
        self.endpoints: dict[str, _Endpoint] = {}

    def options(self, model: type[Options], data: Any, doc: _Doc, loc: Loc) -> Options | None:
        return _validate(model, data, doc, loc, self.problems)

    # -- per file --------------------------------------------------------------------------

    def collect(self, doc: _Doc) -> None:
        data = doc.data
        if data is None:
            return
        if not isinstance(data, dict):
            self.problems.add(
                doc,
                (),
                f"expected a mapping with keys {', '.join(_TOP_KEYS)}; got {_describe(data)}",
                line=1,
            )
            return
        for key in data:
            if key not in _TOP_KEYS:
                hint = did_you_mean(key, _TOP_KEYS) or f"; known keys: {', '.join(_TOP_KEYS)}"
                self.problems.add(doc, (key,), f"unknown key{hint}")
        bridge = data.get("bridge")
        if bridge is not None:
            if isinstance(bridge, dict):
                for key, value in bridge.items():
                    if key in self.bridge:
                        _, first = self.bridge[key]
                        self.problems.add(
                            doc,
                            ("bridge", key),
                            f"also set at {first.where(('bridge', key))}; set it in one file",
                        )
                    else:
                        self.bridge[key] = (value, doc)
            else:
                self.problems.add(doc, ("bridge",), f"expected a mapping; got {_describe(bridge)}")
        self.collect_brokers(doc, data.get("brokers"))
        self.collect_routes(doc, data.get("routes"))

    def collect_brokers(self, doc: _Doc, brokers: Any) -> None:
        if brokers is None:
            return
        if not isinstance(brokers, dict):
            self.problems.add(
                doc, ("brokers",), f"expected a mapping of broker names; got {_describe(brokers)}"
            )
            return
        for name, raw in brokers.items():
            loc: Loc = ("brokers", name)
            if not _NAME_RE.match(name):
                self.problems.add(doc, loc, "a broker name uses only A-Z a-z 0-9 _ . -")
                continue
            if name in self.brokers:
                first = self.brokers[name]
                self.problems.add(
                    doc, loc, f"broker '{name}' is also defined at {first.doc.where(first.loc)}"
                )
                continue
            spec = _validate(BrokerSpec, raw, doc, loc, self.problems)
            # Kept even when invalid: routes naming it are still checked, and not told that
            # the broker does not exist.
            self.brokers[name] = _Item(name, spec, doc, loc, raw)

    def collect_routes(self, doc: _Doc, routes: Any) -> None:
        if routes is None:
            return
        if not isinstance(routes, list):
            self.problems.add(doc, ("routes",), f"expected a list; got {_describe(routes)}")
            return
        for i, raw in enumerate(routes):
            loc: Loc = ("routes", i)
            if not isinstance(raw, dict):
                self.problems.add(doc, loc, f"expected a mapping; got {_describe(raw)}")
                continue
            name = raw.get("name")
            if isinstance(name, str) and name in self.routes:
                first = self.routes[name]
                self.problems.add(
                    doc,
                    (*loc, "name"),
                    f"route '{name}' is also defined at {first.doc.where((*first.loc, 'name'))}",
                )
                continue
            spec = _validate(RouteSpec, raw, doc, loc, self.problems)
            source = None
            if "from" in raw:
                source = _validate(SourceSpec, raw["from"], doc, (*loc, "from"), self.problems)
            to = raw.get("to")
            raw_targets: list[tuple[Loc, Any]] = []
            if isinstance(to, dict):  # a single target needs no list
                raw_targets.append(((*loc, "to"), to))
            elif isinstance(to, list):
                if not to:
                    self.problems.add(doc, (*loc, "to"), "a route needs at least one target")
                raw_targets.extend(((*loc, "to", j), t) for j, t in enumerate(to))
            elif "to" in raw:
                self.problems.add(
                    doc, (*loc, "to"), f"expected a target mapping or a list; got {_describe(to)}"
                )
            targets = [
                (tloc, _validate(TargetSpec, t, doc, tloc, self.problems))
                for tloc, t in raw_targets
            ]
            self.routes[name if isinstance(name, str) else f"#{doc.order}.{i}"] = _Item(
                str(name), _RouteParts(spec, source, targets), doc, loc, raw
            )

    # -- across files ----------------------------------------------------------------------

    def resolve_brokers(self) -> None:
        for name, item in self.brokers.items():
            spec, doc, loc = item.spec, item.doc, item.loc
            raw = item.raw if isinstance(item.raw, dict) else {}
            url = spec.url if spec is not None else raw.get("url")
            if not isinstance(url, str):
                continue  # reported by the schema
            try:
                protocol = check_url(url)
            except ValueError as exc:
                self.problems.add(doc, (*loc, "url"), str(exc))
                continue
            try:
                adapter = _adapter(protocol, self.registry)
            except (KeyError, ImportError) as exc:
                self.problems.add(doc, (*loc, "url"), f"no adapter for {protocol}: {exc}")
                continue
            self.endpoints[name] = _Endpoint(protocol, adapter)
            raw_options = spec.options if spec is not None else raw.get("options", {})
            if not isinstance(raw_options, dict):
                continue  # reported by the schema
            if "security" in raw_options and issubclass(adapter.BrokerOptions, SecuredOptions):
                self.problems.add(
                    doc, (*loc, "options", "security"), "set tls and auth beside options, not in it"
                )
                continue
            options = self.options(adapter.BrokerOptions, raw_options, doc, (*loc, "options"))
            if options is None or spec is None:
                continue
            secured = self.security(spec, protocol, adapter, doc, loc)
            if secured is None:
                continue
            tls, auth = secured
            if tls is not None or auth is not None:
                options = options.model_copy(update={"security": Security(tls=tls, auth=auth)})
            r = spec.reconnect
            self.resolved[name] = Broker(
                name=name,
                url=url,
                protocol=protocol,
                adapter=adapter,
                options=options,
                backoff=Backoff(initial=r.initial, maximum=r.max, attempts=r.attempts),
                tls=tls,
                auth=auth,
            )

    def security(
        self, spec: BrokerSpec, protocol: str, adapter: type[Adapter], doc: _Doc, loc: Loc
    ) -> tuple[TlsSettings | None, Credentials | None] | None:
        """The broker's TLS settings and credentials, secrets resolved; None after reporting
        a problem."""
        if not issubclass(adapter.BrokerOptions, SecuredOptions):
            given = [key for key in ("tls", "auth") if getattr(spec, key) is not None]
            for key in given:
                self.problems.add(doc, (*loc, key), f"the {protocol} adapter takes no {key}")
            return None if given else (None, None)
        tls_scheme = urlsplit(spec.url).scheme.lower() in TLS_SCHEMES
        base_dir = os.path.dirname(os.path.abspath(doc.file))
        problems: list[tuple[Loc, str]] = []
        tls: TlsSettings | None = None
        if spec.tls is None:
            tls = TlsSettings() if tls_scheme else None
        elif not spec.tls.enabled:
            if tls_scheme:
                problems.append((("tls",), "TLS is off here but the URL's scheme asks for it"))
        else:
            tls, found = resolve_tls(spec.tls, base_dir)
            problems += found
        auth: Credentials | None = None
        if spec.auth is not None:
            if url_credentials(spec.url):
                problems.append(
                    (("auth",), "the URL also holds credentials: give them in one place")
                )
            else:
                auth, found = resolve_auth(spec.auth, protocol, self.environ, base_dir)
                problems += found
        for sub, message in problems:
            self.problems.add(doc, (*loc, *sub), message)
        return None if problems else (tls, auth)

    def broker_ref(self, name: str, doc: _Doc, loc: Loc) -> _Endpoint | None:
        broker = self.endpoints.get(name)
        if broker is None and name not in self.brokers:
            known = sorted(self.brokers)
            hint = did_you_mean(name, known) or (
                f"; defined: {', '.join(known)}" if known else "; no brokers are defined"
            )
            self.problems.add(doc, loc, f"unknown broker '{name}'{hint}")
        return broker  # None also when the broker itself had problems (already reported)

    def dead_letter(self, spec: DeadLetterSpec, doc: _Doc, loc: Loc) -> DeadLetter | None:
        broker = self.broker_ref(spec.broker, doc, (*loc, "broker"))
        if broker is None:
            return None
        try:
            parse_topic(spec.topic, broker.protocol)
        except TopicError as exc:
            self.problems.add(
                doc, (*loc, "topic"), f"invalid {broker.protocol} topic: {exc.reason}"
            )
            return None
        return DeadLetter(broker=spec.broker, topic=spec.topic)

    def resolve_bridge(self) -> Bridge:
        raw = {key: value for key, (value, _) in self.bridge.items()}
        docs = {key: doc for key, (_, doc) in self.bridge.items()}
        if not docs:
            return Bridge()
        first = next(iter(docs.values()))

        def doc_of(loc: Loc) -> _Doc:
            # Each key may come from a different file: report where it was set.
            return docs.get(str(loc[0]), first) if loc else first

        try:
            spec = BridgeSpec.model_validate(raw)
        except ValidationError as exc:
            _report_validation(
                exc, BridgeSpec, raw, doc_of=doc_of, base=("bridge",), problems=self.problems
            )
            return Bridge()
        dead = None
        if spec.dead_letter is not None:
            dead = self.dead_letter(
                spec.dead_letter, docs["dead_letter"], ("bridge", "dead_letter")
            )
        return Bridge(id=spec.id, dead_letter=dead, fileserver=spec.fileserver)

    def resolve_route(self, item: _Item[_RouteParts], bridge: Bridge) -> Route | None:
        parts, doc, loc = item.spec, item.doc, item.loc
        spec = parts.route
        ok = spec is not None
        requested = None if spec is None else spec.delivery
        source: Source | None = None
        delivery: DeliveryMode = requested or AT_MOST_ONCE
        if parts.source is not None:
            broker = self.broker_ref(parts.source.broker, doc, (*loc, "from", "broker"))
            if broker is not None:
                source, delivery = self.resolve_source(parts.source, requested, broker, doc, loc)
        ok = ok and source is not None
        targets: list[Target] = []
        for tloc, target in parts.targets:
            built = None
            if target is not None:
                built = self.resolve_target(target, source, delivery, doc, tloc)
            if built is None:
                ok = False
            else:
                targets.append(built)
        dead: DeadLetter | None = bridge.dead_letter
        if spec is not None and "dead_letter" in spec.model_fields_set:
            dead = None
            if spec.dead_letter is not None:
                dead = self.dead_letter(spec.dead_letter, doc, (*loc, "dead_letter"))
                ok = ok and dead is not None
        # At-most-once nothing waits for a confirm, so there is nothing to overlap (without a
        # source the delivery mode is unknown, and the source's problem was reported).
        piped = spec is not None and spec.pipeline > 1
        if piped and source is not None and delivery != AT_LEAST_ONCE:
            msg = f"applies to at-least-once routes; this one is {delivery}"
            self.problems.add(doc, (*loc, "pipeline"), msg)
            ok = False
        if not ok or source is None or spec is None or not targets:
            return None
        return Route(
            name=spec.name,
            source=source,
            targets=tuple(targets),
            delivery=delivery,
            max_in_flight=spec.max_in_flight,
            dead_letter=dead,
            origin=doc.where(loc),
            envelope=spec.envelope,
            pipeline=spec.pipeline,
        )

    def resolve_source(
        self,
        src: SourceSpec,
        requested: DeliveryMode | None,
        broker: _Endpoint,
        doc: _Doc,
        loc: Loc,
    ) -> tuple[Source | None, DeliveryMode]:
        src_loc: Loc = (*loc, "from")
        protocol = broker.protocol
        adapter = broker.adapter
        delivery: DeliveryMode = requested or AT_MOST_ONCE
        try:
            parsed = parse_filter(src.filter, protocol)
            subscriptions = tuple(translate_filter(src.filter, protocol, protocol))
        except TopicError as exc:
            self.problems.add(doc, (*src_loc, "filter"), f"invalid {protocol} filter: {exc.reason}")
            return None, delivery
        options = self.options(adapter.SourceOptions, src.options, doc, (*src_loc, "options"))
        if options is None:
            return None, delivery
        durable_problem = adapter.check_source(options, durable=True)
        if requested is None:
            delivery = AT_LEAST_ONCE if durable_problem is None else AT_MOST_ONCE
        elif requested == AT_LEAST_ONCE and durable_problem is not None:
            self.problems.add(
                doc, (*loc, "delivery"), f"at-least-once is not possible here: {durable_problem}"
            )
            return None, delivery
        if delivery == AT_MOST_ONCE:
            problem = adapter.check_source(options, durable=False)
            if problem is not None:
                where = (*src_loc, "options") if src.options else src_loc
                self.problems.add(doc, where, problem)
                return None, delivery
        source = Source(
            broker=src.broker,
            protocol=protocol,
            filter_text=src.filter,
            filter=parsed,
            subscriptions=subscriptions,
            group=src.group,
            options=options,
        )
        return source, delivery

    def resolve_target(
        self,
        spec: TargetSpec,
        source: Source | None,
        delivery: DeliveryMode,
        doc: _Doc,
        loc: Loc,
    ) -> Target | None:
        broker = self.broker_ref(spec.broker, doc, (*loc, "broker"))
        if broker is None:
            return None
        adapter = broker.adapter
        options = self.options(adapter.TargetOptions, spec.options, doc, (*loc, "options"))
        if options is None:
            return None
        problem = adapter.check_target(options, confirm=delivery == AT_LEAST_ONCE)
        if problem is not None:
            where = (*loc, "options") if spec.options else loc
            if delivery == AT_LEAST_ONCE:
                problem += " (or set the route's delivery: at-most-once)"
            self.problems.add(doc, where, problem)
            return None
        if source is None:
            return None  # the template depends on the source filter, already reported
        try:
            template = Template(
                spec.topic,
                source_filter=source.filter,
                source=source.protocol,
                target=broker.protocol,
            )
        except (TemplateError, TopicError) as exc:
            reason = exc.reason
            if spec.topic is None:
                reason = f"the source topics cannot be carried by {broker.protocol}: {reason}"
            self.problems.add(doc, (*loc, "topic") if spec.topic is not None else loc, reason)
            return None
        return Target(
            broker=spec.broker,
            protocol=broker.protocol,
            topic=spec.topic,
            template=template,
            options=options,
        )

    def check_replies(self, routes: Sequence[Route | None]) -> None:
        """Each request-reply target needs a route that carries its replies back."""
        readers = {
            r.source.broker
            for r in routes
            if r is not None
            and self.resolved[r.source.broker].adapter.reads_replies(r.source.options)
        }
        for item, route in zip(self.routes.values(), routes, strict=True):
            if route is None:
                continue
            for (tloc, _), target in zip(item.spec.targets, route.targets, strict=True):
                if target.broker in readers:
                    continue
                need = self.resolved[target.broker].adapter.replies_needed(target.options)
                if need is not None:
                    loc = (*tloc, "options")
                    self.problems.add(item.doc, loc, need.format(broker=target.broker))

    def load(self, paths: Sequence[str]) -> Config:
        if not paths:
            raise ConfigError(["no mapping file given"])
        for order, path in enumerate(paths):
            doc = _read(path, order, self.environ, self.problems)
            if doc is not None:
                self.docs.append(doc)
                self.collect(doc)
        self.resolve_brokers()
        bridge = self.resolve_bridge()
        routes = [self.resolve_route(item, bridge) for item in self.routes.values()]
        if not self.problems:
            self.check_replies(routes)
        if not self.routes and self.docs and not self.problems:
            self.problems.add(self.docs[0], (), "no routes are defined", line=1)
        if self.problems:
            raise ConfigError(self.problems.lines())
        return Config(
            bridge=bridge,
            brokers=dict(self.resolved),
            routes=tuple(r for r in routes if r is not None),
            files=tuple(paths),
        )


def load(
    paths: Sequence[str],
    environ: Mapping[str, str] = os.environ,
    registry: Registry | None = None,
) -> Config:
    """Load and merge mapping files.  ``registry`` maps protocol -> adapter class (default:
    the installed adapters).  Raises ``ConfigError`` listing every problem."""
    return _Loader(environ, registry).load(paths)
