"""The upstream client: one pooled ``ClientSession``, and the translation of its errors.

The session keeps connections alive (``GATEWAY_KEEPALIVE_TIMEOUT``, below common upstream idle
timeouts), never decompresses (bytes pass through as sent), keeps no cookies, ignores proxy
environment variables, and follows no redirects. aiohttp's own silent re-send of idempotent
requests on a dropped keep-alive connection is switched off: every re-send is a counted
decision of :mod:`gateway.proxy.retry`. aiohttp's exceptions become :mod:`gateway.errors`
types here and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Iterable
from contextvars import ContextVar
from typing import Any, Final

import aiohttp
from multidict import CIMultiDict

from gateway.errors import (
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnreachable,
)
from gateway.proxy.config import UpstreamConfig
from gateway.urls import egress_session, upstream_tls

Body = bytes | AsyncIterable[bytes] | None
#: Headers aiohttp would add on its own; the caller's are forwarded instead.
SKIP_AUTO: Final = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_SKIPPED: Final[CIMultiDict[None]] = CIMultiDict((name, None) for name in SKIP_AUTO)
#: How many connections the current task has opened (its attempts' new connections). Bumped
#: by :class:`ReuseMarkingConnector` in the task that sends the request (aiohttp awaits the
#: connector directly); the retry policy compares it across an attempt: unchanged means the
#: attempt ran on a reused keep-alive connection. Set only when a connection is opened, so a
#: reused one costs a read.
NEW_CONNECTIONS: ContextVar[int] = ContextVar("new_connections", default=0)


class ReuseMarkingConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that counts the connections each task opens (see
    :data:`NEW_CONNECTIONS`). ``_create_connection`` is aiohttp's private hook for exactly
    that, called only for new connections; a test fails if it stops being called (a reset on
    a fresh connection would then look retryable)."""

    async def _create_connection(self, req: aiohttp.ClientRequest, traces: list[Any],
                                 timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
                                 ) -> aiohttp.client_proto.ResponseHandler:
        NEW_CONNECTIONS.set(NEW_CONNECTIONS.get() + 1)
        return await super()._create_connection(req, traces, timeout)


class PassThroughRequest(aiohttp.ClientRequest):
    """A ``ClientRequest`` that adds none of aiohttp's automatic headers (:data:`SKIP_AUTO`):
    what ``skip_auto_headers`` does, without building its lookup table anew for every
    request (it cost about 2 % of a request's instructions). It sets aiohttp's private
    ``_skip_auto_headers`` as ``update_auto_headers`` would; a raw-socket test fails if an
    aiohttp upgrade adds a header anyway."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _SKIPPED  # read only: a body's Content-Type is skipped too


def create_session(up: UpstreamConfig, sharers: int = 1) -> aiohttp.ClientSession:
    """The upstream session of one base URL in a process (create inside the running loop):
    its pool holds ``GATEWAY_POOL_SIZE`` connections for each of the ``sharers`` (credential
    profiles on that URL, each bounded by slots of its own), so one busy profile never
    leaves another waiting for a connection."""
    connector = ReuseMarkingConnector(limit=up.pool_size * sharers,
                                      ssl=upstream_tls(up.upstream_ca_file),
                                      keepalive_timeout=up.keepalive_timeout)
    session = egress_session(up.egress_proxy, up.egress_proxy_password,
                             connector=connector, timeout=attempt_timeout(up, None),
                             auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                             trust_env=False, raise_for_status=False,
                             request_class=PassThroughRequest)
    disable_silent_resend(session)
    return session


def disable_silent_resend(session: aiohttp.ClientSession) -> None:
    """aiohttp re-sends an idempotent request once, uncounted, when a reused connection drops
    (``ClientSession._retry_connection``, private). Switch it off; a test fails if an aiohttp
    upgrade renames it or stops honouring it."""
    if not hasattr(session, "_retry_connection"):
        raise RuntimeError("aiohttp no longer has ClientSession._retry_connection: check "
                           "gateway.proxy.upstream.disable_silent_resend")
    session._retry_connection = False


def attempt_timeout(up: UpstreamConfig, remaining: float | None) -> aiohttp.ClientTimeout:
    """One attempt's timeouts: connect and read as configured, all of it within what is left
    of the request's deadline (``GATEWAY_TOTAL_TIMEOUT``)."""
    total = remaining if remaining is not None else (up.total_timeout or None)
    return aiohttp.ClientTimeout(total=total, connect=up.connect_timeout,
                                 sock_read=up.read_timeout or None)


def translate(exc: BaseException) -> UpstreamError:
    """Map a client-side failure to the gateway's error tree (no URLs or secrets in text).
    Failures before a connection existed are marked ``sent = False``."""
    error: UpstreamError
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # the egress proxy refused the tunnel
        error = UpstreamUnreachable(f"the egress proxy refused the connection ({exc.status})")
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        error = UpstreamTLSError("TLS with the upstream failed", code="upstream_tls_error")
    elif isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        error = UpstreamTimeout("the upstream did not answer in time")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = UpstreamUnreachable("cannot connect to the upstream")
    elif isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError
                    | aiohttp.ClientResponseError):
        error = UpstreamInvalidResponse("the upstream closed the connection or sent an "
                                        "invalid response")
    else:
        error = UpstreamError(f"upstream request failed ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        error.sent = False  # TLS refused and connect timeouts too (Unreachable already is)
    return error
