"""Route templates for metric labels: known Repairy paths become ``/bookings/{id}`` and the
like; anything else is ``other``. Label values never hold raw ids or caller-chosen text.
Also the one form a path is compared in for the gateway's own route checks
(:func:`comparable_path`)."""

from __future__ import annotations

import functools
from typing import Final

#: Known Repairy routes (relative to the base URL), from the partner documentation.
TEMPLATES: Final = (
    "/auth/token",
    "/auth/refresh",
    "/workshops/{id}/services",
    "/workshops/{id}/availabilities",
    "/bookings",
    "/bookings/{id}",
    "/bookings/{id}/{status}",
    "/quotes",
    "/reminders/services",
    "/reminders/services/{id}",
)
OTHER: Final = "other"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SPLIT: Final = tuple((t, t.strip("/").split("/")) for t in TEMPLATES)


def comparable_path(decoded: str) -> str:
    """The form in which the gateway compares a decoded path with its own rules (the
    ``/auth`` refusal, Idempotency-Key routes): lower case, each segment's ``;`` parameters
    cut off, empty segments dropped (no ``//``, no trailing slash). An upstream that ignores
    case, path parameters or doubled slashes then cannot be reached past a rule with
    ``/Bookings``, ``/bookings;x=1`` or ``/bookings//x/y``."""
    if ";" in decoded or "//" in decoded:
        decoded = "/".join(segment.partition(";")[0] for segment in decoded.split("/")
                           if segment.partition(";")[0])
        decoded = "/" + decoded
    return decoded.lower().rstrip("/") or "/"


#: Paths longer than this are matched each time (the cache stays small: 1,024 x 256 bytes).
_CACHED_PATH_LENGTH: Final = 256


def route_template(path: str) -> str:
    """The template a decoded request path matches, else ``other`` (short paths cached)."""
    if len(path) <= _CACHED_PATH_LENGTH:
        return _cached_template(path)
    return _template(path)


@functools.lru_cache(maxsize=1024)
def _cached_template(path: str) -> str:
    return _template(path)


def _template(path: str) -> str:
    """The template a decoded request path matches, else ``other``."""
    segments = path.strip("/").split("/")
    for template, parts in _SPLIT:
        if len(parts) != len(segments):
            continue
        if all(p.startswith("{") or p == s for p, s in zip(parts, segments, strict=True)) and all(
                s for s in segments):
            return template
    return OTHER


def method_label(method: str) -> str:
    """Standard methods as themselves; anything else ``OTHER`` (bounded label values)."""
    return method if method in _METHODS else "OTHER"
