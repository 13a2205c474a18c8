"""The proxy handler: admit the request, take the body, inject credentials, forward, stream back.

Small request bodies (up to ``replay_body_limit``) are kept so the request can be replayed once
after an upstream 401 with a renewed token; larger or unknown-length bodies are streamed and a
401 on them is passed back (after invalidating the token, so the next request gets a new one).
Responses are streamed to the caller chunk by chunk, never held whole. Each request yields one
structured log line and its metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    RequestTimeout,
    UpstreamError,
    UpstreamInvalidResponse,
    error_response,
)
from gateway.proxy.access import ANONYMOUS
from gateway.proxy.headers import (
    REQUEST_ID,
    downstream_response_headers,
    request_id_of,
    upstream_request_headers,
    with_credentials,
)
from gateway.proxy.inbound import GatewayRequestHandler, check_request
from gateway.proxy.routes import method_label, route_template
from gateway.proxy.upstream import Body
from gateway.state import GatewayState
from gateway.token.value import Token
from gateway.urls import target_url

log = logging.getLogger("gateway.proxy")
CHUNK = 64 * 1024


@dataclass
class _Outcome:
    """What happened to one request, for its log line and metrics."""

    route: str = "other"
    client: str = ANONYMOUS
    status: int | None = None
    upstream_status: int | None = None
    generation: int | None = None
    replayed: bool = False
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class _Body:
    data: Body
    replayable: bool


class _BodyReader:
    """Reads the caller's body with an idle timeout and a size cap."""

    def __init__(self, content: aiohttp.StreamReader, idle_timeout: float, max_size: int,
                 outcome: _Outcome) -> None:
        self._content = content
        self._idle = idle_timeout
        self._max = max_size
        self._outcome = outcome

    async def read(self, n: int) -> bytes:
        try:
            async with asyncio.timeout(self._idle or None):
                chunk = await self._content.read(n)
        except TimeoutError:
            raise RequestTimeout("the request body stalled") from None
        except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError,
                aiohttp.http_exceptions.HttpProcessingError):
            raise BadRequest("the request body ended early or was malformed",
                             code="body_incomplete") from None
        self._outcome.bytes_in += len(chunk)
        if self._max and self._outcome.bytes_in > self._max:
            raise BodyTooLarge(f"the request body exceeds {self._max} bytes")
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


async def take_body(request: web.BaseRequest, reader: _BodyReader, replay_limit: int,
                    max_size: int) -> _Body:
    """Keep a small body whole (replayable); stream anything larger."""
    if not request.body_exists:
        return _Body(None, True)
    length = request.content_length
    if max_size and length is not None and length > max_size:
        raise BodyTooLarge(f"the request body exceeds {max_size} bytes")
    if length is not None and length <= replay_limit:
        data = await reader.read_up_to(length)
        if len(data) != length:
            raise BadRequest("the request body is shorter than its Content-Length",
                             code="body_incomplete")
        return _Body(data, True)
    prefix = b""
    if length is None:  # chunked: keep it if it turns out small
        prefix = await reader.read_up_to(replay_limit + 1)
        if len(prefix) <= replay_limit:
            return _Body(prefix, True)
    return _Body(reader.stream(prefix), False)


class Proxy:
    """The request handler of the proxy listener."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        s = state.settings
        self._auth_paths = (s.auth_token_path, s.auth_refresh_path)
        self._internal = frozenset({s.client_key_header.lower(), *s.strip_headers})

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        gw = self.state
        protocol = request.protocol
        if isinstance(protocol, GatewayRequestHandler):
            protocol.begin_request()
        rid = request_id_of(request.headers)
        started = time.monotonic()
        outcome = _Outcome()
        gw.metrics.inflight.inc()
        try:
            response = await self._forward(request, rid, outcome)
            gw.metrics.response("upstream", response.status, "none")
        except GatewayError as exc:
            outcome.error = exc.code
            response = error_response(exc, rid)
            if exc.status in (400, 408, 413):
                response.force_close()  # the rest of the body is not worth reading
            gw.metrics.response("gateway", exc.status, exc.code)
        finally:
            gw.metrics.inflight.dec()
            if isinstance(protocol, GatewayRequestHandler):
                protocol.end_request()
        outcome.status = response.status
        _log_request(request, rid, outcome, started)
        return response

    async def _forward(self, request: web.BaseRequest, rid: str,
                       outcome: _Outcome) -> web.StreamResponse:
        gw, s = self.state, self.state.settings
        decoded = check_request(request, self._auth_paths)
        outcome.client = gw.access.client(request.remote,
                                          request.headers.get(s.client_key_header))
        gw.metrics.client_requests.labels(outcome.client).inc()
        gw.access.check_route(request.method, decoded)
        outcome.route = route_template(decoded)
        reader = _BodyReader(request.content, s.client_body_timeout, s.max_body_size, outcome)
        body = await take_body(request, reader, s.replay_body_limit, s.max_body_size)
        url = target_url(s.base_url, request.raw_path)
        headers = upstream_request_headers(
            request.headers, rid, self._internal,
            forwarded_for=(request.remote or "unix") if s.forwarded_headers else None)
        if not body.replayable and request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        token = await gw.tokens.get()
        resp = await self._exchange(request.method, url, headers, body.data, token, outcome)
        if resp.status == 401:
            if await self._judge_401(outcome.route, token.generation):
                gw.tokens.invalidate(token.generation, "upstream_401")
                if body.replayable:
                    resp.release()
                    token = await gw.tokens.get(newer_than=token.generation)
                    outcome.replayed = True
                    gw.metrics.replayed.labels("upstream_401").inc()
                    resp = await self._exchange(request.method, url, headers, body.data, token,
                                                outcome)
                    if resp.status != 401:
                        gw.route_401.answered(outcome.route, token.generation)
                    else:  # no second replay: pass it back, and judge the route
                        await self._judge_401(outcome.route, token.generation)
        else:
            gw.route_401.answered(outcome.route, token.generation)
        return await self._stream_back(request, resp, rid, outcome)

    async def _judge_401(self, route: str, generation: int) -> bool:
        """A 401 on ``route`` with ``generation``: True to invalidate the token (and replay),
        False to pass it back (the route is marked persistent 401). A verdict on the route
        counts only while that token is still the newest, here and in the fleet."""
        r401 = self.state.route_401
        if r401.would_mark(route, generation) and not await self.state.tokens.still_current(
                generation):
            r401.forget(route)
        return r401.unauthorized(route, generation)

    async def _exchange(self, method: str, url: URL, headers: CIMultiDict[str], body: Body,
                        token: Token, outcome: _Outcome) -> aiohttp.ClientResponse:
        """One upstream attempt with ``token``: counted, timed, errors classified."""
        gw = self.state
        outcome.generation = token.generation
        started = time.monotonic()
        try:
            resp = await gw.upstream.send(
                method, url, with_credentials(headers, token.access, token.partner_id), body)
        except UpstreamError as exc:
            gw.metrics.upstream_error(exc.kind)
            raise
        outcome.upstream_status = resp.status
        gw.metrics.upstream_response(method_label(method), outcome.route, resp.status,
                                     time.monotonic() - started)
        return resp

    async def _stream_back(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                           rid: str, outcome: _Outcome) -> web.StreamResponse:
        try:
            out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                     headers=downstream_response_headers(resp.headers))
            if REQUEST_ID not in out.headers:
                out.headers[REQUEST_ID] = rid
            length = resp.content_length
            if length is not None and "chunked" not in resp.headers.get(
                    "Transfer-Encoding", "").lower():
                out.content_length = length
                if length <= CHUNK and request.method != "HEAD":
                    # Small answer (the common case): read it whole before replying, so a
                    # broken upstream body is still a clean 502 and it goes out in one write.
                    try:
                        body = await resp.read()
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        timed_out = isinstance(exc, TimeoutError)
                        self.state.metrics.upstream_error("timeout" if timed_out else "protocol")
                        raise UpstreamInvalidResponse(
                            "the upstream response body broke") from exc
                    await out.prepare(request)
                    await out.write_eof(body)
                    outcome.bytes_out = len(body)
                    return out
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    await out.write(chunk)
                    outcome.bytes_out += len(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are gone already: cut the caller's connection so it sees a broken
                # body rather than a short one that looks complete.
                if isinstance(exc, aiohttp.ClientPayloadError | TimeoutError):
                    self.state.metrics.upstream_error(
                        "timeout" if isinstance(exc, TimeoutError) else "protocol")
                outcome.error = "stream_broken"
                log.warning("response body broke mid-stream", extra={"fields": {
                    "event": "stream_broken", "request_id": rid,
                    "error": type(exc).__name__}})
                if request.transport is not None:
                    request.transport.abort()
                return out
            await out.write_eof()
            return out
        finally:
            resp.release()


def _log_request(request: web.BaseRequest, rid: str, outcome: _Outcome,
                 started: float) -> None:
    log.info("%s %s %s", request.method, outcome.route, outcome.status, extra={"fields": {
        "event": "request", "request_id": rid, "client": outcome.client,
        "method": request.method[:16], "route": outcome.route, "status": outcome.status,
        "upstream_status": outcome.upstream_status, "error": outcome.error,
        "duration_ms": round((time.monotonic() - started) * 1000, 2),
        "bytes_in": outcome.bytes_in, "bytes_out": outcome.bytes_out,
        "token_generation": outcome.generation, "replayed": outcome.replayed,
        "retried": False}})
