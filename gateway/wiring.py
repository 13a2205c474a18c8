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
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp

from gateway.clock import Clock
from gateway.coordination.redis_client import redis_client
from gateway.metrics import CredentialMetrics, Metrics
from gateway.proxy.access import AccessPolicy
from gateway.proxy.cache import GetCache
from gateway.proxy.cache_shared import SharedCache
from gateway.proxy.guards import Upstream
from gateway.proxy.handler import Proxy
from gateway.proxy.idempotency_redis import RedisStore as RedisIdempotency
from gateway.proxy.idempotency_store import IdempotencyStore, LocalStore
from gateway.proxy.inbound import ProxyServer
from gateway.proxy.lanes import Lane, Lanes
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
from gateway.token.config import DEFAULT_PROFILE, CredentialProfile, PartnerConfig
from gateway.token.file import load_token, save_token
from gateway.token.fleet import Fleet
from gateway.token.manager import TokenManager
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


def auth_client(session: aiohttp.ClientSession, s: Settings, clock: Clock,
                profile: CredentialProfile | None = None) -> AuthClient:
    """The auth calls of one profile (the default one unless named)."""
    side = s.token_side() if profile is None else profile.side
    return AuthClient(session, side.partner, side.auth, clock, s.upstream.connect_timeout)


def token_store(s: Settings, timeout: float,
                profile: CredentialProfile | None = None) -> RedisStore:
    """The fleet's token store for one profile's credentials (GATEWAY_REDIS_URL)."""
    side = s.token_side() if profile is None else profile.side
    return store_for(s.redis, side.owner, timeout)


def build_token_manager(s: Settings, profile: CredentialProfile,
                        session: aiohttp.ClientSession, clock: Clock, events: TokenObservers,
                        rng: random.Random) -> TokenManager:
    """One profile's token manager: its auth client, and its fleet entry (GATEWAY_REDIS_URL)
    or its token file."""
    side = profile.side
    initial, persist = None, None
    fleet = build_fleet(s, profile, clock, events.metrics, rng)
    if side.token.token_file and fleet is not None:
        log.info("GATEWAY_REDIS_URL is set: the token lives in the shared store, not in "
                 "its token file", extra={"fields": {"event": "token_file_unused",
                                                      "credential": profile.name}})
    elif side.token.token_file:
        path = Path(side.token.token_file)
        initial = load_token(path, side, clock)

        def persist(token: Token, partner: PartnerConfig) -> None:
            save_token(path, token, partner)

    return TokenManager(auth_client(session, s, clock, profile), side, clock, events, rng=rng,
                        initial=initial, persist=persist, fleet=fleet)


def build_fleet(s: Settings, profile: CredentialProfile, clock: Clock,
                events: CredentialMetrics, rng: random.Random) -> Fleet | None:
    """One profile's entry in the shared token store, when GATEWAY_REDIS_URL is set (redis
    imported only then)."""
    if not s.redis.redis_url:
        return None
    store = token_store(s, min(2.0, s.redis.redis_lease_ttl / 2), profile)
    log.info("sharing the token through Redis", extra={"fields": {
        "event": "store_configured", "replica": store.replica, "owner": store.owner,
        "encrypted": s.redis.store_key is not None, "credential": profile.name}})
    return Fleet(store, lease_ttl=s.redis.redis_lease_ttl,
                 down_policy=s.redis.redis_down_policy, clock=clock, events=events, rng=rng)


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


def _breaker(s: Settings, clock: Clock, views: list[CredentialMetrics]) -> CircuitBreaker:
    """The breaker of one base URL; its transitions are counted for each profile on it."""
    g = s.guards

    def on_breaker(state: BreakerState, why: str) -> None:
        names = [view.name for view in views]
        if state is BreakerState.OPEN:
            for view in views:
                view.breaker_opened()
            log.warning("circuit breaker open: answering 503 upstream_circuit_open for %gs "
                        "(%s)", g.breaker_cooldown, why, extra={"fields": {
                            "event": "circuit_open", "why": why,
                            "cooldown_s": g.breaker_cooldown, "credentials": names,
                            "credential": None}})  # not the tripping request's alone
        else:
            log.info("circuit breaker %s (%s)", state.name.lower().replace("_", "-"), why,
                     extra={"fields": {"event": f"circuit_{state.name.lower()}", "why": why,
                                       "credentials": names, "credential": None}})

    return CircuitBreaker(BreakerConfig(
        g.breaker_failures, g.breaker_failure_ratio, g.breaker_min_requests, g.breaker_window,
        g.breaker_cooldown, g.breaker_probes), clock, on_breaker)


def _lane_upstream(s: Settings, clock: Clock, session: aiohttp.ClientSession,
                   breaker: CircuitBreaker, view: CredentialMetrics,
                   rng: random.Random) -> Upstream:
    """One profile's upstream: its base URL's session and breaker, its own slots and retry
    budget (Repairy's quotas are per partner)."""
    g, up = s.guards, s.upstream
    view.bind_breaker(lambda: float(breaker.observed_state))
    if g.upstream_concurrency:
        slots = UpstreamSlots(g.upstream_concurrency, up.connect_timeout,
                              reason="GATEWAY_UPSTREAM_CONCURRENCY")
    else:
        slots = UpstreamSlots(up.pool_size, up.connect_timeout, reason="GATEWAY_POOL_SIZE")
    view.bind_slots(lambda: float(slots.in_use))
    budget = RetryBudget(g.retry_budget_ratio, g.retry_budget_min_per_second,
                         g.retry_budget_window, clock)
    retry = RetryPolicy(
        session, RetryConfig(g.retry_attempts, g.retry_on_status, g.retry_backoff_min,
                             g.retry_backoff_max, g.retry_after_max, up.connect_timeout),
        budget, clock, timeout=functools.partial(attempt_timeout, up),
        on_retry=view.retried, on_budget_exhausted=view.budget_exhausted, rand=rng.random)
    return Upstream(session, retry, breaker, slots)


def build_upstream(s: Settings, clock: Clock, metrics: Metrics,
                   rng: random.Random | None = None) -> Upstream:
    """The default profile's upstream session with its guards: retry policy, breaker, slots
    (per process). The retry back-off's jitter draws from ``rng`` (injected; a fresh one by
    default)."""
    view = metrics.credential(DEFAULT_PROFILE)
    return _lane_upstream(s, clock, create_session(s.upstream), _breaker(s, clock, [view]),
                          view, rng or random.Random())


def build_lanes(s: Settings, tokens: Mapping[str, TokenSource], clock: Clock,
                metrics: Metrics, limits: ClientLimits,
                rng: random.Random | None = None) -> Lanes:
    """One lane per credential profile: a session and a breaker per base URL, the rest per
    profile (token source, slots, retry budget, rate limit, persistent-401 routes)."""
    rng = rng or random.Random()
    by_url: dict[str, list[CredentialProfile]] = {}
    for profile in s.profiles:  # one session and breaker per upstream, however it is written
        by_url.setdefault(str(profile.partner.base_url).rstrip("/"), []).append(profile)
    lanes = []
    for profiles in by_url.values():
        views = [metrics.credential(p.name) for p in profiles]
        session = create_session(s.upstream, sharers=len(profiles))
        breaker = _breaker(s, clock, views)
        for profile, view in zip(profiles, views, strict=True):
            source = tokens[profile.name]
            lanes.append(Lane(profile.name, profile.partner.base_url, source,
                              _lane_upstream(s, clock, session, breaker, view, rng),
                              route_401_tracker(s, clock, view, source), view,
                              rate=limits.bucket()))
    return Lanes(lanes, s.inbound.client_profiles, s.inbound.credential_header)


async def close_lanes(lanes: Lanes) -> None:
    """Close each base URL's session once."""
    sessions = {id(lane.upstream.session): lane.upstream.session for lane in lanes}
    for session in sessions.values():
        await session.close()


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


def build_state(s: Settings, tokens: TokenSource | Mapping[str, TokenSource], clock: Clock,
                metrics: Metrics, idempotency: IdempotencyStore | None = None,
                tracing: Tracing | None = None,
                rng: random.Random | None = None) -> GatewayState:
    """The state a proxy listener needs (in the gateway process or a worker): ``tokens`` by
    profile name (a single source: the default profile's)."""
    by_name = tokens if isinstance(tokens, Mapping) else {DEFAULT_PROFILE: tokens}
    limits = build_limits(s, clock, metrics)
    return GatewayState(settings=s, config=s.request_path(),
                        lanes=build_lanes(s, by_name, clock, metrics, limits, rng),
                        metrics=metrics, access=build_access_policy(s), limits=limits,
                        clock=clock, cache=build_cache(s, clock, metrics),
                        idempotency=idempotency, tracing=tracing)


async def close_stores(state: GatewayState) -> None:
    """Close the Idempotency-Key store and the shared cache's client, if any, and send the
    spans still pending."""
    if state.idempotency is not None:
        await state.idempotency.close()
    if state.cache.shared is not None:
        await state.cache.shared.close()
    if state.tracing is not None:
        await asyncio.to_thread(state.tracing.shutdown)


def warn_unknown_grants(s: Settings) -> None:
    """GATEWAY_CLIENT_PROFILES naming clients without a key: a warning, not an error (a key
    revoked from the key file must not stop the next start or reload)."""
    clients = {key.name for key in s.inbound.client_keys}
    unknown = [c for c, _ in s.inbound.client_profiles if c != "*" and c not in clients]
    if unknown:
        log.warning("GATEWAY_CLIENT_PROFILES names clients without a client key: %s",
                    ", ".join(unknown), extra={"fields": {
                        "event": "client_profiles_unknown_clients", "clients": unknown}})


def build_access_policy(s: Settings) -> AccessPolicy:
    i = s.inbound
    return AccessPolicy(i.client_keys, i.allowed_cidrs, i.allowed_routes, i.client_key_header)


def route_401_tracker(s: Settings, clock: Clock, view: CredentialMetrics,
                      tokens: TokenSource | None = None) -> Persistent401:
    def on_mark(route: str, cooldown: float) -> None:
        view.marked_persistent_401(route)
        log.warning("route %s refuses a brand-new token too: passing its 401s back without "
                    "renewing for %gs", route, cooldown, extra={"fields": {
                        "event": "persistent_401", "route": route, "cooldown_s": cooldown,
                        "credential": view.name}})

    # A replay gets its verdict within the token wait (plus the login it may wait for).
    t = s.token
    return Persistent401(clock, t.persistent_401_cooldown, t.persistent_401_cooldown_max,
                         on_mark, verdict_window=t.token_wait_timeout + s.auth.auth_timeout,
                         # a route to blame: its invalidation was no revocation
                         on_explained=None if tokens is None else tokens.route_explained)


class TokenObservers:
    """One profile's metrics, spans, and a callback on each new token (the worker pool's
    broadcast)."""

    def __init__(self, metrics: CredentialMetrics, tracing: Tracing | None) -> None:
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
