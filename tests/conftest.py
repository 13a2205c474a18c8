"""Shared fixtures: a real sandbox on a free loopback port, and a client session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from tests.gateway_helpers import settings_for, wait_until


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig()) as sb:
        yield sb


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def gateway(sandbox: Sandbox) -> AsyncIterator[GatewayServer]:
    """The gateway in-process, pointed at the default sandbox, ready (holding a token)."""
    async with GatewayServer(settings_for(sandbox)) as gw:
        await wait_until(gw.state.tokens.ready)
        yield gw
