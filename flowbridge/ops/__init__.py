"""The bridge's HTTP side: Prometheus metrics, health and readiness probes, a JSON status
document and a live status page (``flowbridge run --http HOST:PORT``)."""

from __future__ import annotations

from flowbridge.ops.server import OpsServer, parse_address, serve

__all__ = ["OpsServer", "parse_address", "serve"]
