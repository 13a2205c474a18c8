"""Scopes follow a credential rotation (issue 20, part 5), over a real gateway process with
two workers, a real redis-server and mounted secret files: after a Partner-ID rotation
(SIGHUP), the GET cache, the Idempotency-Key records and the fleet's token entry are the new
partner's. Invariant: *one partner's answers never reach a request made as another.* This
test failed on 1ca7d9a (partner-1's cached answer and booking were served as partner-2's)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from gateway.app import GatewayServer
from gateway.proxy.cache import cache_key
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.settings import Settings
from tests.fleet_helpers import GatewayProcess, RedisServer
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.test_idempotency import booking_posts
from tests.test_rotation import NEW, OLD, SecretMount, accept
from tests.test_sandbox_api import booking_body

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def partner_seen(session: aiohttp.ClientSession, gw: GatewayProcess) -> str:
    """The X-Partner-ID this worker sends upstream now (the sandbox's echo; never cached)."""
    async with session.get(gw.url + "/__sandbox/echo") as resp:
        assert resp.status == 200
        return str((await resp.json())["data"]["headers"]["X-Partner-ID"])


async def get(session: aiohttp.ClientSession, gw: GatewayProcess) -> tuple[str, Any]:
    async with session.get(gw.url + SERVICES) as resp:
        assert resp.status == 200
        return resp.headers["X-Cache"], await resp.json()


async def book(session: aiohttp.ClientSession, gw: GatewayProcess | GatewayServer,
               key: str) -> tuple[int, bool, str]:
    async with session.post(gw.url + "/bookings", json=booking_body(),
                            headers={"Idempotency-Key": key}) as resp:
        body = await resp.json()
        return (resp.status, resp.headers.get("Idempotent-Replayed") == "true",
                str(body["data"]["id"]))


async def test_a_partner_rotation_moves_every_scope_to_the_new_partner(
        tmp_path: Path, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    mount = SecretMount(tmp_path, OLD)
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:
        env = {**mount.env(sb), "GATEWAY_WORKERS": "2", "GATEWAY_REDIS_URL": redis_server.url,
               "GATEWAY_CACHE_ROUTES": "GET /workshops/*/services=600s",
               "GATEWAY_CACHE_SHARED": "true", "GATEWAY_SECRETS_POLL_INTERVAL": "0"}
        gw = GatewayProcess(sb, env)
        for name in ("REPAIRY_APP_KEY", "REPAIRY_APP_SECRET", "REPAIRY_PARTNER_ID"):
            gw.env.pop(name)
        await gw.start()
        sessions: list[aiohttp.ClientSession] = []
        try:
            await gw.ready(http)
            sessions = [await gw.pinned(http, slot) for slot in (0, 1)]
            before = {}
            for slot, session in enumerate(sessions):
                assert await partner_seen(session, gw) == "partner-1"
                assert (await get(session, gw))[0] in ("HIT", "MISS")
                status, _, booking = await book(session, gw, f"key-{slot}")
                assert status == 201
                before[slot] = booking
            await accept(http, sb, NEW)  # Repairy issues partner-2's credentials...
            mount.update(NEW)  # ...the Secret changes, and the operator sends SIGHUP
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            for session in sessions:
                await wait_until(lambda s=session: _is(partner_seen(s, gw), "partner-2"),
                                 within=10, interval=0.1)
            for slot, session in enumerate(sessions):
                how, _ = await get(session, gw)
                assert how == "MISS" or slot == 1, f"worker {slot}: partner-1's answer served"
                async with http.get(f"{sb.url}/__sandbox/requests?limit=1") as resp:
                    (entry,) = (await resp.json())["requests"]
                assert dict(entry["headers"])["X-Partner-ID"] == "partner-2"
                status, replayed, booking = await book(session, gw, f"key-{slot}")
                assert status == 201 and not replayed, "partner-1's booking replayed"
                assert booking != before[slot]
                assert await book(session, gw, f"key-{slot}") == (201, True, booking)
            client = await redis_server.client()

            async def owners() -> int:  # published within a lease TTL, under its own owner
                return len([k async for k in client.scan_iter("repairy-gateway:*:state")])

            try:
                await wait_until(lambda: _is(owners(), 2), within=15, interval=0.2)
            finally:
                await client.aclose()
            tokenz = await gw.tokenz(http)
            assert tokenz["store"]["key_mismatch"] is False
        finally:
            for session in sessions:
                await session.close()
            await gw.stop()


async def _is(value: Any, expected: object) -> bool:
    return bool(await value == expected)


async def test_a_rotation_between_claim_and_token_sends_nothing(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The race: a booking's key is claimed under partner-1's scope, then the rotation lands
    before its token is taken. It must not go out with partner-2's token under partner-1's
    record (its retry, scoped to partner-2, would book again): 503 credentials_rotated,
    nothing sent, and the retry books once. A cached GET in the same race is not kept under
    partner-1's key. (Rotation injected at the claim and the cache lookup.)"""
    mount = SecretMount(tmp_path, OLD)
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:

        def load() -> Settings:
            return settings_for(sb, env=mount.env(sb), secrets_poll_interval="0",
                                cache_routes="GET /workshops/*/services=600s")

        async with GatewayServer(load(), reload_settings=load) as gw:
            await wait_until(gw.state.tokens.ready)
            store, cache = gw.state.idempotency, gw.state.cache
            assert store is not None and gw.reloader is not None
            reloader = gw.reloader

            async def rotate() -> None:
                await accept(http, sb, NEW)
                mount.update(NEW)
                assert await reloader.check() == "success"

            claim = store.claim

            async def claim_then_rotate(*args: Any) -> Any:
                got = await claim(*args)
                if gw.state.settings.partner.partner_id == OLD["partner-id"]:
                    await rotate()
                return got

            store.claim = claim_then_rotate  # type: ignore[method-assign,assignment]
            posts = booking_posts(sb)
            async with http.post(gw.url + "/bookings", json=booking_body(),
                                 headers={"Idempotency-Key": "raced"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "credentials_rotated"
            assert booking_posts(sb) == posts  # nothing sent
            first = await book(http, gw, "raced")
            assert first[:2] == (201, False) and await book(http, gw, "raced") == (
                201, True, first[2])
            assert booking_posts(sb) == posts + 1
            await accept(http, sb, OLD)  # and back, for the cache's race
            mount.update(OLD)
            assert await reloader.check() == "success"
            tokens = gw.state.tokens
            leader, usable, get_token = cache.leader, tokens.usable, tokens.get
            due = False

            def lead_then_rotate(key: str) -> Any:  # the key is made: the rotation is due
                nonlocal due
                due = True
                return leader(key)

            async def rotate_then_get(newer_than: int = 0) -> Any:
                nonlocal due
                if due:
                    due = False
                    await rotate()
                return await get_token(newer_than)

            cache.leader = lead_then_rotate  # type: ignore[method-assign]
            tokens.usable = lambda: None if due else usable()  # type: ignore[method-assign]
            tokens.get = rotate_then_get  # type: ignore[method-assign]
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
            assert gw.state.settings.partner.partner_id == NEW["partner-id"]
            async with http.get(f"{sb.url}/__sandbox/requests?limit=1") as resp:
                (entry,) = (await resp.json())["requests"]
            assert dict(entry["headers"])["X-Partner-ID"] == NEW["partner-id"]
            stale = cache_key(OLD["partner-id"], SERVICES)
            assert cache.lookup(stale, CIMultiDict()) is None


async def test_the_probe_after_a_rotation_sends_the_tokens_partner(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The probe runs again after a rotation: it must send the token it takes with that
    token's Partner ID, not the one the settings started with (found by the 20-run loop: a
    partner-1 request with partner-2's token, and a false "Repairy refused Partner ID")."""
    mount = SecretMount(tmp_path, OLD)
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:

        def load() -> Settings:
            return settings_for(sb, env=mount.env(sb), secrets_poll_interval="0",
                                check_path="/bookings/000000000000000000000000")

        async with GatewayServer(load(), reload_settings=load) as gw:
            verdict = gw.state.verdict
            assert verdict is not None
            await wait_until(lambda: verdict.rounds == 1 and verdict.first_round_done)
            assert gw.reloader is not None
            await accept(http, sb, NEW)
            mount.update(NEW)
            assert await gw.reloader.check() == "success"
            # Round 2 over (it counts from its start, before its probe is sent).
            await wait_until(lambda: verdict.rounds == 2 and not verdict._in_round
                             and verdict._due is None, within=10)
            assert verdict.last_result is not None and verdict.last_result.outcome == "ok"
            assert verdict.ready()
            async with http.get(f"{sb.url}/__sandbox/requests?limit=20") as resp:
                probes = [e for e in (await resp.json())["requests"]
                          if e["path"].startswith("/bookings/")]
            assert dict(probes[-1]["headers"])["X-Partner-ID"] == NEW["partner-id"]
