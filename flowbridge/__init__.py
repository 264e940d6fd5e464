"""flowbridge: one topic model across NATS, MQTT, AMQP 0-9-1 and Kafka, and a bridge
between them."""

from flowbridge.errors import ConfigError, FlowbridgeError, TopicError
from flowbridge.topics import (
    PROTOCOLS,
    Filter,
    Topic,
    parse_filter,
    parse_topic,
    translate_filter,
    translate_topic,
)

__version__ = "0.1.0"

__all__ = [
    "PROTOCOLS",
    "ConfigError",
    "Filter",
    "FlowbridgeError",
    "Topic",
    "TopicError",
    "__version__",
    "parse_filter",
    "parse_topic",
    "translate_filter",
    "translate_topic",
]
