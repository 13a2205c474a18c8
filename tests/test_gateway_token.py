"""The managed token end to end: single flight, renewal, fallbacks, 401 replay."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from gateway.app import GatewayServer
from gateway.errors import GATEWAY_ERROR_HEADER
from gateway.sandbox import Sandbox, SandboxConfig
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def test_token_200_concurrent_first_requests_make_one_login(
        http: aiohttp.ClientSession) -> None:
    """200 requests arriving before any token exists share exactly one login."""
    async with Sandbox() as sb:
        await faults(http, sb, {"latency": 0.3, "path": "/auth/token"})
        async with GatewayServer(settings_for(sb)) as gw:
            async def one() -> int:
                async with http.get(gw.url + SERVICES) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one() for _ in range(200)))
        s = await stats(http, sb)
    assert statuses == [200] * 200
    assert s["token_requests"] == 1
    assert s["api_requests"] == 200


async def test_token_continuous_load_across_renewals_has_no_failures(
        http: aiohttp.ClientSession) -> None:
    """With 1.5 s tokens and 4 s of load, renewals happen and no request fails or sees 401."""
    async with Sandbox(SandboxConfig(access_ttl=1.5, refresh_ttl=60)) as sb, \
            GatewayServer(settings_for(sb, renew_at_fraction=0.5)) as gw:
        failures: list[int] = []
        count = 0
        deadline = time.monotonic() + 4.0

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                async with http.get(gw.url + SERVICES) as resp:
                    await resp.read()
                    count += 1
                    if resp.status != 200:
                        failures.append(resp.status)

        await asyncio.gather(*(worker() for _ in range(8)))
        s = await stats(http, sb)
    assert failures == []
    assert count > 100
    assert "401" not in s["statuses"]
    assert s["refresh_requests"] >= 3  # several renewals, all by refresh
    assert s["token_requests"] == 1


async def assert_fell_back_to_login(http: aiohttp.ClientSession, sb: Sandbox,
                                    gw: GatewayServer, within: float) -> None:
    """After one failed refresh: a second token obtained by login, and traffic flows."""
    await wait_until(lambda: (tok := gw.state.tokens.current) is not None
                     and tok.generation >= 2, within=within)
    tok = gw.state.tokens.current
    assert tok is not None
    assert tok.via == "login"
    s = await stats(http, sb)
    assert (s["refresh_requests"], s["token_requests"]) == (1, 2)
    async with http.get(gw.url + SERVICES) as resp:
        assert resp.status == 200


async def test_token_rejected_refresh_falls_back_to_login(http: aiohttp.ClientSession) -> None:
    """A refresh answered 401 is followed at once by a login, and traffic keeps flowing."""
    async with Sandbox(SandboxConfig(access_ttl=1.0)) as sb, \
            GatewayServer(settings_for(sb, renew_at_fraction=0.5)) as gw:
        await wait_until(gw.state.tokens.ready)
        await faults(http, sb, {"status": 401, "path": "/auth/refresh"})
        await assert_fell_back_to_login(http, sb, gw, within=3)


async def test_token_expired_refresh_token_means_login(http: aiohttp.ClientSession) -> None:
    """When the refresh token is past its own expiry, renewal logs in without trying it."""
    async with Sandbox(SandboxConfig(access_ttl=2.5, refresh_ttl=1.0)) as sb, \
            GatewayServer(settings_for(sb, renew_at_fraction=0.5)) as gw:
        await wait_until(lambda: (tok := gw.state.tokens.current) is not None
                         and tok.generation >= 3, within=5)
        s = await stats(http, sb)
    assert s["refresh_requests"] == 0
    assert s["token_requests"] >= 3


async def test_token_refresh_timeout_logs_in_and_does_not_resend_refresh_token(
        http: aiohttp.ClientSession) -> None:
    """A refresh that times out (it may have rotated the token) is followed by a login."""
    async with Sandbox(SandboxConfig(access_ttl=2.0)) as sb, \
            GatewayServer(settings_for(sb, renew_at_fraction=0.5, auth_timeout="0.3s")) as gw:
        await wait_until(gw.state.tokens.ready)
        await faults(http, sb, {"latency": 1.0, "path": "/auth/refresh"})
        await assert_fell_back_to_login(http, sb, gw, within=4)


async def test_token_rejected_login_is_503_not_ready_then_recovers(
        http: aiohttp.ClientSession) -> None:
    """Bad credentials: 503 credentials_rejected with Retry-After, not ready; fixed → ready."""
    async with Sandbox() as sb, \
            GatewayServer(settings_for(sb, app_secret="rotated-secret")) as gw:
        await wait_until(lambda: gw.state.manager.status().credentials_rejected)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
            assert resp.headers[GATEWAY_ERROR_HEADER] == "credentials_rejected"
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"]["code"] == "credentials_rejected"
        async with http.get(gw.admin_url + "/readyz") as resp:
            assert resp.status == 503
            assert "rejected the credentials" in (await resp.json())["reasons"][0]
        failed_logins = (await stats(http, sb))["token_requests"]
        async with http.post(f"{sb.url}/__sandbox/credentials", json={
                "app_key": "sandbox-app-key", "app_secret": "rotated-secret",
                "partner_id": "sandbox-partner"}) as resp:
            assert resp.status == 200
        await wait_until(gw.state.tokens.ready, within=3)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200
        async with http.get(gw.admin_url + "/readyz") as resp:
            assert resp.status == 200
    # It kept retrying slowly (every 0.3 s here), not in a tight loop.
    assert 1 <= failed_logins <= 5


async def test_token_401_replays_get_once_with_new_token(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """An upstream 401 on a GET invalidates the token, logs in, and replays: caller sees 200."""
    await faults(http, sandbox, {"status": 401, "path": "/workshops/*"})
    before = await stats(http, sandbox)
    async with http.get(gateway.url + SERVICES) as resp:
        assert resp.status == 200
    after = await stats(http, sandbox)
    assert after["api_requests"] - before["api_requests"] == 2
    assert after["token_requests"] - before["token_requests"] == 1
    tok = gateway.state.tokens.current
    assert tok is not None
    assert tok.generation == 2


async def test_token_401_replays_small_post_and_creates_one_booking(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A small POST that met a 401 is replayed with its body; one booking results."""
    await faults(http, sandbox, {"status": 401, "path": "/bookings"})
    body = {"workshopId": "5f1a2b3c4d5e6f7a8b9c0d01", "startTime": "2026-12-01T09:00:00Z",
            "serviceType": "Basic service",
            "customer": {"firstName": "Jo", "email": "jo@example.com", "phone": "0400000009"},
            "car": {"rego": "XYZ987"}}
    async with http.post(gateway.url + "/bookings", json=body) as resp:
        assert resp.status == 201, await resp.text()
    assert len(sandbox.state.data.bookings) == 1


async def test_token_persistent_401_is_passed_back_without_loop(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """If the upstream keeps answering 401, the caller gets it after exactly one replay."""
    await faults(http, sandbox, {"status": 401, "path": "/workshops/*", "count": 50})
    before = await stats(http, sandbox)
    async with http.get(gateway.url + SERVICES) as resp:
        assert resp.status == 401
        assert GATEWAY_ERROR_HEADER not in resp.headers
    after = await stats(http, sandbox)
    assert after["api_requests"] - before["api_requests"] == 2


async def test_token_large_streamed_body_is_not_replayed(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A body over the replay limit is streamed; its 401 comes back; the next call works."""
    await faults(http, sandbox, {"status": 401, "path": "/__sandbox/echo"})
    before = await stats(http, sandbox)
    async with http.post(gateway.url + "/__sandbox/echo", data=b"z" * 200_000) as resp:
        assert resp.status == 401
    assert (await stats(http, sandbox))["api_requests"] - before["api_requests"] == 1
    async with http.post(gateway.url + "/__sandbox/echo", data=b"z" * 200_000) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"]["size"] == 200_000


async def test_token_mass_401_after_revocation_renews_once(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """All tokens revoked: 50 concurrent requests all succeed through one shared login."""
    await faults(http, sandbox, {"revoke_tokens": True})
    before = await stats(http, sandbox)

    async def one() -> int:
        async with http.get(gateway.url + SERVICES) as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(50))) == [200] * 50
    after = await stats(http, sandbox)
    assert after["token_requests"] - before["token_requests"] == 1


async def test_token_invalidate_spares_a_newer_generation(
        gateway: GatewayServer) -> None:
    """invalidate(old generation) does nothing once a newer token is held."""
    tokens = gateway.state.tokens
    first = await tokens.get()
    assert tokens.invalidate(first.generation, "test") is True
    second = await tokens.get(newer_than=first.generation)
    assert second.generation == first.generation + 1
    assert tokens.invalidate(first.generation, "test") is False
    assert tokens.ready()
    assert (await tokens.get()) is second


async def test_token_requests_do_not_wait_for_background_renewal(
        http: aiohttp.ClientSession) -> None:
    """While a slow refresh is in flight, requests with the still-valid token go straight on."""
    async with Sandbox(SandboxConfig(access_ttl=4.0)) as sb, \
            GatewayServer(settings_for(sb, renew_at_fraction=0.25, renew_jitter_fraction=0,
                                       auth_timeout="3s")) as gw:
        await wait_until(gw.state.tokens.ready)
        await faults(http, sb, {"latency": 1.5, "path": "/auth/refresh"})
        await wait_until(lambda: sb.state.control.counters["refresh_requests"] == 1, within=3)
        started = time.monotonic()
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 0.5
        tok = gw.state.tokens.current
        assert tok is not None
        assert tok.generation == 1  # the refresh is still under way
