"""What ``/api/status`` and the status page show: brokers, routes with counters and rates,
recent dead letters -- never a password or token."""

from __future__ import annotations

import collections
import math
import re
import time
from typing import TYPE_CHECKING, Any

from flowbridge.engine import LATENCY_BUCKETS, RouteStats
from flowbridge.metrics import used_brokers
from flowbridge.security import redact_url

if TYPE_CHECKING:
    from flowbridge.engine import Bridge

_SECRET_KEY = re.compile(r"pass|token|secret|key|cred|auth|sig|nkey|jwt", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_SECRET_PARAM = re.compile(
    r"(?P<key>\b[\w.-]*(?:pass|token|secret|key|cred|auth|sig|nkey|jwt)[\w.-]*=)[^&\s]+",
    re.IGNORECASE,
)


public_url = redact_url  # one redaction for logs, errors and pages


def scrub(text: str) -> str:
    """Free text (health details, refusal reasons) with URL credentials and secret
    parameters masked, in case a client library quoted them."""
    return _SECRET_PARAM.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", text))


_Sample = tuple[int, int, int, int, int]  # id of the RouteStats, received, forwarded, bytes


class RateMeter:
    """Per-route message and byte rates over the last ``window`` samples.

    Fed once a second by the HTTP server's ticker: bounded, and nothing on the message path.
    """

    def __init__(self, window: int = 5) -> None:
        self._samples: collections.deque[tuple[float, dict[str, _Sample]]] = collections.deque(
            maxlen=window + 1
        )

    def sample(self, now: float, stats: dict[str, RouteStats]) -> None:
        self._samples.append(
            (
                now,
                {
                    n: (id(s), s.received, s.forwarded, s.bytes_in, s.bytes_out)
                    for n, s in stats.items()
                },
            )
        )

    def rates(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        if len(self._samples) < 2:
            return out
        t1, last = self._samples[-1]
        for name, now in last.items():
            # Back to the oldest sample of the same, steadily growing counters: a reload
            # restarts a route with new stats, which must not read as a negative rate.
            t0, first = t1, now
            for t, older in reversed(list(self._samples)[:-1]):
                before = older.get(name)
                if (
                    before is None
                    or before[0] != first[0]
                    or any(a > b for a, b in zip(before[1:], first[1:], strict=True))
                ):
                    break
                t0, first = t, before
            if t0 < t1:
                dt = t1 - t0
                out[name] = {
                    "in": (now[1] - first[1]) / dt,
                    "out": (now[2] - first[2]) / dt,
                    "bytes_in": (now[3] - first[3]) / dt,
                    "bytes_out": (now[4] - first[4]) / dt,
                }
        return out


def _quantile_bound(counts: list[int], q: float) -> float | None:
    """Upper bound of the latency bucket holding quantile ``q`` (None: above the last)."""
    total = sum(counts)
    if not total:
        return None
    rank = math.ceil(q * total)
    seen = 0
    for bound, n in zip(LATENCY_BUCKETS, counts, strict=False):
        seen += n
        if seen >= rank:
            return bound
    return None


def _route_doc(st: RouteStats, rates: dict[str, float]) -> dict[str, Any]:
    n = sum(st.latency_counts)
    return {
        "received": st.received,
        "forwarded": st.forwarded,
        "bytes_in": st.bytes_in,
        "bytes_out": st.bytes_out,
        "echo_suppressed": st.echo_suppressed,
        "filtered": st.filtered,
        "dead_lettered": dict(st.dead_lettered),
        "dead_lettered_total": sum(st.dead_lettered.values()),
        "dropped": dict(st.dropped),
        "dropped_total": sum(st.dropped.values()),
        "retries": st.retries,
        "in_flight": st.in_flight,
        "rate": {k: round(v, 3) for k, v in rates.items()}
        or {"in": 0.0, "out": 0.0, "bytes_in": 0.0, "bytes_out": 0.0},
        "latency": {
            "count": n,
            "mean_seconds": st.latency_sum / n if n else None,
            "p50_seconds_le": _quantile_bound(st.latency_counts, 0.5),
            "p99_seconds_le": _quantile_bound(st.latency_counts, 0.99),
        },
    }


def status(bridge: Bridge, meter: RateMeter, *, stopping: bool = False) -> dict[str, Any]:
    """The ``/api/status`` document."""
    config = bridge.config
    ready, problems = bridge.ready()
    brokers = []
    for name in used_brokers(config):
        adapter = bridge.adapters.get(name)
        if adapter is None:
            continue
        h = adapter.health()
        brokers.append(
            {
                "name": name,
                "protocol": adapter.protocol,
                "url": public_url(adapter.url),
                "state": h.state.value,
                "subscribed": h.subscribed,
                "ok": h.ok,
                "reconnects": h.reconnects,
                "detail": scrub(h.detail),
                "counters": adapter.counters(),
            }
        )
    stats = bridge.stats()
    rates = meter.rates()
    routes = []
    for r in config.routes:
        doc: dict[str, Any] = {
            "name": r.name,
            "source": {
                "broker": r.source.broker,
                "protocol": r.source.protocol,
                "filter": r.source.filter_text,
            },
            "targets": [
                {"broker": t.broker, "protocol": t.protocol, "topic": t.topic} for t in r.targets
            ],
            "delivery": r.delivery,
            "dead_letter": (
                {"broker": r.dead_letter.broker, "topic": r.dead_letter.topic}
                if r.dead_letter
                else None
            ),
            "running": r.name in stats,
        }
        st = stats.get(r.name)
        doc.update(_route_doc(st or RouteStats(), rates.get(r.name, {})))
        routes.append(doc)
    dead = [
        {
            "time": d.time,
            "route": d.route,
            "topic": d.topic,
            "target": d.target,
            "reason": scrub(d.reason),
        }
        for d in reversed(bridge.recent_dead)
    ]
    return {
        "bridge": {"id": config.bridge.id, "stopping": stopping},
        "time": time.time(),
        "ready": ready and not stopping,
        "not_ready": {k: scrub(v) for k, v in problems.items()},
        "brokers": brokers,
        "routes": routes,
        "dead_letters": dead,
    }
