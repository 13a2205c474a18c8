"""Sandbox route handlers: the two auth calls, the Repairy resources, and the diagnostics
endpoints (authenticated like the API) that proxy tests stream bodies through."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.sandbox.control import redacted_headers
from gateway.sandbox.data import ApiError
from gateway.sandbox.openapi import openapi
from gateway.sandbox.state import PARTNER, STATE, bearer, error, json_body, ok
from gateway.sandbox.tokens import Issued, TokenRejected

_MAX_DOWNLOAD = 1 << 30
_PATTERN = bytes(range(256)) * 256  # 64 KiB of a known pattern for /__sandbox/bytes


def _auth_payload(issued: Issued) -> dict[str, Any]:
    return {"accessToken": issued.access_token, "refreshToken": issued.refresh_token,
            "tokenType": "Bearer", "expiresIn": issued.access_ttl,
            "refreshExpiresIn": issued.refresh_ttl}


# -- auth ------------------------------------------------------------------------------------
IssueFn = Callable[[web.Request, dict[str, Any]], Issued]


async def _grant(request: web.Request, issue: IssueFn, success_counter: str) -> web.Response:
    """Shared shape of both auth calls: JSON object in; 400/401 JSON error or a grant out."""
    state = request.app[STATE]
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    try:
        issued = issue(request, body)
    except TokenRejected as exc:
        state.control.counters["rejected_requests"] += 1
        status = 400 if exc.code == "invalid_request" else 401
        return error(status, exc.code, exc.message)
    state.control.counters[success_counter] += 1
    state.control.count_partner(issued.partner_id, "logins" if success_counter == (
        "logins_succeeded") else "refreshes")
    return ok(_auth_payload(issued))


async def auth_token(request: web.Request) -> web.StreamResponse:
    return await _grant(request, lambda r, body: r.app[STATE].tokens.login(
        body.get("appKey"), body.get("appSecret")), "logins_succeeded")


async def auth_refresh(request: web.Request) -> web.StreamResponse:
    return await _grant(request, lambda r, body: r.app[STATE].tokens.refresh(
        bearer(r), body.get("refreshToken")), "refreshes_succeeded")


# -- resources -------------------------------------------------------------------------------
async def workshop_services(request: web.Request) -> web.StreamResponse:
    return ok(request.app[STATE].data.services(request.match_info["id"]))


async def workshop_availabilities(request: web.Request) -> web.StreamResponse:
    q = request.query
    return ok(request.app[STATE].data.availabilities(
        request.match_info["id"], q.get("from"), q.get("to")))


async def create_booking(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    return ok(request.app[STATE].data.create_booking(request[PARTNER], body), status=201)


async def get_booking(request: web.Request) -> web.StreamResponse:
    return ok(request.app[STATE].data.booking(request[PARTNER], request.match_info["id"]))


async def update_booking(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    return ok(request.app[STATE].data.update_booking(
        request[PARTNER], request.match_info["id"], body))


async def change_booking_status(request: web.Request) -> web.StreamResponse:
    return ok(request.app[STATE].data.change_status(
        request[PARTNER], request.match_info["id"], request.match_info["status"]))


async def create_quote(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    return ok(request.app[STATE].data.create_quote(request[PARTNER], body), status=201)


async def send_reminder(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    return ok(request.app[STATE].data.send_reminder(request[PARTNER], body), status=201)


async def get_reminder(request: web.Request) -> web.StreamResponse:
    return ok(request.app[STATE].data.reminder(request[PARTNER], request.match_info["id"]))


async def openapi_document(request: web.Request) -> web.StreamResponse:
    """The OpenAPI 3.1 description of this API (no token needed)."""
    return web.json_response(openapi())


# -- diagnostics (authenticated like the API; for proxy tests) --------------------------------
async def echo(request: web.Request) -> web.StreamResponse:
    """Stream the request body in, answer with its size, SHA-256 and what was received."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    headers = dict(redacted_headers(request.headers))
    return ok({"method": request.method, "path": request.raw_path.partition("?")[0],
                "query": request.query_string, "size": size, "sha256": digest.hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
                "headers": headers})


async def download(request: web.Request) -> web.StreamResponse:
    """Stream ``n`` bytes of a fixed pattern (``?chunked=1`` to omit Content-Length)."""
    try:
        size = int(request.match_info["n"])
    except ValueError:
        raise ApiError(400, "invalid_size", "size must be an integer") from None
    if not 0 <= size <= _MAX_DOWNLOAD:
        raise ApiError(400, "invalid_size", f"size must be 0..{_MAX_DOWNLOAD}")
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") not in ("1", "true"):
        resp.content_length = size
    await resp.prepare(request)
    left = size if request.method != "HEAD" else 0
    while left:
        chunk = _PATTERN[: min(left, len(_PATTERN))]
        await resp.write(chunk)
        left -= len(chunk)
    await resp.write_eof()
    return resp


def pattern_bytes(size: int) -> bytes:
    """What ``/__sandbox/bytes/{size}`` sends, for tests to compare against."""
    whole, part = divmod(size, len(_PATTERN))
    return _PATTERN * whole + _PATTERN[:part]
