"""Shared fixtures: the brokers every integration and interop test talks to."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support import brokers


@pytest.fixture(scope="session")
def nats_url() -> str:
    brokers.require(brokers.NATS_URL, "nats", 4222)
    return brokers.NATS_URL


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    brokers.require(brokers.MQTT_URL, "mqtt", 1883)
    return brokers.MQTT_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    brokers.require(brokers.AMQP_URL, "amqp", 5672)
    return brokers.AMQP_URL


@pytest.fixture(scope="session")
def kafka_url() -> Iterator[str]:
    """FLOWBRIDGE_TEST_KAFKA_URL when set, otherwise a Tansu broker for the session."""
    if brokers.KAFKA_URL:
        brokers.require(brokers.KAFKA_URL, "kafka", 9092)
        yield brokers.KAFKA_URL
        return
    with brokers.Tansu() as tansu:
        yield tansu.url


@pytest.fixture
def unique() -> str:
    """A short token that keeps topics, queues and groups of one test apart from others."""
    return uuid.uuid4().hex[:10]
