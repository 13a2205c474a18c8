"""The GET cache over real sockets against the sandbox: single flight, Cache-Control, Vary,
lifetimes, bypass, bounded memory."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.proxy.cache import cache_key
from gateway.sandbox import Sandbox
from gateway.settings import SettingsError
from tests.fleet_helpers import RedisServer
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.sandbox_helpers import faults, stats
from tests.test_proxy_failures import sample, started

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

CACHED = "GET /workshops/*/services"


async def api_count(http: aiohttp.ClientSession, sb: Sandbox) -> int:
    return int((await stats(http, sb))["api_requests"])


async def cache_gateway(sb: Sandbox, ttl: str = "60s", **extra: object) -> GatewayServer:
    return await started(settings_for(sb, None, cache_routes=f"{CACHED}={ttl}", **extra))


async def test_cache_100_concurrent_gets_make_one_upstream_call(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        await faults(http, sandbox, {"latency": 0.3, "scope": "api", "count": 1})
        before = await api_count(http, sandbox)

        async def get() -> tuple[int, str, bytes]:
            async with http.get(gw.url + SERVICES) as resp:
                return resp.status, resp.headers.get("X-Cache", ""), await resp.read()

        results = await asyncio.gather(*(get() for _ in range(100)))
        assert await api_count(http, sandbox) - before == 1
        assert {status for status, _, _ in results} == {200}
        assert len({body for _, _, body in results}) == 1
        kinds = sorted(how for _, how, _ in results)
        assert kinds.count("MISS") == 1 and kinds.count("COALESCED") == 99
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.headers["X-Cache"] == "HIT"
            assert int(resp.headers["Age"]) >= 0
        assert sample(gw, "cache_requests_total", result="coalesced") == 99
        assert sample(gw, "cache_requests_total", result="hit") == 1
        assert sample(gw, "cache_stored_total") == 1
    finally:
        await gw.stop()


async def test_cache_never_keeps_no_store_or_private_answers(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        for control in ("no-store", "private, max-age=60", "no-cache"):
            await faults(http, sandbox, {"headers": {"Cache-Control": control}, "scope": "api",
                                         "duration": 30})
            before = await api_count(http, sandbox)
            for _ in range(3):
                async with http.get(gw.url + SERVICES) as resp:
                    assert resp.status == 200
                    assert resp.headers["X-Cache"] == "MISS"
            assert await api_count(http, sandbox) - before == 3, control
            await http.delete(f"{sandbox.url}/__sandbox/faults")
        assert sample(gw, "cache_stored_total") == 0
    finally:
        await gw.stop()


async def test_cache_lifetime_ends_with_one_refresh_and_max_age_caps_it(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox, ttl="0.5s")
    try:
        before = await api_count(http, sandbox)
        hows = []
        for pause in (0, 0, 0.6, 0, 0):
            await asyncio.sleep(pause)
            async with http.get(gw.url + SERVICES) as resp:
                hows.append(resp.headers["X-Cache"])
        assert hows == ["MISS", "HIT", "MISS", "HIT", "HIT"]
        assert await api_count(http, sandbox) - before == 2
    finally:
        await gw.stop()
    gw = await cache_gateway(sandbox, ttl="60s")
    try:  # the upstream's max-age=1 caps the configured 60 s
        await faults(http, sandbox, {"headers": {"Cache-Control": "public, max-age=1"},
                                     "scope": "api", "duration": 30})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.headers["X-Cache"] == "MISS"
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.headers["X-Cache"] == "HIT"
        await asyncio.sleep(1.1)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.headers["X-Cache"] == "MISS"
    finally:
        await gw.stop()


async def test_cache_honours_vary(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """An answer that varies on Accept-Encoding is only served to callers sending the same."""
    gw = await cache_gateway(sandbox)
    try:
        await faults(http, sandbox, {"headers": {"Vary": "Accept-Encoding"}, "scope": "api",
                                     "duration": 30})
        gzip, plain = {"Accept-Encoding": "gzip"}, {"Accept-Encoding": "identity"}
        async with http.get(gw.url + SERVICES, headers=gzip) as resp:
            assert resp.headers["X-Cache"] == "MISS"
        async with http.get(gw.url + SERVICES, headers=gzip) as resp:
            assert resp.headers["X-Cache"] == "HIT"
        async with http.get(gw.url + SERVICES, headers=plain) as resp:
            assert resp.headers["X-Cache"] == "MISS"
        await faults(http, sandbox, {"headers": {"Vary": "*"}, "scope": "api", "count": 1,
                                     "path": "/workshops/x/services"})
    finally:
        await gw.stop()


async def test_cache_no_cache_from_the_caller_bypasses_and_refreshes(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.headers["X-Cache"] == "MISS"
        before = await api_count(http, sandbox)
        async with http.get(gw.url + SERVICES, headers={"Cache-Control": "no-cache"}) as resp:
            assert resp.headers["X-Cache"] == "MISS"
        assert await api_count(http, sandbox) - before == 1
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.headers["X-Cache"] == "HIT"
        assert sample(gw, "cache_requests_total", result="bypass") == 1
    finally:
        await gw.stop()


async def test_cache_serves_head_from_the_get_entry_and_leaves_other_routes_alone(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        async with http.get(gw.url + SERVICES) as resp:
            length = len(await resp.read())
        before = await api_count(http, sandbox)
        async with http.head(gw.url + SERVICES) as resp:
            assert resp.status == 200
            assert resp.headers["X-Cache"] == "HIT"
            assert int(resp.headers["Content-Length"]) == length
            assert await resp.read() == b""
        for _ in range(2):
            async with http.get(gw.url + "/bookings/000000000000000000000000") as resp:
                assert "X-Cache" not in resp.headers
        assert await api_count(http, sandbox) - before == 2
    finally:
        await gw.stop()


async def test_cache_memory_stays_within_its_limits_under_a_flood_of_keys(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox, cache_max_bytes="64KiB", cache_max_entries="100")
    try:
        for i in range(400):
            async with http.get(f"{gw.url}{SERVICES}?page={i}") as resp:
                assert resp.status == 200
            assert gw.state.cache.stored_bytes <= 64 * 1024
            assert len(gw.state.cache) <= 100
        assert sample(gw, "cache_evictions_total") > 0
        assert sample(gw, "cache_bytes") <= 64 * 1024
    finally:
        await gw.stop()


@pytest.mark.unit
def test_cache_routes_setting_is_checked() -> None:
    import pytest

    from gateway.settings import SettingsError, load_settings

    base = {"REPAIRY_BASE_URL": "https://api.example.test", "REPAIRY_APP_KEY": "k",
            "REPAIRY_APP_SECRET": "s", "REPAIRY_PARTNER_ID": "p"}
    s = load_settings({**base, "GATEWAY_CACHE_ROUTES": "GET /a/*=60s, /b=5m"})
    assert [(r.pattern, r.ttl) for r in s.cache.cache_routes] == [("/a/*", 60.0), ("/b", 300.0)]
    for bad in ("POST /a=60s", "GET /a", "GET a=60s", "GET /a=0s"):
        with pytest.raises(SettingsError) as err:
            load_settings({**base, "GATEWAY_CACHE_ROUTES": bad})
        assert err.value.setting == "GATEWAY_CACHE_ROUTES"


async def redis_values(redis_server: RedisServer, pattern: str) -> list[str]:
    client = await redis_server.client()
    try:
        return [await client.get(k) async for k in client.scan_iter(pattern)]
    finally:
        await client.aclose()


async def test_cache_shared_through_redis_one_upstream_call_serves_two_replicas(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """GATEWAY_CACHE_SHARED: replica two answers from what replica one fetched (sealed in
    Redis with the store key), with the remaining lifetime."""
    shared = {"redis_url": redis_server.url, "store_key": "s" * 40, "cache_shared": "true"}
    one = await cache_gateway(sandbox, **shared)
    two = await cache_gateway(sandbox, **shared)
    try:
        before = await api_count(http, sandbox)
        async with http.get(one.url + SERVICES) as resp:
            assert resp.headers["X-Cache"] == "MISS"
            body = await resp.read()

        async def written() -> bool:
            return len(await redis_values(redis_server, "*:cache:*")) == 1

        await wait_until(written)
        for _ in range(3):
            async with http.get(two.url + SERVICES) as resp:
                assert resp.status == 200 and resp.headers["X-Cache"] == "HIT"
                assert await resp.read() == body
        assert await api_count(http, sandbox) - before == 1
        assert sample(two, "cache_requests_total", result="shared_hit") == 1
        assert sample(two, "cache_requests_total", result="hit") == 2  # then from memory
        (value,) = await redis_values(redis_server, "*:cache:*")
        assert value.startswith("gcm:") and b"Logbook" not in value.encode()
    finally:
        await one.stop()
        await two.stop()


async def test_cache_shared_never_writes_uncacheable_answers_and_survives_redis_down(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    gw = await cache_gateway(sandbox, redis_url=redis_server.url, cache_shared="true")
    try:
        await faults(http, sandbox, {"headers": {"Cache-Control": "no-store"}, "scope": "api",
                                     "count": 1})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200
        await asyncio.sleep(0.2)
        assert await redis_values(redis_server, "*:cache:*") == []
        await redis_server.stop()
        gw.state.cache.forget(cache_key(gw.settings.partner.partner_id, SERVICES))
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
        assert sample(gw, "cache_shared_errors_total", op="get") >= 1
    finally:
        await gw.stop()


@pytest.mark.unit
def test_cache_shared_needs_redis() -> None:
    with pytest.raises(SettingsError) as info:
        settings_for("http://127.0.0.1:1", cache_shared="true")
    assert info.value.setting == "GATEWAY_CACHE_SHARED"
