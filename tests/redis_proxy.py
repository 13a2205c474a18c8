"""A small TCP proxy in front of a real redis-server that loses replies on demand: the
command reaches Redis and is applied, only its answer never comes back (what a network that
drops a packet, or a Redis that dies between applying and answering, does)."""

from __future__ import annotations

import asyncio
import contextlib


class ReplyDropper:
    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._marker = b""
        self._armed = 0
        self.dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def drop_reply_to(self, marker: bytes, count: int = 1) -> None:
        """Lose the replies to the next ``count`` commands whose bytes hold ``marker``."""
        self._marker, self._armed = marker, count

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        lose_next = [False]

        async def upstream() -> None:  # client -> redis
            while data := await reader.read(65536):
                if self._armed and self._marker in data:
                    self._armed -= 1
                    lose_next[0] = True
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:  # redis -> client
            while data := await up_reader.read(65536):
                if lose_next[0]:
                    lose_next[0] = False
                    self.dropped += 1
                    continue
                writer.write(data)
            writer.close()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks)
        writer.close()
        up_writer.close()
