"""The proxy handler: check the target, take the body, inject credentials, forward, stream back.

Small request bodies (up to ``replay_body_limit``) are kept so the request can be replayed once
after an upstream 401 with a renewed token; larger or unknown-length bodies are streamed and a
401 on them is passed back (after invalidating the token, so the next request gets a new one).
Responses are streamed to the caller chunk by chunk, never held whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    RouteForbidden,
    UpstreamInvalidResponse,
    error_response,
)
from gateway.headers import (
    REQUEST_ID,
    downstream_response_headers,
    request_id_of,
    upstream_request_headers,
    with_credentials,
)
from gateway.state import GATEWAY, GatewayState
from gateway.upstream import Body, target_url

log = logging.getLogger("gateway.proxy")
CHUNK = 64 * 1024


def check_target(raw_path: str, auth_paths: tuple[str, ...]) -> None:
    """Refuse targets that are not origin-form paths, escape the prefix, or reach /auth."""
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise BadRequest("the request target must be a path starting with a single /",
                         code="invalid_target")
    path = raw_path.partition("?")[0]
    decoded = unquote(path)
    segments = decoded.split("/")
    if any(seg in (".", "..") for seg in segments) or "\\" in decoded or "\x00" in decoded:
        raise BadRequest("the request path may not contain dot segments, backslashes or NUL",
                         code="invalid_path")
    lowered = decoded.lower().rstrip("/")
    forbidden = {"/auth", *(p.lower().rstrip("/") for p in auth_paths)}
    if lowered in forbidden or lowered.startswith("/auth/"):
        raise RouteForbidden("authentication belongs to the gateway; /auth/* is not proxied",
                             code="auth_route_forbidden")


@dataclass
class _Body:
    data: Body
    replayable: bool


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


async def _stream(prefix: bytes, content: aiohttp.StreamReader,
                  max_size: int) -> AsyncIterator[bytes]:
    total = len(prefix)
    if prefix:
        yield prefix
    async for chunk in content.iter_chunked(CHUNK):
        total += len(chunk)
        if max_size and total > max_size:
            raise BodyTooLarge(f"the request body exceeds {max_size} bytes")
        yield chunk


async def take_body(request: web.Request, replay_limit: int, max_size: int) -> _Body:
    """Keep a small body whole (replayable); stream anything larger."""
    if not request.body_exists:
        return _Body(None, True)
    length = request.content_length
    if max_size and length is not None and length > max_size:
        raise BodyTooLarge(f"the request body exceeds {max_size} bytes")
    if length is not None and length <= replay_limit:
        return _Body(await _read_up_to(request.content, length), True)
    if length is None:  # chunked: keep it if it turns out small
        prefix = await _read_up_to(request.content, replay_limit + 1)
        if len(prefix) <= replay_limit:
            return _Body(prefix, True)
        return _Body(_stream(prefix, request.content, max_size), False)
    return _Body(_stream(b"", request.content, max_size), False)


async def handle(request: web.Request) -> web.StreamResponse:
    """Forward one request to Repairy with the managed credentials."""
    gw = request.app[GATEWAY]
    rid = request_id_of(request.headers)
    started = time.monotonic()
    outcome = _Outcome()
    try:
        response = await _forward(request, gw, rid, outcome)
    except GatewayError as exc:
        outcome.error = exc.code
        response = error_response(exc, rid)
    finally:
        _log_request(request, rid, outcome, started)
    return response


@dataclass
class _Outcome:
    status: int | None = None
    generation: int | None = None
    replayed: bool = False
    error: str | None = None


async def _forward(request: web.Request, gw: GatewayState, rid: str,
                   outcome: _Outcome) -> web.StreamResponse:
    s = gw.settings
    check_target(request.raw_path, (s.auth_token_path, s.auth_refresh_path))
    body = await take_body(request, s.replay_body_limit, s.max_body_size)
    url = target_url(s.base_url, request.raw_path)
    base_headers = upstream_request_headers(request.headers, rid)
    if not body.replayable and request.content_length is not None:
        base_headers["Content-Length"] = str(request.content_length)
    token = await gw.tokens.get()
    outcome.generation = token.generation
    upstream = gw.upstream
    resp = await upstream.send(request.method, url,
                               with_credentials(base_headers, token.access, s.partner_id),
                               body.data)
    if resp.status == 401:
        gw.tokens.invalidate(token.generation, "upstream_401")
        if body.replayable:
            resp.release()
            token = await gw.tokens.get()
            outcome.generation, outcome.replayed = token.generation, True
            resp = await upstream.send(request.method, url,
                                       with_credentials(base_headers, token.access,
                                                        s.partner_id), body.data)
            if resp.status == 401:  # no second replay: pass it back, let renewal sort it out
                gw.tokens.invalidate(token.generation, "upstream_401")
    outcome.status = resp.status
    return await _stream_back(request, resp, rid)


async def _stream_back(request: web.Request, resp: aiohttp.ClientResponse,
                       rid: str) -> web.StreamResponse:
    try:
        out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                 headers=downstream_response_headers(resp.headers))
        if REQUEST_ID not in out.headers:
            out.headers[REQUEST_ID] = rid
        if resp.content_length is not None and "chunked" not in resp.headers.get(
                "Transfer-Encoding", "").lower():
            out.content_length = resp.content_length
        await out.prepare(request)
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                await out.write(chunk)
        except aiohttp.ClientPayloadError as exc:
            # Headers are gone already: cut the caller's connection so it sees a broken body.
            log.warning("upstream body broke mid-stream", extra={"fields": {
                "request_id": rid, "error": type(exc).__name__}})
            if request.transport is not None:
                request.transport.abort()
            return out
        except (aiohttp.ClientError, TimeoutError) as exc:
            if out.prepared:
                if request.transport is not None:
                    request.transport.abort()
                log.warning("upstream body failed mid-stream", extra={"fields": {
                    "request_id": rid, "error": type(exc).__name__}})
                return out
            raise UpstreamInvalidResponse("the upstream response broke") from exc
        await out.write_eof()
        return out
    finally:
        resp.release()


def _log_request(request: web.Request, rid: str, outcome: _Outcome, started: float) -> None:
    log.info("%s %s %s", request.method, request.path, outcome.status or outcome.error,
             extra={"fields": {
                 "event": "request", "request_id": rid, "method": request.method,
                 "path": request.path, "status": outcome.status, "error": outcome.error,
                 "generation": outcome.generation, "replayed": outcome.replayed,
                 "duration_ms": round((time.monotonic() - started) * 1000, 2)}})
