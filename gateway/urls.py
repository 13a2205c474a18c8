"""Addressing the upstream, shared by the proxy and the auth calls: the configured base URL
joined with a path, and the TLS trust to verify it with."""

from __future__ import annotations

import functools
import ssl

from yarl import URL


def upstream_tls(ca_file: str) -> ssl.SSLContext | bool:
    """Verify with ``ca_file`` (a private CA) when set, else with the system CAs (True)."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


@functools.lru_cache(maxsize=8)
def _prefix(base: URL) -> str:
    return str(base).rstrip("/")


def target_url(base: URL, raw_path_and_query: str) -> URL:
    """``base`` (with its path prefix) + the caller's path and query, bytes unchanged."""
    return URL(_prefix(base) + raw_path_and_query, encoded=True)
