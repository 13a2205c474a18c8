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

import re
import uuid
from typing import Final, cast

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

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


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def request_id_of(headers: CIMultiDictProxy[str]) -> str:
    """The caller's ``X-Request-ID`` if it is sane, else a fresh one."""
    given = headers.get(REQUEST_ID, "")
    return given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex


def upstream_request_headers(incoming: CIMultiDictProxy[str], request_id: str,
                             internal: frozenset[str] = frozenset(),
                             forwarded_for: str | None = None) -> CIMultiDict[str]:
    """The caller's headers as they may go upstream, without any credentials yet.

    ``internal`` names (lower-case) are never forwarded (the client-key header, configured
    internal headers); ``forwarded_for`` adds X-Forwarded-For/-Proto when configured.
    """
    drop = (HOP_BY_HOP | CALLER_CREDENTIALS | FORWARDING | _REQUEST_FRAMING | internal
            | _connection_named(incoming))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop and name.lower() != "x-request-id":
            out.add(name, value)
    out[REQUEST_ID] = request_id
    if forwarded_for is not None:
        out["X-Forwarded-For"] = forwarded_for
        out["X-Forwarded-Proto"] = "http"
    return out


def with_credentials(headers: CIMultiDict[str], access_token: str,
                     partner_id: str) -> CIMultiDict[str]:
    """A copy of ``headers`` with ours set last (any earlier values are gone)."""
    out = headers.copy()
    out["Authorization"] = f"Bearer {access_token}"
    out["X-Partner-ID"] = partner_id
    return out


def downstream_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream answer's headers as they may go back to the caller."""
    drop = HOP_BY_HOP | _RESPONSE_FRAMING | _connection_named(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


class _NoAddedHeaders:
    """aiohttp's ``StreamResponse._prepare_headers`` (private) adds ``Content-Type`` and
    ``Server`` when absent; take back what it added. A test fails if an aiohttp upgrade
    changes where they come from."""

    async def _prepare_headers(self) -> None:
        headers = cast(web.StreamResponse, self).headers
        had_type = hdrs.CONTENT_TYPE in headers
        had_server = hdrs.SERVER in headers
        await super()._prepare_headers()  # type: ignore[misc]
        if not had_type:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            headers.popall(hdrs.SERVER, None)


class PassThroughResponse(_NoAddedHeaders, web.StreamResponse):
    """An upstream answer on its way back: its headers, nothing of aiohttp's."""


class PlainResponse(_NoAddedHeaders, web.Response):
    """A response the gateway makes itself, without a ``Server`` header."""
