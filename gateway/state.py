"""Typed application state shared by the proxy and admin listeners."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.clock import Clock
from gateway.metrics import Metrics
from gateway.proxy.access import AccessPolicy
from gateway.proxy.cache import GetCache
from gateway.proxy.idempotency_store import IdempotencyStore
from gateway.proxy.limits import ClientLimits
from gateway.proxy.upstream import Upstream
from gateway.settings import Settings
from gateway.token.manager import TokenManager, TokenSource
from gateway.token.route_401 import Persistent401
from gateway.tracing import Tracing


@dataclass
class GatewayState:
    settings: Settings
    tokens: TokenSource
    upstream: Upstream
    metrics: Metrics
    access: AccessPolicy
    route_401: Persistent401
    limits: ClientLimits
    clock: Clock
    cache: GetCache
    #: Idempotency-Key records (None: no protected routes).
    idempotency: IdempotencyStore | None = None
    #: OpenTelemetry spans (None: off, the default).
    tracing: Tracing | None = None
    draining: bool = False
    #: The store's Redis: its maxmemory-policy as read at start-up (None: not read), and
    #: what /tokenz should say about it.
    store_policy: str | None = None
    store_notes: tuple[str, ...] = ()
    #: With worker processes: their status, for /healthz.
    workers: Callable[[], list[dict[str, Any]]] | None = None

    def ready(self) -> bool:
        return not self.draining and self.tokens.ready()

    @property
    def manager(self) -> TokenManager:
        """The token manager (the admin listener and rotation run where it lives)."""
        assert isinstance(self.tokens, TokenManager), "no token manager in this process"
        return self.tokens


GATEWAY = web.AppKey("gateway", GatewayState)
