"""The request path's configs: the upstream connection, retries and limits, the GET cache,
Idempotency-Keys, the proxy listener and who may call it. Each field is a setting declared once
(:mod:`gateway.declare`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from yarl import URL

from gateway.config_values import (
    ListenAddress,
    bounded_int,
    bounded_number,
    duration_at_least,
    parse_bool,
    parse_duration,
    parse_egress_proxy,
    parse_listen,
    parse_name,
    parse_optional_file,
    parse_optional_secret,
    parse_positive_duration,
    parse_positive_int,
    parse_redis_url,
    parse_size,
    parse_status_list,
)
from gateway.declare import setting
from gateway.proxy.access import (
    ClientKey,
    ClientProfiles,
    IPNetwork,
    RouteRule,
    parse_cidrs,
    parse_client_keys,
    parse_client_profiles,
    parse_header_names,
    parse_routes,
)
from gateway.proxy.cache import CacheRule, parse_cache_routes
from gateway.proxy.idempotency import IdempotencyRule, parse_idempotency_routes
from gateway.redact import Secret


@dataclass(frozen=True)
class UpstreamConfig:
    """How the upstream is reached: timeouts, pool, TLS, egress proxy, headers."""

    SECTION: ClassVar[str] = "upstream"

    connect_timeout: float = setting(
        "GATEWAY_CONNECT_TIMEOUT", duration_at_least(0.05), "5s",
        "Time allowed to open a connection to the upstream. At least 50ms.")
    read_timeout: float = setting(
        "GATEWAY_READ_TIMEOUT", duration_at_least(0.1, zero_is_off=True), "60s",
        "Longest silence allowed while reading an upstream response (0: no limit). "
        "At least 100ms.")
    total_timeout: float = setting(
        "GATEWAY_TOTAL_TIMEOUT", duration_at_least(0.1, zero_is_off=True), "300s",
        "One deadline per request from its first upstream send: attempts, back-off, "
        "the 401 replay and the answer's body (0 = no limit: refused while "
        "GATEWAY_IDEMPOTENCY_ROUTES is on). At least 100ms.")
    pool_size: int = setting(
        "GATEWAY_POOL_SIZE", parse_positive_int, "100",
        "Most simultaneous upstream connections (keep-alive pool), per credential profile.")
    keepalive_timeout: float = setting(
        "GATEWAY_KEEPALIVE_TIMEOUT", parse_duration, "4s",
        "How long an idle upstream connection is kept for reuse (keep it below the "
        "upstream's own idle timeout: Node's is 5s).")
    upstream_ca_file: str = setting(
        "GATEWAY_UPSTREAM_CA_FILE", parse_optional_file, "",
        "PEM CA bundle to verify the upstream's TLS certificate (empty: system CAs).")
    allow_insecure_upstream: bool = setting(
        "GATEWAY_ALLOW_INSECURE_UPSTREAM", parse_bool, "false",
        "Allow an http:// base URL that is not loopback (tokens would travel in clear).")
    egress_proxy: str = setting(
        "GATEWAY_EGRESS_PROXY", parse_egress_proxy, "",
        "HTTP proxy for the calls to Repairy (proxied requests and logins; not Redis): "
        "http://[user@]host:port, https upstreams tunnelled with CONNECT. Empty: direct.")
    egress_proxy_password: Secret | None = setting(
        "GATEWAY_EGRESS_PROXY_PASSWORD", parse_optional_secret, "",
        "Password for the egress proxy's user (or GATEWAY_EGRESS_PROXY_PASSWORD_FILE).",
        file_variant=True, secret=True)
    strip_headers: tuple[str, ...] = setting(
        "GATEWAY_STRIP_HEADERS", parse_header_names, "",
        "Comma-separated internal headers never forwarded upstream.")
    forwarded_headers: bool = setting(
        "GATEWAY_FORWARDED_HEADERS", parse_bool, "false",
        "Add X-Forwarded-For/-Proto upstream (callers' X-Forwarded-* are always dropped).")


@dataclass(frozen=True)
class GuardConfig:
    """Retries, the retry budget, the breaker and the rate and concurrency limits."""

    SECTION: ClassVar[str] = "retries and limits"

    retry_attempts: int = setting(
        "GATEWAY_RETRY_ATTEMPTS", bounded_int(1, 10), "2",
        "Most sends of one request in all, the first included (1: no retries). Only safe "
        "cases are retried: see 'Retries' in docs/how-it-works.md.")
    retry_on_status: frozenset[int] = setting(
        "GATEWAY_RETRY_ON_STATUS", parse_status_list, "",
        "Comma-separated statuses retried for idempotent methods (e.g. 502,503,504,429; "
        "empty: answers pass through).")
    retry_backoff_min: float = setting(
        "GATEWAY_RETRY_BACKOFF_MIN", duration_at_least(0.01), "50ms",
        "First wait before a retry (doubles each retry, jittered). At least 10ms.")
    retry_backoff_max: float = setting(
        "GATEWAY_RETRY_BACKOFF_MAX", parse_positive_duration, "2s",
        "Longest wait before a retry.")
    retry_after_max: float = setting(
        "GATEWAY_RETRY_AFTER_MAX", parse_duration, "5s",
        "Longest Retry-After waited on before a retry; a longer one is passed back to the "
        "caller.")
    retry_budget_ratio: float = setting(
        "GATEWAY_RETRY_BUDGET_RATIO", bounded_number(0.0, 1.0), "0.2",
        "Retry budget: retries may be at most this share of the requests of the last "
        "GATEWAY_RETRY_BUDGET_WINDOW (per process).")
    retry_budget_min_per_second: float = setting(
        "GATEWAY_RETRY_BUDGET_MIN_PER_SECOND", bounded_number(0.0, 10000.0), "10",
        "Retry budget floor: this many retries a second "
        "are always allowed (per process).")
    retry_budget_window: float = setting(
        "GATEWAY_RETRY_BUDGET_WINDOW", duration_at_least(1.0), "10s",
        "The retry budget's window. At least 1s.")
    breaker_failures: int = setting(
        "GATEWAY_BREAKER_FAILURES", bounded_int(0, 100000), "20",
        "Consecutive connection failures or timeouts that open the circuit breaker (0: no "
        "breaker).")
    breaker_failure_ratio: float = setting(
        "GATEWAY_BREAKER_FAILURE_RATIO", bounded_number(0.01, 1.0), "0.5",
        "The breaker also opens at this share of failures among at least "
        "GATEWAY_BREAKER_MIN_REQUESTS requests in GATEWAY_BREAKER_WINDOW.")
    breaker_min_requests: int = setting(
        "GATEWAY_BREAKER_MIN_REQUESTS", bounded_int(1, 1000000), "20",
        "Fewest requests in the window for the failure share to count.")
    breaker_window: float = setting(
        "GATEWAY_BREAKER_WINDOW", duration_at_least(1.0), "10s",
        "The breaker's window for the failure share. At least 1s.")
    breaker_cooldown: float = setting(
        "GATEWAY_BREAKER_COOLDOWN", duration_at_least(0.1), "10s",
        "How long an open breaker answers 503 upstream_circuit_open before probing. At "
        "least 100ms.")
    breaker_probes: int = setting(
        "GATEWAY_BREAKER_PROBES", bounded_int(1, 1000), "1",
        "Requests let through at once to probe a recovering upstream (half-open).")
    upstream_concurrency: int = setting(
        "GATEWAY_UPSTREAM_CONCURRENCY", bounded_int(0, 100000), "0",
        "Most upstream exchanges at once, per credential profile; callers wait up to "
        "GATEWAY_CONNECT_TIMEOUT, then 503 upstream_busy (0: GATEWAY_POOL_SIZE bounds it).")
    rate_limit: float = setting(
        "GATEWAY_RATE_LIMIT", bounded_number(0.0, 1e6), "0",
        "Requests a second let through to the upstream, all callers together, per "
        "credential profile (429 rate_limited above; 0: no limit).")
    rate_limit_burst: int = setting(
        "GATEWAY_RATE_LIMIT_BURST", bounded_int(0, 10**7), "0",
        "Requests allowed at once above the rate (0: one second's worth).")
    client_rate_limit: float = setting(
        "GATEWAY_CLIENT_RATE_LIMIT", bounded_number(0.0, 1e6), "0",
        "Requests a second per client (by client key; 'anonymous' without keys; 0: none).")
    client_rate_limit_burst: int = setting(
        "GATEWAY_CLIENT_RATE_LIMIT_BURST", bounded_int(0, 10**7), "0",
        "Per-client burst (0: one second's worth).")
    client_concurrency: int = setting(
        "GATEWAY_CLIENT_CONCURRENCY", bounded_int(0, 100000), "0",
        "Most requests in flight per client (429 client_busy above; 0: no limit).")


@dataclass(frozen=True)
class CacheConfig:
    """The GET cache: routes, sizes, and the shared (Redis) tier."""

    SECTION: ClassVar[str] = "cache"

    cache_routes: tuple[CacheRule, ...] = setting(
        "GATEWAY_CACHE_ROUTES", parse_cache_routes, "",
        "GET answers to cache, comma-separated 'GET /path-glob=TTL' (e.g. "
        "GET /workshops/*/services=60s; empty: no cache). Per process.")
    cache_max_bytes: int = setting(
        "GATEWAY_CACHE_MAX_BYTES", parse_size, "32MiB",
        "Most memory the GET cache holds (bodies, headers and keys).")
    cache_max_entries: int = setting(
        "GATEWAY_CACHE_MAX_ENTRIES", bounded_int(1, 10**7), "10000",
        "Most answers the GET cache holds.")
    cache_max_entry: int = setting(
        "GATEWAY_CACHE_MAX_ENTRY", parse_size, "1MiB",
        "Largest answer body the GET cache keeps.")
    cache_shared: bool = setting(
        "GATEWAY_CACHE_SHARED", parse_bool, "false",
        "Share the GET cache's answers through Redis too (GATEWAY_CACHE_REDIS_URL, else "
        "GATEWAY_REDIS_URL), so one replica's upstream call serves the fleet.")
    cache_redis_url: str = setting(
        "GATEWAY_CACHE_REDIS_URL", parse_redis_url, "",
        "A Redis of its own for the shared GET cache (allkeys-lru is right for it); empty: "
        "GATEWAY_REDIS_URL, beside the token and the Idempotency-Key records, within "
        "GATEWAY_CACHE_SHARED_MAX_BYTES.")
    cache_redis_password: Secret | None = setting(
        "GATEWAY_CACHE_REDIS_PASSWORD", parse_optional_secret, "",
        "Password of GATEWAY_CACHE_REDIS_URL (or GATEWAY_CACHE_REDIS_PASSWORD_FILE).",
        file_variant=True, secret=True)
    cache_shared_max_bytes: int = setting(
        "GATEWAY_CACHE_SHARED_MAX_BYTES", parse_size, "32MiB",
        "Most memory the shared GET cache takes in Redis, for the whole fleet (entries, "
        "keys and their index; the soonest to expire go first). At least 3 times "
        "GATEWAY_CACHE_MAX_ENTRY.")


@dataclass(frozen=True)
class IdempotencyConfig:
    """Idempotency-Key routes: how long answers are kept, how long repeats wait, sizes."""

    SECTION: ClassVar[str] = "idempotency"

    idempotency_routes: tuple[IdempotencyRule, ...] = setting(
        "GATEWAY_IDEMPOTENCY_ROUTES", parse_idempotency_routes, "POST /bookings,POST /bookings/*/*",
        "Routes where a caller's Idempotency-Key is honoured, comma-separated "
        "'METHOD /path-glob' (off: none). See 'Idempotency-Key' in docs/how-it-works.md.")
    idempotency_ttl: float = setting(
        "GATEWAY_IDEMPOTENCY_TTL", parse_positive_duration, "24h",
        "How long the answer to a request with an Idempotency-Key is kept for repeats, from "
        "when it is stored; at least GATEWAY_IDEMPOTENCY_WAIT + GATEWAY_TOKEN_WAIT_TIMEOUT + "
        "GATEWAY_CONNECT_TIMEOUT + GATEWAY_TOTAL_TIMEOUT + 5s.")
    idempotency_wait: float = setting(
        "GATEWAY_IDEMPOTENCY_WAIT", parse_duration, "10s",
        "How long a repeat waits for the first request still in flight before 409 "
        "idempotency_in_flight.")
    idempotency_max_body: int = setting(
        "GATEWAY_IDEMPOTENCY_MAX_BODY", parse_size, "256KiB",
        "Largest answer body kept for repeats (a larger answer is passed on and its key "
        "answers repeats with 409 idempotent_answer_not_kept).")
    idempotency_max_bytes: int = setting(
        "GATEWAY_IDEMPOTENCY_MAX_BYTES", parse_size, "64MiB",
        "Most memory the kept answers hold, without Redis (the oldest go first).")
    idempotency_max_entries: int = setting(
        "GATEWAY_IDEMPOTENCY_MAX_ENTRIES", bounded_int(1, 10**7), "100000",
        "Most keys kept, without Redis.")


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy listener and request body limits."""

    SECTION: ClassVar[str] = "proxy"

    listen: ListenAddress = setting(
        "GATEWAY_LISTEN", parse_listen, "127.0.0.1:8080",
        "Proxy listener: host:port, [v6]:port or unix:/path.")
    replay_body_limit: int = setting(
        "GATEWAY_REPLAY_BODY_LIMIT", parse_size, "64KiB",
        "Request bodies up to this size are kept so a request can be replayed after a 401.")
    max_body_size: int = setting(
        "GATEWAY_MAX_BODY_SIZE", parse_size, "100MiB",
        "Largest request body accepted (413 above it; 0 = no limit).")


@dataclass(frozen=True)
class InboundConfig:
    """Who may call the gateway, and how long a client may take."""

    SECTION: ClassVar[str] = "inbound"

    client_keys: tuple[ClientKey, ...] = setting(
        "GATEWAY_CLIENT_KEYS", parse_client_keys, "",
        "Inbound client keys, name=key comma- or newline-separated (or _FILE).",
        file_variant=True, secret=True)
    client_key_header: str = setting(
        "GATEWAY_CLIENT_KEY_HEADER", parse_name, "X-Gateway-Key",
        "Header in which callers present their client key (never forwarded).")
    client_profiles: ClientProfiles = setting(
        "GATEWAY_CLIENT_PROFILES", parse_client_profiles, "",
        "Which credential profiles each client key may use: 'client=eu|au' (the first is its "
        "default), '*=...' for clients not listed; a client listed nowhere may use 'default' "
        "only. Needs GATEWAY_CLIENT_KEYS (without keys, any profile may be chosen).")
    credential_header: str = setting(
        "GATEWAY_CREDENTIAL_HEADER", parse_name, "X-Repairy-Credential",
        "Header in which a caller names the credential profile to use (never forwarded; "
        "absent: the client's default).")
    allowed_cidrs: tuple[IPNetwork, ...] = setting(
        "GATEWAY_ALLOWED_CIDRS", parse_cidrs, "",
        "Comma-separated CIDRs allowed to call the proxy (empty: any that can connect).")
    allowed_routes: tuple[RouteRule, ...] = setting(
        "GATEWAY_ALLOWED_ROUTES", parse_routes, "*",
        "Comma-separated 'METHOD /glob' or '/glob' allow-list; /auth/* is always refused.")
    header_timeout: float = setting(
        "GATEWAY_HEADER_TIMEOUT", duration_at_least(0.1), "10s",
        "A client must send complete request headers within this time (checked every "
        "quarter of it, at most every second). At least 100ms.")
    client_body_timeout: float = setting(
        "GATEWAY_CLIENT_BODY_TIMEOUT", duration_at_least(0.1), "30s",
        "Longest pause allowed while a client sends its request body (then 408). At least "
        "100ms.")
    client_keepalive_timeout: float = setting(
        "GATEWAY_CLIENT_KEEPALIVE_TIMEOUT", parse_duration, "75s",
        "Idle time after which a client keep-alive connection is closed.")
    max_header_size: int = setting(
        "GATEWAY_MAX_HEADER_SIZE", parse_size, "8KiB",
        "Longest request line or single header accepted (414/431 above).")
    max_headers: int = setting(
        "GATEWAY_MAX_HEADERS", parse_positive_int, "100",
        "Most request headers accepted.")


@dataclass(frozen=True)
class RequestPathConfig:
    """What the request path reads: the proxy's own configs, and the little it takes from the
    partner and token side (composed by :meth:`gateway.settings.Settings.request_path`)."""

    base_url: URL
    #: The auth endpoints' paths: never proxied.
    auth_paths: tuple[str, ...]
    token_wait_timeout: float
    upstream: UpstreamConfig
    proxy: ProxyConfig
    inbound: InboundConfig
    idempotency: IdempotencyConfig
