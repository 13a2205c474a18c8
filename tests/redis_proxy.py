"""A small TCP proxy in front of a real redis-server that loses or delays replies on demand:
the command reaches Redis and is applied, only its answer never comes back, or comes late
(what a network that drops a packet, a Redis that dies between applying and answering, or a
slow link does)."""

from __future__ import annotations

import asyncio
import contextlib
import time


class ReplyDropper:
    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._marker = b""
        self._armed = 0
        self._delay = 0.0  # 0: lose the reply; else hold it this long
        self._blackout_until = 0.0  # every reply lost until then (monotonic)
        self.dropped = 0
        self.delayed = 0
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

    def blackout(self, seconds: float) -> None:
        """Lose every reply, on every connection, for ``seconds`` (the commands still apply)."""
        self._blackout_until = max(self._blackout_until, time.monotonic() + seconds)

    def drop_reply_to(self, marker: bytes, count: int = 1) -> None:
        """Lose the replies to the next ``count`` commands whose bytes hold ``marker``."""
        self._marker, self._armed, self._delay = marker, count, 0.0

    def delay_reply_to(self, marker: bytes, seconds: float, count: int = 1) -> None:
        """Hold the replies to the next ``count`` commands holding ``marker`` ``seconds``."""
        self._marker, self._armed, self._delay = marker, count, seconds

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:  # Redis is down (restarting): this connection fails, as it would
            writer.close()
            return
        next_reply: list[float | None] = [None]  # what happens to it: 0 lost, > 0 held

        async def upstream() -> None:  # client -> redis
            while data := await reader.read(65536):
                if self._armed and self._marker in data:
                    self._armed -= 1
                    next_reply[0] = self._delay
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:  # redis -> client
            while data := await up_reader.read(65536):
                fate, next_reply[0] = next_reply[0], None
                if time.monotonic() < self._blackout_until:
                    self.dropped += 1
                    continue
                if fate == 0.0:
                    self.dropped += 1
                    continue
                if fate is not None:
                    self.delayed += 1
                    await asyncio.sleep(fate)
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
