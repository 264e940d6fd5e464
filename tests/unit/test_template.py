"""Target topic templates: compile-time checks and rendering."""

from __future__ import annotations

import pytest

from flowbridge.errors import TopicError
from flowbridge.template import Template, TemplateError, sample_topic
from flowbridge.topics import Topic, parse_filter, parse_topic, translate_topic


def compile_(text: str | None, flt: str, source: str, target: str) -> Template:
    return Template(text, source_filter=parse_filter(flt, source), source=source, target=target)


def test_absent_topic_translates_the_real_topic() -> None:
    t = compile_(None, "sensors/+/temperature", "mqtt", "nats")
    assert t.kind == "translate"
    assert t.fixed is None
    name = "sensors/a.b/temperature"
    assert t.render(parse_topic(name, "mqtt")) == "sensors.a//b.temperature"
    assert t.render_native(name) == translate_topic(name, "mqtt", "nats")


def test_fixed_name_is_returned_as_is() -> None:
    t = compile_("audit.all", "a/#", "mqtt", "nats")
    assert t.kind == "fixed"
    assert t.fixed == "audit.all"
    assert t.render(Topic(("a", "b", "c"))) == "audit.all"
    assert t.render_native("a/zzz") == "audit.all"


def test_level_placeholder_is_one_target_level() -> None:
    # A '.' inside an MQTT level must not become a NATS separator.
    t = compile_("x.{2}.{topic}", "sensors/+/temperature", "mqtt", "nats")
    assert t.kind == "template"
    assert t.render_native("sensors/a.b/temperature") == "x.a//b.sensors.a//b.temperature"
    # A '/' inside a NATS token is plain text in MQTT: one level stays one level.
    t2 = compile_("in/{2}", "dev.*", "nats", "mqtt")
    assert t2.render_native("dev.k1") == "in/k1"


def test_level_the_target_cannot_carry_raises_topic_error() -> None:
    # MQTT has no way to put '/' inside a level: the engine dead-letters such a message.
    t = compile_("x/{1}", "*.temp", "amqp", "mqtt")
    assert t.render_native("ab.temp") == "x/ab"
    with pytest.raises(TopicError):
        t.render_native("a/b.temp")


def test_doubled_braces_are_literal() -> None:
    t = compile_("{{lit}}/{1}/}}", "sensors/#", "mqtt", "mqtt")
    assert t.render_native("sensors/a/b") == "{lit}/sensors/}"


def test_placeholders_up_to_min_levels_are_accepted() -> None:
    # a/+/# guarantees two levels; NATS a.> guarantees two as well (> needs one or more).
    compile_("{2}", "a/+/#", "mqtt", "nats")
    compile_("{2}", "a.>", "nats", "mqtt")
    compile_("{1}", "a/#", "mqtt", "nats")


@pytest.mark.parametrize(
    ("text", "flt", "source", "target", "reason"),
    [
        ("{3}", "a/+/#", "mqtt", "nats", "{3}: not every topic the source filter matches has 3"),
        ("{2}", "a/#", "mqtt", "nats", "(it guarantees 1)"),
        ("{3}", "a.>", "nats", "mqtt", "it guarantees 2"),
        ("x.{0}", "a/b", "mqtt", "nats", "{0}: levels are numbered from 1"),
        ("x.{foo}", "a/b", "mqtt", "nats", "unknown placeholder {foo} at column 3"),
        ("x.{}", "a/b", "mqtt", "nats", "unknown placeholder {} at column 3"),
        ("x.{1", "a/b", "mqtt", "nats", "unmatched '{' at column 3"),
        ("x}.{1}", "a/b", "mqtt", "nats", "unmatched '}' at column 2"),
        ("", "a/b", "mqtt", "nats", "empty topic"),
        ("x.*", "a/b", "mqtt", "nats", "not a valid nats topic"),
        ("x.*.{1}", "a/b", "mqtt", "nats", "not a valid nats topic (rendered as 'x.*.a')"),
        ("x/#/{1}", "a/b", "mqtt", "mqtt", "not a valid mqtt topic"),
        ("bad name {1}", "a/b", "mqtt", "kafka", "not a valid kafka topic"),
    ],
)
def test_invalid_templates_fail_at_compile(
    text: str, flt: str, source: str, target: str, reason: str
) -> None:
    with pytest.raises(TemplateError) as info:
        compile_(text, flt, source, target)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


def test_sample_topic_fills_wildcards() -> None:
    assert sample_topic(parse_filter("sensors/+/#", "mqtt")).levels == (
        "sensors",
        "any",
        "more",
    )
    assert sample_topic(parse_filter("a.b", "nats")).levels == ("a", "b")


def test_render_does_not_parse_the_template_per_message() -> None:
    t = compile_("x.{1}.{topic}", "+/b", "mqtt", "nats")
    t.text = "garbage {{{"  # the compiled parts are all render uses
    assert t.render_native("k/b") == "x.k.k.b"
