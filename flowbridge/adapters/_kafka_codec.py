"""Compression levels for aiokafka's producers.

aiokafka compresses record batches at fixed levels (lz4 9, which is LZ4 HC, and gzip 9) and
takes no level from its caller.  Those cost several times the CPU of the levels librdkafka
uses by default (fast lz4, gzip 6) for a few percent of size: lz4 9 compressed text-like
batches at 56 MB/s here, level 0 at 290 MB/s, 1.9:1 against 1.7:1.

The codec functions aiokafka's record builders call are wrapped once, at import, to take the
level of the producer compressing: ``producer_level`` is set while a producer starts, and the
sender task it starts (the one that builds every batch) inherits it.  A producer started
without it gets ``DEFAULT_LEVELS``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Callable, Iterator
from typing import Any, cast

from aiokafka import codec

# librdkafka's defaults: what other Kafka bridges (mq-bridge, Redpanda Connect) compress with.
DEFAULT_LEVELS = {"gzip": 6, "lz4": 0, "zstd": 3}
LEVELS = {"gzip": (1, 9), "lz4": (0, 12), "zstd": (1, 22)}  # valid ranges, inclusive

_level: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "flowbridge_kafka_compression_level", default=None
)


def _pick(codec_name: str) -> int:
    level = _level.get()
    return DEFAULT_LEVELS[codec_name] if level is None else level


def _gzip(payload: Any, compresslevel: int | None = None) -> bytes:
    return cast(bytes, codec.gzip_encode(payload, compresslevel or _pick("gzip")))


def _lz4(payload: Any, level: int | None = None) -> bytes:
    return cast(bytes, codec.lz4_encode(payload, _pick("lz4") if level is None else level))


def _zstd(payload: Any, level: int | None = None) -> bytes:
    return cast(bytes, codec.zstd_encode(payload, _pick("zstd") if level is None else level))


_WRAPPERS: dict[str, Callable[..., bytes]] = {
    "gzip_encode": _gzip,
    "lz4_encode": _lz4,
    "zstd_encode": _zstd,
}


def _install() -> list[str]:
    """Wrap the codec names the record modules call; returns the modules wrapped."""
    done = []
    for name in ("aiokafka.record.default_records", "aiokafka.record._crecords.default_records"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # the C module is optional
            continue
        for attr, wrapper in _WRAPPERS.items():
            if getattr(module, attr, None) is getattr(codec, attr):
                setattr(module, attr, wrapper)
                done.append(f"{name}.{attr}")
    return done


INSTALLED = _install()


@contextlib.contextmanager
def producer_level(level: int | None) -> Iterator[None]:
    """Around ``producer.start()``: the level its batches are compressed with (None: the
    codec's entry in DEFAULT_LEVELS)."""
    token = _level.set(level)
    try:
        yield
    finally:
        _level.reset(token)
