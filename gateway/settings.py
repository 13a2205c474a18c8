"""Settings: one typed, immutable :class:`Settings`, loaded once, failing fast by name.

Sources, later wins: built-in defaults → the TOML file named by ``GATEWAY_CONFIG`` → the
environment. Each setting is declared once in :data:`SPECS` (file key, environment variable,
parser, default, one line of documentation); the example config file and docs/settings.md are
checked against that list. Credentials may come as ``<NAME>_FILE`` (a Kubernetes secret mount).
This is the only module that reads the environment.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from yarl import URL

from gateway.config_values import (
    ListenAddress,
    TcpAddress,
    bounded_int,
    bounded_number,
    choice,
    duration_at_least,
    parse_admin_listen,
    parse_base_url,
    parse_bool,
    parse_duration,
    parse_egress_proxy,
    parse_fraction,
    parse_listen,
    parse_name,
    parse_optional_file,
    parse_optional_path,
    parse_optional_secret,
    parse_otlp_endpoint,
    parse_path,
    parse_positive_duration,
    parse_positive_int,
    parse_redis_url,
    parse_renew_fraction,
    parse_secret,
    parse_size,
    parse_status_list,
)
from gateway.proxy.access import (
    ClientKey,
    IPNetwork,
    RouteRule,
    is_loopback,
    parse_cidrs,
    parse_client_keys,
    parse_header_names,
    parse_routes,
)
from gateway.proxy.cache import CacheRule, parse_cache_routes
from gateway.proxy.idempotency import (
    LEASE_MARGIN,
    IdempotencyRule,
    leader_deadline,
    parse_idempotency_routes,
)
from gateway.redact import Secret


class SettingsError(Exception):
    """Settings are missing or invalid: ``setting``/``problem`` name the first, ``problems``
    all of them; ``str()`` is one line for each."""

    def __init__(self, setting: str, problem: str,
                 more: Sequence[tuple[str, str]] = ()) -> None:
        self.setting = setting
        self.problem = problem
        self.problems: list[tuple[str, str]] = [(setting, problem), *more]
        super().__init__("\n".join(f"invalid setting {name}: {why}"
                                    for name, why in self.problems))


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


U, A, T, F, R = "upstream", "auth", "token", "fleet", "retries and limits"
C, ID = "cache", "idempotency"


def parse_optional_api_path(value: object) -> str:
    """An API path, or ``off`` (or empty in the TOML file): none."""
    text = str(value).strip()
    return "" if text.lower() in ("", "off", "none") else parse_path(text)

P, IN, S, L = "proxy", "inbound", "server", "logging"
#: Most worker processes: each is a whole interpreter with its own upstream pool, and the
#: supervisor fans every token out to them and merges their metrics every second; past a few
#: per core they add memory and upstream connections, not throughput.
MAX_WORKERS: Final = 32
#: Every setting, in documentation order. ``default=None`` means required (for ``serve``).
SPECS: tuple[Spec, ...] = (
    _spec("base_url", "REPAIRY_BASE_URL", parse_base_url, None,
          "Upstream base URL, may carry a path prefix (https://host/prefix).", U),
    _spec("app_key", "REPAIRY_APP_KEY", parse_secret, None,
          "Partner App Key (or REPAIRY_APP_KEY_FILE).", U, True),
    _spec("app_secret", "REPAIRY_APP_SECRET", parse_secret, None,
          "Partner App Secret (or REPAIRY_APP_SECRET_FILE).", U, True),
    _spec("partner_id", "REPAIRY_PARTNER_ID", parse_name, None,
          "Partner ID sent as X-Partner-ID (or REPAIRY_PARTNER_ID_FILE).", U, True),
    _spec("connect_timeout", "GATEWAY_CONNECT_TIMEOUT", duration_at_least(0.05), "5s",
          "Time allowed to open a connection to the upstream. At least 50ms.", U),
    _spec("read_timeout", "GATEWAY_READ_TIMEOUT", duration_at_least(0.1, zero_is_off=True),
          "60s", "Longest silence allowed while reading an upstream response (0: no limit). "
          "At least 100ms.", U),
    _spec("total_timeout", "GATEWAY_TOTAL_TIMEOUT", duration_at_least(0.1, zero_is_off=True),
          "300s", "One deadline per request from its first upstream send: attempts, back-off, "
          "the 401 replay and the answer's body (0 = no limit: refused while "
          "GATEWAY_IDEMPOTENCY_ROUTES is on). At least 100ms.", U),
    _spec("pool_size", "GATEWAY_POOL_SIZE", parse_positive_int, "100",
          "Most simultaneous upstream connections (keep-alive pool).", U),
    _spec("keepalive_timeout", "GATEWAY_KEEPALIVE_TIMEOUT", parse_duration, "4s",
          "How long an idle upstream connection is kept for reuse (keep it below the "
          "upstream's own idle timeout: Node's is 5s).", U),
    _spec("upstream_ca_file", "GATEWAY_UPSTREAM_CA_FILE", parse_optional_file, "",
          "PEM CA bundle to verify the upstream's TLS certificate (empty: system CAs).", U),
    _spec("allow_insecure_upstream", "GATEWAY_ALLOW_INSECURE_UPSTREAM", parse_bool, "false",
          "Allow an http:// base URL that is not loopback (tokens would travel in clear).", U),
    _spec("egress_proxy", "GATEWAY_EGRESS_PROXY", parse_egress_proxy, "",
          "HTTP proxy for the calls to Repairy (proxied requests and logins; not Redis): "
          "http://[user@]host:port, https upstreams tunnelled with CONNECT. Empty: direct.", U),
    _spec("egress_proxy_password", "GATEWAY_EGRESS_PROXY_PASSWORD", parse_optional_secret, "",
          "Password for the egress proxy's user (or GATEWAY_EGRESS_PROXY_PASSWORD_FILE).", U,
          True),
    _spec("strip_headers", "GATEWAY_STRIP_HEADERS", parse_header_names, "",
          "Comma-separated internal headers never forwarded upstream.", U),
    _spec("forwarded_headers", "GATEWAY_FORWARDED_HEADERS", parse_bool, "false",
          "Add X-Forwarded-For/-Proto upstream (callers' X-Forwarded-* are always dropped).", U),
    _spec("retry_attempts", "GATEWAY_RETRY_ATTEMPTS", bounded_int(1, 10), "2",
          "Most sends of one request in all, the first included (1: no retries). Only safe "
          "cases are retried: see 'Retries' in docs/how-it-works.md.", R),
    _spec("retry_on_status", "GATEWAY_RETRY_ON_STATUS", parse_status_list, "",
          "Comma-separated statuses retried for idempotent methods (e.g. 502,503,504,429; "
          "empty: answers pass through).", R),
    _spec("retry_backoff_min", "GATEWAY_RETRY_BACKOFF_MIN", duration_at_least(0.01), "50ms",
          "First wait before a retry (doubles each retry, jittered). At least 10ms.", R),
    _spec("retry_backoff_max", "GATEWAY_RETRY_BACKOFF_MAX", parse_positive_duration, "2s",
          "Longest wait before a retry.", R),
    _spec("retry_after_max", "GATEWAY_RETRY_AFTER_MAX", parse_duration, "5s",
          "Longest Retry-After waited on before a retry; a longer one is passed back to the "
          "caller.", R),
    _spec("retry_budget_ratio", "GATEWAY_RETRY_BUDGET_RATIO", bounded_number(0.0, 1.0), "0.2",
          "Retry budget: retries may be at most this share of the requests of the last "
          "GATEWAY_RETRY_BUDGET_WINDOW (per process).", R),
    _spec("retry_budget_min_per_second", "GATEWAY_RETRY_BUDGET_MIN_PER_SECOND",
          bounded_number(0.0, 10000.0), "10", "Retry budget floor: this many retries a second "
          "are always allowed (per process).", R),
    _spec("retry_budget_window", "GATEWAY_RETRY_BUDGET_WINDOW", duration_at_least(1.0), "10s",
          "The retry budget's window. At least 1s.", R),
    _spec("breaker_failures", "GATEWAY_BREAKER_FAILURES", bounded_int(0, 100000), "20",
          "Consecutive connection failures or timeouts that open the circuit breaker (0: no "
          "breaker).", R),
    _spec("breaker_failure_ratio", "GATEWAY_BREAKER_FAILURE_RATIO", bounded_number(0.01, 1.0),
          "0.5", "The breaker also opens at this share of failures among at least "
          "GATEWAY_BREAKER_MIN_REQUESTS requests in GATEWAY_BREAKER_WINDOW.", R),
    _spec("breaker_min_requests", "GATEWAY_BREAKER_MIN_REQUESTS", bounded_int(1, 1000000),
          "20", "Fewest requests in the window for the failure share to count.", R),
    _spec("breaker_window", "GATEWAY_BREAKER_WINDOW", duration_at_least(1.0), "10s",
          "The breaker's window for the failure share. At least 1s.", R),
    _spec("breaker_cooldown", "GATEWAY_BREAKER_COOLDOWN", duration_at_least(0.1), "10s",
          "How long an open breaker answers 503 upstream_circuit_open before probing. At "
          "least 100ms.", R),
    _spec("breaker_probes", "GATEWAY_BREAKER_PROBES", bounded_int(1, 1000), "1",
          "Requests let through at once to probe a recovering upstream (half-open).", R),
    _spec("upstream_concurrency", "GATEWAY_UPSTREAM_CONCURRENCY", bounded_int(0, 100000), "0",
          "Most upstream exchanges at once; callers wait up to GATEWAY_CONNECT_TIMEOUT, then "
          "503 upstream_busy (0: GATEWAY_POOL_SIZE bounds it).", R),
    _spec("rate_limit", "GATEWAY_RATE_LIMIT", bounded_number(0.0, 1e6), "0",
          "Requests a second let through to the upstream, all callers together (429 "
          "rate_limited above; 0: no limit).", R),
    _spec("rate_limit_burst", "GATEWAY_RATE_LIMIT_BURST", bounded_int(0, 10**7), "0",
          "Requests allowed at once above the rate (0: one second's worth).", R),
    _spec("client_rate_limit", "GATEWAY_CLIENT_RATE_LIMIT", bounded_number(0.0, 1e6), "0",
          "Requests a second per client (by client key; 'anonymous' without keys; 0: none).",
          R),
    _spec("client_rate_limit_burst", "GATEWAY_CLIENT_RATE_LIMIT_BURST", bounded_int(0, 10**7),
          "0", "Per-client burst (0: one second's worth).", R),
    _spec("client_concurrency", "GATEWAY_CLIENT_CONCURRENCY", bounded_int(0, 100000), "0",
          "Most requests in flight per client (429 client_busy above; 0: no limit).", R),
    _spec("cache_routes", "GATEWAY_CACHE_ROUTES", parse_cache_routes, "",
          "GET answers to cache, comma-separated 'GET /path-glob=TTL' (e.g. "
          "GET /workshops/*/services=60s; empty: no cache). Per process.", C),
    _spec("cache_max_bytes", "GATEWAY_CACHE_MAX_BYTES", parse_size, "32MiB",
          "Most memory the GET cache holds (bodies, headers and keys).", C),
    _spec("cache_max_entries", "GATEWAY_CACHE_MAX_ENTRIES", bounded_int(1, 10**7), "10000",
          "Most answers the GET cache holds.", C),
    _spec("cache_max_entry", "GATEWAY_CACHE_MAX_ENTRY", parse_size, "1MiB",
          "Largest answer body the GET cache keeps.", C),
    _spec("cache_shared", "GATEWAY_CACHE_SHARED", parse_bool, "false",
          "Share the GET cache's answers through Redis too (GATEWAY_CACHE_REDIS_URL, else "
          "GATEWAY_REDIS_URL), so one replica's upstream call serves the fleet.", C),
    _spec("cache_redis_url", "GATEWAY_CACHE_REDIS_URL", parse_redis_url, "",
          "A Redis of its own for the shared GET cache (allkeys-lru is right for it); empty: "
          "GATEWAY_REDIS_URL, beside the token and the Idempotency-Key records, within "
          "GATEWAY_CACHE_SHARED_MAX_BYTES.", C),
    _spec("cache_redis_password", "GATEWAY_CACHE_REDIS_PASSWORD", parse_optional_secret, "",
          "Password of GATEWAY_CACHE_REDIS_URL (or GATEWAY_CACHE_REDIS_PASSWORD_FILE).", C, True),
    _spec("cache_shared_max_bytes", "GATEWAY_CACHE_SHARED_MAX_BYTES", parse_size, "32MiB",
          "Most memory the shared GET cache takes in Redis, for the whole fleet (entries, "
          "keys and their index; the soonest to expire go first). At least 3 times "
          "GATEWAY_CACHE_MAX_ENTRY.", C),
    _spec("idempotency_routes", "GATEWAY_IDEMPOTENCY_ROUTES", parse_idempotency_routes,
          "POST /bookings,POST /bookings/*/*",
          "Routes where a caller's Idempotency-Key is honoured, comma-separated "
          "'METHOD /path-glob' (off: none). See 'Idempotency-Key' in docs/how-it-works.md.", ID),
    _spec("idempotency_ttl", "GATEWAY_IDEMPOTENCY_TTL", parse_positive_duration, "24h",
          "How long the answer to a request with an Idempotency-Key is kept for repeats, from "
          "when it is stored; at least GATEWAY_IDEMPOTENCY_WAIT + GATEWAY_TOKEN_WAIT_TIMEOUT + "
          "GATEWAY_CONNECT_TIMEOUT + GATEWAY_TOTAL_TIMEOUT + 5s.", ID),
    _spec("idempotency_wait", "GATEWAY_IDEMPOTENCY_WAIT", parse_duration, "10s",
          "How long a repeat waits for the first request still in flight before 409 "
          "idempotency_in_flight.", ID),
    _spec("idempotency_max_body", "GATEWAY_IDEMPOTENCY_MAX_BODY", parse_size, "256KiB",
          "Largest answer body kept for repeats (a larger answer is passed on and its key "
          "answers repeats with 409 idempotent_answer_not_kept).", ID),
    _spec("idempotency_max_bytes", "GATEWAY_IDEMPOTENCY_MAX_BYTES", parse_size, "64MiB",
          "Most memory the kept answers hold, without Redis (the oldest go first).", ID),
    _spec("idempotency_max_entries", "GATEWAY_IDEMPOTENCY_MAX_ENTRIES",
          bounded_int(1, 10**7), "100000",
          "Most keys kept, without Redis.", ID),
    _spec("auth_token_path", "REPAIRY_AUTH_TOKEN_PATH", parse_path, "/auth/token",
          "Login endpoint, relative to the base URL.", A),
    _spec("auth_refresh_path", "REPAIRY_AUTH_REFRESH_PATH", parse_path, "/auth/refresh",
          "Refresh endpoint, relative to the base URL.", A),
    _spec("auth_app_key_field", "REPAIRY_AUTH_APP_KEY_FIELD", parse_name, "appKey",
          "Login body field carrying the App Key.", A),
    _spec("auth_app_secret_field", "REPAIRY_AUTH_APP_SECRET_FIELD", parse_name, "appSecret",
          "Login body field carrying the App Secret.", A),
    _spec("auth_refresh_token_field", "REPAIRY_AUTH_REFRESH_TOKEN_FIELD", parse_name,
          "refreshToken", "Refresh body field carrying the refresh token.", A),
    _spec("auth_body_format", "REPAIRY_AUTH_BODY_FORMAT", choice("json", "form"), "json",
          "Encoding of auth request bodies: json or form (urlencoded).", A),
    _spec("auth_refresh_bearer", "REPAIRY_AUTH_REFRESH_BEARER", parse_bool, "true",
          "Send the current access token as Bearer on refresh.", A),
    _spec("check_path", "GATEWAY_CHECK_PATH", parse_optional_api_path,
          "/bookings/000000000000000000000000", "What 'check' GETs after logging in to prove "
          "the token and the Partner ID work (2xx or 404 pass; off: no call).", A),
    _spec("auth_timeout", "GATEWAY_AUTH_TIMEOUT", duration_at_least(0.1), "10s",
          "Time allowed for one login or refresh call. At least 100ms.", A),
    _spec("access_token_default_ttl", "REPAIRY_ACCESS_TOKEN_TTL", duration_at_least(1.0), "48h",
          "Access-token lifetime assumed when the auth response states none. At least 1s.", A),
    _spec("refresh_token_default_ttl", "REPAIRY_REFRESH_TOKEN_TTL", duration_at_least(1.0),
          "14d", "Refresh-token lifetime assumed when the auth response states none. At least "
          "1s.", A),
    _spec("renew_at_fraction", "GATEWAY_RENEW_AT_FRACTION", parse_renew_fraction, "0.8",
          "Renew in the background once this share of the token lifetime has passed.", T),
    _spec("renew_jitter_fraction", "GATEWAY_RENEW_JITTER_FRACTION", parse_fraction, "0.1",
          "Renew up to this share of the lifetime earlier, at random, so replicas spread.", T),
    _spec("token_expiry_margin", "GATEWAY_TOKEN_EXPIRY_MARGIN", parse_duration, "60s",
          "Stop using a token this long before it expires (capped at 10% of its lifetime).", T),
    _spec("token_wait_timeout", "GATEWAY_TOKEN_WAIT_TIMEOUT", duration_at_least(0.1), "10s",
          "Longest a request waits for a token when none is usable (then 503). At least "
          "100ms.", T),
    _spec("renew_retry_min", "GATEWAY_RENEW_RETRY_MIN", duration_at_least(0.05), "1s",
          "First back-off after a failed renewal (doubles each failure, jittered). At least "
          "50ms.", T),
    _spec("renew_retry_max", "GATEWAY_RENEW_RETRY_MAX", duration_at_least(0.5), "60s",
          "Longest back-off between failed renewals. At least 500ms.", T),
    _spec("login_retry_interval", "GATEWAY_LOGIN_RETRY_INTERVAL", duration_at_least(0.05),
          "30s", "Wait between logins while Repairy refuses the configuration (rejected "
          "credentials, a wrong auth path or body). At least 50ms.", T),
    _spec("persistent_401_cooldown", "GATEWAY_PERSISTENT_401_COOLDOWN", duration_at_least(1.0),
          "60s", "A route that answers 401 to a brand-new token too is passed through, without "
          "renewing, for this long (doubling while it persists). At least 1s.", T),
    _spec("persistent_401_cooldown_max", "GATEWAY_PERSISTENT_401_COOLDOWN_MAX",
          parse_positive_duration, "1h", "Longest persistent-401 cool-down of a route.", T),
    _spec("token_file", "GATEWAY_TOKEN_FILE", parse_optional_path, "",
          "Keep the token in this file (0600) so a restart reuses it (empty: memory only).", T),
    _spec("redis_url", "GATEWAY_REDIS_URL", parse_redis_url, "",
          "Shared store for a fleet (redis:// or rediss://): the token (taking precedence over "
          "GATEWAY_TOKEN_FILE), Idempotency-Key records, the GET cache if shared. Empty: this "
          "process keeps its own.", F),
    _spec("redis_password", "GATEWAY_REDIS_PASSWORD", parse_optional_secret, "",
          "Redis password (or GATEWAY_REDIS_PASSWORD_FILE).", F, True),
    _spec("redis_ca_file", "GATEWAY_REDIS_CA_FILE", parse_optional_file, "",
          "PEM CA bundle to verify a rediss:// server (empty: system CAs).", F),
    _spec("redis_key_prefix", "GATEWAY_REDIS_KEY_PREFIX", parse_name, "repairy-gateway",
          "Prefix of the store's keys (the rest is derived from upstream, App Key, Partner ID).",
          F),
    _spec("redis_lease_ttl", "GATEWAY_REDIS_LEASE_TTL", duration_at_least(1.0), "5s",
          "Lifetime of the fleet's renewal lease (extended every third of it while renewing; "
          "store calls time out at half of it, at most 2s). At least 1s.",
          F),
    _spec("redis_down_policy", "GATEWAY_REDIS_DOWN_POLICY", choice("local", "wait"), "local",
          "Redis down when renewal is due: local (renew here in the last part of the token's "
          "usable life) or wait.", F),
    _spec("store_key", "GATEWAY_STORE_KEY", parse_optional_secret, "",
          "Encrypt tokens in the store with this key (AES-GCM; or GATEWAY_STORE_KEY_FILE).", F,
          True),
    _spec("store_key_previous", "GATEWAY_STORE_KEY_PREVIOUS", parse_optional_secret, "",
          "Another store key, for reading only (or GATEWAY_STORE_KEY_PREVIOUS_FILE); 'plain' "
          "reads entries written without a key. For the steps of a store key rotation "
          "(docs/deployment.md).", F, True),
    _spec("listen", "GATEWAY_LISTEN", parse_listen, "127.0.0.1:8080",
          "Proxy listener: host:port, [v6]:port or unix:/path.", P),
    _spec("replay_body_limit", "GATEWAY_REPLAY_BODY_LIMIT", parse_size, "64KiB",
          "Request bodies up to this size are kept so a request can be replayed after a 401.", P),
    _spec("max_body_size", "GATEWAY_MAX_BODY_SIZE", parse_size, "100MiB",
          "Largest request body accepted (413 above it; 0 = no limit).", P),
    _spec("client_keys", "GATEWAY_CLIENT_KEYS", parse_client_keys, "",
          "Inbound client keys, name=key comma- or newline-separated (or _FILE).", IN, True),
    _spec("client_key_header", "GATEWAY_CLIENT_KEY_HEADER", parse_name, "X-Gateway-Key",
          "Header in which callers present their client key (never forwarded).", IN),
    _spec("allowed_cidrs", "GATEWAY_ALLOWED_CIDRS", parse_cidrs, "",
          "Comma-separated CIDRs allowed to call the proxy (empty: any that can connect).", IN),
    _spec("allowed_routes", "GATEWAY_ALLOWED_ROUTES", parse_routes, "*",
          "Comma-separated 'METHOD /glob' or '/glob' allow-list; /auth/* is always refused.", IN),
    _spec("header_timeout", "GATEWAY_HEADER_TIMEOUT", duration_at_least(0.1), "10s",
          "A client must send complete request headers within this time (checked every "
          "quarter of it, at most every second). At least 100ms.", IN),
    _spec("client_body_timeout", "GATEWAY_CLIENT_BODY_TIMEOUT", duration_at_least(0.1), "30s",
          "Longest pause allowed while a client sends its request body (then 408). At least "
          "100ms.", IN),
    _spec("client_keepalive_timeout", "GATEWAY_CLIENT_KEEPALIVE_TIMEOUT", parse_duration,
          "75s", "Idle time after which a client keep-alive connection is closed.", IN),
    _spec("max_header_size", "GATEWAY_MAX_HEADER_SIZE", parse_size, "8KiB",
          "Longest request line or single header accepted (414/431 above).", IN),
    _spec("max_headers", "GATEWAY_MAX_HEADERS", parse_positive_int, "100",
          "Most request headers accepted.", IN),
    _spec("secrets_poll_interval", "GATEWAY_SECRETS_POLL_INTERVAL",
          duration_at_least(0.05, zero_is_off=True), "10s",
          "How often *_FILE credentials are checked for changes (0: only on SIGHUP). At least "
          "50ms.", IN),
    _spec("admin_listen", "GATEWAY_ADMIN_LISTEN", parse_admin_listen, "127.0.0.1:9091",
          "Admin listener (/healthz, /readyz, /tokenz, /metrics): host:port.", S),
    _spec("workers", "GATEWAY_WORKERS", bounded_int(1, MAX_WORKERS), "1",
          "Proxy worker processes, 1 to 32; above 1 a supervisor keeps the one token and hands "
          "it to them (one login for all).", S),
    _spec("event_loop", "GATEWAY_EVENT_LOOP", choice("uvloop", "asyncio"), "uvloop",
          "Event loop: uvloop (faster; falls back to asyncio where it is not installed) or "
          "asyncio.", S),
    _spec("shutdown_delay", "GATEWAY_SHUTDOWN_DELAY", parse_duration, "0s",
          "On SIGTERM, keep serving (not ready) this long so load balancers notice first.", S),
    _spec("shutdown_grace", "GATEWAY_SHUTDOWN_GRACE", parse_duration, "20s",
          "On SIGTERM, how long in-flight requests get to finish.", S),
    _spec("log_level", "GATEWAY_LOG_LEVEL", choice("debug", "info", "warning", "error"),
          "info", "Log level: debug, info, warning or error.", L),
    _spec("log_format", "GATEWAY_LOG_FORMAT", choice("json", "text"), "json",
          "Log format: json (one object a line) or text (for terminals).", L),
    _spec("otel_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", parse_otlp_endpoint, "",
          "OpenTelemetry: send spans of upstream calls and renewals over OTLP/HTTP (protobuf) to "
          "<this>/v1/traces (needs the otel extra; empty: off). OTEL_SERVICE_NAME, "
          "OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS apply.", L),
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
    upstream_ca_file: str
    allow_insecure_upstream: bool
    egress_proxy: str
    egress_proxy_password: Secret | None
    strip_headers: tuple[str, ...]
    forwarded_headers: bool
    retry_attempts: int
    retry_on_status: frozenset[int]
    retry_backoff_min: float
    retry_backoff_max: float
    retry_after_max: float
    retry_budget_ratio: float
    retry_budget_min_per_second: float
    retry_budget_window: float
    breaker_failures: int
    breaker_failure_ratio: float
    breaker_min_requests: int
    breaker_window: float
    breaker_cooldown: float
    breaker_probes: int
    upstream_concurrency: int
    rate_limit: float
    rate_limit_burst: int
    client_rate_limit: float
    client_rate_limit_burst: int
    client_concurrency: int
    cache_routes: tuple[CacheRule, ...]
    cache_max_bytes: int
    cache_max_entries: int
    cache_max_entry: int
    cache_shared: bool
    cache_redis_url: str
    cache_redis_password: Secret | None
    cache_shared_max_bytes: int
    idempotency_routes: tuple[IdempotencyRule, ...]
    idempotency_ttl: float
    idempotency_wait: float
    idempotency_max_body: int
    idempotency_max_bytes: int
    idempotency_max_entries: int
    auth_token_path: str
    auth_refresh_path: str
    auth_app_key_field: str
    auth_app_secret_field: str
    auth_refresh_token_field: str
    auth_body_format: str
    auth_refresh_bearer: bool
    check_path: str
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
    persistent_401_cooldown: float
    persistent_401_cooldown_max: float
    token_file: str
    redis_url: str
    redis_password: Secret | None
    redis_ca_file: str
    redis_key_prefix: str
    redis_lease_ttl: float
    redis_down_policy: str
    store_key: Secret | None
    store_key_previous: Secret | None
    listen: ListenAddress
    replay_body_limit: int
    max_body_size: int
    client_keys: tuple[ClientKey, ...]
    client_key_header: str
    allowed_cidrs: tuple[IPNetwork, ...]
    allowed_routes: tuple[RouteRule, ...]
    header_timeout: float
    client_body_timeout: float
    client_keepalive_timeout: float
    max_header_size: int
    max_headers: int
    secrets_poll_interval: float
    admin_listen: TcpAddress
    workers: int
    event_loop: str
    shutdown_delay: float
    shutdown_grace: float
    log_level: str
    log_format: str
    otel_endpoint: str
    config_file: str | None = field(default=None)
    #: (setting key, path) for every setting read from a ``*_FILE`` (watched for rotation).
    secret_files: tuple[tuple[str, str], ...] = field(default=())


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
    """Load and validate every setting; raise :class:`SettingsError` naming every bad one.

    ``env`` defaults to the process environment; ``overrides`` (by file key) win over all.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get(CONFIG_ENV) or None
    from_file = _load_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    secret_files: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    for spec in SPECS:
        raw: object | None = spec.default
        origin = spec.env
        if spec.key in from_file:
            raw, origin = from_file[spec.key], f"{spec.key} (in {config_file})"
        file_var = f"{spec.env}_FILE"
        if spec.file_variant and env.get(file_var):
            if env.get(spec.env):
                problems.append((spec.env, f"set either {spec.env} or {file_var}, not both"))
                continue
            try:
                raw, origin = _read_file_setting(spec, env[file_var]), file_var
            except SettingsError as exc:
                problems.extend(exc.problems)
                continue
            secret_files.append((spec.key, env[file_var]))
        elif env.get(spec.env, "") != "":
            raw, origin = env[spec.env], spec.env
        if overrides and spec.key in overrides:
            raw, origin = overrides[spec.key], spec.env
        if raw is None:
            extra = f" (or {file_var})" if spec.file_variant else ""
            problems.append((spec.env, f"required; set {spec.env}{extra}"))
            continue
        try:
            values[spec.key] = spec.parse(raw)
        except (ValueError, TypeError) as exc:
            problems.append((origin, str(exc) or "invalid value"))
    if problems:  # every one at once: fixing them one run at a time is no fun
        raise SettingsError(*problems[0], more=problems[1:])
    settings = Settings(**values, config_file=config_file, secret_files=tuple(secret_files))
    _check_consistency(settings)
    return settings


#: Every environment variable the gateway reads (``_FILE`` variants included).
KNOWN_VARIABLES: Final = frozenset(
    {CONFIG_ENV, *(spec.env for spec in SPECS),
     *(f"{spec.env}_FILE" for spec in SPECS if spec.file_variant)})
_PREFIXES: Final = ("GATEWAY_", "REPAIRY_")


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``GATEWAY_*``/``REPAIRY_*`` variables the gateway does not read (a typo is silently
    ignored otherwise), each with the closest known name, if any."""
    found = []
    for name in sorted(env):
        if name.startswith(_PREFIXES) and name not in KNOWN_VARIABLES:
            prefix = name[:name.index("_") + 1]  # compare what follows the shared prefix
            rest = {k[len(prefix):]: k for k in KNOWN_VARIABLES if k.startswith(prefix)}
            close = difflib.get_close_matches(name[len(prefix):], rest, n=1, cutoff=0.75)
            found.append((name, rest[close[0]] if close else None))
    return found


def _check_consistency(s: Settings) -> None:
    if s.renew_retry_min > s.renew_retry_max:
        raise SettingsError("GATEWAY_RENEW_RETRY_MIN", "must not exceed GATEWAY_RENEW_RETRY_MAX")
    if s.renew_jitter_fraction >= s.renew_at_fraction:
        raise SettingsError("GATEWAY_RENEW_JITTER_FRACTION",
                            "must be below GATEWAY_RENEW_AT_FRACTION")
    if (s.redis_password is not None or s.store_key is not None
            or s.store_key_previous is not None) and not (s.redis_url or s.cache_redis_url):
        raise SettingsError("GATEWAY_REDIS_URL", "GATEWAY_REDIS_PASSWORD / GATEWAY_STORE_KEY "
                            "are set, but no GATEWAY_REDIS_URL: set it, or drop them")
    if s.idempotency_max_body > 8 * 1024 * 1024:
        raise SettingsError("GATEWAY_IDEMPOTENCY_MAX_BODY", "must be at most 8MiB")
    if s.idempotency_max_bytes < 2 * s.idempotency_max_body:
        raise SettingsError("GATEWAY_IDEMPOTENCY_MAX_BYTES", "must hold at least two answers "
                            "of GATEWAY_IDEMPOTENCY_MAX_BODY")
    if s.idempotency_routes and not s.total_timeout:
        raise SettingsError("GATEWAY_TOTAL_TIMEOUT", "must be a duration, not 0 (no limit), "
                            "while GATEWAY_IDEMPOTENCY_ROUTES is on: a booking's claim must "
                            "have a bound (or set GATEWAY_IDEMPOTENCY_ROUTES=off)")
    least = s.idempotency_wait + leader_deadline(s.token_wait_timeout, s.connect_timeout,
                                                 s.total_timeout) + LEASE_MARGIN
    if s.idempotency_routes and s.idempotency_ttl < least:
        raise SettingsError("GATEWAY_IDEMPOTENCY_TTL", f"must be at least {least:g}s: "
                            "GATEWAY_IDEMPOTENCY_WAIT + GATEWAY_TOKEN_WAIT_TIMEOUT + "
                            "GATEWAY_CONNECT_TIMEOUT + GATEWAY_TOTAL_TIMEOUT + 5s (a claim "
                            "must outlive its leader's lease and the repeats waiting on it)")
    if s.cache_shared and not (s.redis_url or s.cache_redis_url):
        raise SettingsError("GATEWAY_CACHE_SHARED", "needs GATEWAY_REDIS_URL (the fleet's "
                            "Redis) or GATEWAY_CACHE_REDIS_URL to share the cache through")
    if (s.cache_redis_url or s.cache_redis_password is not None) and not s.cache_shared:
        raise SettingsError("GATEWAY_CACHE_REDIS_URL", "is only used with "
                            "GATEWAY_CACHE_SHARED=true: set it, or drop the cache's Redis")
    if s.cache_redis_password is not None and not s.cache_redis_url:
        raise SettingsError("GATEWAY_CACHE_REDIS_PASSWORD", "is set, but no "
                            "GATEWAY_CACHE_REDIS_URL")
    if s.cache_shared and s.cache_shared_max_bytes < 3 * s.cache_max_entry:
        raise SettingsError("GATEWAY_CACHE_SHARED_MAX_BYTES", "must be at least 3 times "
                            "GATEWAY_CACHE_MAX_ENTRY (an entry takes a third more in Redis)")
    previous = None if s.store_key_previous is None else s.store_key_previous.reveal()
    if previous == "plain" and s.store_key is None:
        raise SettingsError("GATEWAY_STORE_KEY_PREVIOUS", "'plain' reads entries written "
                            "without a key, which a gateway without GATEWAY_STORE_KEY does "
                            "anyway: drop it")
    if previous is not None and previous != "plain" and len(previous) < 32:
        raise SettingsError("GATEWAY_STORE_KEY_PREVIOUS", "must be at least 32 characters, "
                            "or 'plain'")
    if s.egress_proxy_password is not None and not URL(s.egress_proxy).user:
        raise SettingsError("GATEWAY_EGRESS_PROXY_PASSWORD", "is set, but GATEWAY_EGRESS_PROXY "
                            "names no user (http://user@proxy:3128)")
    if s.redis_ca_file and not s.redis_url.startswith("rediss://"):
        raise SettingsError("GATEWAY_REDIS_CA_FILE", "only applies to a rediss:// "
                            "GATEWAY_REDIS_URL (TLS)")
    if s.store_key is not None and len(s.store_key.reveal()) < 32:
        raise SettingsError("GATEWAY_STORE_KEY", "must be at least 32 characters of random "
                            "(e.g. openssl rand -base64 32)")
    if s.persistent_401_cooldown > s.persistent_401_cooldown_max:
        raise SettingsError("GATEWAY_PERSISTENT_401_COOLDOWN",
                            "must not exceed GATEWAY_PERSISTENT_401_COOLDOWN_MAX")
    if s.max_body_size and s.replay_body_limit > s.max_body_size:
        raise SettingsError("GATEWAY_REPLAY_BODY_LIMIT", "must not exceed GATEWAY_MAX_BODY_SIZE")
    if s.retry_backoff_min > s.retry_backoff_max:
        raise SettingsError("GATEWAY_RETRY_BACKOFF_MIN", "must not exceed "
                            "GATEWAY_RETRY_BACKOFF_MAX")
    if s.upstream_concurrency > s.pool_size:
        raise SettingsError("GATEWAY_UPSTREAM_CONCURRENCY", f"must not exceed GATEWAY_POOL_SIZE "
                            f"({s.pool_size}): raise the pool size too")
    if s.auth_token_path == s.auth_refresh_path:
        raise SettingsError("REPAIRY_AUTH_REFRESH_PATH", "must differ from the login path")
    if not is_loopback(s.listen) and not s.client_keys and not s.allowed_cidrs:
        raise SettingsError("GATEWAY_LISTEN", f"{s.listen} is not loopback: set "
                            "GATEWAY_CLIENT_KEYS and/or GATEWAY_ALLOWED_CIDRS so that not "
                            "everyone who can reach it acts as the partner")
    if s.base_url.scheme == "http" and not s.allow_insecure_upstream and not _loopback_host(
            s.base_url.host or ""):
        raise SettingsError("REPAIRY_BASE_URL", "http:// would send the token in clear: use "
                            "https://, or set GATEWAY_ALLOW_INSECURE_UPSTREAM=true")


def _loopback_host(host: str) -> bool:
    return is_loopback(TcpAddress(host, 0))


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


def render_settings_table() -> str:
    """docs/settings.md's settings table (Markdown), from :data:`SPECS`."""
    rows = ["| Variable | File key | Default | Meaning |", "|---|---|---|---|",
            f"| `{CONFIG_ENV}` | - | none | Optional TOML config file ([gateway] table of the "
            "file keys below). |"]
    for spec in SPECS:
        default = "required" if spec.default is None else (
            f"`{spec.default}`" if spec.default else "empty")
        rows.append(f"| `{spec.env}` | `{spec.key}` | {default} | {spec.doc} |")
    return "\n".join(rows) + "\n"
