"""``Retry-After`` as the upstream sends it: delay-seconds or an HTTP date (RFC 9110 §10.2.3).

Shared by the auth client (renewal back-off) and the proxy's retries."""

from __future__ import annotations

import math
from email.utils import parsedate_to_datetime


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` of delay-seconds or an HTTP date; None if absent
    or unreadable. Always finite and not negative."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(min(int(text[:12]), 10**9))
    try:
        seconds = float(text) if text.isascii() else math.nan
    except (ValueError, OverflowError):
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now_wall
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), 1e9)
