"""A TCP relay between clients and one broker, for tests that change what the link does
(slow it, stop it, damage it); subclasses override the two hooks."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Relays every connection to ``upstream``; listens on ``port`` (0: any free port)."""

    def __init__(self, upstream: tuple[str, int], port: int = 0) -> None:
        self.upstream = upstream
        self.listen = port
        self.server: asyncio.Server | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen)
        return self.port

    async def before_read(self, *, to_broker: bool) -> None:
        """Called before each read in one direction: waiting here stops reading it."""

    async def relay(self, data: bytes, *, to_broker: bool) -> bytes:
        """What of ``data`` goes on (called once per chunk read)."""
        return data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]
        self.tasks += [
            asyncio.ensure_future(self._pump(reader, up_writer, to_broker=True)),
            asyncio.ensure_future(self._pump(up_reader, writer, to_broker=False)),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_broker: bool
    ) -> None:
        try:
            while True:
                await self.before_read(to_broker=to_broker)
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(await self.relay(data, to_broker=to_broker))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if self.server is not None:
            await self.server.wait_closed()
