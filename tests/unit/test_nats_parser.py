"""The NATS adapter's protocol parser: every frame kind, split at every byte boundary."""

from __future__ import annotations

import json
import random
from typing import Any

import nats.errors
import pytest

from flowbridge.adapters.nats import _Parser

INFO = {"server_id": "x", "max_payload": 1048576}


class FakeClient:
    """What the parser calls on nats-py's client, recorded in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.fb_handlers = {b"1": self.mine}
        self.fb_lines: dict[bytes, Any] = {}
        self.errors: list[BaseException] = []
        self.fb_errors = self.errors.append

    def mine(self, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        if data == b"boom":
            raise RuntimeError("handler failed")
        self.events.append(("mine", subject, reply, data, hdr))

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: Any
    ) -> None:
        self.events.append(("other", sid, subject, reply, data, hdr))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_err(self, msg: str) -> None:
        self.events.append(("err", msg))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))


HDR = b"NATS/1.0\r\nA: 1\r\n\r\n"
STREAM = (
    b"INFO " + json.dumps(INFO).encode() + b"\r\n"
    b"+OK\r\n"
    b"MSG a.b 1 5\r\nhello\r\n"
    b"MSG a.c 1 _INBOX.x 0\r\n\r\n"
    b"HMSG h.x 1 %d %d\r\n%sbody\r\n"
    % (len(HDR), len(HDR) + 4, HDR)
    + b"HMSG h.y 1 reply.to %d %d\r\n%s\r\n" % (len(HDR), len(HDR), HDR)
    + b"MSG with\r\ncrlf 1 4\r\n\r\n\r\n\r\n"  # the payload holds CRLFs
    b"MSG other 7 2\r\nhi\r\n"
    b"PING\r\nPONG\r\n"
    b"MSG a.tab\t1\t3\r\nxyz\r\n"
    b"-ERR 'Stale Connection'\r\n"
)
EXPECTED = [
    ("info", INFO),
    ("mine", b"a.b", b"", b"hello", None),
    ("mine", b"a.c", b"_INBOX.x", b"", None),
    ("mine", b"h.x", b"", b"body", HDR),
    ("mine", b"h.y", b"reply.to", b"", HDR),
]


async def feed(chunks: list[bytes]) -> FakeClient:
    nc = FakeClient()
    parser = _Parser(nc)  # type: ignore[arg-type]
    for chunk in chunks:
        await parser.parse(chunk)
    return nc


async def test_whole_stream() -> None:
    # "MSG with\r\ncrlf ..." is not a valid frame: the parser must refuse it, not guess.
    nc = FakeClient()
    parser = _Parser(nc)  # type: ignore[arg-type]
    with pytest.raises(nats.errors.ProtocolError):
        await parser.parse(STREAM)
    assert nc.events == EXPECTED


GOOD = STREAM.replace(b"MSG with\r\ncrlf 1 4\r\n\r\n\r\n\r\n", b"MSG crlf 1 4\r\n\r\n\r\n\r\n")
GOOD_EXPECTED = [
    *EXPECTED,
    ("mine", b"crlf", b"", b"\r\n\r\n", None),
    ("other", 7, b"other", b"", b"hi", None),
    ("ping",),
    ("pong",),
    ("mine", b"a.tab", b"", b"xyz", None),
    ("err", "'stale connection'"),
]


async def test_every_split_point() -> None:
    for cut in range(1, len(GOOD)):
        nc = await feed([GOOD[:cut], GOOD[cut:]])
        assert nc.events == GOOD_EXPECTED, cut


async def test_byte_by_byte() -> None:
    nc = await feed([GOOD[i : i + 1] for i in range(len(GOOD))])
    assert nc.events == GOOD_EXPECTED


async def test_large_payload_in_many_chunks() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    frame = b"MSG big 1 %d\r\n%s\r\nMSG after 1 1\r\nz\r\n" % (len(body), body)
    chunks = [frame[i : i + 32768] for i in range(0, len(frame), 32768)]
    nc = await feed(chunks)
    assert nc.events == [("mine", b"big", b"", body, None), ("mine", b"after", b"", b"z", None)]


async def test_frames_of_every_size_cut_at_random_chunk_ends() -> None:
    # As a socket delivers a stream: frames of 0 B to 70 KB, cut anywhere, in chunks of any
    # size; every payload arrives whole, as bytes, in order.
    rng = random.Random(5)
    want: list[tuple[Any, ...]] = []
    stream = bytearray()
    for i in range(400):
        body = rng.randbytes(rng.choice((0, 1, 100, 4096, 10_240, 40_000, 70_000)))
        if i % 3:
            stream += b"MSG s.%d 1 %d\r\n%s\r\n" % (i, len(body), body)
            want.append(("mine", b"s.%d" % i, b"", body, None))
        else:
            stream += b"HMSG h 1 %d %d\r\n%s%s\r\n" % (len(HDR), len(HDR) + len(body), HDR, body)
            want.append(("mine", b"h", b"", body, HDR))
    data = bytes(stream)
    for _ in range(5):
        chunks, at = [], 0
        while at < len(data):
            n = rng.choice((1, 7, 512, 32_768, 65_536, 200_000))
            chunks.append(data[at : at + n])
            at += n
        nc = await feed(chunks)
        assert nc.events == want
        assert all(type(e[3]) is bytes for e in nc.events)


async def test_handler_error_is_reported_and_parsing_goes_on() -> None:
    nc = await feed([b"MSG a 1 4\r\nboom\r\nMSG b 1 2\r\nok\r\n"])
    assert [str(e) for e in nc.errors] == ["handler failed"]
    assert nc.events == [("mine", b"b", b"", b"ok", None)]


@pytest.mark.parametrize(
    "bad", [b"MSG a x 3\r\nabc\r\n", b"MSG a 1\r\n", b"BOGUS\r\n", b"HMSG a 1 z 3\r\nabc\r\n"]
)
async def test_malformed_frames_are_protocol_errors(bad: bytes) -> None:
    with pytest.raises(nats.errors.ProtocolError):
        await feed([bad])


async def test_reset_drops_a_partial_frame() -> None:
    nc = FakeClient()
    parser = _Parser(nc)  # type: ignore[arg-type]
    await parser.parse(b"MSG a 1 10\r\nabc")
    parser.reset()  # a reconnect: the new connection starts with a fresh stream
    await parser.parse(b"MSG b 1 1\r\nz\r\n")
    assert nc.events == [("mine", b"b", b"", b"z", None)]


async def test_repeated_lines_follow_handler_changes() -> None:
    """Control lines are parsed once and remembered; the adapter forgets them whenever its
    handlers change, and the parser then goes by the handlers of the moment."""
    nc = FakeClient()
    parser = _Parser(nc)  # type: ignore[arg-type]
    frame = b"MSG a.b 1 2\r\nhi\r\n"
    await parser.parse(frame * 3 + b"MSG a.b 1 3\r\nbye\r\n")
    assert len(nc.fb_lines) == 2
    del nc.fb_handlers[b"1"]  # as on unsubscribe
    nc.fb_lines.clear()
    await parser.parse(frame)
    assert nc.events == [
        *[("mine", b"a.b", b"", b"hi", None)] * 3,
        ("mine", b"a.b", b"", b"bye", None),
        ("other", 1, b"a.b", b"", b"hi", None),
    ]


async def test_runs_of_one_line_split_anywhere() -> None:
    """Consecutive frames repeating a control line are split by it in place; a line that
    differs after the repeated one (size, subject, a reply, headers) or a frame cut anywhere
    still decodes as the general path does."""
    hdr = b"NATS/1.0\r\nA: 1\r\n\r\n"
    frames = [
        b"MSG s.1 1 3\r\nabc\r\n",
        b"MSG s.1 1 3\r\ndef\r\n",
        b"MSG s.1 1 3\r\nghi\r\n",
        b"MSG s.1 1 4\r\njklm\r\n",
        b"MSG s.1 1 3\r\nnop\r\n",
        b"MSG s.1 1 r.x 3\r\nqrs\r\n",
        b"MSG s.1 1 r.x 3\r\ntuv\r\n",
        b"MSG s.1 1 3\r\nwxy\r\n",
        b"HMSG s.2 1 %d %d\r\n%sz\r\n" % (len(hdr), len(hdr) + 1, hdr),
        b"HMSG s.2 1 %d %d\r\n%sy\r\n" % (len(hdr), len(hdr) + 1, hdr),
        b"MSG s.1 1 3\r\nMSG\r\n",
        b"PING\r\n",
        b"MSG s.1 1 3\r\nend\r\n",
    ]
    expected = []
    for f in frames:
        nc = FakeClient()
        await _Parser(nc).parse(f)  # type: ignore[arg-type]
        expected += nc.events
    stream = b"".join(frames)
    assert (await feed([stream])).events == expected
    for cut in range(1, len(stream)):
        assert (await feed([stream[:cut], stream[cut:]])).events == expected, cut
