"""Typed application state shared by the proxy and admin listeners: the request path's
context (:class:`~gateway.proxy.context.ProxyContext`) and what the admin side adds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.proxy.context import ProxyContext
from gateway.settings import Settings
from gateway.token.config import CredentialProfile
from gateway.token.manager import TokenManager
from gateway.token.verdict import UpstreamVerdict


@dataclass(eq=False)
class ProfileState:
    """One credential profile where its token manager lives: the manager and the probe's
    verdict on it (``profile`` as started: its credentials as rotated since are in
    ``GatewayState.settings``)."""

    profile: CredentialProfile
    manager: TokenManager
    verdict: UpstreamVerdict | None = None

    def ready(self) -> bool:
        """A usable token, and no refusal the probe confirmed."""
        return self.manager.ready() and (self.verdict is None or self.verdict.ready())


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
    #: Every profile's manager and verdict, by name (where the managers live; empty in a
    #: worker). ``manager`` and ``verdict`` are the default profile's.
    profiles: dict[str, ProfileState] = field(default_factory=dict)

    def ready(self) -> bool:
        """Ready for three reasons only: every *required* profile holds a usable token and
        has no refusal the probe confirmed, and not draining (an optional profile's outage
        never takes the pod out of its Service)."""
        if self.draining:
            return False
        if not self.profiles:
            return self.tokens.ready() and (self.verdict is None or self.verdict.ready())
        return all(p.ready() for p in self.profiles.values() if p.profile.required)

    @property
    def manager(self) -> TokenManager:
        """The token manager (the admin listener and rotation run where it lives)."""
        assert isinstance(self.tokens, TokenManager), "no token manager in this process"
        return self.tokens


GATEWAY = web.AppKey("gateway", GatewayState)
