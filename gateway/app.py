"""Lifecycle: start the proxy and admin listeners, drain, stop (the components themselves are
built by :mod:`gateway.wiring`).

Start-up, top to bottom: upstream session → auth client → token manager (first login runs in
the background; readiness waits for it) → the probe's verdict (it probes once the first token
is in) → proxy listener → admin listener. Shutdown runs in
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
from typing import Self

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import __version__, logs
from gateway.admin import build_admin_app
from gateway.clock import Clock, SystemClock
from gateway.config_values import TcpAddress, UnixAddress
from gateway.coordination.redis_client import redis_client
from gateway.coordination.redis_policy import EvictingStore, check_store_policy
from gateway.credentials import CredentialReloader
from gateway.metrics import Metrics
from gateway.proxy.idempotency_store import LocalStore
from gateway.settings import Settings, SettingsError, load_settings
from gateway.state import GatewayState, ProfileState
from gateway.supervisor import WorkerPool, bind_listener
from gateway.tasks import cancel_and_wait, log_task_failure
from gateway.token.config import DEFAULT_PROFILE
from gateway.token.verdict import UpstreamVerdict, VerdictPolicy
from gateway.tracing import tracing_for
from gateway.wiring import (
    TokenObservers,
    auth_session,
    build_idempotency,
    build_proxy_server,
    build_state,
    build_token_manager,
    close_lanes,
    close_stores,
    warn_unknown_grants,
)

log = logging.getLogger("gateway.app")


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
        self._verdict_tasks: list[asyncio.Task[None]] = []
        self._observers: dict[str, TokenObservers] = {}

    @property
    def state(self) -> GatewayState:
        assert self._state is not None, "not started"
        return self._state

    async def start(self) -> None:
        s = self.settings
        # Both listeners first: a busy port is a start-up error naming its setting, before
        # any login, session or task exists.
        listener = _bind("GATEWAY_LISTEN", s.proxy.listen)
        try:
            admin_sock = _bind("GATEWAY_ADMIN_LISTEN", s.server.admin_listen)
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
        self._auth_session = auth_session(s)
        tracing = tracing_for(s.tracing.otel_endpoint, __version__)
        # The token side, once per credential profile.
        self._observers = {p.name: TokenObservers(self.metrics.credential(p.name), tracing)
                           for p in s.profiles}
        managers = {p.name: build_token_manager(s, p, self._auth_session, self.clock,
                                                self._observers[p.name], self.rng)
                    for p in s.profiles}
        # With workers this process serves no request: it holds the Idempotency-Key store for
        # them only without Redis (with it, each worker talks to Redis itself).
        idempotency = (None if s.server.workers > 1 and s.redis.redis_url
                       else build_idempotency(s, self.clock, self.metrics))
        self._state = state = build_state(s, managers, self.clock, self.metrics, idempotency,
                                          tracing, self.rng)
        state.store_policy, state.store_notes = notes
        policy = VerdictPolicy(s.auth.reprobe_min_refusals, s.auth.reprobe_refused_ratio)
        for profile in s.profiles:
            manager, view = managers[profile.name], self._observers[profile.name].metrics
            verdict = UpstreamVerdict(
                manager, self.clock, policy, enabled=bool(profile.side.auth.check_path),
                events=view, rng=self.rng, tally=state.lanes.by_name[profile.name].tally)
            state.profiles[profile.name] = held = ProfileState(profile, manager, verdict)
            view.bind_contention(manager.contended)
            view.bind_ready(held.ready)
        state.verdict = state.profiles[DEFAULT_PROFILE].verdict
        self.metrics.bind_ready(state.ready)
        warn_unknown_grants(s)
        for held in state.profiles.values():
            # With several profiles, each one's background work logs under its name.
            mark = logs.CREDENTIAL.set(held.profile.name) if len(state.profiles) > 1 else None
            try:
                await held.manager.start()
                assert held.verdict is not None
                task = asyncio.create_task(held.verdict.run(),
                                           name=f"upstream-verdict-{held.profile.name}")
            finally:
                if mark is not None:
                    logs.CREDENTIAL.reset(mark)
            task.add_done_callback(lambda task: log_task_failure(task, log, "upstream verdict"))
            self._verdict_tasks.append(task)
        self.reloader = CredentialReloader(self._state, self._auth_session, self.clock,
                                           self._reload_settings)
        await self.reloader.start()
        if s.server.workers > 1:
            await self._start_workers(listener)
        else:
            self._proxy_runner = web.ServerRunner(build_proxy_server(self._state),
                                                  shutdown_timeout=s.server.shutdown_grace)
            await self._proxy_runner.setup()
            await web.SockSite(self._proxy_runner, listener).start()
            self.url = _url_of(self._proxy_runner, s.proxy.listen)
        self._admin_runner = web.AppRunner(build_admin_app(self._state), handle_signals=False,
                                           access_log=None, shutdown_timeout=1.0)
        await self._admin_runner.setup()
        await web.SockSite(self._admin_runner, admin_sock).start()
        self.admin_url = _url_of(self._admin_runner, s.server.admin_listen)
        log.info("gateway listening", extra={"fields": {
            "event": "started", "proxy": self.url, "admin": self.admin_url,
            "upstream": str(s.partner.base_url), "partner_id": s.partner.partner_id,
            "app_key_fp": s.partner.app_key.fingerprint,
            "credentials": [{"name": p.name, "upstream": str(p.partner.base_url),
                             "partner_id": p.partner.partner_id,
                             "app_key_fp": p.partner.app_key.fingerprint,
                             "required": p.required} for p in s.profiles]}})

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
        steps.append(self._stop_verdict)
        if state is not None:
            steps += [functools.partial(held.manager.stop, 0.0)
                      for held in state.profiles.values()]
            steps += [functools.partial(close_lanes, state.lanes),
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
        if isinstance(self.settings.proxy.listen, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.proxy.listen.path)

    async def _start_workers(self, listener: socket.socket) -> None:
        """GATEWAY_WORKERS > 1: this process supervises; workers run the proxy listener."""
        s, state = self.settings, self.state
        lanes = state.lanes.by_name

        def on_traffic(name: str, calls: int, refused: int) -> None:
            lane = lanes.get(name)
            if lane is not None:
                lane.tally.add(calls, refused)

        self._pool = pool = WorkerPool(
            s.server.workers, listener,
            {name: held.manager for name, held in state.profiles.items()},
            state.idempotency if isinstance(state.idempotency, LocalStore) else None,
            on_fault=lambda fault: self.metrics.channel_faults.labels(fault).inc(),
            on_traffic=on_traffic)
        for name, held in state.profiles.items():
            events, manager = self._observers[name], held.manager
            events.on_token = functools.partial(pool.broadcast_of, name, manager)
            events.on_contention = functools.partial(pool.broadcast_of, name, manager, None)
        assert self.reloader is not None
        self.reloader.on_client_keys = pool.broadcast_client_keys
        self.metrics.add_source(pool.metrics_texts)
        state.collect = pool.pull_metrics
        state.workers = pool.status
        await pool.start()
        if isinstance(s.proxy.listen, UnixAddress):
            self.url = f"unix:{s.proxy.listen.path}"
        else:
            host, port = listener.getsockname()[:2]
            self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def _check_store_policy(self, s: Settings) -> tuple[str | None, tuple[str, ...]]:
        """The store's Redis must not evict booking records: its maxmemory-policy, read once
        (an evicting one with Idempotency-Key routes on is a start-up error naming it)."""
        if not s.redis.redis_url:
            return None, ()
        r = s.redis
        client = redis_client(r.redis_url, password=r.redis_password, ca_file=r.redis_ca_file,
                              timeout=2.0)
        try:
            verdict = await check_store_policy(client, bool(s.idempotency.idempotency_routes))
        except EvictingStore as exc:
            raise SettingsError("GATEWAY_REDIS_URL", str(exc)) from None
        finally:
            await client.aclose()
        return verdict.policy, (verdict.note,) if verdict.note else ()

    async def _stop_verdict(self) -> None:
        tasks, self._verdict_tasks = self._verdict_tasks, []
        for task in tasks:
            with contextlib.suppress(Exception):  # a failure was logged when it happened
                await cancel_and_wait(task)

    async def stop(self) -> None:
        if self._state is None:
            return
        loop = asyncio.get_running_loop()
        server = self.settings.server
        deadline = loop.time() + server.shutdown_delay + server.shutdown_grace
        self._state.draining = True
        log.info("draining", extra={"fields": {"event": "draining",
                                               "grace_s": self.settings.server.shutdown_grace}})
        if self.settings.server.shutdown_delay:
            await asyncio.sleep(self.settings.server.shutdown_delay)
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()  # stop accepting, let in-flight requests finish
        if self._pool is not None:
            await self._pool.stop(self.settings.server.shutdown_grace)  # each worker drains
            self._pool = None
        if self.reloader is not None:
            await self.reloader.stop()
        await self._stop_verdict()
        # A renewal under way may finish (Repairy may already have rotated the refresh token
        # it used), within the auth timeout and what is left of the shutdown deadline.
        grace = min(self.settings.auth.auth_timeout, max(0.0, deadline - loop.time()))
        await asyncio.gather(*(held.manager.stop(grace)
                               for held in self._state.profiles.values()))
        await close_lanes(self._state.lanes)
        await close_stores(self._state)
        await self._auth_session.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if isinstance(self.settings.proxy.listen, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.proxy.listen.path)
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
            await wait_for_signal(on_hangup=server.reloader.trigger)
    finally:
        logs.flush()
    return 0
