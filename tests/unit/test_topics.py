"""Topic model and codecs: the nats-server vectors, simple names, escapes and errors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowbridge import Filter, Topic, TopicError, translate_filter, translate_topic
from flowbridge.topics import MULTI, SINGLE, parse_filter, parse_topic

# nats-server's MQTT gateway, from its own tests (topic-mapping.md).
NATS_SERVER_TOPICS = [
    ("foo/bar", "foo.bar"),
    ("/foo", "/.foo"),
    ("foo/", "foo./"),
    ("/", "/./"),
    ("foo//bar", "foo./.bar"),
    (".", "//"),
    ("foo.bar/baz", "foo//bar.baz"),
    ("spBv1.0/plant1", "spBv1//0.plant1"),
]
NATS_SERVER_FILTERS = [
    ("+", "*"),
    ("foo/+/", "foo.*./"),
    ("#", ">"),
    ("/#", "/.>"),
    ("foo/bar.baz/#", "foo.bar//baz.>"),
]


@pytest.mark.parametrize(("mqtt", "nats"), NATS_SERVER_TOPICS)
def test_nats_server_topic_vectors(mqtt: str, nats: str) -> None:
    assert translate_topic(mqtt, "mqtt", "nats") == nats
    assert translate_topic(nats, "nats", "mqtt") == mqtt


@pytest.mark.parametrize(("mqtt", "nats"), NATS_SERVER_FILTERS)
def test_nats_server_filter_vectors(mqtt: str, nats: str) -> None:
    subs = translate_filter(mqtt, "mqtt", "nats")
    # nats-server subscribes to its conversion, plus the parent level for a trailing '#'.
    expected = [nats]
    if nats.endswith(".>"):
        expected = [nats[:-2], nats]
    assert subs == expected


def test_done_when_example() -> None:
    assert translate_filter("foo.bar/#", "mqtt", "nats") == ["foo//bar", "foo//bar.>"]


def _nats_server_conversion(topic: str) -> str:
    """nats-server's MQTT->NATS rule, restated per character from its documentation: '/'
    becomes '.', except that an empty level becomes '/' (leading '/.' , trailing './',
    '//' -> './.'); '.' becomes '//'."""
    levels = topic.split("/")
    return ".".join("/" if level == "" else level.replace(".", "//") for level in levels)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab/.$_-é%*>!"), min_size=1, max_size=16))
def test_agrees_with_nats_server_rule(topic: str) -> None:
    if any(level in ("*", ">") for level in topic.split("/")):
        # nats-server leaks these as wildcards; flowbridge escapes them.
        assert "/2A" in translate_topic(topic, "mqtt", "nats") or "/3E" in translate_topic(
            topic, "mqtt", "nats"
        )
        return
    assert translate_topic(topic, "mqtt", "nats") == _nats_server_conversion(topic)


@pytest.mark.parametrize("protocol", ["mqtt", "nats", "amqp", "kafka"])
def test_simple_names_are_the_same_everywhere(protocol: str) -> None:
    native = {"mqtt": "a/b_1/c-2", "nats": "a.b_1.c-2", "amqp": "a.b_1.c-2", "kafka": "a.b_1.c-2"}
    for target, name in native.items():
        assert translate_topic(native[protocol], protocol, target) == name


@pytest.mark.parametrize(
    ("source", "name", "target", "expected"),
    [
        ("mqtt", "a/*/b", "nats", "a./2A.b"),  # nats-server would leak '*' as a wildcard
        ("mqtt", "a/>", "nats", "a./3E"),
        ("mqtt", "a*b/c>", "nats", "a*b.c>"),  # not whole tokens: literal in NATS
        ("mqtt", "living room/t", "nats", "living/20room.t"),  # nats-server refuses spaces
        ("mqtt", "a.b/c", "amqp", "a//b.c"),  # RabbitMQ's plugin makes three words of it
        ("mqtt", "/a//b", "amqp", ".a..b"),  # empty words, as RabbitMQ maps them
        ("mqtt", "a/#/x", "nats", None),  # not a topic: '#' is a wildcard
        ("nats", "a/b.c", "amqp", "a/b.c"),
        ("nats", "a/b.c", "kafka", "a__2f_b.c"),
        ("nats", "a+b.c", "amqp", "a+b.c"),
        ("amqp", "a./2A", "nats", "a./2A"),
        ("amqp", "a.*", "nats", None),  # a literal '*' word is written /2A
        ("mqtt", "$SYS/broker", "kafka", "__24_SYS.broker"),
        ("mqtt", "sensor_1/x__y_", "kafka", "sensor_1.x__y_"),
        ("mqtt", "a/__2f_", "kafka", "a.__5f__2f_"),
        ("kafka", "a.__5f__2f_", "mqtt", "a/__2f_"),
        ("kafka", "a.__61_", "mqtt", None),  # non-canonical: would be 'a'
        ("mqtt", "é/ü", "kafka", "__e9_.__fc_"),
    ],
)
def test_escapes(source: str, name: str, target: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(TopicError):
            translate_topic(name, source, target)
        return
    assert translate_topic(name, source, target) == expected
    assert translate_topic(expected, target, source) == name


@pytest.mark.parametrize(
    ("source", "name", "target", "fragment"),
    [
        ("nats", "a+b", "mqtt", "'+'"),
        ("nats", "a/b", "mqtt", "'/'"),
        ("mqtt", "a/+", "nats", "wildcard"),
        ("nats", "a.*", "mqtt", "wildcard"),
        ("nats", "a..b", "mqtt", "token 2 is empty"),
        ("nats", "a b", "mqtt", "whitespace"),
        ("mqtt", "x" * 250, "kafka", "249"),
        ("mqtt", "x" * 256, "amqp", "255"),
        ("kafka", "a/b", "mqtt", "'/' is not allowed"),
        ("mqtt", "a\x00", "nats", "NUL"),
        ("mqtt", "/", "kafka", "'.'"),
    ],
)
def test_errors_say_why(source: str, name: str, target: str, fragment: str) -> None:
    with pytest.raises(TopicError) as info:
        translate_topic(name, source, target)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_filter_translations() -> None:
    assert translate_filter("a/+/c", "mqtt", "amqp") == ["a.*.c"]
    assert translate_filter("a/#", "mqtt", "amqp") == ["a.#"]  # AMQP '#' matches zero words
    assert translate_filter("a.>", "nats", "mqtt") == ["a/+/#"]  # '>' needs one token
    assert translate_filter(">", "nats", "mqtt") == ["#"]
    assert translate_filter("a.*.>", "nats", "amqp") == ["a.*.*.#"]
    assert translate_filter("a.#.b", "amqp", "kafka") == [r"^a(?:\.[A-Za-z0-9_-]*)*\.b$"]
    with pytest.raises(TopicError, match="middle"):
        translate_filter("a.#.b", "amqp", "nats")
    with pytest.raises(TopicError, match="last"):
        translate_filter("a/#/b", "mqtt", "nats")
    with pytest.raises(TopicError, match="whole level"):
        translate_filter("a/b+", "mqtt", "nats")


def test_kafka_patterns() -> None:
    (sensors,) = translate_filter("sensors.+.temperature", "kafka", "kafka")
    assert re.fullmatch(sensors, "sensors.room1.temperature")
    assert not re.fullmatch(sensors, "sensors.room1.humidity")
    (everything,) = translate_filter("#", "mqtt", "kafka")
    assert re.fullmatch(everything, "a.b")
    assert not re.fullmatch(everything, "__24_SYS.x")  # '$' topics stay out of '#'
    (sub,) = translate_filter("sensors.#", "kafka", "kafka")
    assert re.fullmatch(sub, "sensors")
    assert re.fullmatch(sub, "sensors.a.b")
    assert not re.fullmatch(sub, "sensorsx")


def test_model_matching() -> None:
    f = parse_filter("a/#", "mqtt")
    assert f.levels == ("a", MULTI)
    assert f.matches(Topic(("a",)))
    assert f.matches(Topic(("a", "b", "c")))
    assert not Filter((MULTI,)).matches(Topic(("$SYS", "x")))
    assert Filter(("$SYS", MULTI)).matches(Topic(("$SYS", "x")))
    assert Filter((MULTI, SINGLE)).levels == (SINGLE, MULTI)  # normalised
    assert parse_filter(">", "nats") == parse_filter("#", "mqtt")
    assert parse_filter("a.>", "nats").min_levels == 2
    assert parse_topic("a.b", "amqp").levels == ("a", "b")
    with pytest.raises(TopicError):
        Topic(())
