"""Upstream URLs: the configured base URL joined with a path, shared by the proxy and auth."""

from __future__ import annotations

from yarl import URL


def target_url(base: URL, raw_path_and_query: str) -> URL:
    """``base`` (with its path prefix) + the caller's path and query, bytes unchanged."""
    return URL(str(base).rstrip("/") + raw_path_and_query, encoded=True)
