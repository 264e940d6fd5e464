"""A small HTTP/1.1 server on asyncio for metrics, health and the status page.

One request per connection (``Connection: close``): scrapers and the page's poll need no
more, and it keeps the server free of keep-alive bookkeeping.  Request heads are bounded in
size and time, connections in number; a handler that raises answers 500 and is logged, it
never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import choose_encoder

from flowbridge.errors import FlowbridgeError
from flowbridge.metrics import FixedCollector, Snapshot
from flowbridge.ops.page import STATUS_PAGE
from flowbridge.ops.status import RateMeter, scrub, status

if TYPE_CHECKING:
    from flowbridge.engine import Bridge

log = logging.getLogger("flowbridge.http")

MAX_HEAD = 8192  # request line and headers
MAX_HEADERS = 64
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
SAMPLE_EVERY = 1.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, doc: Any) -> Response:
    return Response(status, json.dumps(doc).encode() + b"\n", "application/json")


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode() + b"\n")


def parse_address(address: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every interface)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FlowbridgeError(f"--http {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    return host or None, int(port_text)


class OpsServer:
    """Serves ``/metrics``, ``/healthz``, ``/readyz``, ``/api/status`` and ``/`` for one
    bridge.  An async context manager: listening inside, closed (idempotently) on exit."""

    def __init__(self, bridge: Bridge, *, stopping: asyncio.Event | None = None) -> None:
        self.bridge = bridge
        self.stopping = stopping or asyncio.Event()
        self.meter = RateMeter()
        self.routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/": self.page,
            "/metrics": self.metrics,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/api/status": self.api_status,
        }
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str | None, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._connection, host, port, limit=MAX_HEAD, reuse_address=True
            )
        except OSError as exc:
            raise FlowbridgeError(
                f"--http {host or '*'}:{port}: cannot listen: {exc.strerror or exc}"
            ) from exc
        self._ticker = asyncio.ensure_future(self._tick())
        log.info("serving /metrics, /healthz, /readyz, /api/status and / on %s", self.where())

    def where(self) -> str:
        assert self._server is not None
        names = [s.getsockname() for s in self._server.sockets]
        return ", ".join(f"[{n[0]}]:{n[1]}" if ":" in n[0] else f"{n[0]}:{n[1]}" for n in names)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> OpsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.meter.sample(loop.time(), self.bridge.stats())
            except Exception:  # a reload swapping routes must not end the sampling
                log.exception("http: rate sampling failed")
            await asyncio.sleep(SAMPLE_EVERY)

    # -- connection handling -------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            await self._send(writer, _text(503, "too many connections"), head_only=False)
            return
        self._writers.add(writer)
        try:
            request, error = await self._read(reader)
            if request is None:
                if error is not None:
                    await self._send(writer, error, head_only=False)
                return
            response = await self._dispatch(request)
            await self._send(writer, response, head_only=request.method == "HEAD")
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> tuple[Request | None, Response | None]:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return None, _text(431, "request head too large")
        except asyncio.IncompleteReadError:
            return None, None  # the client went away
        except TimeoutError:
            return None, _text(408, "request head not received in time")
        except (ConnectionError, ValueError):
            return None, None
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            return None, _text(400, "malformed request line")
        if not version.startswith("HTTP/1."):
            return None, _text(505, "HTTP/1.x only")
        if not target.startswith("/"):
            return None, _text(400, "request target must be a path")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                return None, _text(400, "malformed header line")
            headers[name.lower()] = value.strip()
        if len(headers) > MAX_HEADERS:
            return None, _text(431, "too many headers")
        path, _, query = target.partition("?")
        return Request(method, path, query, headers), None

    async def _dispatch(self, request: Request) -> Response:
        handler = self.routes.get(request.path)
        if handler is None:
            return _text(404, f"not found; try {', '.join(self.routes)}")
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"GET or HEAD only\n", headers={"Allow": "GET, HEAD"})
        try:
            return await handler(request)
        except Exception:
            log.exception("http: %s failed", request.path)
            return _text(500, "internal error (logged)")

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, head_only: bool
    ) -> None:
        head = [
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            *(f"{k}: {v}" for k, v in response.headers.items()),
        ]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if not head_only:
            data += response.body
        try:
            writer.write(data)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stopped reading: nothing more to do for it

    # -- handlers --------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return Response(
            200,
            STATUS_PAGE,
            "text/html; charset=utf-8",
            {"Content-Security-Policy": _PAGE_POLICY, "X-Frame-Options": "DENY"},
        )

    async def metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        # Copy the counters here, on the loop; rendering thousands of samples takes tens of
        # milliseconds, which must not hold up forwarding.
        exposition = FixedCollector(Snapshot.of(self.bridge))
        return Response(200, await asyncio.to_thread(encoder, exposition), content_type)

    async def healthz(self, request: Request) -> Response:
        return _text(200, "ok")

    async def readyz(self, request: Request) -> Response:
        ready, problems = self.bridge.ready()
        stopping = self.stopping.is_set()
        if ready and not stopping:
            return _json(200, {"ready": True})
        brokers = {name: scrub(problem) for name, problem in problems.items()}
        return _json(503, {"ready": False, "stopping": stopping, "brokers": brokers})

    async def api_status(self, request: Request) -> Response:
        return _json(200, status(self.bridge, self.meter, stopping=self.stopping.is_set()))


@contextlib.asynccontextmanager
async def serve(
    bridge: Bridge, address: str, *, stopping: asyncio.Event | None = None
) -> AsyncIterator[OpsServer]:
    """Serve the bridge's HTTP side on ``address`` (``HOST:PORT``) while inside."""
    host, port = parse_address(address)
    server = OpsServer(bridge, stopping=stopping)
    await server.start(host, port)
    try:
        yield server
    finally:
        await server.close()
