"""Wiring and lifecycle: build the proxy and admin applications, start, drain, stop.

Start-up, top to bottom: upstream session → auth client → token manager (first login runs in
the background; readiness waits for it) → proxy listener → admin listener. Shutdown runs in
reverse: readiness goes false, an optional delay lets load balancers notice, the proxy listener
stops accepting and in-flight requests get ``shutdown_grace`` to finish, then the token manager
and the session close, and the admin listener last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Self

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import __version__, logs
from gateway.admin import build_admin_app
from gateway.clock import Clock, SystemClock
from gateway.config_values import TcpAddress, UnixAddress
from gateway.coordination.redis_policy import EvictingStore, check_store_policy
from gateway.credentials import CredentialReloader
from gateway.metrics import Metrics
from gateway.probe import probe
from gateway.proxy.access import AccessPolicy
from gateway.proxy.cache import GetCache
from gateway.proxy.cache_shared import SharedCache
from gateway.proxy.handler import Proxy
from gateway.proxy.idempotency_store import IdempotencyStore, LocalStore
from gateway.proxy.idempotency_store import RedisStore as RedisIdempotency
from gateway.proxy.inbound import ProxyServer
from gateway.proxy.limits import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    ClientLimits,
    UpstreamSlots,
)
from gateway.proxy.retry import RetryBudget, RetryConfig, RetryPolicy
from gateway.proxy.upstream import Upstream, attempt_timeout, create_session
from gateway.settings import Settings, SettingsError, load_settings
from gateway.state import GatewayState
from gateway.supervisor import WorkerPool, bind_listener
from gateway.tasks import cancel_and_wait, log_task_failure
from gateway.token.auth_client import AuthClient, create_auth_session
from gateway.token.file import load_token, save_token
from gateway.token.fleet import Fleet
from gateway.token.manager import TokenManager, TokenSource
from gateway.token.route_401 import Persistent401
from gateway.token.store import redis_client, store_for
from gateway.token.value import RenewalKind, Token
from gateway.tracing import Tracing, tracing_for

log = logging.getLogger("gateway.app")
#: How long ``serve``'s start-up probe waits for the first token before giving up (seconds).
STARTUP_PROBE_WAIT: Final = 600.0


def build_proxy_server(state: GatewayState) -> ProxyServer:
    """The proxy listener: a low-level server (one handler, no router) with strict limits."""
    s = state.settings

    def on_reject(status: int, code: str) -> None:
        state.metrics.response("gateway", status, code)

    return ProxyServer(Proxy(state), header_timeout=s.header_timeout, on_reject=on_reject,
                       max_line_size=s.max_header_size, max_field_size=s.max_header_size,
                       max_headers=s.max_headers, keepalive_timeout=s.client_keepalive_timeout,
                       access_log=None)


def build_upstream(s: Settings, clock: Clock, metrics: Metrics,
                   rng: random.Random | None = None) -> Upstream:
    """The upstream session with its guards: retry policy, breaker, slots (per process).
    The retry back-off's jitter draws from ``rng`` (injected; a fresh one by default)."""
    session = create_session(s)

    def on_breaker(state: BreakerState, why: str) -> None:
        if state is BreakerState.OPEN:
            metrics.breaker_opened.inc()
            log.warning("circuit breaker open: answering 503 upstream_circuit_open for %gs "
                        "(%s)", s.breaker_cooldown, why, extra={"fields": {
                            "event": "circuit_open", "why": why,
                            "cooldown_s": s.breaker_cooldown}})
        else:
            log.info("circuit breaker %s (%s)", state.name.lower().replace("_", "-"), why,
                     extra={"fields": {"event": f"circuit_{state.name.lower()}", "why": why}})

    breaker = CircuitBreaker(BreakerConfig(
        s.breaker_failures, s.breaker_failure_ratio, s.breaker_min_requests, s.breaker_window,
        s.breaker_cooldown, s.breaker_probes), clock, on_breaker)
    metrics.breaker_state.set_function(lambda: float(breaker.observed_state))
    if s.upstream_concurrency:
        slots = UpstreamSlots(s.upstream_concurrency, s.connect_timeout,
                              reason="GATEWAY_UPSTREAM_CONCURRENCY")
    else:
        slots = UpstreamSlots(s.pool_size, s.connect_timeout, reason="GATEWAY_POOL_SIZE")
    metrics.upstream_slots_in_use.set_function(lambda: float(slots.in_use))
    budget = RetryBudget(s.retry_budget_ratio, s.retry_budget_min_per_second,
                         s.retry_budget_window, clock)
    retry = RetryPolicy(
        session, RetryConfig(s.retry_attempts, s.retry_on_status, s.retry_backoff_min,
                             s.retry_backoff_max, s.retry_after_max, s.connect_timeout),
        budget, clock, timeout=functools.partial(attempt_timeout, s),
        on_retry=lambda reason: metrics.retries.labels(reason).inc(),
        on_budget_exhausted=metrics.retry_budget_exhausted.inc,
        rand=(rng or random.Random()).random)
    return Upstream(session, retry, breaker, slots)


def build_limits(s: Settings, clock: Clock, metrics: Metrics) -> ClientLimits:
    return ClientLimits(clock, rate=s.rate_limit, burst=s.rate_limit_burst,
                        client_rate=s.client_rate_limit, client_burst=s.client_rate_limit_burst,
                        client_concurrency=s.client_concurrency,
                        on_reject=lambda limit, client: metrics.limited.labels(
                            limit, client).inc())


def build_cache(s: Settings, clock: Clock, metrics: Metrics) -> GetCache:
    cache = GetCache(s.cache_routes, max_bytes=s.cache_max_bytes,
                     max_entries=s.cache_max_entries, max_entry=s.cache_max_entry, clock=clock,
                     on_evict=metrics.cache_evictions.inc)
    metrics.cache_bytes.set_function(lambda: float(cache.stored_bytes))
    metrics.cache_entries.set_function(lambda: float(len(cache)))
    if s.cache_shared and s.cache_routes:
        own = bool(s.cache_redis_url)  # a Redis of its own, else the fleet's
        cache.shared = SharedCache(
            redis_client(s.cache_redis_url if own else s.redis_url,
                         password=s.cache_redis_password if own else s.redis_password,
                         ca_file=s.redis_ca_file, timeout=0.5),
            prefix=s.redis_key_prefix, scope=str(s.base_url),
            store_key=s.store_key, previous_key=s.store_key_previous, clock=clock,
            on_error=lambda op: metrics.cache_shared_errors.labels(op).inc(),
            max_bytes=s.cache_shared_max_bytes, on_evict=metrics.cache_shared_evictions.inc)
    return cache


def build_local_idempotency(s: Settings, clock: Clock, metrics: Metrics) -> LocalStore:
    store = LocalStore(max_bytes=s.idempotency_max_bytes, max_entries=s.idempotency_max_entries,
                       clock=clock, on_evict=metrics.idempotency_evictions.inc)
    metrics.idempotency_bytes.set_function(lambda: float(store.stored_bytes))
    metrics.idempotency_entries.set_function(lambda: float(len(store)))
    return store


def build_idempotency(s: Settings, clock: Clock, metrics: Metrics,
                      remote: IdempotencyStore | None = None) -> IdempotencyStore | None:
    """Where Idempotency-Key records live: the fleet's Redis when GATEWAY_REDIS_URL is set,
    else ``remote`` (a worker: the supervisor's store), else this process's memory."""
    if not s.idempotency_routes:
        return None
    if s.redis_url:
        if s.store_key is None:
            log.warning("Idempotency-Key records (booking answers) are kept in Redis in clear: "
                        "set GATEWAY_STORE_KEY to seal them", extra={"fields": {
                            "event": "idempotency_unsealed"}})
        client = redis_client(s.redis_url, password=s.redis_password, ca_file=s.redis_ca_file,
                              timeout=2.0)
        return RedisIdempotency(client, prefix=s.redis_key_prefix, store_key=s.store_key,
                                previous_key=s.store_key_previous, clock=clock)
    if remote is not None:
        return remote
    return build_local_idempotency(s, clock, metrics)


def build_state(s: Settings, tokens: TokenSource, clock: Clock, metrics: Metrics,
                idempotency: IdempotencyStore | None = None,
                tracing: Tracing | None = None,
                rng: random.Random | None = None) -> GatewayState:
    """The state a proxy listener needs (in the gateway process or a worker)."""
    upstream = build_upstream(s, clock, metrics, rng)
    return GatewayState(settings=s, tokens=tokens, upstream=upstream,
                        metrics=metrics, access=build_access_policy(s),
                        route_401=route_401_tracker(s, clock, metrics),
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
    return AccessPolicy(s.client_keys, s.allowed_cidrs, s.allowed_routes, s.client_key_header)


def route_401_tracker(s: Settings, clock: Clock, metrics: Metrics) -> Persistent401:
    def on_mark(route: str, cooldown: float) -> None:
        metrics.persistent_401.labels(route).inc()
        log.warning("route %s refuses a brand-new token too: passing its 401s back without "
                    "renewing for %gs", route, cooldown, extra={"fields": {
                        "event": "persistent_401", "route": route, "cooldown_s": cooldown}})

    # A replay gets its verdict within the token wait (plus the login it may wait for).
    return Persistent401(clock, s.persistent_401_cooldown, s.persistent_401_cooldown_max,
                         on_mark, verdict_window=s.token_wait_timeout + s.auth_timeout)


class _TokenEvents:
    """Metrics, spans, and a callback on each new token (the worker pool's broadcast)."""

    def __init__(self, metrics: Metrics, tracing: Tracing | None) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.on_token: Callable[[Token | None], None] | None = None

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


def _bind(setting: str, address: TcpAddress | UnixAddress) -> socket.socket:
    """A bound, listening socket for ``address`` (a stale unix socket file is replaced), or a
    :class:`SettingsError` naming ``setting``."""
    try:
        return bind_listener(address)
    except OSError as exc:
        raise SettingsError(setting, f"cannot listen on {address}: "
                                     f"{exc.strerror or exc}") from None


def _url_of(runner: web.BaseRunner, address: TcpAddress | UnixAddress) -> str:
    if isinstance(address, UnixAddress):
        return f"unix:{address.path}"
    host, port = runner.addresses[0][:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


class GatewayServer:
    """The gateway with both listeners: ``async with GatewayServer(settings) as gw: gw.url``."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None,
                 registry: CollectorRegistry | None = None,
                 process_metrics: bool = False,
                 reload_settings: Callable[[], Settings] | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self._reload_settings = reload_settings or functools.partial(
            load_settings, config_file=settings.config_file)
        self.reloader: CredentialReloader | None = None
        self.clock = clock or SystemClock()
        #: Every jitter (renewal, fleet, retry back-off) draws from this one source.
        self.rng = rng or random.Random()
        self.metrics = Metrics(registry, process=process_metrics)
        self.url = ""
        self.admin_url = ""
        self._state: GatewayState | None = None
        self._proxy_runner: web.ServerRunner | None = None
        self._auth_session: aiohttp.ClientSession
        self._admin_runner: web.AppRunner | None = None
        self._pool: WorkerPool | None = None

    @property
    def state(self) -> GatewayState:
        assert self._state is not None, "not started"
        return self._state

    async def start(self) -> None:
        s = self.settings
        # Both listeners first: a busy port is a start-up error naming its setting, before
        # any login, session or task exists.
        listener = _bind("GATEWAY_LISTEN", s.listen)
        try:
            admin_sock = _bind("GATEWAY_ADMIN_LISTEN", s.admin_listen)
        except BaseException:
            listener.close()
            raise
        try:
            await self._start_on(listener, admin_sock)
        except BaseException:
            # Nothing half-started outlives a failed start: tasks, sessions, listeners.
            try:
                await self._roll_back()
            finally:
                listener.close()
                admin_sock.close()
            raise

    async def _start_on(self, listener: socket.socket, admin_sock: socket.socket) -> None:
        s = self.settings
        notes = await self._check_store_policy(s)
        initial, persist = None, None
        fleet = self._fleet(s)
        if s.token_file and fleet is not None:
            log.info("GATEWAY_REDIS_URL is set: the token lives in the shared store, not in "
                     "GATEWAY_TOKEN_FILE", extra={"fields": {"event": "token_file_unused"}})
        elif s.token_file:
            path = Path(s.token_file)
            initial = load_token(path, s, self.clock)

            def persist(token: Token, current: Settings) -> None:
                save_token(path, token, current)

        self._auth_session = create_auth_session(s)
        tracing = tracing_for(s.otel_endpoint, __version__)
        events = _TokenEvents(self.metrics, tracing)
        tokens = TokenManager(AuthClient(self._auth_session, s, self.clock), s, self.clock,
                              events, rng=self.rng, initial=initial, persist=persist,
                              fleet=fleet)
        # With workers this process serves no request: it holds the Idempotency-Key store for
        # them only without Redis (with it, each worker talks to Redis itself).
        idempotency = (None if s.workers > 1 and s.redis_url
                       else build_idempotency(s, self.clock, self.metrics))
        self._state = build_state(s, tokens, self.clock, self.metrics, idempotency, tracing,
                                  self.rng)
        self._state.store_policy, self._state.store_notes = notes
        self.metrics.bind_ready(self._state.ready)
        await tokens.start()
        self.reloader = CredentialReloader(self._state, self._auth_session, self.clock,
                                           self._reload_settings)
        await self.reloader.start()
        if s.workers > 1:
            await self._start_workers(events, listener)
        else:
            self._proxy_runner = web.ServerRunner(build_proxy_server(self._state),
                                                  shutdown_timeout=s.shutdown_grace)
            await self._proxy_runner.setup()
            await web.SockSite(self._proxy_runner, listener).start()
            self.url = _url_of(self._proxy_runner, s.listen)
        self._admin_runner = web.AppRunner(build_admin_app(self._state), handle_signals=False,
                                           access_log=None, shutdown_timeout=1.0)
        await self._admin_runner.setup()
        await web.SockSite(self._admin_runner, admin_sock).start()
        self.admin_url = _url_of(self._admin_runner, s.admin_listen)
        log.info("gateway listening", extra={"fields": {
            "event": "started", "proxy": self.url, "admin": self.admin_url,
            "upstream": str(s.base_url), "partner_id": s.partner_id,
            "app_key_fp": s.app_key.fingerprint}})

    async def _roll_back(self) -> None:
        """Undo a start that failed part-way, in the order :meth:`stop` uses; each step is
        tried whatever the one before did (a failure here is logged, never raised over the
        start's own error)."""
        state, self._state = self._state, None
        steps: list[Callable[[], Awaitable[object]]] = []
        if self._proxy_runner is not None:
            steps.append(self._proxy_runner.cleanup)
        if self._pool is not None:
            steps.append(functools.partial(self._pool.stop, 0.0))
        if self.reloader is not None:
            steps.append(self.reloader.stop)
        if state is not None:
            steps += [functools.partial(state.manager.stop, 0.0), state.upstream.close,
                      functools.partial(close_stores, state)]
        if hasattr(self, "_auth_session"):
            steps.append(self._auth_session.close)
        if self._admin_runner is not None:
            steps.append(self._admin_runner.cleanup)
        for step in steps:
            try:
                await step()
            except Exception:
                log.exception("rolling back a failed start", extra={"fields": {
                    "event": "start_rollback_failed"}})
        self._proxy_runner = self._admin_runner = self._pool = self.reloader = None
        if isinstance(self.settings.listen, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.listen.path)

    async def _start_workers(self, events: _TokenEvents, listener: socket.socket) -> None:
        """GATEWAY_WORKERS > 1: this process supervises; workers run the proxy listener."""
        s, state = self.settings, self.state
        self._pool = pool = WorkerPool(
            s.workers, listener, state.manager,
            state.idempotency if isinstance(state.idempotency, LocalStore) else None,
            on_fault=lambda fault: self.metrics.channel_faults.labels(fault).inc())
        events.on_token = pool.broadcast_token
        assert self.reloader is not None
        self.reloader.on_client_keys = pool.broadcast_client_keys
        self.metrics.add_source(pool.metrics_texts)
        state.workers = pool.status
        await pool.start()
        if isinstance(s.listen, UnixAddress):
            self.url = f"unix:{s.listen.path}"
        else:
            host, port = listener.getsockname()[:2]
            self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def _check_store_policy(self, s: Settings) -> tuple[str | None, tuple[str, ...]]:
        """The store's Redis must not evict booking records: its maxmemory-policy, read once
        (an evicting one with Idempotency-Key routes on is a start-up error naming it)."""
        if not s.redis_url:
            return None, ()
        client = redis_client(s.redis_url, password=s.redis_password, ca_file=s.redis_ca_file,
                              timeout=2.0)
        try:
            verdict = await check_store_policy(client, bool(s.idempotency_routes))
        except EvictingStore as exc:
            raise SettingsError("GATEWAY_REDIS_URL", str(exc)) from None
        finally:
            await client.aclose()
        return verdict.policy, (verdict.note,) if verdict.note else ()

    def _fleet(self, s: Settings) -> Fleet | None:
        """The shared token store, when GATEWAY_REDIS_URL is set (redis imported only then)."""
        if not s.redis_url:
            return None
        store = store_for(s, timeout=min(2.0, s.redis_lease_ttl / 2))
        log.info("sharing the token through Redis", extra={"fields": {
            "event": "store_configured", "replica": store.replica, "owner": store.owner,
            "encrypted": s.store_key is not None}})
        return Fleet(store, lease_ttl=s.redis_lease_ttl, down_policy=s.redis_down_policy,
                     clock=self.clock, events=self.metrics, rng=self.rng)

    async def startup_probe(self) -> None:
        """``serve``'s one probe (GATEWAY_CHECK_PATH) once the first token is in: a wrong
        Partner ID or a refused token is logged as a warning, never fatal."""
        s = self.settings
        if not s.check_path:
            return
        # Wait (calling nothing) for the first token, as long as the renewal policy may take
        # to get it, checking once a second.
        for _ in range(int(STARTUP_PROBE_WAIT)):
            token = self.state.tokens.usable()
            if token is not None:
                break
            await self.clock.sleep(1.0)
        else:
            log.warning("start-up probe skipped: no token after %gs", STARTUP_PROBE_WAIT,
                        extra={"fields": {"event": "startup_probe_skipped"}})
            return
        refused = await probe(self._auth_session, s, token.access)
        if refused is None:
            log.info("start-up probe ok: Repairy took the token and the Partner ID", extra={
                "fields": {"event": "startup_probe_ok", "path": s.check_path}})
        else:
            log.warning("start-up probe: %s", refused, extra={"fields": {
                "event": "startup_probe_failed", "path": s.check_path}})

    async def stop(self) -> None:
        if self._state is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_delay + self.settings.shutdown_grace
        self._state.draining = True
        log.info("draining", extra={"fields": {"event": "draining",
                                               "grace_s": self.settings.shutdown_grace}})
        if self.settings.shutdown_delay:
            await asyncio.sleep(self.settings.shutdown_delay)
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()  # stop accepting, let in-flight requests finish
        if self._pool is not None:
            await self._pool.stop(self.settings.shutdown_grace)  # each worker drains
            self._pool = None
        if self.reloader is not None:
            await self.reloader.stop()
        # A renewal under way may finish (Repairy may already have rotated the refresh token
        # it used), within the auth timeout and what is left of the shutdown deadline.
        grace = min(self.settings.auth_timeout, max(0.0, deadline - loop.time()))
        await self._state.manager.stop(grace)
        await self._state.upstream.close()
        await close_stores(self._state)
        await self._auth_session.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if isinstance(self.settings.listen, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.listen.path)
        self._state = None
        log.info("stopped", extra={"fields": {"event": "stopped"}})

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def wait_for_signal(on_hangup: Callable[[], None] | None = None) -> None:
    """Return on the first SIGTERM or SIGINT; call ``on_hangup`` on each SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = [signal.SIGTERM, signal.SIGINT]
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if on_hangup is not None:
        signals.append(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def serve(settings: Settings) -> int:
    """``repairy-gateway serve``: run until SIGTERM/SIGINT (SIGHUP re-reads credentials),
    drain, exit 0."""
    try:
        async with GatewayServer(settings, process_metrics=True) as server:
            assert server.reloader is not None
            probing = asyncio.create_task(server.startup_probe(), name="startup-probe")
            probing.add_done_callback(lambda task: log_task_failure(task, log, "start-up probe"))
            try:
                await wait_for_signal(on_hangup=server.reloader.trigger)
            finally:
                with contextlib.suppress(Exception):  # a failure is logged when it happens
                    await cancel_and_wait(probing)
    finally:
        logs.flush()
    return 0
