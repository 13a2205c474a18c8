"""Response writing: the upstream's answer back to the caller, read whole and sent in one write
when small (a broken body is then still a clean 502), streamed chunk by chunk otherwise; a
cached route's answer is stored on the way. A caller who leaves while its answer is written is
:class:`~gateway.errors.ClientClosedRequest`; a body that breaks mid-stream cuts the caller's
connection, so it sees a broken answer rather than a short one that looks complete."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import (
    ClientClosedRequest,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
)
from gateway.proxy.body import CHUNK
from gateway.proxy.cache import X_CACHE
from gateway.proxy.context import ProxyContext
from gateway.proxy.headers import (
    REQUEST_ID,
    PassThroughResponse,
    WholePassThroughResponse,
    downstream_response_headers,
)
from gateway.proxy.outcome import Outcome
from gateway.urls import read_up_to

log = logging.getLogger("gateway.proxy")


class Responder:
    """Writes upstream answers to callers (one per process)."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx

    async def answer(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                     rid: str, outcome: Outcome) -> web.StreamResponse:
        """The upstream's answer for the caller. A small one (the common case) is read whole
        first, so a broken upstream body is still a clean 502, and sent as one write (head
        and body together). Anything else is streamed."""
        length = resp.content_length
        whole_limit = CHUNK if outcome.cache_rule is None else max(
            CHUNK, self.ctx.cache.max_entry)
        if length is None or length > whole_limit or request.method == "HEAD" or (
                "chunked" in resp.headers.get("Transfer-Encoding", "").lower()):
            return await self.stream_back(request, resp, rid, outcome)
        try:
            body = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._broken_body(exc, outcome) from exc
        finally:
            resp.release()
        return await self.whole(request, resp, body, rid, outcome)

    async def read_up_to(self, resp: aiohttp.ClientResponse, limit: int,
                         outcome: Outcome) -> bytes:
        """The answer's body, or its first ``limit`` + 1 bytes if it is longer."""
        try:
            return await read_up_to(resp, limit)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._broken_body(exc, outcome) from exc

    def _broken_body(self, exc: BaseException, outcome: Outcome) -> UpstreamError:
        """The error (counted) for an upstream answer whose body stalled or broke."""
        metrics = outcome.lane.metrics
        if isinstance(exc, TimeoutError):
            metrics.upstream_error("timeout")
            return UpstreamTimeout("the upstream's answer stalled")
        metrics.upstream_error("protocol")
        return UpstreamInvalidResponse("the upstream response body broke")

    async def whole(self, request: web.BaseRequest, resp: aiohttp.ClientResponse, body: bytes,
                    rid: str, outcome: Outcome) -> web.StreamResponse:
        """An answer read whole, sent as one write."""
        out = WholePassThroughResponse.of(resp.status, resp.reason, resp.headers, body)
        rule = outcome.cache_rule
        # Kept only under the key of the partner whose token fetched it (a rotation between).
        if rule is not None and outcome.sent_partner == outcome.partner and self.ctx.cache.store(
                outcome.cache_key, rule, resp.status, resp.reason or "", out.headers, body,
                outcome.cache_sent or CIMultiDict()):
            self.ctx.metrics.cache_stored.inc()
        if outcome.cache is not None:
            out.headers[X_CACHE] = outcome.cache
        if REQUEST_ID not in out.headers:
            out.headers[REQUEST_ID] = rid
        try:  # sent here, before the log line is made: that is the caller's latency
            await out.prepare(request)
            await out.write_eof()
        except ConnectionError:
            raise ClientClosedRequest("the caller left before its answer was sent") from None
        outcome.bytes_out = len(body)
        return out

    async def stream_back(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                          rid: str, outcome: Outcome, prefix: bytes = b"",
                          until: float | None = None) -> web.StreamResponse:
        """Stream the answer chunk by chunk, as it comes (``prefix``: what was read of it
        already; ``until``: the loop time at which it is cut off, for a leader)."""
        try:
            out = PassThroughResponse(status=resp.status, reason=resp.reason)
            downstream_response_headers(resp.headers, out.headers)
            if REQUEST_ID not in out.headers:
                out.headers[REQUEST_ID] = rid
            length = resp.content_length
            if length is not None and "chunked" not in resp.headers.get(
                    "Transfer-Encoding", "").lower():
                out.content_length = length
            try:
                await out.prepare(request)
            except ConnectionError:
                raise ClientClosedRequest("the caller left before its answer was sent") from None
            deadline = (contextlib.nullcontext() if until is None
                        else asyncio.timeout_at(until))
            try:
                async with deadline:
                    chunks = _prefixed(prefix, resp) if prefix else resp.content.iter_any()
                    async for chunk in chunks:
                        try:
                            await out.write(chunk)
                        except ConnectionError:  # aiohttp's ClientConnectionResetError too
                            raise ClientClosedRequest(
                                "the caller left while its answer was sent") from None
                        outcome.bytes_out += len(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._broken_stream(request, rid, outcome, exc,
                                    isinstance(deadline, asyncio.Timeout) and deadline.expired())
                return out
            try:
                await out.write_eof()
            except ConnectionError:
                raise ClientClosedRequest("the caller left while its answer was sent") from None
            return out
        finally:
            resp.release()

    def _broken_stream(self, request: web.BaseRequest, rid: str, outcome: Outcome,
                       exc: BaseException, at_deadline: bool) -> None:
        """Headers are gone already: cut the caller's connection so it sees a broken body
        rather than a short one that looks complete."""
        if at_deadline:
            outcome.error = "stream_deadline"
            log.warning("answer cut off at the request's deadline", extra={"fields": {
                "event": "stream_deadline", "request_id": rid}})
        else:
            if isinstance(exc, aiohttp.ClientPayloadError | TimeoutError):
                outcome.lane.metrics.upstream_error(
                    "timeout" if isinstance(exc, TimeoutError) else "protocol")
            outcome.error = "stream_broken"
            log.warning("response body broke mid-stream", extra={"fields": {
                "event": "stream_broken", "request_id": rid, "error": type(exc).__name__}})
        if request.transport is not None:
            request.transport.abort()


async def _prefixed(prefix: bytes, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    yield prefix
    async for chunk in resp.content.iter_any():
        yield chunk
