"""File servers behind ``link`` payloads: where large payload bytes are uploaded and fetched.

A handler uploads bytes and returns a URL, and downloads a URL back to bytes.  Downloads are
only made from the handler's own server (a URL pointing anywhere else is refused, so an
envelope cannot make a receiver fetch internal addresses), never follow redirects, read at
most a size cap, and retry transient failures with backoff 100 ms doubling up to 5 s.

Handlers: ``PlikClient`` (Plik's HTTP API), ``S3FileServer`` (any S3-compatible store, path
style, SigV4; links are presigned GET URLs so receivers need no credentials) and
``PlikStore``, a small Plik-API-compatible server with bounded memory for development
(``python -m flowbridge.fileserver --listen 127.0.0.1:8080``).

HTTP is spoken over asyncio streams: one connection per request, HTTP/1.1, no redirects.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import ssl
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit

from flowbridge.errors import FlowbridgeError

log = logging.getLogger("flowbridge.fileserver")

DEFAULT_MAX_SIZE = 256 * 1024 * 1024
"""Largest payload a handler uploads or downloads unless told otherwise."""
DEFAULT_FILESERVER_URL = "http://localhost:8080"
_MAX_HEADER_BYTES = 64 * 1024
_MAX_HEADERS = 100
_RETRY_STATUS = frozenset({404, 408, 425, 429, 500, 502, 503, 504})
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_REQUEST_TARGET = re.compile(r"/[\x21-\x7e]*")


class FileServerError(FlowbridgeError):
    """An upload or download that failed.  ``retriable`` says whether trying again may help;
    ``correlation_id`` is the envelope's when the failure happened while receiving one."""

    def __init__(
        self,
        reason: str,
        *,
        url: str = "",
        retriable: bool = False,
        correlation_id: str | None = None,
    ) -> None:
        self.reason = reason
        self.url = url
        self.retriable = retriable
        self.correlation_id = correlation_id
        tag = f" (correlation_id {correlation_id})" if correlation_id else ""
        super().__init__(f"{reason}{tag}")


class RefusedURLError(FileServerError):
    """A download URL outside every configured file server."""


# ---- a minimal HTTP/1.1 client ---------------------------------------------------------


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class _TooLargeError(Exception):
    pass


def _host_header(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return shown if port == default else f"{shown}:{port}"


def _target(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FileServerError(f"not an http(s) URL: {url!r}", url=url)
    if parts.hostname is None:
        raise FileServerError(f"URL without host: {url!r}", url=url)
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if not _REQUEST_TARGET.fullmatch(path):
        # Spaces, control or non-ASCII characters would corrupt the request line.
        raise FileServerError(f"URL path is not percent-encoded: {url!r}", url=url)
    return scheme, parts.hostname, port, path


async def _read_headers(reader: asyncio.StreamReader) -> list[bytes]:
    lines: list[bytes] = []
    total = 0
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        total += len(line)
        if total > _MAX_HEADER_BYTES or len(lines) > _MAX_HEADERS:
            raise ValueError("header section too large")
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line.rstrip(b"\r\n"))


def _status(line: bytes) -> int:
    fields = line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
        raise ValueError(f"malformed status line {line[:80]!r}")
    return int(fields[1])


def _parse_header_lines(lines: Sequence[bytes]) -> list[tuple[str, str]]:
    out = []
    for raw in lines:
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"malformed header line {raw[:80]!r}")
        out.append((name.strip(), value.strip()))
    return out


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], max_size: int
) -> bytes:
    lower = {k.lower(): v for k, v in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                await _read_headers(reader)  # trailers
                return b"".join(parts)
            total += size
            if total > max_size:
                raise _TooLargeError(total)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = lower.get("content-length")
    if length is not None:
        n = int(length)
        if n < 0:
            raise ValueError("negative Content-Length")
        if n > max_size:
            raise _TooLargeError(n)
        return await reader.readexactly(n)
    data = await reader.read(max_size + 1)
    while len(data) <= max_size:
        more = await reader.read(max_size + 1 - len(data))
        if not more:
            break
        data += more
    if len(data) > max_size:
        raise _TooLargeError(len(data))
    return data


async def http_request(
    method: str,
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    max_size: int = DEFAULT_MAX_SIZE,
    timeout: float = 30.0,  # noqa: ASYNC109 - one deadline for connect, send and receive
) -> Response:
    """One HTTP/1.1 request on its own connection.  Raises ``FileServerError`` (retriable for
    connection failures, timeouts and truncated responses) or returns any status."""
    scheme, host, port, path = _target(url)
    ctx = ssl.create_default_context() if scheme == "https" else None
    head = [f"{method} {path} HTTP/1.1", f"Host: {_host_header(scheme, host, port)}"]
    head += ["Connection: close", "User-Agent: flowbridge", "Accept-Encoding: identity"]
    if body or method in ("POST", "PUT"):
        head.append(f"Content-Length: {len(body)}")
    head += [f"{k}: {v}" for k, v in headers]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
            writer.write(request)
            if body:
                writer.write(body)
            await writer.drain()
            status = _status(await reader.readline())
            response_headers = _parse_header_lines(await _read_headers(reader))
            no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            data = b"" if no_body else await _read_body(reader, response_headers, max_size)
            return Response(status, response_headers, data)
    except _TooLargeError as exc:
        raise FileServerError(
            f"{method} {_redact(url)}: response larger than the {max_size} byte cap ({exc})",
            url=url,
        ) from None
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        reason = str(exc) or type(exc).__name__
        raise FileServerError(
            f"{method} {_redact(url)}: {reason}", url=url, retriable=True
        ) from exc
    except ValueError as exc:
        raise FileServerError(f"{method} {_redact(url)}: bad response: {exc}", url=url) from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _redact(url: str) -> str:
    """A URL for messages: no userinfo and no query (presigned URLs carry signatures)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}"


# ---- handler interface -----------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


@dataclass(frozen=True, slots=True)
class Retry:
    """Download retries: ``retries`` more attempts after the first, waiting ``initial``
    seconds doubled each time up to ``maximum``."""

    retries: int = 5
    initial: float = 0.1
    maximum: float = 5.0


class FileServer(abc.ABC):
    """Where link payloads live.  ``base_url`` bounds what ``download`` may fetch."""

    def __init__(
        self,
        base_url: str,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        timeout: float = 30.0,
        retry: Retry = Retry(),  # frozen: one default shared safely
    ) -> None:
        scheme = urlsplit(base_url).scheme.lower()
        if scheme not in ("http", "https"):
            raise FileServerError(f"file server URL must be http(s): {base_url!r}", url=base_url)
        self.base_url = base_url.rstrip("/")
        self.max_size = max_size
        self.timeout = timeout
        self.retry = retry

    @abc.abstractmethod
    async def upload(self, data: bytes, name: str) -> str:
        """Store ``data`` under a file name like ``name``; the URL a receiver downloads."""

    def allows(self, url: str) -> bool:
        """True when ``url`` is on this server: same scheme, host and port, under the base
        path, without userinfo."""
        parts = urlsplit(url)
        if "@" in parts.netloc or _origin(url) != _origin(self.base_url):
            return False
        base_path = urlsplit(self.base_url).path.rstrip("/")
        path = unquote(parts.path)
        return ".." not in path.split("/") and (path + "/").startswith(base_path + "/")

    def check_url(self, url: str) -> None:
        if not self.allows(url):
            raise RefusedURLError(
                f"refusing to download {_redact(url)}: not on file server {self.base_url}",
                url=url,
            )

    def download_headers(self, url: str) -> list[tuple[str, str]]:
        """Headers a download of ``url`` needs (credentials, for instance)."""
        return []

    async def download(self, url: str, *, max_size: int | None = None) -> bytes:
        """The bytes at ``url``, at most ``max_size`` (default: the handler's cap), retrying
        transient failures as ``retry`` says.  Raises ``RefusedURLError`` for a URL off this
        server and ``FileServerError`` otherwise."""
        self.check_url(url)
        cap = self.max_size if max_size is None else min(max_size, self.max_size)
        delay = self.retry.initial
        attempt = 0
        while True:
            error: FileServerError
            try:
                resp = await http_request(
                    "GET",
                    url,
                    headers=self.download_headers(url),
                    max_size=cap,
                    timeout=self.timeout,
                )
            except FileServerError as exc:
                error = exc
            else:
                if resp.status == 200:
                    return resp.body
                error = FileServerError(
                    f"GET {_redact(url)}: HTTP {resp.status}",
                    url=url,
                    retriable=resp.status in _RETRY_STATUS,
                )
            if not error.retriable or attempt >= self.retry.retries:
                if attempt:
                    error.reason += f" (after {attempt + 1} attempts)"
                    error.args = (error.reason,)
                raise error
            log.debug("download of %s failed (%s); retry in %.2fs", _redact(url), error, delay)
            attempt += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry.maximum)


def safe_name(name: str) -> str:
    """``name`` reduced to characters every store and URL keeps as they are."""
    cleaned = _SAFE_NAME.sub("_", name).strip(".") or "payload"
    return cleaned[:200]


def _json_body(resp: Response, what: str, url: str) -> dict[str, Any]:
    try:
        obj = json.loads(resp.body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise FileServerError(f"{what}: expected a JSON object from {_redact(url)}", url=url)
    return obj


# ---- Plik ------------------------------------------------------------------------------


class PlikClient(FileServer):
    """Plik's HTTP API: ``POST /upload`` opens an upload, ``POST /file/{id}`` (multipart part
    ``file``, header ``X-UploadToken``) adds the file, ``GET /file/{id}/{fileId}/{name}``
    downloads it.  ``token`` is a Plik user token (``X-PlikToken``) for servers that need
    authentication."""

    def __init__(self, base_url: str, *, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.token = token

    def _auth(self) -> list[tuple[str, str]]:
        return [("X-PlikToken", self.token)] if self.token else []

    async def upload(self, data: bytes, name: str) -> str:
        if len(data) > self.max_size:
            raise FileServerError(f"upload of {len(data)} bytes exceeds the {self.max_size} cap")
        fname = safe_name(name)
        url = f"{self.base_url}/upload"
        resp = await http_request(
            "POST",
            url,
            headers=[("Content-Type", "application/json"), *self._auth()],
            body=b"{}",
            max_size=_MAX_HEADER_BYTES,
            timeout=self.timeout,
        )
        if resp.status != 200:
            raise FileServerError(f"POST {url}: HTTP {resp.status} {resp.body[:200]!r}", url=url)
        upload = _json_body(resp, "create upload", url)
        upload_id, upload_token = upload.get("id"), upload.get("uploadToken")
        if not isinstance(upload_id, str) or not isinstance(upload_token, str):
            raise FileServerError(f"POST {url}: no id/uploadToken in the answer", url=url)
        boundary = "flowbridge-" + secrets.token_hex(16)
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{fname}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        file_url = f"{self.base_url}/file/{quote(upload_id, safe='')}"
        resp = await http_request(
            "POST",
            file_url,
            headers=[
                ("Content-Type", f"multipart/form-data; boundary={boundary}"),
                ("X-UploadToken", upload_token),
                *self._auth(),
            ],
            body=body,
            max_size=_MAX_HEADER_BYTES,
            timeout=self.timeout,
        )
        if resp.status != 200:
            raise FileServerError(
                f"POST {file_url}: HTTP {resp.status} {resp.body[:200]!r}", url=file_url
            )
        info = _json_body(resp, "upload file", file_url)
        file_id = info.get("id")
        if not isinstance(file_id, str):
            raise FileServerError(f"POST {file_url}: no file id in the answer", url=file_url)
        stored = info.get("fileName")
        stored_name = stored if isinstance(stored, str) and stored else fname
        return (
            f"{self.base_url}/file/{quote(upload_id, safe='')}/{quote(file_id, safe='')}/"
            f"{quote(stored_name, safe='')}"
        )

    def download_headers(self, url: str) -> list[tuple[str, str]]:
        return self._auth()


# ---- S3 --------------------------------------------------------------------------------


def _uri_encode(text: str, *, slash: bool) -> str:
    return quote(text, safe="-_.~/" if slash else "-_.~")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None

    @classmethod
    def from_env(cls) -> Credentials | None:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            return None
        return cls(key, secret, os.environ.get("AWS_SESSION_TOKEN") or None)


def sigv4(
    method: str,
    url: str,
    *,
    creds: Credentials,
    region: str,
    now: dt.datetime,
    payload_hash: str = "UNSIGNED-PAYLOAD",
    headers: Mapping[str, str] | None = None,
    presign_expires: int | None = None,
    service: str = "s3",
) -> tuple[str, list[tuple[str, str]]]:
    """AWS Signature Version 4 for one request.  Returns the URL to use (with the signature
    in the query when ``presign_expires`` is set) and the headers to send (with
    ``Authorization`` otherwise).  The URL's path must already be URI-encoded."""
    parts = urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{now:%Y%m%d}/{region}/{service}/aws4_request"
    scheme = parts.scheme.lower()
    default_port = 443 if scheme == "https" else 80
    host = _host_header(scheme, parts.hostname or "", parts.port or default_port)
    send = {"host": host, **{k.lower(): v for k, v in (headers or {}).items()}}
    query = [
        (unquote(k), unquote(v))
        for k, _, v in (p.partition("=") for p in parts.query.split("&") if p)
    ]
    if presign_expires is not None:
        query += [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", f"{creds.access_key}/{scope}"),
            ("X-Amz-Date", amz_date),
            ("X-Amz-Expires", str(presign_expires)),
        ]
        if creds.session_token:
            query.append(("X-Amz-Security-Token", creds.session_token))
    else:
        send["x-amz-date"] = amz_date
        send["x-amz-content-sha256"] = payload_hash
        if creds.session_token:
            send["x-amz-security-token"] = creds.session_token
    signed = sorted(send)
    signed_names = ";".join(signed)
    if presign_expires is not None:
        query.append(("X-Amz-SignedHeaders", signed_names))
    canonical_query = "&".join(
        f"{_uri_encode(k, slash=False)}={_uri_encode(v, slash=False)}" for k, v in sorted(query)
    )
    canonical_headers = "".join(f"{k}:{' '.join(send[k].split())}\n" for k in signed)
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            canonical_query,
            canonical_headers,
            signed_names,
            payload_hash,
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + creds.secret_key).encode(), f"{now:%Y%m%d}")
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    base = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
    if presign_expires is not None:
        final_query = canonical_query + f"&X-Amz-Signature={signature}"
        return f"{base}?{final_query}", []
    out_headers = [(k, v) for k, v in send.items() if k != "host"]
    out_headers.append(
        (
            "Authorization",
            f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature}",
        )
    )
    return url, out_headers


class S3FileServer(FileServer):
    """An S3-compatible bucket, addressed path style (``{endpoint}/{bucket}/{key}``).

    ``upload`` PUTs the object signed with SigV4 and returns a presigned GET URL valid for
    ``link_expires`` seconds, so any receiver (of any language) downloads it without
    credentials; downloads are refused outside ``{endpoint}/{bucket}/``.
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        credentials: Credentials | None = None,
        region: str | None = None,
        prefix: str = "",
        link_expires: int = 7 * 24 * 3600,
        **kwargs: Any,
    ) -> None:
        super().__init__(f"{endpoint.rstrip('/')}/{quote(bucket, safe='')}", **kwargs)
        creds = credentials or Credentials.from_env()
        if creds is None:
            raise FileServerError(
                "S3 file server needs credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
        if not 1 <= link_expires <= 7 * 24 * 3600:
            raise FileServerError("link_expires must be 1 s to 7 days (the SigV4 limit)")
        self.creds = creds
        self.region = region or os.environ.get("AWS_REGION") or "us-east-1"
        self.prefix = prefix
        self.link_expires = link_expires

    def object_url(self, key: str) -> str:
        return f"{self.base_url}/{_uri_encode(key, slash=True)}"

    async def upload(self, data: bytes, name: str) -> str:
        if len(data) > self.max_size:
            raise FileServerError(f"upload of {len(data)} bytes exceeds the {self.max_size} cap")
        key = f"{self.prefix}{uuid.uuid4().hex}/{safe_name(name)}"
        url = self.object_url(key)
        now = dt.datetime.now(dt.UTC)
        _, headers = sigv4(
            "PUT",
            url,
            creds=self.creds,
            region=self.region,
            now=now,
            payload_hash=hashlib.sha256(data).hexdigest(),
            headers={"content-type": "application/octet-stream"},
        )
        resp = await http_request(
            "PUT", url, headers=headers, body=data, max_size=_MAX_HEADER_BYTES, timeout=self.timeout
        )
        if resp.status != 200:
            raise FileServerError(
                f"PUT {_redact(url)}: HTTP {resp.status} {resp.body[:300]!r}", url=url
            )
        link, _ = sigv4(
            "GET",
            url,
            creds=self.creds,
            region=self.region,
            now=now,
            presign_expires=self.link_expires,
        )
        return link


def from_url(url: str | None = None, **kwargs: Any) -> FileServer:
    """The handler for a file server URL (default ``FILESERVER_URL``, else
    http://localhost:8080): ``http(s)://...`` is a Plik API, ``s3+http(s)://HOST/BUCKET[/PREFIX]``
    an S3-compatible endpoint with credentials from the AWS environment variables."""
    url = url or os.environ.get("FILESERVER_URL") or DEFAULT_FILESERVER_URL
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return PlikClient(url, **kwargs)
    if scheme in ("s3+http", "s3+https"):
        bucket, _, prefix = parts.path.lstrip("/").partition("/")
        if not bucket:
            raise FileServerError(f"S3 file server URL needs a bucket: {url!r}", url=url)
        endpoint = f"{scheme[3:]}://{parts.netloc}"
        return S3FileServer(
            endpoint, bucket, prefix=prefix.rstrip("/") + "/" if prefix else "", **kwargs
        )
    raise FileServerError(f"unsupported file server URL {url!r} (http, https, s3+http, s3+https)")


# ---- a small Plik-API-compatible store -------------------------------------------------


@dataclass(slots=True)
class _File:
    id: str
    name: str
    data: bytes
    md5: str
    expires: float


@dataclass(slots=True)
class _Upload:
    token: str
    expires: float
    files: dict[str, _File]


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


class PlikStore:
    """A Plik-API-compatible file store in memory, for development and tests.

    Everything is bounded: ``max_file_size`` per file, ``max_total`` bytes and ``max_files``
    files held, ``max_connections`` served at once, ``ttl`` seconds per file.  A full store
    answers 507 (the uploader sees the failure; nothing held is evicted early)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_file_size: int = 64 * 1024 * 1024,
        max_total: int = 512 * 1024 * 1024,
        max_files: int = 10_000,
        ttl: float = 3600.0,
        max_connections: int = 64,
        request_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.max_file_size = max_file_size
        self.max_total = max_total
        self.max_files = max_files
        self.ttl = ttl
        self.request_timeout = request_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._uploads: dict[str, _Upload] = {}
        self._total = 0
        self._count = 0
        self._server: asyncio.Server | None = None
        self.served = 0

    @property
    def url(self) -> str:
        return f"http://{_host_header('http', self.host, self.port)}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_MAX_HEADER_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    # -- bookkeeping --

    def _purge(self, now: float) -> None:
        for uid in list(self._uploads):
            up = self._uploads[uid]
            for fid in [f for f, rec in up.files.items() if rec.expires <= now]:
                rec = up.files.pop(fid)
                self._total -= len(rec.data)
                self._count -= 1
            if not up.files and up.expires <= now:
                del self._uploads[uid]

    # -- HTTP --

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._slots:
            try:
                async with asyncio.timeout(self.request_timeout):
                    status, ctype, body = await self._respond(reader)
            except _HttpError as exc:
                status, ctype = exc.status, "application/json"
                body = json.dumps({"message": exc.message}).encode()
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            except Exception:
                log.exception("file store: request failed")
                status, ctype, body = 500, "application/json", b'{"message":"internal error"}'
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            try:
                writer.write(head.encode())
                writer.write(body)
                await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            request_line = await reader.readline()
            lines = await _read_headers(reader)
            headers = _parse_header_lines(lines)
        except ValueError as exc:
            raise _HttpError(431, str(exc)) from None
        fields = request_line.decode("latin-1").split()
        if len(fields) != 3:
            raise _HttpError(400, "malformed request line")
        method, target, _ = fields
        lower = {k.lower(): v for k, v in headers}
        path = urlsplit(target).path
        segments = [unquote(s) for s in path.strip("/").split("/")]
        now = time.monotonic()
        self._purge(now)
        if method == "POST" and segments == ["upload"]:
            await self._body(reader, lower, _MAX_HEADER_BYTES)
            return self._create_upload(now)
        if method == "POST" and len(segments) == 2 and segments[0] == "file":
            up = self._uploads.get(segments[1])
            if up is None:
                raise _HttpError(404, "upload not found")
            if not hmac.compare_digest(lower.get("x-uploadtoken", ""), up.token):
                raise _HttpError(403, "invalid upload token")
            body = await self._body(reader, lower, self.max_file_size + 64 * 1024)
            name, data = _multipart_file(lower.get("content-type", ""), body)
            return self._store(up, name, data, now)
        if method in ("GET", "HEAD") and len(segments) == 4 and segments[0] == "file":
            up = self._uploads.get(segments[1])
            rec = up.files.get(segments[2]) if up is not None else None
            if rec is None or rec.name != segments[3]:
                raise _HttpError(404, "file not found")
            self.served += 1
            return 200, "application/octet-stream", rec.data
        if segments and segments[0] in ("upload", "file"):
            raise _HttpError(405, f"{method} not allowed here")
        raise _HttpError(404, "not found")

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str], cap: int) -> bytes:
        if "transfer-encoding" in headers:
            raise _HttpError(411, "send a Content-Length")
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            raise _HttpError(400, "bad Content-Length") from None
        if n < 0:
            raise _HttpError(400, "bad Content-Length")
        if n > cap:
            raise _HttpError(413, f"body of {n} bytes over the {cap} byte limit")
        return await reader.readexactly(n)

    def _create_upload(self, now: float) -> tuple[int, str, bytes]:
        if len(self._uploads) >= self.max_files:
            raise _HttpError(507, "too many uploads held")
        uid = secrets.token_urlsafe(12)
        token = secrets.token_urlsafe(24)
        self._uploads[uid] = _Upload(token, now + self.ttl, {})
        return 200, "application/json", json.dumps({"id": uid, "uploadToken": token}).encode()

    def _store(self, up: _Upload, name: str, data: bytes, now: float) -> tuple[int, str, bytes]:
        if len(data) > self.max_file_size:
            raise _HttpError(413, f"file over the {self.max_file_size} byte limit")
        if self._total + len(data) > self.max_total or self._count >= self.max_files:
            raise _HttpError(507, "store full")
        fid = secrets.token_urlsafe(12)
        fname = safe_name(name)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        up.files[fid] = _File(fid, fname, data, md5, now + self.ttl)
        self._total += len(data)
        self._count += 1
        info = {"id": fid, "fileName": fname, "fileSize": len(data), "fileMd5": md5}
        info["status"] = "uploaded"
        return 200, "application/json", json.dumps(info).encode()


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_DISPOSITION_NAME = re.compile(r'\bname="([^"]*)"', re.IGNORECASE)
_DISPOSITION_FILE = re.compile(r'\bfilename="([^"]*)"', re.IGNORECASE)


def _multipart_file(content_type: str, body: bytes) -> tuple[str, bytes]:
    """The file name and bytes of the part named ``file``."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise _HttpError(415, "expected multipart/form-data")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise _HttpError(400, "multipart without boundary")
    delimiter = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    pos = body.find(delimiter)
    while pos >= 0:
        start = pos + len(delimiter)
        if body[start : start + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", start)
        nxt = body.find(b"\r\n" + delimiter, start)
        if head_end < 0 or nxt < 0 or head_end > nxt:
            break
        head = body[start:head_end].decode("utf-8", "replace")
        name = _DISPOSITION_NAME.search(head)
        if name is not None and name.group(1) == "file":
            fname = _DISPOSITION_FILE.search(head)
            return (fname.group(1) if fname else "file"), body[head_end + 4 : nxt]
        pos = nxt + 2
    raise _HttpError(400, "no multipart part named 'file'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowbridge.fileserver",
        description="Serve a Plik-API-compatible file store in memory (development only).",
    )
    parser.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    parser.add_argument("--max-file-size", type=int, default=64 * 1024 * 1024, metavar="BYTES")
    parser.add_argument("--max-total", type=int, default=512 * 1024 * 1024, metavar="BYTES")
    parser.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    store = PlikStore(
        host or "127.0.0.1",
        int(port),
        max_file_size=args.max_file_size,
        max_total=args.max_total,
        ttl=args.ttl,
    )

    async def serve() -> None:
        await store.start()
        print(f"file store on {store.url} (FILESERVER_URL={store.url})", file=sys.stderr)
        await store.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
