"""Mapping files: every problem at its FILE:LINE and key path, env expansion, merging.

Most tests use small fake adapters so they pin the loader's behaviour, not an adapter's
option set; ``test_example_mappings_validate`` loads mappings/ with the real adapters.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from pydantic import Field

from flowbridge import config
from flowbridge.adapters.base import (
    Adapter,
    Backoff,
    Delivery,
    Health,
    Message,
    Options,
    PublishOutcome,
    Subscription,
)
from flowbridge.errors import ConfigError
from flowbridge.template import Template
from flowbridge.topics import PROTOCOLS

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"


class FakeBrokerOptions(Options):
    timeout: float = Field(default=1.0, gt=0)


class FakeSourceOptions(Options):
    ack: bool = True
    window: int = 10


class FakeTargetOptions(Options):
    confirms: bool = True


class Fake(Adapter):
    BrokerOptions = FakeBrokerOptions
    SourceOptions = FakeSourceOptions
    TargetOptions = FakeTargetOptions

    @classmethod
    def check_source(cls, options: Options, *, durable: bool) -> str | None:
        assert isinstance(options, FakeSourceOptions)
        if durable and not options.ack:
            return "ack: false cannot be at-least-once"
        if not durable and options.window > 100:
            return "window above 100 needs acks"
        return None

    @classmethod
    def check_target(cls, options: Options, *, confirm: bool) -> str | None:
        assert isinstance(options, FakeTargetOptions)
        if confirm and not options.confirms:
            return "confirms: false cannot confirm"
        return None

    # Never instantiated: the loader only reads the class.
    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def subscribe(self, sub: Subscription) -> AsyncIterator[list[Delivery]]:
        raise NotImplementedError

    async def publish(
        self, messages: Sequence[Message], *, confirm: bool, options: Options | None = None
    ) -> PublishOutcome:
        raise NotImplementedError

    def health(self) -> Health:
        raise NotImplementedError


REGISTRY: dict[str, type[Adapter]] = dict.fromkeys(("mqtt", "nats", "amqp", "kafka"), Fake)

BROKERS = """\
brokers:
  edge: {url: "mqtt://127.0.0.1:1883"}
  core: {url: "nats://127.0.0.1:4222"}
  rabbit: {url: "amqp://guest:guest@127.0.0.1:5672/"}
  log: {url: "kafka://127.0.0.1:9092"}
"""


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Mapping files are written to (and named relative to) a fresh directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, text: str) -> str:
    Path(name).write_text(textwrap.dedent(text))
    return name


def load(*texts: str, environ: dict[str, str] | None = None) -> config.Config:
    names = [write(f"m{i or ''}.yaml", t) for i, t in enumerate(texts)]
    return config.load(names, environ=environ or {}, registry=REGISTRY)


def problems(*texts: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(*texts, environ=environ)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --------------------------------------------------------------------------- valid files


FULL = (
    """\
bridge:
  id: edge-bridge
  dead_letter: {broker: core, topic: "flowbridge.dead"}
"""
    + BROKERS.replace(
        '"nats://127.0.0.1:4222"}',
        '"nats://127.0.0.1:4222", reconnect: {initial: 0.5, max: 8, attempts: 3},\n'
        "         options: {timeout: 2.5}}",
    )
    + """\
routes:
  - name: sensors-to-core
    from: {broker: edge, filter: "sensors/+/temperature", group: g1}
    to: [{broker: core}, {broker: log, topic: "sensors.{2}.{topic}"}]
    max_in_flight: 50
  - name: fixed
    from: {broker: core, filter: "orders.>", options: {ack: false}}
    to: {broker: rabbit, topic: "audit.orders", options: {confirms: false}}
    dead_letter: null
  - name: own-dead-letter
    from: {broker: rabbit, filter: "a.#"}
    to: {broker: edge}
    delivery: at-most-once
    dead_letter: {broker: log, topic: "dead.a"}
"""
)


def test_full_example_loads(files: Path) -> None:
    cfg = load(FULL)
    assert cfg.files == ("m.yaml",)
    assert cfg.bridge.id == "edge-bridge"
    assert {n: b.protocol for n, b in cfg.brokers.items()} == {
        "edge": "mqtt",
        "core": "nats",
        "rabbit": "amqp",
        "log": "kafka",
    }
    core = cfg.brokers["core"]
    assert core.backoff == Backoff(initial=0.5, maximum=8, attempts=3)
    assert core.options == FakeBrokerOptions(timeout=2.5)
    assert core.adapter is Fake
    assert cfg.brokers["edge"].backoff == Backoff()

    r1, r2, r3 = cfg.routes
    assert r1.name == "sensors-to-core"
    assert r1.origin == "m.yaml:11"
    assert r1.delivery == config.AT_LEAST_ONCE
    assert r1.source.protocol == "mqtt"
    assert r1.source.subscriptions == ("sensors/+/temperature",)
    assert r1.source.filter.min_levels == 3
    assert r1.source.options == FakeSourceOptions()
    assert [t.broker for t in r1.targets] == ["core", "log"]
    assert r1.targets[0].template.kind == "translate"
    assert r1.targets[0].template.render_native("sensors/k/temperature") == "sensors.k.temperature"
    assert isinstance(r1.targets[1].template, Template)
    assert r1.dead_letter == config.DeadLetter(broker="core", topic="flowbridge.dead")
    sub = r1.subscription()
    assert sub == Subscription(
        route="sensors-to-core",
        filters=("sensors/+/temperature",),
        durable=True,
        max_in_flight=50,
        group="g1",
        options=FakeSourceOptions(),
    )

    # ack: false cannot be at-least-once, so the default falls back to at-most-once.
    assert r2.delivery == config.AT_MOST_ONCE
    assert not r2.subscription().durable
    assert r2.targets[0].template.fixed == "audit.orders"
    assert r2.targets[0].options == FakeTargetOptions(confirms=False)
    assert r2.dead_letter is None

    assert r3.delivery == config.AT_MOST_ONCE
    assert r3.dead_letter == config.DeadLetter(broker="log", topic="dead.a")


def test_config_is_frozen(files: Path) -> None:
    cfg = load(FULL)
    with pytest.raises(ValueError, match="frozen"):
        cfg.routes[0].max_in_flight = 3


def test_nats_filter_gives_native_subscriptions(files: Path) -> None:
    cfg = load(
        BROKERS
        + """\
routes:
  - {name: r, from: {broker: edge, filter: "foo.bar/#"}, to: {broker: core, topic: "x.{1}"}}
"""
    )
    assert cfg.routes[0].source.subscriptions == ("foo.bar/#",)
    assert cfg.routes[0].targets[0].template.render_native("foo.bar") == "x.foo//bar"


# --------------------------------------------------------------------------- environment


def test_env_expansion(files: Path) -> None:
    text = """\
brokers:
  edge: {url: "${EDGE_URL}"}
  core: {url: "${CORE_URL:-nats://127.0.0.1:4222}"}
  log: {url: "kafka://${KHOST:-127.0.0.1}:${KPORT:-9092}"}
routes:
  - name: r
    from: {broker: edge, filter: "a/$${x}"}
    to: {broker: core}
    max_in_flight: ${WINDOW}
"""
    cfg = load(text, environ={"EDGE_URL": "mqtt://10.1.1.1:1884", "KPORT": "", "WINDOW": "7"})
    assert cfg.brokers["edge"].url == "mqtt://10.1.1.1:1884"
    assert cfg.brokers["core"].url == "nats://127.0.0.1:4222"
    # ':-' also covers a variable that is set but empty, as in a shell.
    assert cfg.brokers["log"].url == "kafka://127.0.0.1:9092"
    assert cfg.routes[0].source.filter_text == "a/${x}"
    assert cfg.routes[0].max_in_flight == 7


def test_unquoted_expansion_takes_the_yaml_type(files: Path) -> None:
    # A quoted "${V}" stays text, an unquoted ${V} is typed like the value written in place.
    data = config.expand("${A}-$${B}", {"A": "1"})
    assert data == "1-${B}"
    text = (
        BROKERS
        + """\
routes:
  - name: r
    from:
      broker: edge
      filter: "a"
      options:
        window: ${W}
    to: {broker: core, options: {confirms: "${C}"}}
"""
    )
    cfg = load(text, environ={"W": "12", "C": "true"})
    assert cfg.routes[0].source.options == FakeSourceOptions(window=12)


def test_unset_variable_names_variable_file_and_line(files: Path) -> None:
    text = """\
brokers:
  edge: {url: "mqtt://127.0.0.1"}
  core:
    url: ${CORE_URL}
routes:
  - {name: r, from: {broker: edge, filter: a}, to: {broker: core}}
"""
    assert problems(text) == [
        "m.yaml:4: brokers.core.url: environment variable CORE_URL is not set "
        "(write ${CORE_URL:-default} to give a default)",
    ]


def test_malformed_reference(files: Path) -> None:
    text = (
        BROKERS
        + "routes:\n  - {name: r, from: {broker: edge, filter: 'a/${1x}'}, to: [{broker: core}]}\n"
    )
    (p,) = problems(text)
    assert p.startswith("m.yaml:7: routes[0].from.filter: malformed '${' at column 3")


# --------------------------------------------------------------------------- merging


def test_files_merge(files: Path) -> None:
    routes = """\
routes:
  - {name: r, from: {broker: edge, filter: a}, to: {broker: core}}
"""
    cfg = load(BROKERS, routes)
    assert cfg.files == ("m.yaml", "m1.yaml")
    assert [r.name for r in cfg.routes] == ["r"]
    assert cfg.routes[0].origin == "m1.yaml:2"


def test_duplicate_names_across_files_name_both_places(files: Path) -> None:
    second = """\
bridge:
  id: other
brokers:
  core: {url: "nats://10.0.0.1"}
routes:
  - {name: r, from: {broker: edge, filter: a}, to: {broker: core}}
  - name: r
    from: {broker: edge, filter: b}
    to: {broker: core}
"""
    first = (
        "bridge: {id: one}\n"
        + BROKERS
        + "routes:\n  - {name: r, from: {broker: edge, filter: a}, to: {broker: core}}\n"
    )
    assert problems(first, second) == [
        "m1.yaml:2: bridge.id: also set at m.yaml:1; set it in one file",
        "m1.yaml:4: brokers.core: broker 'core' is also defined at m.yaml:4",
        "m1.yaml:6: routes[0].name: route 'r' is also defined at m.yaml:8",
        "m1.yaml:7: routes[1].name: route 'r' is also defined at m.yaml:8",
    ]


# --------------------------------------------------------------------------- error kinds


def test_yaml_syntax_error_line(files: Path) -> None:
    text = BROKERS + "routes:\n  - name: r\n    from: {broker: edge\n    to: x\n"
    (p,) = problems(text)
    assert p.startswith("m.yaml:9: invalid YAML: ")


def test_yaml_error_in_second_file_and_missing_file(files: Path) -> None:
    write("ok.yaml", BROKERS)
    write("bad.yaml", "routes:\n- a\n b: c\n")
    with pytest.raises(ConfigError) as info:
        config.load(["ok.yaml", "bad.yaml", "nope.yaml"], environ={}, registry=REGISTRY)
    bad, nope = info.value.problems
    assert bad.startswith("bad.yaml:3: invalid YAML: ")
    assert nope == "nope.yaml: cannot read: No such file or directory"


def test_unknown_keys_with_suggestions(files: Path) -> None:
    text = """\
brokers:
  edge: {url: "mqtt://127.0.0.1", reconect: {}}
  core: {url: "nats://127.0.0.1", options: {timeuot: 1}}
rutes: []
routes:
  - name: r
    from:
      broker: edge
      fitler: a
    to: {broker: core, topik: x}
    zzz: 1
"""
    assert problems(text) == [
        "m.yaml:2: brokers.edge.reconect: unknown key (did you mean 'reconnect'?)",
        "m.yaml:3: brokers.core.options.timeuot: unknown key (did you mean 'timeout'?)",
        "m.yaml:4: rutes: unknown key (did you mean 'routes'?)",
        "m.yaml:7: routes[0].from: missing required key 'filter'",
        "m.yaml:9: routes[0].from.fitler: unknown key (did you mean 'filter'?)",
        "m.yaml:10: routes[0].to.topik: unknown key (did you mean 'topic'?)",
        "m.yaml:11: routes[0].zzz: unknown key; known keys: name, from, to, delivery, "
        "max_in_flight, pipeline, dead_letter, envelope",
    ]


def test_unknown_broker_names(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - name: r
    from: {broker: egde, filter: a}
    to:
      - {broker: core}
      - {broker: nowhere}
    dead_letter: {broker: kore}
"""
    )
    assert problems(text) == [
        "m.yaml:8: routes[0].from.broker: unknown broker 'egde' (did you mean 'edge'?)",
        "m.yaml:11: routes[0].to[1].broker: unknown broker 'nowhere'; defined: core, edge, log, "
        "rabbit",
        "m.yaml:12: routes[0].dead_letter.broker: unknown broker 'kore' (did you mean 'core'?)",
    ]


def test_invalid_filter_carries_topic_reason(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - name: r
    from:
      broker: edge
      filter: "a/#/b"
    to: {broker: core}
  - name: r2
    from: {broker: core, filter: "a b"}
    to: {broker: edge}
"""
    )
    p1, p2 = problems(text)
    assert p1.startswith("m.yaml:10: routes[0].from.filter: invalid mqtt filter: ")
    assert "#" in p1
    assert p2.startswith("m.yaml:13: routes[1].from.filter: invalid nats filter: ")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqttt://h:1883", "unknown scheme 'mqttt' (did you mean 'mqtt'?); known: nats, tls"),
        ("http://h", "unknown scheme 'http'; known: nats, tls, mqtt, mqtts, amqp, amqps, kafka"),
        ("127.0.0.1:4222", "is not a URL; write SCHEME://HOST[:PORT]"),
        ("nats://", "'nats://' has no host"),
        ("nats://h:99999", "bad port in 'h:99999'"),
        ("amqp://u:secret@h:x/", "'amqp://u:***@h:x/': bad port in 'h:x'"),
        ("kafka://a:9092,:9093", "empty host in ':9093'"),
    ],
)
def test_bad_urls(files: Path, url: str, message: str) -> None:
    text = f"""\
brokers:
  edge: {{url: "mqtt://127.0.0.1"}}
  bad:
    url: "{url}"
routes:
  - {{name: r, from: {{broker: edge, filter: a}}, to: {{broker: edge}}}}
"""
    (p,) = problems(text)
    assert p.startswith("m.yaml:4: brokers.bad.url: ")
    assert message in p
    assert "secret" not in p


def test_pipeline_is_for_at_least_once_routes_and_bounded(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - {name: ok, from: {broker: log, filter: a}, to: {broker: core}, pipeline: 4}
  - {name: plain, from: {broker: log, filter: a}, to: {broker: core}}
  - name: amo
    from: {broker: log, filter: a}
    to: {broker: core}
    delivery: at-most-once
    pipeline: 2
  - {name: big, from: {broker: log, filter: a}, to: {broker: core}, pipeline: 65}
"""
    )
    assert problems(text) == [
        "m.yaml:13: routes[2].pipeline: applies to at-least-once routes; this one is at-most-once",
        "m.yaml:14: routes[3].pipeline: Input should be less than or equal to 64",
    ]
    good = load(text.split("  - name: amo")[0])
    assert [r.pipeline for r in good.routes] == [4, 1]


def test_kafka_bootstrap_list_is_accepted(files: Path) -> None:
    text = BROKERS.replace("kafka://127.0.0.1:9092", "kafka+ssl://k1:9093,k2:9093")
    cfg = load(text + "routes: [{name: r, from: {broker: log, filter: a}, to: {broker: core}}]")
    assert cfg.brokers["log"].protocol == "kafka"


def test_wrong_types(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - name: "bad name"
    from: {broker: edge, filter: a, group: [x]}
    to: 5
    delivery: maybe
    max_in_flight: 100001
  - name: r2
    from:
      broker: edge
      filter: # a comment, not a filter
    to: []
"""
    )
    assert problems(text) == [
        "m.yaml:7: routes[0].name: String should match pattern '^[A-Za-z0-9_.-]+$'; got 'bad name'",
        "m.yaml:8: routes[0].from.group: Input should be a valid string; got a list",
        "m.yaml:9: routes[0].to: expected a target mapping or a list; got 5",
        "m.yaml:10: routes[0].delivery: Input should be 'at-least-once' or 'at-most-once'; "
        "got 'maybe'",
        "m.yaml:11: routes[0].max_in_flight: Input should be less than or equal to 100000",
        "m.yaml:15: routes[1].from.filter: Input should be a valid string; got nothing (null) "
        "(quote filters and topics that start with '#', '*' or '>')",
        "m.yaml:16: routes[1].to: a route needs at least one target",
    ]


def test_top_level_shapes(files: Path) -> None:
    assert problems("- a\n- b\n") == [
        "m.yaml:1: expected a mapping with keys bridge, brokers, routes; got a list"
    ]
    assert problems("brokers: [a]\nroutes: {a: 1}\n") == [
        "m.yaml:1: brokers: expected a mapping of broker names; got a list",
        "m.yaml:2: routes: expected a list; got a mapping",
    ]
    assert problems(BROKERS) == ["m.yaml:1: no routes are defined"]


def test_duplicate_key_in_one_mapping(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - name: r
    from: {broker: edge, filter: a}
    to: {broker: core}
    name: r2
"""
    )
    assert problems(text) == ["m.yaml:10: routes[0].name: duplicate key (first at line 7)"]


def test_yaml_merge_keys_are_supported(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - &base {name: r, from: {broker: edge, filter: a}, to: {broker: core}}
  - <<: *base
    name: r2
"""
    )
    assert [r.name for r in load(text).routes] == ["r", "r2"]


def test_adapter_option_models_reject_values(files: Path) -> None:
    text = """\
brokers:
  edge:
    url: mqtt://127.0.0.1
    options:
      timeout: -1
  core:
    url: nats://127.0.0.1
    reconnect: {initial: 2, max: 1, attempts: 0}
routes:
  - name: r
    from:
      broker: edge
      filter: a
      options:
        window: many
    to:
      - broker: core
        options: {confirms: maybe}
"""
    assert problems(text) == [
        "m.yaml:5: brokers.edge.options.timeout: Input should be greater than 0",
        "m.yaml:8: brokers.core.reconnect.attempts: Input should be greater than or equal to 1",
        "m.yaml:15: routes[0].from.options.window: Input should be a valid integer, unable to "
        "parse string as an integer; got 'many'",
        "m.yaml:18: routes[0].to[0].options.confirms: Input should be a valid boolean, unable "
        "to interpret input; got 'maybe'",
    ]


def test_cross_field_checks(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - name: explicit
    from: {broker: edge, filter: a, options: {ack: false}}
    to: {broker: core}
    delivery: at-least-once
  - name: confirm
    from: {broker: edge, filter: b}
    to:
      - broker: core
      - broker: log
        options: {confirms: false}
  - name: amo
    from:
      broker: edge
      filter: c
      options: {window: 500}
    to: {broker: core}
    delivery: at-most-once
"""
    )
    assert problems(text) == [
        "m.yaml:10: routes[0].delivery: at-least-once is not possible here: "
        "ack: false cannot be at-least-once",
        "m.yaml:16: routes[1].to[1].options: confirms: false cannot confirm "
        "(or set the route's delivery: at-most-once)",
        "m.yaml:21: routes[2].from.options: window above 100 needs acks",
    ]


def test_target_template_errors(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - name: r
    from: {broker: edge, filter: "a/+/#"}
    to:
      - {broker: core, topic: "x.{3}"}
      - broker: log
        topic: "x.{nope}"
      - {broker: core, topic: "x.*.{1}"}
"""
    )
    assert problems(text) == [
        "m.yaml:10: routes[0].to[0].topic: {3}: not every topic the source filter matches has "
        "3 levels (it guarantees 2)",
        "m.yaml:12: routes[0].to[1].topic: unknown placeholder {nope} at column 3; use {topic} "
        "or a level number such as {1}",
        "m.yaml:13: routes[0].to[2].topic: not a valid nats topic (rendered as 'x.*.a'): "
        "token 2 is the wildcard '*'",
    ]


def test_target_that_cannot_carry_source_topics(files: Path) -> None:
    text = (
        BROKERS
        + """\
routes:
  - name: r
    from: {broker: rabbit, filter: "a/b.*"}
    to: {broker: edge}
"""
    )
    (p,) = problems(text)
    assert p.startswith(
        "m.yaml:9: routes[0].to: the source topics cannot be carried by mqtt: level 'a/b'"
    )


def test_dead_letter_checks(files: Path) -> None:
    text = """\
bridge:
  id: "bad id"
  dead_letter: {broker: core, topic: "a.*"}
brokers:
  core: {url: "nats://127.0.0.1"}
routes:
  - name: r
    from: {broker: core, filter: a}
    to: {broker: core}
    dead_letter: {broker: core, topic: "a b", extra: 1}
"""
    found = problems(text)
    assert found[0] == (
        "m.yaml:2: bridge.id: String should match pattern '^[A-Za-z0-9_.-]+$'; got 'bad id'"
    )
    assert found[1] == (
        "m.yaml:10: routes[0].dead_letter.extra: unknown key; known keys: broker, topic"
    )
    assert len(found) == 2  # a bridge that failed validation does not cascade


def test_dead_letter_topic_invalid_for_protocol(files: Path) -> None:
    text = """\
bridge:
  dead_letter: {broker: core, topic: "a.*"}
brokers:
  core: {url: "nats://127.0.0.1"}
routes:
  - name: r
    from: {broker: core, filter: a}
    to: {broker: core}
"""
    (p,) = problems(text)
    assert p.startswith("m.yaml:2: bridge.dead_letter.topic: invalid nats topic: ")


def test_all_problems_of_several_files_at_once(files: Path) -> None:
    a = BROKERS + "routes:\n  - {name: r, from: {broker: x, filter: a}, to: {broker: core}}\n"
    b = "routes:\n  - {name: s, from: {broker: edge, filter: a}, to: {broker: y}}\n"
    assert problems(a, b) == [
        "m.yaml:7: routes[0].from.broker: unknown broker 'x'; defined: core, edge, log, rabbit",
        "m1.yaml:2: routes[0].to.broker: unknown broker 'y'; defined: core, edge, log, rabbit",
    ]


# --------------------------------------------------------------------------- shipped examples


def example_files() -> list[Path]:
    return sorted(MAPPINGS.glob("*.yaml"))


def test_mappings_directory_has_the_examples() -> None:
    names = {p.name for p in example_files()}
    for expected in (
        "mqtt-nats.yaml",
        "nats-amqp.yaml",
        "amqp-kafka.yaml",
        "mqtt-kafka.yaml",
        "nats-kafka.yaml",
        "mqtt-amqp.yaml",
        "all-four-mirror.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_mappings_validate(path: Path) -> None:
    # The real adapters: an example must be accepted by what `flowbridge run` uses.
    cfg = config.load([str(path)], environ={})
    assert cfg.routes


def test_mirror_covers_every_direction() -> None:
    cfg = config.load([str(MAPPINGS / "all-four-mirror.yaml")], environ={})
    pairs = {(r.source.protocol, t.protocol) for r in cfg.routes for t in r.targets}
    assert pairs == {(a, b) for a in PROTOCOLS for b in PROTOCOLS if a != b}
    assert cfg.bridge.id == "mirror"


def test_example_urls_come_from_the_environment() -> None:
    env = {"FLOWBRIDGE_MQTT_URL": "mqtts://10.9.9.9:8883", "FLOWBRIDGE_NATS_URL": "tls://n:4443"}
    cfg = config.load([str(MAPPINGS / "mqtt-nats.yaml")], environ=env)
    assert cfg.brokers["mqtt"].url == "mqtts://10.9.9.9:8883"
    assert cfg.brokers["nats"].protocol == "nats"
    assert cfg.brokers["nats"].url == "tls://n:4443"
