"""Wiring: build the components from :class:`~gateway.settings.Settings`.

The one place that reads a composed ``Settings`` and hands each component its own config and
collaborators; the components never see ``Settings``. ``app``, ``worker`` and ``commands`` call
these builders.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable

import aiohttp

from gateway.clock import Clock
from gateway.coordination.redis_client import redis_client
from gateway.metrics import Metrics
from gateway.proxy.access import AccessPolicy
from gateway.proxy.cache import GetCache
from gateway.proxy.cache_shared import SharedCache
from gateway.proxy.guards import Upstream
from gateway.proxy.handler import Proxy
from gateway.proxy.idempotency_redis import RedisStore as RedisIdempotency
from gateway.proxy.idempotency_store import IdempotencyStore, LocalStore
from gateway.proxy.inbound import ProxyServer
from gateway.proxy.limits import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    ClientLimits,
    UpstreamSlots,
)
from gateway.proxy.retry import RetryBudget, RetryConfig, RetryPolicy
from gateway.proxy.upstream import attempt_timeout, create_session
from gateway.settings import Settings
from gateway.state import GatewayState
from gateway.token.auth_client import AuthClient, create_auth_session
from gateway.token.route_401 import Persistent401
from gateway.token.source import TokenSource
from gateway.token.store import RedisStore, store_for
from gateway.token.value import RenewalKind, Token
from gateway.tracing import Tracing

log = logging.getLogger("gateway.app")  # the name its lines have always had


def auth_session(s: Settings) -> aiohttp.ClientSession:
    """The auth calls' session, through the upstream's CA bundle and egress proxy."""
    up = s.upstream
    return create_auth_session(up.upstream_ca_file, up.egress_proxy, up.egress_proxy_password)


def auth_client(session: aiohttp.ClientSession, s: Settings, clock: Clock) -> AuthClient:
    return AuthClient(session, s.partner, s.auth, clock, s.upstream.connect_timeout)


def token_store(s: Settings, timeout: float) -> RedisStore:
    """The fleet's token store for these credentials (GATEWAY_REDIS_URL)."""
    return store_for(s.redis, s.token_side().owner, timeout)


def build_proxy_server(state: GatewayState) -> ProxyServer:
    """The proxy listener: a low-level server (one handler, no router) with strict limits."""
    s = state.settings

    def on_reject(status: int, code: str) -> None:
        state.metrics.response("gateway", status, code)

    i = s.inbound
    return ProxyServer(Proxy(state), header_timeout=i.header_timeout, on_reject=on_reject,
                       max_line_size=i.max_header_size, max_field_size=i.max_header_size,
                       max_headers=i.max_headers, keepalive_timeout=i.client_keepalive_timeout,
                       access_log=None)


def build_upstream(s: Settings, clock: Clock, metrics: Metrics,
                   rng: random.Random | None = None) -> Upstream:
    """The upstream session with its guards: retry policy, breaker, slots (per process).
    The retry back-off's jitter draws from ``rng`` (injected; a fresh one by default)."""
    session = create_session(s.upstream)
    g, up = s.guards, s.upstream

    def on_breaker(state: BreakerState, why: str) -> None:
        if state is BreakerState.OPEN:
            metrics.breaker_opened.inc()
            log.warning("circuit breaker open: answering 503 upstream_circuit_open for %gs "
                        "(%s)", s.guards.breaker_cooldown, why, extra={"fields": {
                            "event": "circuit_open", "why": why,
                            "cooldown_s": s.guards.breaker_cooldown}})
        else:
            log.info("circuit breaker %s (%s)", state.name.lower().replace("_", "-"), why,
                     extra={"fields": {"event": f"circuit_{state.name.lower()}", "why": why}})

    breaker = CircuitBreaker(BreakerConfig(
        g.breaker_failures, g.breaker_failure_ratio, g.breaker_min_requests, g.breaker_window,
        g.breaker_cooldown, g.breaker_probes), clock, on_breaker)
    metrics.breaker_state.set_function(lambda: float(breaker.observed_state))
    if g.upstream_concurrency:
        slots = UpstreamSlots(g.upstream_concurrency, up.connect_timeout,
                              reason="GATEWAY_UPSTREAM_CONCURRENCY")
    else:
        slots = UpstreamSlots(up.pool_size, up.connect_timeout, reason="GATEWAY_POOL_SIZE")
    metrics.upstream_slots_in_use.set_function(lambda: float(slots.in_use))
    budget = RetryBudget(g.retry_budget_ratio, g.retry_budget_min_per_second,
                         g.retry_budget_window, clock)
    retry = RetryPolicy(
        session, RetryConfig(g.retry_attempts, g.retry_on_status, g.retry_backoff_min,
                             g.retry_backoff_max, g.retry_after_max, up.connect_timeout),
        budget, clock, timeout=functools.partial(attempt_timeout, up),
        on_retry=lambda reason: metrics.retries.labels(reason).inc(),
        on_budget_exhausted=metrics.retry_budget_exhausted.inc,
        rand=(rng or random.Random()).random)
    return Upstream(session, retry, breaker, slots)


def build_limits(s: Settings, clock: Clock, metrics: Metrics) -> ClientLimits:
    g = s.guards
    return ClientLimits(clock, rate=g.rate_limit, burst=g.rate_limit_burst,
                        client_rate=g.client_rate_limit, client_burst=g.client_rate_limit_burst,
                        client_concurrency=g.client_concurrency,
                        on_reject=lambda limit, client: metrics.limited.labels(
                            limit, client).inc())


def build_cache(s: Settings, clock: Clock, metrics: Metrics) -> GetCache:
    c, r = s.cache, s.redis
    cache = GetCache(c.cache_routes, max_bytes=c.cache_max_bytes,
                     max_entries=c.cache_max_entries, max_entry=c.cache_max_entry, clock=clock,
                     on_evict=metrics.cache_evictions.inc)
    metrics.cache_bytes.set_function(lambda: float(cache.stored_bytes))
    metrics.cache_entries.set_function(lambda: float(len(cache)))
    if c.cache_shared and c.cache_routes:
        own = bool(c.cache_redis_url)  # a Redis of its own, else the fleet's
        cache.shared = SharedCache(
            redis_client(c.cache_redis_url if own else r.redis_url,
                         password=c.cache_redis_password if own else r.redis_password,
                         ca_file=r.redis_ca_file, timeout=0.5),
            prefix=r.redis_key_prefix, scope=str(s.partner.base_url),
            store_key=r.store_key, previous_key=r.store_key_previous, clock=clock,
            on_error=lambda op: metrics.cache_shared_errors.labels(op).inc(),
            max_bytes=c.cache_shared_max_bytes, on_evict=metrics.cache_shared_evictions.inc)
    return cache


def build_local_idempotency(s: Settings, clock: Clock, metrics: Metrics) -> LocalStore:
    store = LocalStore(max_bytes=s.idempotency.idempotency_max_bytes,
                       max_entries=s.idempotency.idempotency_max_entries, clock=clock,
                       on_evict=metrics.idempotency_evictions.inc)
    metrics.idempotency_bytes.set_function(lambda: float(store.stored_bytes))
    metrics.idempotency_entries.set_function(lambda: float(len(store)))
    return store


def build_idempotency(s: Settings, clock: Clock, metrics: Metrics,
                      remote: IdempotencyStore | None = None) -> IdempotencyStore | None:
    """Where Idempotency-Key records live: the fleet's Redis when GATEWAY_REDIS_URL is set,
    else ``remote`` (a worker: the supervisor's store), else this process's memory."""
    if not s.idempotency.idempotency_routes:
        return None
    if s.redis.redis_url:
        if s.redis.store_key is None:
            log.warning("Idempotency-Key records (booking answers) are kept in Redis in clear: "
                        "set GATEWAY_STORE_KEY to seal them", extra={"fields": {
                            "event": "idempotency_unsealed"}})
        r = s.redis
        client = redis_client(r.redis_url, password=r.redis_password, ca_file=r.redis_ca_file,
                              timeout=2.0)
        return RedisIdempotency(client, prefix=r.redis_key_prefix, store_key=r.store_key,
                                previous_key=r.store_key_previous, clock=clock)
    if remote is not None:
        return remote
    return build_local_idempotency(s, clock, metrics)


def build_state(s: Settings, tokens: TokenSource, clock: Clock, metrics: Metrics,
                idempotency: IdempotencyStore | None = None,
                tracing: Tracing | None = None,
                rng: random.Random | None = None) -> GatewayState:
    """The state a proxy listener needs (in the gateway process or a worker)."""
    upstream = build_upstream(s, clock, metrics, rng)
    return GatewayState(settings=s, config=s.request_path(), tokens=tokens, upstream=upstream,
                        metrics=metrics, access=build_access_policy(s),
                        route_401=route_401_tracker(s, clock, metrics, tokens),
                        limits=build_limits(s, clock, metrics), clock=clock,
                        cache=build_cache(s, clock, metrics), idempotency=idempotency,
                        tracing=tracing)


async def close_stores(state: GatewayState) -> None:
    """Close the Idempotency-Key store and the shared cache's client, if any, and send the
    spans still pending."""
    if state.idempotency is not None:
        await state.idempotency.close()
    if state.cache.shared is not None:
        await state.cache.shared.close()
    if state.tracing is not None:
        await asyncio.to_thread(state.tracing.shutdown)


def build_access_policy(s: Settings) -> AccessPolicy:
    i = s.inbound
    return AccessPolicy(i.client_keys, i.allowed_cidrs, i.allowed_routes, i.client_key_header)


def route_401_tracker(s: Settings, clock: Clock, metrics: Metrics,
                      tokens: TokenSource | None = None) -> Persistent401:
    def on_mark(route: str, cooldown: float) -> None:
        metrics.persistent_401.labels(route).inc()
        log.warning("route %s refuses a brand-new token too: passing its 401s back without "
                    "renewing for %gs", route, cooldown, extra={"fields": {
                        "event": "persistent_401", "route": route, "cooldown_s": cooldown}})

    # A replay gets its verdict within the token wait (plus the login it may wait for).
    t = s.token
    return Persistent401(clock, t.persistent_401_cooldown, t.persistent_401_cooldown_max,
                         on_mark, verdict_window=t.token_wait_timeout + s.auth.auth_timeout,
                         # a route to blame: its invalidation was no revocation
                         on_explained=None if tokens is None else tokens.route_explained)


class TokenObservers:
    """Metrics, spans, and a callback on each new token (the worker pool's broadcast)."""

    def __init__(self, metrics: Metrics, tracing: Tracing | None) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.on_token: Callable[[Token | None], None] | None = None
        #: Told while contention begins or lasts longer (workers hear it with the token).
        self.on_contention: Callable[[], None] | None = None

    def renewal(self, kind: RenewalKind, ok: bool, reason: str, seconds: float) -> None:
        self.metrics.renewal(kind, ok, reason, seconds)
        if self.tracing is not None:
            self.tracing.renewal(kind, ok, reason, seconds)

    def token_changed(self, token: Token | None) -> None:
        self.metrics.token_changed(token)
        if self.on_token is not None:
            self.on_token(token)

    def invalidated(self, reason: str) -> None:
        self.metrics.invalidated(reason)

    def contention(self, began: bool) -> None:
        self.metrics.contention(began)
        if self.on_contention is not None:
            self.on_contention()
