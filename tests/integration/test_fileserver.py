"""File servers behind link payloads: the built-in Plik-API store, the Plik client, the S3
handler against a real local S3 server (moto), download retries and the SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import itertools
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3  # type: ignore[import-untyped]
import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials as BotoCredentials  # type: ignore[import-untyped]
from moto.server import ThreadedMotoServer

from flowbridge.adapters.base import Message
from flowbridge.envelope import Envelope, IntegrityError, Payload
from flowbridge.fileserver import (
    Credentials,
    FileServerError,
    PlikClient,
    PlikStore,
    RefusedURLError,
    Retry,
    S3FileServer,
    from_url,
    http_request,
    sigv4,
)
from flowbridge.smart import build_envelope, listen, smartreceive, smartsend
from tests.support.brokers import free_port

FAST = Retry(retries=5, initial=0.01, maximum=0.04)
CREDS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
FIVE_MB = 5 * 1024 * 1024

Handler = Callable[[asyncio.StreamReader], Awaitable[bytes]]


class TinyServer:
    """An HTTP server whose answers the test scripts; counts connections."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.hits = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hits += 1
        try:
            writer.write(await self.answer(reader))
            await writer.drain()
        finally:
            writer.close()

    async def __aenter__(self) -> TinyServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _skip_request(reader: asyncio.StreamReader) -> None:
    while (await reader.readline()) not in (b"\r\n", b""):
        pass


def _http(status: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    return head.encode() + body


def _urlopen(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body


def _link_envelope(url: str, raw: bytes) -> bytes:
    return Envelope(
        send_to="t", sender_name="s", payloads=[Payload.link("x", "binary", url, raw)]
    ).to_json()


@asynccontextmanager
async def store(**kwargs: Any) -> AsyncIterator[PlikStore]:
    async with PlikStore(**kwargs) as s:
        yield s


# ---- built-in store and Plik client ------------------------------------------------------


async def test_store_and_plik_client_round_trip_5mb() -> None:
    data = os.urandom(FIVE_MB)
    async with store() as s:
        client = PlikClient(s.url)
        t0 = time.perf_counter()
        url = await client.upload(data, "big image.png")
        t1 = time.perf_counter()
        assert urlsplit(url).path.startswith("/file/")
        assert url.endswith("/big_image.png")
        assert await client.download(url) == data
        t2 = time.perf_counter()
        # A plain HTTP client (what any peer uses) downloads the same URL.
        assert await asyncio.to_thread(_urlopen, url) == data
    print(f"5 MB upload {t1 - t0:.3f}s, download {t2 - t1:.3f}s")


async def test_store_speaks_the_plik_api() -> None:
    async with store() as s:
        resp = await http_request("POST", f"{s.url}/upload", body=b"{}")
        upload = json.loads(resp.body)
        assert resp.status == 200
        assert set(upload) >= {"id", "uploadToken"}
        body = (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
            b"Content-Type: text/plain\r\n\r\nhello\r\n--XyZ--\r\n"
        )
        ctype = ("Content-Type", "multipart/form-data; boundary=XyZ")
        bad = await http_request(
            "POST",
            f"{s.url}/file/{upload['id']}",
            headers=[ctype, ("X-UploadToken", "nope")],
            body=body,
        )
        assert bad.status == 403
        resp = await http_request(
            "POST",
            f"{s.url}/file/{upload['id']}",
            headers=[ctype, ("X-UploadToken", upload["uploadToken"])],
            body=body,
        )
        info = json.loads(resp.body)
        assert resp.status == 200
        assert (info["fileName"], info["fileSize"]) == ("a.txt", 5)
        assert info["fileMd5"] == hashlib.md5(b"hello").hexdigest()
        base = f"{s.url}/file/{upload['id']}/{info['id']}"
        assert (await http_request("GET", f"{base}/a.txt")).body == b"hello"
        assert (await http_request("GET", f"{base}/other.txt")).status == 404
        assert (await http_request("GET", f"{s.url}/file/nope/{info['id']}/a.txt")).status == 404
        assert (await http_request("DELETE", f"{base}/a.txt")).status == 405


async def test_store_is_bounded_and_says_so() -> None:
    async with store(max_file_size=1000, max_total=1500) as s:
        client = PlikClient(s.url, retry=FAST)
        with pytest.raises(FileServerError, match="HTTP 413"):
            await client.upload(b"x" * 1001, "big")
        await client.upload(b"x" * 1000, "one")
        with pytest.raises(FileServerError, match="HTTP 507"):
            await client.upload(b"x" * 600, "two")
        await client.upload(b"x" * 500, "fits")
    async with store(ttl=0.05, max_total=1000) as s:
        client = PlikClient(s.url, retry=FAST)
        url = await client.upload(b"x" * 1000, "one")
        await asyncio.sleep(0.1)
        await client.upload(b"y" * 1000, "two")  # the expired file made room
        with pytest.raises(FileServerError, match="HTTP 404"):
            await client.download(url)
    with pytest.raises(FileServerError, match="exceeds the 10 cap"):
        await PlikClient("http://127.0.0.1:1", max_size=10).upload(b"x" * 11, "n")


# ---- downloads: retries, caps, SSRF -------------------------------------------------------


async def test_download_retries_with_backoff_then_succeeds() -> None:
    calls: list[float] = []

    async def flaky(reader: asyncio.StreamReader) -> bytes:
        await _skip_request(reader)
        calls.append(time.monotonic())
        return _http("503 Busy") if len(calls) < 3 else _http("200 OK", b"payload")

    async with TinyServer(flaky) as srv:
        got = await PlikClient(srv.url).download(f"{srv.url}/file/a/b/c")
    assert got == b"payload"
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) == 3
    assert gaps[0] >= 0.09  # 100 ms, then doubled
    assert gaps[1] >= 0.19
    assert Retry() == Retry(retries=5, initial=0.1, maximum=5.0)


async def test_download_gives_up_after_five_retries_with_the_correlation_id() -> None:
    async def down(reader: asyncio.StreamReader) -> bytes:
        await _skip_request(reader)
        return _http("500 Broken")

    async with TinyServer(down) as srv:
        fs = PlikClient(srv.url, retry=FAST)
        body = _link_envelope(f"{srv.url}/file/a/b/blob", b"z" * 100)
        with pytest.raises(FileServerError) as info:
            await smartreceive(body, fileserver=fs)
    corr = json.loads(body)["correlation_id"]
    assert srv.hits == 6  # the first attempt and five retries
    assert info.value.correlation_id == corr
    assert "after 6 attempts" in str(info.value)
    assert corr in str(info.value)


async def test_hostile_urls_are_refused_without_a_request() -> None:
    async def record(reader: asyncio.StreamReader) -> bytes:
        await _skip_request(reader)
        return _http("200 OK", b"secret")

    async with TinyServer(record) as hostile, store() as s:
        fs = PlikClient(s.url)
        env = await build_envelope("t", [("x", b"a" * 64, "binary")], fileserver=fs, threshold=1)
        good = env.payloads[0].data
        path = urlsplit(good).path
        host_port = urlsplit(s.url).netloc
        for url in [
            f"{hostile.url}{path}",  # another port on the same host
            f"http://localhost:{s.port}{path}",  # another name for it: not configured
            f"http://{host_port}@127.0.0.1:{hostile.port}{path}",  # userinfo trick
            f"https://{host_port}{path}",  # another scheme
            f"http://{host_port}/file/../../admin",
            "http://169.254.169.254/latest/meta-data/",
        ]:
            obj = json.loads(env.to_json())
            obj["payloads"][0]["data"] = url
            with pytest.raises(RefusedURLError) as info:
                await smartreceive(json.dumps(obj).encode(), fileserver=fs)
            assert info.value.correlation_id == env.correlation_id
        assert hostile.hits == 0
        # The genuine link still works.
        items, _ = await smartreceive(env.to_json(), fileserver=fs)
        assert items[0][1] == b"a" * 64


async def test_urls_that_would_corrupt_the_request_are_refused() -> None:
    async with store() as s:
        fs = PlikClient(s.url)
        for path in ["/file/a b/c/d", "/file/\u00e9/c/d", "/file/a\x00/c/d"]:
            with pytest.raises(FileServerError, match="not percent-encoded"):
                await fs.download(s.url + path)
        assert s.served == 0


async def test_redirects_are_not_followed() -> None:
    async def record(reader: asyncio.StreamReader) -> bytes:
        await _skip_request(reader)
        return _http("200 OK", b"secret")

    async with TinyServer(record) as hostile:

        async def redirect(reader: asyncio.StreamReader) -> bytes:
            await _skip_request(reader)
            return _http("302 Found", extra=f"Location: {hostile.url}/x\r\n")

        async with TinyServer(redirect) as srv:
            with pytest.raises(FileServerError, match="HTTP 302"):
                await PlikClient(srv.url, retry=FAST).download(f"{srv.url}/file/a/b/c")
        assert hostile.hits == 0


@pytest.mark.parametrize("chunked", [False, True])
async def test_overlong_downloads_stop_at_the_declared_size(chunked: bool) -> None:
    big = b"q" * 100_000

    async def liar(reader: asyncio.StreamReader) -> bytes:
        await _skip_request(reader)
        if chunked:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            return head + b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n"
        return _http("200 OK", big)

    async with TinyServer(liar) as srv:
        fs = PlikClient(srv.url, retry=FAST)
        body = _link_envelope(f"{srv.url}/file/a/b/x", b"q" * 10)
        with pytest.raises(FileServerError, match="byte cap"):
            await smartreceive(body, fileserver=fs)
        assert srv.hits == 1  # not retried


async def test_a_link_with_a_changed_file_is_rejected() -> None:
    async with store() as s:
        fs = PlikClient(s.url)
        env = await build_envelope("t", [("x", b"A" * 1000, "binary")], fileserver=fs, threshold=1)
        other = await fs.upload(b"B" * 1000, "x")  # same size, different bytes
        obj = json.loads(env.to_json())
        obj["payloads"][0]["data"] = other
        with pytest.raises(IntegrityError, match=r"payloads\[0\]\.metadata\.sha256"):
            await smartreceive(json.dumps(obj).encode(), fileserver=fs)


async def test_payload_over_the_receivers_cap_is_not_downloaded() -> None:
    async with store() as s:
        fs = PlikClient(s.url)
        env = await build_envelope("t", [("x", b"A" * 5000, "binary")], fileserver=fs, threshold=1)
        with pytest.raises(FileServerError, match="over the 4096 byte cap"):
            await smartreceive(env.to_json(), fileserver=fs, max_size=4096)
        assert s.served == 0


# ---- S3 -----------------------------------------------------------------------------------


def test_sigv4_matches_botocore() -> None:
    boto = BotoCredentials(CREDS.access_key, CREDS.secret_key)
    url = "http://127.0.0.1:9000/bucket/ab%20c/big_image.png"
    req = AWSRequest(method="GET", url=url)
    S3SigV4QueryAuth(boto, "s3", "eu-west-1", expires=3600).add_auth(req)
    q = parse_qs(urlsplit(req.url).query)
    now = dt.datetime.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    mine, _ = sigv4("GET", url, creds=CREDS, region="eu-west-1", now=now, presign_expires=3600)
    assert parse_qs(urlsplit(mine).query) == q

    body = b"hello"
    req = AWSRequest(method="PUT", url=url, data=body, headers={"content-type": "text/plain"})
    req.context["payload_signing_enabled"] = True
    S3SigV4Auth(boto, "s3", "eu-west-1").add_auth(req)
    now = dt.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    _, headers = sigv4(
        "PUT",
        url,
        creds=CREDS,
        region="eu-west-1",
        now=now,
        payload_hash=hashlib.sha256(body).hexdigest(),
        headers={"content-type": "text/plain"},
    )
    assert dict(headers)["Authorization"] == req.headers["Authorization"]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _boto(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDS.access_key,
        aws_secret_access_key=CREDS.secret_key,
        region_name="us-east-1",
    )


@pytest.fixture
def bucket(s3_endpoint: str, unique: str) -> str:
    name = f"flowbridge-{unique}"
    _boto(s3_endpoint).create_bucket(Bucket=name)
    return name


async def test_s3_handler_against_a_real_s3_server(s3_endpoint: str, bucket: str) -> None:
    fs = S3FileServer(s3_endpoint, bucket, credentials=CREDS, prefix="links/")
    data = os.urandom(FIVE_MB)
    url = await fs.upload(data, "clip one.mp4")
    parts = urlsplit(url)
    assert parts.path.startswith(f"/{bucket}/links/")
    assert parts.path.endswith("/clip_one.mp4")
    assert "X-Amz-Signature=" in parts.query  # presigned: receivers need no credentials
    key = parts.path.removeprefix(f"/{bucket}/")
    native = await asyncio.to_thread(_boto(s3_endpoint).get_object, Bucket=bucket, Key=key)
    assert native["Body"].read() == data
    assert await fs.download(url) == data
    with pytest.raises(RefusedURLError):
        await fs.download(url.replace(f"/{bucket}/", "/other-bucket/"))


async def test_5mb_link_through_nats_with_the_s3_handler(
    s3_endpoint: str, bucket: str, nats_url: str, unique: str
) -> None:
    fs = S3FileServer(s3_endpoint, bucket, credentials=CREDS)
    data = os.urandom(FIVE_MB)
    subject = f"fb.smart.s3.{unique}"
    async with listen(nats_url, subject, fileserver=fs) as rx:
        sent = await smartsend(
            nats_url,
            subject,
            [("note", "big one", "text"), ("video", data, "video")],
            fileserver=fs,
        )
        items, env = await rx.receive(timeout=20)
    assert [p.transport for p in sent.payloads] == ["direct", "link"]
    assert env.msg_id == sent.msg_id
    assert items == [("note", "big one", "text"), ("video", data, "video")]


def test_from_url_picks_the_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILESERVER_URL", "http://files.example:8080")
    assert isinstance(from_url(), PlikClient)
    assert from_url().base_url == "http://files.example:8080"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    fs = from_url("s3+http://127.0.0.1:9000/bucket/some/prefix")
    assert isinstance(fs, S3FileServer)
    assert (fs.base_url, fs.prefix) == ("http://127.0.0.1:9000/bucket", "some/prefix/")
    with pytest.raises(FileServerError, match="unsupported file server URL"):
        from_url("ftp://x")


async def test_direct_and_message_forms_are_equivalent() -> None:
    env = await build_envelope("t", [("m", "hi", "text")], threshold=100)
    body = env.to_json()
    assert await smartreceive(body) == await smartreceive(Message("t", body))
    assert base64.b64decode(env.payloads[0].data) == b"hi"
