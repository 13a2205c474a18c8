"""The caller's request body: read with an idle timeout and a size cap, kept whole when small.

Small bodies (up to ``GATEWAY_REPLAY_BODY_LIMIT``) are kept so the request can be retried or
replayed after a 401; larger or unknown-length ones are streamed upstream as they arrive. A
reader failure is remembered (:attr:`BodyReader.failure`) so that, when it surfaces wrapped by
the HTTP client as a failed upstream send, the caller's own fault is answered with its own
status (408 stalled, 413 too large, 400 cut short, 499 the caller left) and never blamed on
the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web

from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    ClientClosedRequest,
    GatewayError,
    RequestTimeout,
)
from gateway.proxy.upstream import Body

CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class TakenBody:
    data: Body
    replayable: bool


NO_BODY: Final = TakenBody(None, True)


class BodyReader:
    """Reads the caller's body with an idle timeout and a size cap, counting bytes."""

    def __init__(self, content: aiohttp.StreamReader, idle_timeout: float, max_size: int,
                 caller_gone: Callable[[], bool]) -> None:
        self._content = content
        self._idle = idle_timeout
        self._max = max_size
        self._caller_gone = caller_gone
        self.bytes_in = 0
        self.failure: GatewayError | None = None

    def failed(self) -> GatewayError | None:
        """The reader's failure, if any (the caller's fault behind a failed send)."""
        return self.failure

    def _fail(self, error: GatewayError) -> GatewayError:
        self.failure = error
        return error

    async def read(self, n: int) -> bytes:
        try:
            async with asyncio.timeout(self._idle or None):
                chunk = await self._content.read(n)
        except TimeoutError:
            raise self._fail(RequestTimeout("the request body stalled")) from None
        except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError,
                aiohttp.http_exceptions.HttpProcessingError):
            if self._caller_gone():
                raise self._fail(ClientClosedRequest(
                    "the caller left while sending its body")) from None
            raise self._fail(BadRequest("the request body ended early or was malformed",
                                        code="body_incomplete")) from None
        self.bytes_in += len(chunk)
        if self._max and self.bytes_in > self._max:
            raise self._fail(BodyTooLarge(f"the request body exceeds {self._max} bytes"))
        return chunk

    async def read_up_to(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < limit:
            chunk = await self.read(min(CHUNK, limit - size))
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    async def stream(self, prefix: bytes) -> AsyncIterator[bytes]:
        if prefix:
            yield prefix
        while chunk := await self.read(CHUNK):
            yield chunk


def check_declared_size(request: web.BaseRequest, max_size: int) -> None:
    """413 for a declared ``Content-Length`` over the cap, before any body byte is read (and
    before a ``100 Continue`` invites it)."""
    length = request.content_length
    if max_size and length is not None and length > max_size:
        raise BodyTooLarge(f"the request body exceeds {max_size} bytes")


async def take_body(request: web.BaseRequest, reader: BodyReader, replay_limit: int) -> TakenBody:
    """Keep a small body whole (replayable); stream anything larger."""
    if not request.body_exists:
        return NO_BODY
    length = request.content_length
    if length is not None and length <= replay_limit:
        data = await reader.read_up_to(length)
        if len(data) != length:
            raise BadRequest("the request body is shorter than its Content-Length",
                             code="body_incomplete")
        return TakenBody(data, True)
    prefix = b""
    if length is None:  # chunked: keep it if it turns out small
        prefix = await reader.read_up_to(replay_limit + 1)
        if len(prefix) <= replay_limit:
            return TakenBody(prefix, True)
    return TakenBody(reader.stream(prefix), False)
