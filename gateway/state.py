"""Typed application state shared by the proxy and admin listeners."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.settings import Settings
from gateway.token_manager import TokenManager
from gateway.upstream import Upstream


@dataclass
class GatewayState:
    settings: Settings
    tokens: TokenManager
    upstream: Upstream
    draining: bool = False


GATEWAY = web.AppKey("gateway", GatewayState)
