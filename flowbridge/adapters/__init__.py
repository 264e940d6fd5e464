"""Broker adapters, registered by protocol name and loaded on first use."""

from __future__ import annotations

import importlib

from flowbridge.adapters.base import Adapter

# URL scheme -> protocol.  ``tls`` is NATS over TLS, as nats clients spell it.
SCHEMES: dict[str, str] = {
    "nats": "nats",
    "tls": "nats",
    "mqtt": "mqtt",
    "mqtts": "mqtt",
    "amqp": "amqp",
    "amqps": "amqp",
    "kafka": "kafka",
    "kafka+ssl": "kafka",
}

_MODULES: dict[str, tuple[str, str]] = {
    "nats": ("flowbridge.adapters.nats", "NatsAdapter"),
    "mqtt": ("flowbridge.adapters.mqtt", "MqttAdapter"),
    "amqp": ("flowbridge.adapters.amqp", "AmqpAdapter"),
    "kafka": ("flowbridge.adapters.kafka", "KafkaAdapter"),
    "memory": ("flowbridge.adapters.memory", "MemoryAdapter"),
}


def adapter_class(protocol: str) -> type[Adapter]:
    module_name, class_name = _MODULES[protocol]
    cls: type[Adapter] = getattr(importlib.import_module(module_name), class_name)
    return cls
