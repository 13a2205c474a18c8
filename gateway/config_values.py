"""Value parsers for settings: durations, sizes, booleans, listen addresses, URLs, paths.

Each parser takes raw text (or a TOML value) and returns a typed value or raises ValueError
with a message fit to follow the setting's name.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from yarl import URL

from gateway.redact import Secret


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


ListenAddress = TcpAddress | UnixAddress

# -- parsers: each takes the raw text (or a TOML value) and returns the typed value -----------
#: The longest duration any setting takes (beyond it, arithmetic on times loses meaning).
MAX_DURATION = 10 * 365 * 86400.0
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib|k|m|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1 << 20,
               "mb": 1000**2, "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30}


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``1.5``, ``250ms``, ``30s``, ``5m``, ``48h`` or ``14d``."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 30s, 5m, 48h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration (e.g. 30s, 5m, 48h, 1.5)")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration (e.g. 30s, 5m, 48h)")
    if seconds < 0:
        raise ValueError("must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError("must not exceed 10 years")
    return seconds


def parse_positive_duration(value: object) -> float:
    """A duration that must be above zero (a timeout, a retry interval, a lifetime)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be above zero (e.g. 250ms, 2s, 1m)")
    return seconds


def duration_at_least(floor: float, *, zero_is_off: bool = False) -> Callable[[object], float]:
    """A duration with a floor (``zero_is_off``: 0 is also taken, meaning off). A duration
    that bounds another (a lease and the store calls within it, a poll, a retry back-off)
    below its floor makes the bounded one impossible or floods what it calls."""
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if seconds == 0 and zero_is_off:
            return 0.0
        if seconds < floor:
            text = f"{floor * 1000:g}ms" if floor < 1 else f"{floor:g}s"
            raise ValueError(f"must be at least {text}" + (" (or 0: off)" if zero_is_off
                                                             else ""))
        return seconds
    parse.floor = floor  # type: ignore[attr-defined]
    return parse


def parse_size(value: object) -> int:
    """Bytes from ``65536``, ``64KiB``, ``100MiB``, ``1GiB``."""
    if isinstance(value, bool):
        raise ValueError("a size such as 64KiB")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a size (e.g. 65536, 64KiB, 100MiB)")
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    if size < 0:
        raise ValueError("must not be negative")
    return size


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def _number(value: object) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a number such as 0.8") from None
    if number != number:
        raise ValueError("must be a number such as 0.8")
    return number


def parse_fraction(value: object) -> float:
    number = _number(value)
    if not 0.0 <= number <= 0.95:
        raise ValueError("must be a fraction from 0 to 0.95")
    return number


def parse_renew_fraction(value: object) -> float:
    """The share of a token's lifetime after which renewal starts."""
    number = _number(value)
    if not 0.1 <= number <= 0.95:
        raise ValueError("must be a fraction from 0.1 to 0.95 (0.8: renew at 80% of the "
                         "lifetime)")
    return number


def parse_positive_int(value: object) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number (e.g. 4)") from None
    if number < 1:
        raise ValueError("must be a positive integer")
    return number


def bounded_int(low: int, high: int) -> Callable[[object], int]:
    """A whole number from ``low`` to ``high`` (0 often meaning "off")."""
    def parse(value: object) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return number
    return parse


def bounded_number(low: float, high: float) -> Callable[[object], float]:
    """A finite number from ``low`` to ``high`` (a ratio, a rate)."""
    def parse(value: object) -> float:
        number = _number(value)
        if not low <= number <= high:
            raise ValueError(f"must be a number from {low:g} to {high:g}")
        return number
    return parse


def parse_status_list(value: object) -> frozenset[int]:
    """Comma-separated HTTP statuses (``502,503,504,429``); empty for none."""
    statuses: set[int] = set()
    for raw in str(value).split(","):
        text = raw.strip()
        if not text:
            continue
        if not text.isdigit() or not 400 <= int(text) <= 599:
            raise ValueError(f"{text!r} is not an HTTP error status from 400 to 599")
        if int(text) in (401, 407):
            raise ValueError("401 is the token's business (replayed once with a new token); "
                             "do not list it")
        statuses.add(int(text))
    return frozenset(statuses)


def parse_base_url(value: object) -> URL:
    url = URL(str(value).strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute http:// or https:// URL")
    if url.query_string or url.fragment or url.user or url.password:
        raise ValueError("must not carry a query, fragment or user info")
    return url


def parse_path(value: object) -> str:
    text = str(value).strip()
    if not text.startswith("/") or text.startswith("//") or "?" in text or "#" in text:
        raise ValueError("must be an absolute path such as /auth/token")
    return text


def parse_name(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def parse_host_port(text: str) -> TcpAddress:
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]*):(\d+)$", text)
    if not m:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:8080)")
    host, port = m.group(1) or "0.0.0.0", int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if ":" in host:
        ipaddress.IPv6Address(host)
    return TcpAddress(host, port)


def parse_listen(value: object) -> ListenAddress:
    text = str(value).strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError("unix: needs a socket path")
        return UnixAddress(path)
    return parse_host_port(text)


def parse_admin_listen(value: object) -> TcpAddress:
    return parse_host_port(str(value).strip())


def parse_secret(value: object) -> Secret:
    text = str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return Secret(text)


def parse_optional_secret(value: object) -> Secret | None:
    """A secret, or None when empty."""
    text = value.reveal() if isinstance(value, Secret) else str(value)
    return Secret(text) if text.strip() else None


def _service_url(text: str, schemes: tuple[str, ...], example: str,
                 credentials: str) -> URL:
    """``text`` as a URL of one of ``schemes`` with a host and no password (``credentials``
    says where that goes instead)."""
    url = URL(text)
    if url.scheme not in schemes or not url.host:
        names = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"must be a URL ({names}) such as {example}")
    if url.password or any(k.lower() in ("password", "passwd", "username", "user")
                           for k in url.query):
        raise ValueError(f"must not carry a password or user (in the URL or its query): "
                         f"{credentials}")
    return url


def parse_redis_url(value: object) -> str:
    """Empty (no shared store), or a redis:// or rediss:// URL (no password in it: use
    GATEWAY_REDIS_PASSWORD)."""
    text = str(value).strip()
    if text:
        _service_url(text, ("redis", "rediss"), "redis://redis:6379/0",
                     "set its password setting (GATEWAY_REDIS_PASSWORD or "
                     "GATEWAY_CACHE_REDIS_PASSWORD, or their _FILE)")
    return text


def parse_egress_proxy(value: object) -> str:
    """Empty (direct), or an http:// proxy URL (a user name may be in it; the password goes in
    GATEWAY_EGRESS_PROXY_PASSWORD). An https upstream is reached through it in a CONNECT
    tunnel."""
    text = str(value).strip()
    if not text or text.lower() == "off":
        return ""
    url = _service_url(text, ("http",), "http://proxy.corp:3128",
                       "set GATEWAY_EGRESS_PROXY_PASSWORD(_FILE)")
    if url.path not in ("", "/") or url.query_string:
        raise ValueError("must be just scheme, host and port (http://proxy.corp:3128)")
    return text


def parse_otlp_endpoint(value: object) -> str:
    """Empty (no spans), or the OTLP/HTTP base URL (http:// or https://, no credentials: use
    OTEL_EXPORTER_OTLP_HEADERS)."""
    text = str(value).strip()
    if text:
        url = _service_url(text, ("http", "https"), "http://collector:4318",
                           "use OTEL_EXPORTER_OTLP_HEADERS")
        if url.user:
            raise ValueError("must not carry credentials: use OTEL_EXPORTER_OTLP_HEADERS")
    return text


def parse_optional_file(value: object) -> str:
    """A readable file path, or empty for none."""
    path = str(value).strip()
    if path and not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}")
    return path


def parse_optional_path(value: object) -> str:
    """A file path in an existing, writable directory, or empty for none."""
    path = str(value).strip()
    if path:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"directory {parent} does not exist or is not writable")
    return path


def parse_audit_target(value: object) -> str:
    """Where audit lines go: stderr, stdout, off, or a file (in a writable directory)."""
    text = str(value).strip()
    if text.lower() in ("stderr", "stdout", "off"):
        return text.lower()
    if not text.startswith("/"):
        raise ValueError("stderr, stdout, off, or an absolute file path")
    return parse_optional_path(text)


def parse_optional_api_path(value: object) -> str:
    """An API path, or ``off`` (or empty in the TOML file): none."""
    text = str(value).strip()
    return "" if text.lower() in ("", "off", "none") else parse_path(text)
