"""A small real forward proxy for the egress tests: ``CONNECT`` tunnels (https upstreams) and
absolute-form requests (http upstreams), optional Basic proxy authentication, and a record of
every target it was asked for. Each client connection serves one target, piped both ways."""

from __future__ import annotations

import asyncio
import base64
import contextlib

from yarl import URL


class EgressProxy:
    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        #: Answer tunnels with this status instead of connecting (a proxy that cannot reach
        #: the upstream, or forbids it).
        self.refuse_connect: int | None = None
        self._auth = None if user is None else "Basic " + base64.b64encode(
            f"{user}:{password or ''}".encode()).decode()
        self.targets: list[str] = []  # "CONNECT host:port" or "GET http://host:port/path"
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        first, *lines = head.decode("latin-1").split("\r\n")
        method, target, version = first.split(" ", 2)
        headers = [line for line in lines if line]
        auth = next((h.split(":", 1)[1].strip() for h in headers
                     if h.lower().startswith("proxy-authorization:")), None)
        if self._auth is not None and auth != self._auth:
            self.refused += 1
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            await writer.drain()
            return
        self.targets.append(f"{method} {target}")
        if method == "CONNECT" and self.refuse_connect is not None:
            writer.write(f"HTTP/1.1 {self.refuse_connect} Refused\r\nContent-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:
            url = URL(target)
            assert url.host is not None and url.port is not None
            up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
            kept = [h for h in headers if not h.lower().startswith(("proxy-authorization:",
                                                                      "proxy-connection:"))]
            up_writer.write(f"{method} {url.raw_path_qs} {version}\r\n".encode("latin-1")
                            + "".join(f"{h}\r\n" for h in kept).encode("latin-1") + b"\r\n")
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
