"""Settings: one typed, immutable :class:`Settings`, loaded once, failing fast by name.

Sources, later wins: built-in defaults → the TOML file named by ``GATEWAY_CONFIG`` → the
environment. Each setting is declared once in :data:`SPECS` (file key, environment variable,
parser, default, one line of documentation); the example config file and the README table are
checked against that list. Credentials may come as ``<NAME>_FILE`` (a Kubernetes secret mount).
This is the only module that reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from gateway.redact import Secret


class SettingsError(Exception):
    """A setting is missing or invalid; ``str()`` is one line naming it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"invalid setting {setting}: {problem}")
        self.setting = setting
        self.problem = problem


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
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


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


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def _parse_fraction(value: object) -> float:
    number = float(str(value))
    if not 0.0 <= number < 1.0:
        raise ValueError("must be a fraction from 0 up to (not including) 1")
    return number


def _parse_positive_int(value: object) -> int:
    number = int(str(value))
    if number < 1:
        raise ValueError("must be a positive integer")
    return number


def _parse_base_url(value: object) -> URL:
    url = URL(str(value).strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute http:// or https:// URL")
    if url.query_string or url.fragment or url.user or url.password:
        raise ValueError("must not carry a query, fragment or user info")
    return url


def _parse_path(value: object) -> str:
    text = str(value).strip()
    if not text.startswith("/") or text.startswith("//") or "?" in text or "#" in text:
        raise ValueError("must be an absolute path such as /auth/token")
    return text


def _parse_name(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def _parse_host_port(text: str) -> TcpAddress:
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]*):(\d+)$", text)
    if not m:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:8080)")
    host, port = m.group(1) or "0.0.0.0", int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if ":" in host:
        ipaddress.IPv6Address(host)
    return TcpAddress(host, port)


def _parse_listen(value: object) -> ListenAddress:
    text = str(value).strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError("unix: needs a socket path")
        return UnixAddress(path)
    return _parse_host_port(text)


def _parse_admin_listen(value: object) -> TcpAddress:
    return _parse_host_port(str(value).strip())


def _parse_secret(value: object) -> Secret:
    text = str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return Secret(text)


@dataclass(frozen=True)
class Spec:
    """One setting: its file key, environment variable, parser, default and documentation."""

    key: str
    env: str
    parse: Callable[[object], Any]
    default: str | None
    doc: str
    section: str
    file_variant: bool = False  # may come as <ENV>_FILE


def _spec(key: str, env: str, parse: Callable[[object], Any], default: str | None, doc: str,
          section: str, file_variant: bool = False) -> Spec:
    return Spec(key, env, parse, default, doc, section, file_variant)


U, A, T, P, S, L = "upstream", "auth", "token", "proxy", "server", "logging"
#: Every setting, in documentation order. ``default=None`` means required (for ``serve``).
SPECS: tuple[Spec, ...] = (
    _spec("base_url", "REPAIRY_BASE_URL", _parse_base_url, None,
          "Upstream base URL, may carry a path prefix (https://host/prefix).", U),
    _spec("app_key", "REPAIRY_APP_KEY", _parse_secret, None,
          "Partner App Key (or REPAIRY_APP_KEY_FILE).", U, True),
    _spec("app_secret", "REPAIRY_APP_SECRET", _parse_secret, None,
          "Partner App Secret (or REPAIRY_APP_SECRET_FILE).", U, True),
    _spec("partner_id", "REPAIRY_PARTNER_ID", _parse_name, None,
          "Partner ID sent as X-Partner-ID (or REPAIRY_PARTNER_ID_FILE).", U, True),
    _spec("connect_timeout", "GATEWAY_CONNECT_TIMEOUT", parse_duration, "5s",
          "Time allowed to open a connection to the upstream.", U),
    _spec("read_timeout", "GATEWAY_READ_TIMEOUT", parse_duration, "60s",
          "Longest silence allowed while reading an upstream response.", U),
    _spec("total_timeout", "GATEWAY_TOTAL_TIMEOUT", parse_duration, "300s",
          "Longest an upstream exchange may take in all (0 = no limit).", U),
    _spec("pool_size", "GATEWAY_POOL_SIZE", _parse_positive_int, "100",
          "Most simultaneous upstream connections (keep-alive pool).", U),
    _spec("keepalive_timeout", "GATEWAY_KEEPALIVE_TIMEOUT", parse_duration, "30s",
          "How long an idle upstream connection is kept for reuse.", U),
    _spec("auth_token_path", "REPAIRY_AUTH_TOKEN_PATH", _parse_path, "/auth/token",
          "Login endpoint, relative to the base URL.", A),
    _spec("auth_refresh_path", "REPAIRY_AUTH_REFRESH_PATH", _parse_path, "/auth/refresh",
          "Refresh endpoint, relative to the base URL.", A),
    _spec("auth_app_key_field", "REPAIRY_AUTH_APP_KEY_FIELD", _parse_name, "appKey",
          "Login body field carrying the App Key.", A),
    _spec("auth_app_secret_field", "REPAIRY_AUTH_APP_SECRET_FIELD", _parse_name, "appSecret",
          "Login body field carrying the App Secret.", A),
    _spec("auth_refresh_token_field", "REPAIRY_AUTH_REFRESH_TOKEN_FIELD", _parse_name,
          "refreshToken", "Refresh body field carrying the refresh token.", A),
    _spec("auth_body_format", "REPAIRY_AUTH_BODY_FORMAT", _choice("json", "form"), "json",
          "Encoding of auth request bodies: json or form (urlencoded).", A),
    _spec("auth_refresh_bearer", "REPAIRY_AUTH_REFRESH_BEARER", _parse_bool, "true",
          "Send the current access token as Bearer on refresh.", A),
    _spec("auth_timeout", "GATEWAY_AUTH_TIMEOUT", parse_duration, "10s",
          "Time allowed for one login or refresh call.", A),
    _spec("access_token_default_ttl", "REPAIRY_ACCESS_TOKEN_TTL", parse_duration, "48h",
          "Access-token lifetime assumed when the auth response states none.", A),
    _spec("refresh_token_default_ttl", "REPAIRY_REFRESH_TOKEN_TTL", parse_duration, "14d",
          "Refresh-token lifetime assumed when the auth response states none.", A),
    _spec("renew_at_fraction", "GATEWAY_RENEW_AT_FRACTION", _parse_fraction, "0.8",
          "Renew in the background once this share of the token lifetime has passed.", T),
    _spec("renew_jitter_fraction", "GATEWAY_RENEW_JITTER_FRACTION", _parse_fraction, "0.1",
          "Renew up to this share of the lifetime earlier, at random, so replicas spread.", T),
    _spec("token_expiry_margin", "GATEWAY_TOKEN_EXPIRY_MARGIN", parse_duration, "60s",
          "Stop using a token this long before it expires (capped at 10% of its lifetime).", T),
    _spec("token_wait_timeout", "GATEWAY_TOKEN_WAIT_TIMEOUT", parse_duration, "10s",
          "Longest a request waits for a token when none is usable (then 503).", T),
    _spec("renew_retry_min", "GATEWAY_RENEW_RETRY_MIN", parse_duration, "1s",
          "First back-off after a failed renewal (doubles each failure, jittered).", T),
    _spec("renew_retry_max", "GATEWAY_RENEW_RETRY_MAX", parse_duration, "60s",
          "Longest back-off between failed renewals.", T),
    _spec("login_retry_interval", "GATEWAY_LOGIN_RETRY_INTERVAL", parse_duration, "30s",
          "Wait between logins while the credentials are rejected.", T),
    _spec("listen", "GATEWAY_LISTEN", _parse_listen, "127.0.0.1:8080",
          "Proxy listener: host:port, [v6]:port or unix:/path.", P),
    _spec("replay_body_limit", "GATEWAY_REPLAY_BODY_LIMIT", parse_size, "64KiB",
          "Request bodies up to this size are kept so a request can be replayed after a 401.", P),
    _spec("max_body_size", "GATEWAY_MAX_BODY_SIZE", parse_size, "100MiB",
          "Largest request body accepted (413 above it; 0 = no limit).", P),
    _spec("admin_listen", "GATEWAY_ADMIN_LISTEN", _parse_admin_listen, "127.0.0.1:9091",
          "Admin listener (health, readiness; metrics later): host:port.", S),
    _spec("shutdown_delay", "GATEWAY_SHUTDOWN_DELAY", parse_duration, "0s",
          "On SIGTERM, keep serving (not ready) this long so load balancers notice first.", S),
    _spec("shutdown_grace", "GATEWAY_SHUTDOWN_GRACE", parse_duration, "20s",
          "On SIGTERM, how long in-flight requests get to finish.", S),
    _spec("log_level", "GATEWAY_LOG_LEVEL", _choice("debug", "info", "warning", "error"),
          "info", "Log level: debug, info, warning or error.", L),
    _spec("log_format", "GATEWAY_LOG_FORMAT", _choice("json", "text"), "json",
          "Log format: json (one object a line) or text (for terminals).", L),
)
CONFIG_ENV = "GATEWAY_CONFIG"
_BY_KEY = {s.key: s for s in SPECS}


@dataclass(frozen=True)
class Settings:
    """Every setting, typed. Build with :func:`load_settings`."""

    base_url: URL
    app_key: Secret
    app_secret: Secret
    partner_id: str
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    pool_size: int
    keepalive_timeout: float
    auth_token_path: str
    auth_refresh_path: str
    auth_app_key_field: str
    auth_app_secret_field: str
    auth_refresh_token_field: str
    auth_body_format: str
    auth_refresh_bearer: bool
    auth_timeout: float
    access_token_default_ttl: float
    refresh_token_default_ttl: float
    renew_at_fraction: float
    renew_jitter_fraction: float
    token_expiry_margin: float
    token_wait_timeout: float
    renew_retry_min: float
    renew_retry_max: float
    login_retry_interval: float
    listen: ListenAddress
    replay_body_limit: int
    max_body_size: int
    admin_listen: TcpAddress
    shutdown_delay: float
    shutdown_grace: float
    log_level: str
    log_format: str
    config_file: str | None = field(default=None)


def _read_file_setting(spec: Spec, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{spec.env}_FILE", f"cannot read {path}: {exc.strerror}") from None


def _load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(CONFIG_ENV, f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(CONFIG_ENV, f"{path} is not valid TOML: {exc}") from None
    table = data.get("gateway", data)
    if not isinstance(table, dict):
        raise SettingsError(CONFIG_ENV, f"{path}: [gateway] must be a table")
    for key in table:
        if key not in _BY_KEY:
            raise SettingsError(f"{key} (in {path})", "unknown setting")
    return table


def load_settings(env: Mapping[str, str] | None = None, *, config_file: str | None = None,
                  overrides: Mapping[str, object] | None = None) -> Settings:
    """Load and validate every setting; raise :class:`SettingsError` naming the first bad one.

    ``env`` defaults to the process environment; ``overrides`` (by file key) win over all.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get(CONFIG_ENV) or None
    from_file = _load_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for spec in SPECS:
        raw: object | None = spec.default
        origin = spec.env
        if spec.key in from_file:
            raw, origin = from_file[spec.key], f"{spec.key} (in {config_file})"
        file_var = f"{spec.env}_FILE"
        if spec.file_variant and env.get(file_var):
            if env.get(spec.env):
                raise SettingsError(spec.env, f"set either {spec.env} or {file_var}, not both")
            raw, origin = _read_file_setting(spec, env[file_var]), file_var
        elif env.get(spec.env, "") != "":
            raw, origin = env[spec.env], spec.env
        if overrides and spec.key in overrides:
            raw, origin = overrides[spec.key], spec.env
        if raw is None:
            extra = f" (or {file_var})" if spec.file_variant else ""
            raise SettingsError(spec.env, f"required; set {spec.env}{extra}")
        try:
            values[spec.key] = spec.parse(raw)
        except (ValueError, TypeError) as exc:
            raise SettingsError(origin, str(exc) or "invalid value") from None
    settings = Settings(**values, config_file=config_file)
    _check_consistency(settings)
    return settings


def _check_consistency(s: Settings) -> None:
    if s.renew_retry_min > s.renew_retry_max:
        raise SettingsError("GATEWAY_RENEW_RETRY_MIN", "must not exceed GATEWAY_RENEW_RETRY_MAX")
    if s.renew_jitter_fraction > s.renew_at_fraction:
        raise SettingsError("GATEWAY_RENEW_JITTER_FRACTION",
                            "must not exceed GATEWAY_RENEW_AT_FRACTION")
    if s.max_body_size and s.replay_body_limit > s.max_body_size:
        raise SettingsError("GATEWAY_REPLAY_BODY_LIMIT", "must not exceed GATEWAY_MAX_BODY_SIZE")
    if s.auth_token_path == s.auth_refresh_path:
        raise SettingsError("REPAIRY_AUTH_REFRESH_PATH", "must differ from the login path")


def render_example_config() -> str:
    """The documented example config file (``config/repairy-gateway.toml``)."""
    lines = [
        "# repairy-gateway example configuration (TOML). Every setting with its default.",
        "# Point GATEWAY_CONFIG at this file; environment variables override it.",
        "# Durations: 30s, 5m, 48h, 14d or plain seconds. Sizes: 65536, 64KiB, 100MiB.",
        "# Keep credentials out of this file: use REPAIRY_APP_SECRET_FILE and friends.",
        "",
        "[gateway]",
    ]
    section = ""
    for spec in SPECS:
        if spec.section != section:
            section = spec.section
            lines += ["", f"# --- {section} ---"]
        lines.append(f"# {spec.doc} Environment: {spec.env}.")
        if spec.default is None:
            lines.append(f'# {spec.key} = "..."  (required)')
        else:
            lines.append(f'# {spec.key} = "{spec.default}"')
    return "\n".join(lines) + "\n"
