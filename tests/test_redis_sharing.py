"""What shares one Redis cannot hurt the rest (issue 20, part 1), over real redis-server and
gateway processes: GET traffic never removes or refuses a booking's record, the store's
eviction policy is checked at start-up, and the cache may have a Redis of its own.

Invariant: *no volume of GET traffic removes a booking's record, refuses a booking, or drops
the token entry.* Each test here failed on 1ca7d9a."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from gateway.sandbox import Sandbox
from tests.fleet_helpers import GatewayProcess, RedisServer
from tests.gateway_helpers import wait_until
from tests.test_idempotency import book, bookings

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

#: 400 answers of 200 KB: about 107 MB once sealed, more than three times the Redis's 32 MB.
FLOOD, BODY = 400, 200_000
CACHED = {"GATEWAY_CACHE_ROUTES": "GET /__sandbox/bytes/*=600s", "GATEWAY_CACHE_SHARED": "true",
          "GATEWAY_CACHE_MAX_BYTES": "2MiB"}
NOEVICTION_32MB = ("--maxmemory", "32mb", "--maxmemory-policy", "noeviction")


@asynccontextmanager
async def redis(*args: str) -> AsyncIterator[RedisServer]:
    server = RedisServer(args=args)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def gateway(sb: Sandbox, http: aiohttp.ClientSession,
                  **env: str) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(sb, env)
    await gw.start()
    try:
        await gw.ready(http)
        yield gw
    finally:
        await gw.stop()


async def flood(http: aiohttp.ClientSession, url: str) -> None:
    """FLOOD distinct cached GETs, 16 at a time; every one is answered 200."""
    gate = asyncio.Semaphore(16)

    async def get(i: int) -> None:
        async with gate, http.get(f"{url}/__sandbox/bytes/{BODY}?n={i}") as resp:
            assert resp.status == 200
            assert len(await resp.read()) == BODY

    await asyncio.gather(*(get(i) for i in range(FLOOD)))


async def info(server: RedisServer, section: str) -> dict[str, Any]:
    client = await server.client()
    try:
        found: dict[str, Any] = await client.info(section)
        return found
    finally:
        await client.aclose()


async def keys(server: RedisServer, pattern: str) -> list[str]:
    client = await server.client()
    try:
        return [k async for k in client.scan_iter(pattern)]
    finally:
        await client.aclose()


async def metric(http: aiohttp.ClientSession, gw: GatewayProcess, name: str) -> float:
    async with http.get(gw.admin + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def book_twice(http: aiohttp.ClientSession, sb: Sandbox, url: str, key: str) -> None:
    """A booking and its retry: one booking, the same answer, never refused."""
    before = bookings(sb)
    first = await book(http, url, key)
    again = await book(http, url, key)
    assert first[0] == 201, first
    assert again[0] == 201 and again[1].get("Idempotent-Replayed") == "true", again
    assert again[2]["data"]["id"] == first[2]["data"]["id"]
    assert bookings(sb) - before == 1


async def test_a_get_flood_within_the_caches_bound_never_refuses_a_booking(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """One Redis (noeviction, maxmemory 32mb) for the token, the booking records and the
    shared cache bounded at 8 MiB: after a flood of three times the Redis's memory, a booking
    and its retry give one booking, and a record kept before the flood is still there."""
    async with redis(*NOEVICTION_32MB) as store, gateway(
            sandbox, http, GATEWAY_REDIS_URL=store.url, GATEWAY_CACHE_SHARED_MAX_BYTES="8MiB",
            GATEWAY_WORKERS="2", **CACHED) as gw:
        await book_twice(http, sandbox, gw.url, "before-the-flood")
        await flood(http, gw.url)

        async def full() -> bool:  # the cache made room (or, unbounded, Redis refused it)
            return await metric(http, gw, "repairy_gateway_cache_shared_evictions_total") + (
                await metric(http, gw, "repairy_gateway_cache_shared_errors_total")) > 0

        await wait_until(full, within=10)
        await book_twice(http, sandbox, gw.url, "after-the-flood")
        replay = await book(http, gw.url, "before-the-flood")
        assert replay[0] == 201 and replay[1].get("Idempotent-Replayed") == "true"
        client = await store.client()
        try:
            total = int(await client.hget("repairy-gateway:cache-sizes", "#") or 0)
        finally:
            await client.aclose()
        assert 0 < total <= 8 * 1024 * 1024
        assert int((await info(store, "memory"))["used_memory"]) < 24 * 1024 * 1024
        assert await metric(http, gw, "repairy_gateway_cache_shared_errors_total") == 0
        assert len(await keys(store, "*:state")) == 1  # the token entry stays


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
async def test_an_evicting_store_with_idempotency_routes_stops_the_start_up(
        sandbox: Sandbox, http: aiohttp.ClientSession, policy: str) -> None:
    """An evicting maxmemory-policy could drop a booking's record: exit 2, one line naming
    maxmemory-policy (and the setting), before any login."""
    async with redis("--maxmemory", "32mb", "--maxmemory-policy", policy) as store:
        gw = GatewayProcess(sandbox, {"GATEWAY_REDIS_URL": store.url})
        logins = sandbox.state.control.stats()["token_requests"]
        await gw.start()
        assert gw.proc is not None
        code = await asyncio.wait_for(gw.proc.wait(), 30)
        assert code == 2, gw.logs()[-2000:]
        assert (f"invalid setting GATEWAY_REDIS_URL: the Redis has maxmemory-policy {policy}"
                in gw.logs())
        assert sandbox.state.control.stats()["token_requests"] == logins


async def test_an_unreadable_or_evicting_policy_without_booking_routes_is_a_warning(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """CONFIG disabled (as on managed Redis): a warning and a note on /tokenz, never an error;
    an evicting policy with Idempotency-Key routes off: the same."""
    async with redis("--rename-command", "CONFIG", "") as store, gateway(
            sandbox, http, GATEWAY_REDIS_URL=store.url) as gw:
        tokenz = await gw.tokenz(http)
        assert tokenz["store"]["maxmemory_policy"] is None
        (note,) = tokenz["store"]["notes"]
        assert "maxmemory-policy could not be read (CONFIG is not allowed" in note
        assert "store_policy_warning" in gw.logs()
    async with redis("--maxmemory-policy", "allkeys-lru") as store, gateway(
            sandbox, http, GATEWAY_REDIS_URL=store.url,
            GATEWAY_IDEMPOTENCY_ROUTES="off") as gw:
        tokenz = await gw.tokenz(http)
        assert tokenz["store"]["maxmemory_policy"] == "allkeys-lru"
        assert "token entry" in tokenz["store"]["notes"][0]
    async with redis(*NOEVICTION_32MB) as store, gateway(
            sandbox, http, GATEWAY_REDIS_URL=store.url) as gw:
        tokenz = await gw.tokenz(http)
        assert tokenz["store"]["maxmemory_policy"] == "noeviction"
        assert tokenz["store"]["notes"] == []


async def test_a_cache_redis_of_its_own_takes_the_flood(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """GATEWAY_CACHE_REDIS_URL: the cache in its own Redis (allkeys-lru, 32 MB) beside the
    store (noeviction, 32 MB): the flood never reaches the store; one booking per key."""
    async with redis(*NOEVICTION_32MB) as store, redis(
            "--maxmemory", "32mb", "--maxmemory-policy", "allkeys-lru") as cache, gateway(
            sandbox, http, GATEWAY_REDIS_URL=store.url, GATEWAY_CACHE_REDIS_URL=cache.url,
            GATEWAY_CACHE_SHARED_MAX_BYTES="1GiB", **CACHED) as gw:
        await flood(http, gw.url)

        async def full() -> bool:  # the cache's Redis made room (or the store refused it)
            return int((await info(cache, "stats"))["evicted_keys"]) + (
                await metric(http, gw, "repairy_gateway_cache_shared_errors_total")) > 0

        await wait_until(full, within=10)
        await book_twice(http, sandbox, gw.url, "beside-the-cache")
        assert await keys(store, "*:cache*") == []
        assert len(await keys(cache, "*:cache:*")) > 10
        assert int((await info(cache, "stats"))["evicted_keys"]) > 0  # its own LRU at work
        assert int((await info(store, "memory"))["used_memory"]) < 8 * 1024 * 1024


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("needs redis-server")


async def test_a_store_down_at_start_up_is_judged_at_the_first_booking(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Redis down when the gateway starts (a note, not an error), then up with an evicting
    policy: the first booking with a key is refused (503 idempotency_unavailable naming
    maxmemory-policy), nothing is sent; bookings without a key still go through."""
    store = RedisServer(args=("--maxmemory-policy", "allkeys-lru"))
    gw = GatewayProcess(sandbox, {"GATEWAY_REDIS_URL": store.url,
                                  "GATEWAY_REDIS_LEASE_TTL": "1s"})
    await gw.start()
    try:
        await gw.ready(http)  # renewed locally: the store is down
        (note,) = (await gw.tokenz(http))["store"]["notes"]
        assert "could not be read (Redis unreachable" in note
        await store.start()
        before = bookings(sandbox)
        status, _, body = await book(http, gw.url, "while-evicting")
        assert status == 503 and body["error"]["code"] == "idempotency_unavailable"
        assert "maxmemory-policy allkeys-lru" in body["error"]["message"]
        assert bookings(sandbox) == before
        assert (await book(http, gw.url, None))[0] == 201
        assert "store_policy_refused" in gw.logs()
    finally:
        await gw.stop()
        await store.stop()
