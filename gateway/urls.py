"""Talking to the upstream, shared by the proxy and the auth calls: the configured base URL
joined with a path, the TLS trust to verify it with, the egress proxy to go through, and
reading an answer's body within a bound."""

from __future__ import annotations

import functools
import ssl
import warnings
from typing import Any

import aiohttp
from yarl import URL

from gateway.redact import Secret


def upstream_tls(ca_file: str) -> ssl.SSLContext | bool:
    """Verify with ``ca_file`` (a private CA) when set, else with the system CAs (True)."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


@functools.lru_cache(maxsize=8)
def _prefix(base: URL) -> str:
    return str(base).rstrip("/")


def target_url(base: URL, raw_path_and_query: str) -> URL:
    """``base`` (with its path prefix) + the caller's path and query, bytes unchanged."""
    return URL(_prefix(base) + raw_path_and_query, encoded=True)


def egress_session(proxy: str, password: Secret | None,
                   **kwargs: Any) -> aiohttp.ClientSession:
    """A ``ClientSession`` going through GATEWAY_EGRESS_PROXY (direct when empty): the proxy is
    set once per session, never per request, and never from the environment (``trust_env``
    stays off). The session-wide ``proxy_auth`` is deprecated for aiohttp 4 (the project pins
    aiohttp < 4): its warning is silenced here, where it is raised once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if proxy:
            url = URL(proxy)
            kwargs["proxy"] = url.with_user(None)
            if url.user:
                kwargs["proxy_auth"] = aiohttp.BasicAuth(
                    url.user, password.reveal() if password is not None else "")
        return aiohttp.ClientSession(**kwargs)


async def read_up_to(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's whole body, however many pieces it comes in, or its first ``limit`` + 1
    bytes if it is longer (so the caller can tell)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await resp.content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
