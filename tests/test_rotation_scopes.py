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

from gateway.sandbox import Sandbox, SandboxConfig
from tests.fleet_helpers import GatewayProcess, RedisServer
from tests.gateway_helpers import SERVICES, wait_until
from tests.test_rotation import NEW, OLD, SecretMount, accept
from tests.test_sandbox_api import booking_body


async def partner_seen(session: aiohttp.ClientSession, gw: GatewayProcess) -> str:
    """The X-Partner-ID this worker sends upstream now (the sandbox's echo; never cached)."""
    async with session.get(gw.url + "/__sandbox/echo") as resp:
        assert resp.status == 200
        return str((await resp.json())["data"]["headers"]["X-Partner-ID"])


async def get(session: aiohttp.ClientSession, gw: GatewayProcess) -> tuple[str, Any]:
    async with session.get(gw.url + SERVICES) as resp:
        assert resp.status == 200
        return resp.headers["X-Cache"], await resp.json()


async def book(session: aiohttp.ClientSession, gw: GatewayProcess,
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
