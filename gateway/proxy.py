"""The proxy handler: check the target, take the body, inject credentials, forward, stream back.

Small request bodies (up to ``replay_body_limit``) are kept so the request can be replayed once
after an upstream 401 with a renewed token; larger or unknown-length bodies are streamed and a
401 on them is passed back (after invalidating the token, so the next request gets a new one).
Responses are streamed to the caller chunk by chunk, never held whole. Each request yields one
structured log line and its metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    RouteForbidden,
    UpstreamError,
    error_response,
)
from gateway.headers import (
    REQUEST_ID,
    downstream_response_headers,
    request_id_of,
    upstream_request_headers,
    with_credentials,
)
from gateway.routes import method_label, route_template
from gateway.state import GATEWAY, GatewayState
from gateway.token import Token
from gateway.upstream import Body, target_url

log = logging.getLogger("gateway.proxy")
CHUNK = 64 * 1024


def check_target(raw_path: str, auth_paths: tuple[str, ...]) -> str:
    """Refuse targets that are not origin-form paths, escape the prefix, or reach /auth.

    Returns the decoded path (for the route template).
    """
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise BadRequest("the request target must be a path starting with a single /",
                         code="invalid_target")
    decoded = unquote(raw_path.partition("?")[0])
    segments = decoded.split("/")
    if any(seg in (".", "..") for seg in segments) or "\\" in decoded or "\x00" in decoded:
        raise BadRequest("the request path may not contain dot segments, backslashes or NUL",
                         code="invalid_path")
    lowered = decoded.lower().rstrip("/")
    forbidden = {"/auth", *(p.lower().rstrip("/") for p in auth_paths)}
    if lowered in forbidden or lowered.startswith("/auth/"):
        raise RouteForbidden("authentication belongs to the gateway; /auth/* is not proxied",
                             code="auth_route_forbidden")
    return decoded


@dataclass
class _Outcome:
    """What happened to one request, for its log line and metrics."""

    route: str = "other"
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


async def _stream(prefix: bytes, content: aiohttp.StreamReader, max_size: int,
                  outcome: _Outcome) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    async for chunk in content.iter_chunked(CHUNK):
        outcome.bytes_in += len(chunk)
        if max_size and outcome.bytes_in > max_size:
            raise BodyTooLarge(f"the request body exceeds {max_size} bytes")
        yield chunk


async def take_body(request: web.Request, replay_limit: int, max_size: int,
                    outcome: _Outcome) -> _Body:
    """Keep a small body whole (replayable); stream anything larger."""
    if not request.body_exists:
        return _Body(None, True)
    length = request.content_length
    if max_size and length is not None and length > max_size:
        raise BodyTooLarge(f"the request body exceeds {max_size} bytes")
    if length is not None and length <= replay_limit:
        data = await _read_up_to(request.content, length)
        outcome.bytes_in = len(data)
        return _Body(data, True)
    prefix = b""
    if length is None:  # chunked: keep it if it turns out small
        prefix = await _read_up_to(request.content, replay_limit + 1)
        outcome.bytes_in = len(prefix)
        if len(prefix) <= replay_limit:
            return _Body(prefix, True)
    return _Body(_stream(prefix, request.content, max_size, outcome), False)


async def handle(request: web.Request) -> web.StreamResponse:
    """Forward one request to Repairy with the managed credentials."""
    gw = request.app[GATEWAY]
    rid = request_id_of(request.headers)
    started = time.monotonic()
    outcome = _Outcome()
    gw.metrics.inflight.inc()
    try:
        response = await _forward(request, gw, rid, outcome)
        gw.metrics.response("upstream", response.status, "none")
    except GatewayError as exc:
        outcome.error = exc.code
        response = error_response(exc, rid)
        gw.metrics.response("gateway", exc.status, exc.code)
    finally:
        gw.metrics.inflight.dec()
    outcome.status = response.status
    _log_request(request, rid, outcome, started)
    return response


async def _forward(request: web.Request, gw: GatewayState, rid: str,
                   outcome: _Outcome) -> web.StreamResponse:
    s = gw.settings
    decoded = check_target(request.raw_path, (s.auth_token_path, s.auth_refresh_path))
    outcome.route = route_template(decoded)
    body = await take_body(request, s.replay_body_limit, s.max_body_size, outcome)
    url = target_url(s.base_url, request.raw_path)
    headers = upstream_request_headers(request.headers, rid)
    if not body.replayable and request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    token = await gw.tokens.get()
    resp = await _exchange(gw, request.method, url, headers, body.data, token, outcome)
    if resp.status == 401:
        gw.tokens.invalidate(token.generation, "upstream_401")
        if body.replayable:
            resp.release()
            token = await gw.tokens.get()
            outcome.replayed = True
            gw.metrics.replayed.labels("upstream_401").inc()
            resp = await _exchange(gw, request.method, url, headers, body.data, token, outcome)
            if resp.status == 401:  # no second replay: pass it back, let renewal sort it out
                gw.tokens.invalidate(token.generation, "upstream_401")
    return await _stream_back(request, resp, rid, gw, outcome)


async def _exchange(gw: GatewayState, method: str, url: URL, headers: CIMultiDict[str],
                    body: Body, token: Token, outcome: _Outcome) -> aiohttp.ClientResponse:
    """One upstream attempt with ``token``: counted, timed, errors classified."""
    outcome.generation = token.generation
    started = time.monotonic()
    try:
        resp = await gw.upstream.send(
            method, url, with_credentials(headers, token.access, gw.settings.partner_id), body)
    except UpstreamError as exc:
        gw.metrics.upstream_error(exc.kind)
        raise
    outcome.upstream_status = resp.status
    gw.metrics.upstream_response(method_label(method), outcome.route, resp.status,
                                 time.monotonic() - started)
    return resp


async def _stream_back(request: web.Request, resp: aiohttp.ClientResponse, rid: str,
                       gw: GatewayState, outcome: _Outcome) -> web.StreamResponse:
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
                outcome.bytes_out += len(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: cut the caller's connection so it sees a broken body.
            if isinstance(exc, aiohttp.ClientPayloadError | TimeoutError):
                gw.metrics.upstream_error("timeout" if isinstance(exc, TimeoutError)
                                          else "protocol")
            outcome.error = "stream_broken"
            log.warning("response body broke mid-stream", extra={"fields": {
                "event": "stream_broken", "request_id": rid, "error": type(exc).__name__}})
            if request.transport is not None:
                request.transport.abort()
            return out
        await out.write_eof()
        return out
    finally:
        resp.release()


def _log_request(request: web.Request, rid: str, outcome: _Outcome, started: float) -> None:
    log.info("%s %s %s", request.method, outcome.route, outcome.status, extra={"fields": {
        "event": "request", "request_id": rid, "method": request.method,
        "route": outcome.route, "status": outcome.status,
        "upstream_status": outcome.upstream_status, "error": outcome.error,
        "duration_ms": round((time.monotonic() - started) * 1000, 2),
        "bytes_in": outcome.bytes_in, "bytes_out": outcome.bytes_out,
        "token_generation": outcome.generation, "replayed": outcome.replayed,
        "retried": False}})
