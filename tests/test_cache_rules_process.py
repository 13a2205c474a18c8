"""The GET cache's rules for a shared cache in a real ``serve`` process (issue 20, part 4):
the defects of the issue, checked in-process by tests/test_cache_rules.py, here end to end."""

from __future__ import annotations

import aiohttp

from gateway.sandbox import Sandbox
from tests.fleet_helpers import GatewayProcess
from tests.gateway_helpers import SERVICES
from tests.test_cache_rules import answers_with

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def how(session: aiohttp.ClientSession, gw: GatewayProcess) -> str:
    async with session.get(gw.url + SERVICES) as resp:
        assert resp.status == 200
        await resp.read()
        return resp.headers["X-Cache"]


async def test_a_serve_process_never_shares_a_cookie_or_another_callers_variant(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = GatewayProcess(sandbox, {"GATEWAY_CACHE_ROUTES": "GET /workshops/*/services=60s",
                                  "GATEWAY_FORWARDED_HEADERS": "true"})
    await gw.start()
    mine = http
    theirs = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    try:
        await gw.ready(http)
        await answers_with(http, sandbox, **{"Set-Cookie": "session=caller-one"})
        assert [await how(mine, gw) for _ in range(3)] == ["MISS"] * 3
        await answers_with(http, sandbox, Pragma="no-cache")
        assert [await how(mine, gw) for _ in range(2)] == ["MISS"] * 2
        await answers_with(http, sandbox, Vary="X-Forwarded-For")
        assert [await how(mine, gw) for _ in range(2)] == ["MISS", "HIT"]
        assert await how(theirs, gw) == "MISS"  # another address never gets that variant
        assert await how(theirs, gw) == "HIT"  # but its own
    finally:
        await theirs.close()
        await gw.stop()
