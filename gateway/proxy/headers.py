"""Which headers cross the gateway, in one place.

Upstream-bound: hop-by-hop headers (and any the caller's ``Connection`` names), the caller's
credentials (``Authorization``, ``X-Partner-ID``, ``Proxy-Authorization``), ``Host``, framing
headers (``Content-Length``, ``Transfer-Encoding``, ``Expect``: the client library frames the
body it sends) are removed; the request id is set; our credentials are set last.
Caller-bound: hop-by-hop and framing headers of the upstream answer are removed, and nothing
is added but framing and a ``Date`` (RFC 9110 §6.6.1): aiohttp's default ``Content-Type:
application/octet-stream`` and ``Server: Python/… aiohttp/…`` are kept off
(:class:`PassThroughResponse`, :class:`PlainResponse`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import uuid
from typing import TYPE_CHECKING, Final, cast

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import GATEWAY_ERROR_HEADER, GatewayError

if TYPE_CHECKING:
    from gateway.proxy.cache import CachedAnswer

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
CALLER_CREDENTIALS: Final = frozenset({"authorization", "x-partner-id", "proxy-authorization"})
#: Client-address claims a caller could forge; set by us only when configured.
FORWARDING: Final = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host",
                               "x-forwarded-proto", "x-forwarded-port", "x-real-ip"})
_REQUEST_FRAMING: Final = frozenset({"host", "content-length", "expect"})
_RESPONSE_FRAMING: Final = frozenset({"content-length"})
REQUEST_ID: Final = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


_NONE: Final[frozenset[str]] = frozenset()
#: ``Connection`` values that name no other header (the common ones: nothing to compute).
_PLAIN_CONNECTION: Final = frozenset({"keep-alive", "close"})


def _connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names the message's ``Connection`` header lists (hop-by-hop for this hop)."""
    values = headers.getall("Connection", None)
    if values is None or (len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION):
        return _NONE
    return frozenset(t.strip().lower() for value in values for t in value.split(",")
                     if t.strip())


@functools.lru_cache(maxsize=16)
def _request_drop(internal: frozenset[str]) -> frozenset[str]:
    return (HOP_BY_HOP | CALLER_CREDENTIALS | FORWARDING | _REQUEST_FRAMING | internal
            | {"x-request-id"})


_RESPONSE_DROP: Final = HOP_BY_HOP | _RESPONSE_FRAMING


#: Fresh request ids: a random per-process prefix and a counter (unique across processes and
#: restarts without a random draw per request).
_ID_PREFIX: Final = uuid.uuid4().hex[:16]
_ids = itertools.count(1)


def request_id_of(headers: CIMultiDictProxy[str]) -> str:
    """The caller's ``X-Request-ID`` if it is sane, else a fresh one."""
    given = headers.get(REQUEST_ID)
    if given is not None and _REQUEST_ID_RE.match(given):
        return given
    return f"{_ID_PREFIX}{next(_ids):016x}"


def upstream_request_headers(incoming: CIMultiDictProxy[str], request_id: str,
                             internal: frozenset[str] = frozenset(),
                             forwarded_for: str | None = None) -> CIMultiDict[str]:
    """The caller's headers as they may go upstream, without any credentials yet.

    ``internal`` names (lower-case) are never forwarded (the client-key header, configured
    internal headers); ``forwarded_for`` adds X-Forwarded-For/-Proto when configured.
    """
    drop = _request_drop(internal)
    named = _connection_named(incoming)
    if named:
        drop = drop | named
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    out[REQUEST_ID] = request_id
    if forwarded_for is not None:
        out["X-Forwarded-For"] = forwarded_for
        out["X-Forwarded-Proto"] = "http"
    return out


def with_credentials(headers: CIMultiDict[str], access_token: str,
                     partner_id: str) -> CIMultiDict[str]:
    """``headers`` with ours set last, in place (any earlier values are gone; a replay with
    another token overwrites them). aiohttp copies the headers it sends, so this is safe."""
    headers["Authorization"] = f"Bearer {access_token}"
    headers["X-Partner-ID"] = partner_id
    return headers


def downstream_response_headers(upstream: CIMultiDictProxy[str],
                                 out: CIMultiDict[str] | None = None) -> CIMultiDict[str]:
    """The upstream answer's headers as they may go back to the caller, added to ``out`` (a
    response's own headers: no copy in between) or a new multidict."""
    named = _connection_named(upstream)
    drop = _RESPONSE_DROP | named if named else _RESPONSE_DROP
    if out is None:
        out = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


class _NoAddedHeaders:
    """aiohttp's ``StreamResponse._prepare_headers`` (private) adds ``Content-Type`` and
    ``Server`` when absent (and ``Response.body``'s setter a ``Content-Type``); take back what
    it added. A test fails if an aiohttp upgrade changes where they come from."""

    #: Whether the ``Content-Type`` is the upstream's (None: whatever is there at prepare).
    own_content_type: bool | None = None

    async def _prepare_headers(self) -> None:
        headers = cast(web.StreamResponse, self).headers
        had_type = (hdrs.CONTENT_TYPE in headers if self.own_content_type is None
                    else self.own_content_type)
        had_server = hdrs.SERVER in headers
        await super()._prepare_headers()  # type: ignore[misc]
        if not had_type:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            headers.popall(hdrs.SERVER, None)


class PassThroughResponse(_NoAddedHeaders, web.StreamResponse):
    """An upstream answer on its way back: its headers, nothing of aiohttp's."""


class WholePassThroughResponse(_NoAddedHeaders, web.Response):
    """A small upstream answer, read whole: head and body leave in one write (``web.Response``
    holds the head back for its body). Build with :meth:`of`."""

    @classmethod
    def of(cls, status: int, reason: str | None, upstream: CIMultiDictProxy[str],
           body: bytes) -> WholePassThroughResponse:
        out = cls(status=status, reason=reason)
        downstream_response_headers(upstream, out.headers)
        out.own_content_type = hdrs.CONTENT_TYPE in out.headers
        out.body = body  # after the headers: the setter adds a Content-Type only if missing
        return out


class CachedResponse(_NoAddedHeaders, web.Response):
    """An answer from the GET cache (with ``Age`` and ``X-Cache``), or a kept one."""

    @classmethod
    def of(cls, entry: CachedAnswer, age: int, how: str) -> CachedResponse:
        out = cls.kept(entry.status, entry.reason, entry.headers, entry.body)
        out.headers["Age"] = str(age)
        out.headers["X-Cache"] = how
        return out

    @classmethod
    def kept(cls, status: int, reason: str, headers: tuple[tuple[str, str], ...],
             body: bytes) -> CachedResponse:
        """A kept answer (the GET cache's, or an Idempotency-Key's), as it was."""
        out = cls(status=status, reason=reason or None)
        out.headers.extend(headers)
        out.own_content_type = hdrs.CONTENT_TYPE in out.headers
        out.body = body
        return out


class PlainResponse(_NoAddedHeaders, web.Response):
    """A response the gateway makes itself, without a ``Server`` header."""


def error_response(exc: GatewayError, request_id: str | None = None) -> web.Response:
    """The JSON response for a gateway-made error: ``{"error": {"code", "message"}}``."""
    body: dict[str, object] = {"code": exc.code, "message": exc.message}
    if request_id:
        body["request_id"] = request_id
    resp = PlainResponse(text=json.dumps({"error": body}), status=exc.status,
                         content_type="application/json")
    resp.headers[GATEWAY_ERROR_HEADER] = exc.code
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if request_id:
        resp.headers["X-Request-ID"] = request_id
    return resp
