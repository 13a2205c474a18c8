"""The upstream client: one pooled ``ClientSession``, target URLs, and error translation.

The session keeps connections alive, never decompresses (bytes pass through as sent), keeps no
cookies, ignores proxy environment variables, and follows no redirects. aiohttp's exceptions
become :mod:`gateway.errors` types here and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamTLSError,
)
from gateway.settings import Settings
from gateway.urls import upstream_tls

Body = bytes | AsyncIterable[bytes] | None
#: Headers aiohttp would add on its own; the caller's are forwarded instead.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


def create_session(settings: Settings) -> aiohttp.ClientSession:
    """The one upstream session of an application (create inside the running loop)."""
    connector = aiohttp.TCPConnector(limit=settings.pool_size,
                                     ssl=upstream_tls(settings.upstream_ca_file),
                                     keepalive_timeout=settings.keepalive_timeout)
    timeout = aiohttp.ClientTimeout(total=settings.total_timeout or None,
                                    connect=settings.connect_timeout,
                                    sock_read=settings.read_timeout or None)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                 cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                 raise_for_status=False)


class Upstream:
    """Sends one request upstream and hands back the response, headers read, body not."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def send(self, method: str, url: URL, headers: CIMultiDict[str],
                   body: Body) -> aiohttp.ClientResponse:
        try:
            return await self.session.request(
                method, url, headers=headers, data=body, allow_redirects=False,
                skip_auto_headers=_SKIP_AUTO)
        except GatewayError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise translate(exc) from exc

    async def close(self) -> None:
        await self.session.close()


def translate(exc: BaseException) -> GatewayError:
    """Map a client-side failure to the gateway's error tree (no URLs or secrets in text)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamTLSError("TLS with the upstream failed", code="upstream_tls_error")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout("the upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("cannot connect to the upstream")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError
                  | aiohttp.ClientResponseError):
        return UpstreamInvalidResponse("the upstream closed the connection or sent an invalid "
                                       "response")
    return UpstreamError(f"upstream request failed ({type(exc).__name__})")
