"""Typed application state shared by the proxy and admin listeners."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.access import AccessPolicy
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.token.manager import TokenManager
from gateway.token.route_401 import Persistent401
from gateway.upstream import Upstream


@dataclass
class GatewayState:
    settings: Settings
    tokens: TokenManager
    upstream: Upstream
    metrics: Metrics
    access: AccessPolicy
    route_401: Persistent401
    draining: bool = False

    def ready(self) -> bool:
        return not self.draining and self.tokens.ready()


GATEWAY = web.AppKey("gateway", GatewayState)
