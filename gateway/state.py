"""Typed application state shared by the proxy and admin listeners: the request path's
context (:class:`~gateway.proxy.context.ProxyContext`) and what the admin side adds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.proxy.context import ProxyContext
from gateway.settings import Settings
from gateway.token.manager import TokenManager
from gateway.token.verdict import UpstreamVerdict


@dataclass(kw_only=True)
class GatewayState(ProxyContext):
    settings: Settings
    #: The store's Redis: its maxmemory-policy as read at start-up (None: not read), and
    #: what /tokenz should say about it.
    store_policy: str | None = None
    store_notes: tuple[str, ...] = ()
    #: With worker processes: their status, for /healthz.
    workers: Callable[[], list[dict[str, Any]]] | None = None
    #: Repairy's verdict on the configuration (the probe), where the token manager lives.
    verdict: UpstreamVerdict | None = None
    #: Before a scrape renders: fetch what other processes (workers) counted so far.
    collect: Callable[[], Awaitable[None]] | None = None

    def ready(self) -> bool:
        """Ready for three reasons only: a usable token, no refusal the probe confirmed, not
        draining."""
        return not self.draining and self.tokens.ready() and (
            self.verdict is None or self.verdict.ready())

    @property
    def manager(self) -> TokenManager:
        """The token manager (the admin listener and rotation run where it lives)."""
        assert isinstance(self.tokens, TokenManager), "no token manager in this process"
        return self.tokens


GATEWAY = web.AppKey("gateway", GatewayState)
