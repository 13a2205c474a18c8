"""Several credential profiles over real processes: 3 gateway replicas sharing one real
redis-server, 2 worker processes each, against a sandbox with three partners, one live token
per credential and 6 s access tokens.

Invariants checked (each would fail if profiles shared anything):

* a profile's calls carry only its own token and Partner ID: the sandbox counts every call
  whose token belongs to another partner (0), and every echoed answer names the caller's
  partner (an answer reaches only its own caller);
* one login per profile for the whole fleet, and at most one refresh per renewal window;
* revoking one profile's tokens costs that profile one login, the others none;
* an optional profile whose credentials are refused answers its callers 503 with its reason,
  and the others serve; readiness stays 200;
* the same Idempotency-Key under two profiles makes two bookings, one per partner; a GET
  cached (and shared through Redis) under one profile is never served to another.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.sandbox import Sandbox, SandboxConfig
from gateway.sandbox.state import numbered_partner
from gateway.sandbox.tokens import Credential
from tests.fleet_helpers import GatewayProcess, RedisServer
from tests.gateway_helpers import wait_until
from tests.sandbox_helpers import faults, stats
from tests.test_profiles import BOOKING, HEADER, profile_vars, profiles_env

CATEGORY = "integration"

PARTNERS = {"default": "sandbox-partner", "eu": "sandbox-partner-2",
            "au": "sandbox-partner-3"}
ACCESS_TTL = 6.0
RATE = 300  # requests a second, over the replicas and the three profiles


@dataclass
class Paced:
    ok: int = 0
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    crossed: list[tuple[str, str]] = field(default_factory=list)  # (profile, partner seen)


async def start_fleet(sb: Sandbox, redis: RedisServer, env: dict[str, str],
                      replicas: int) -> list[GatewayProcess]:
    """``replicas`` gateway processes on one Redis, two workers each, the GET cache shared
    through Redis; logins refused are retried every 30 s (a refused profile stays refused)."""
    env = {"GATEWAY_REDIS_URL": redis.url, "GATEWAY_WORKERS": "2",
           "GATEWAY_CACHE_ROUTES": "GET /bookings/*=60s", "GATEWAY_CACHE_SHARED": "true",
           "GATEWAY_LOGIN_RETRY_INTERVAL": "30s", **env}
    gateways = [GatewayProcess(sb, env) for _ in range(replicas)]
    for gw in gateways:
        await gw.start()
    return gateways


async def paced_load(http: aiohttp.ClientSession, gateways: list[GatewayProcess],
                     seconds: float, load: Paced) -> None:
    """``RATE`` requests a second for ``seconds``, request i to replica i % 3 under profile
    (i // 3) % 3 (each replica sees every profile), each checked for its partner."""
    names = list(PARTNERS)
    started = time.monotonic()
    tasks = []

    async def one(gw: GatewayProcess, name: str) -> None:
        try:
            async with http.get(gw.url + "/__sandbox/echo", headers={HEADER: name}) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    load.failed.append((name, resp.status, str(body)[:120]))
                    return
        except (aiohttp.ClientError, ValueError) as exc:
            load.failed.append((name, 0, type(exc).__name__))
            return
        seen = {k.lower(): v for k, v in body["data"]["headers"].items()}["x-partner-id"]
        if seen != PARTNERS[name]:
            load.crossed.append((name, seen))
        load.ok += 1

    for i in range(int(seconds * RATE)):
        delay = started + i / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(gateways[i % len(gateways)],
                                             names[(i // len(gateways)) % len(names)])))
    await asyncio.gather(*tasks)


async def ready_but(http: aiohttp.ClientSession, gw: GatewayProcess,
                    refused: str) -> tuple[int, Any]:
    """/readyz once every profile but ``refused`` can serve and ``refused`` has been tried
    (polled, up to 30 s)."""
    async def settled() -> bool:
        try:
            async with http.get(gw.admin + "/readyz") as resp:
                states = (await resp.json()).get("profiles", {})
        except aiohttp.ClientError:
            return False
        if not states:
            return False
        others = all(state["ready"] for name, state in states.items() if name != refused)
        return others and states[refused]["reasons"] not in ([], ["no usable token yet"])

    await wait_until(settled, within=30)
    async with http.get(gw.admin + "/readyz") as resp:
        return resp.status, await resp.json()


def partner_counts(s: dict[str, Any], what: str) -> dict[str, int]:
    return {name: s["partners"].get(partner, {}).get(what, 0)
            for name, partner in PARTNERS.items()}


def refreshes_of(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {n: partner_counts(after, "refreshes")[n] - partner_counts(before, "refreshes")[n]
            for n in PARTNERS}


async def test_three_profiles_three_replicas_two_workers_one_redis(
        redis_server: RedisServer, http: aiohttp.ClientSession) -> None:
    config = SandboxConfig(access_ttl=ACCESS_TTL, refresh_ttl=120, single_token=True,
                           more_partners=(numbered_partner(2), numbered_partner(3)))
    async with Sandbox(config) as sb:
        env = profiles_env(sb, ("eu", "au", "nz"), REPAIRY_PROFILE_NZ_APP_SECRET="refused")
        gateways = await start_fleet(sb, redis_server, env, 3)
        try:
            for gw in gateways:
                await gw.ready(http, within=30)
            before = await stats(http, sb)
            load = Paced()
            await paced_load(http, gateways, 30.0, load)
            during = await stats(http, sb)
            readyz = []
            for gw in gateways:
                async with http.get(gw.admin + "/readyz") as resp:
                    readyz.append((resp.status, await resp.json()))

            # Revoke one profile's tokens under load: one login for it, none for the others.
            revoke = Paced()
            loading = asyncio.create_task(paced_load(http, gateways, 8.0, revoke))
            await asyncio.sleep(2.0)
            await faults(http, sb, {"revoke_tokens": PARTNERS["eu"]})
            await loading
            after = await stats(http, sb)

            # The refused optional profile: 503 with its reason, on every replica.
            refused = []
            for gw in gateways:
                async with http.get(gw.url + "/__sandbox/echo", headers={HEADER: "nz"}) as resp:
                    refused.append((resp.status, (await resp.json())["error"]["code"]))

            # The same Idempotency-Key under two profiles, through different replicas.
            ids: dict[str, str] = {}
            for i, name in enumerate(("default", "eu", "default", "eu")):
                async with http.post(gateways[i % 3].url + "/bookings", json=BOOKING, headers={
                        HEADER: name, "Idempotency-Key": "one-key-two-partners"}) as resp:
                    assert resp.status in (200, 201), await resp.text()
                    got = (await resp.json())["data"]["id"]
                assert ids.setdefault(name, got) == got, name
            # A GET cached under default (and shared through Redis), asked under eu
            # through another replica: eu's own call, which its partner cannot see.
            path = f"/bookings/{ids['default']}"
            for gw in gateways[:2]:
                async with http.get(gw.url + path) as resp:
                    assert resp.status == 200
            cached = resp.headers.get("X-Cache")
            async with http.get(gateways[2].url + path, headers={HEADER: "eu"}) as resp:
                other = (resp.status, resp.headers.get("X-Cache"))
        finally:
            codes = await asyncio.gather(*(gw.stop() for gw in gateways))
            logs = [gw.logs() for gw in gateways]
    assert all(c in (0, None) for c in codes), (codes, logs[0][-3000:])
    for text in logs:
        assert "sbx_at_" not in text and "sandbox-app-secret" not in text
    # What workers' 401s make each supervisor's managers log names the profile.
    invalidated = [json.loads(line) for text in logs for line in text.splitlines()
                   if line.startswith("{") and '"token invalidated"' in line]
    assert invalidated and {doc.get("credential") for doc in invalidated} <= set(PARTNERS)
    assert "eu" in {doc.get("credential") for doc in invalidated}  # the revocation

    print(f"figures: {load.ok} ok of {30 * RATE}; logins {partner_counts(during, 'logins')}; "
          f"refreshes in the 30 s {refreshes_of(before, during)}; wrong-partner calls "
          f"{partner_counts(during, 'wrong_partner_calls')}; revoke: {revoke.ok} ok, logins "
          f"{partner_counts(after, 'logins')}")
    # 30 s at 300 requests/s over 3 profiles: nothing failed, nothing crossed.
    assert load.failed == [], load.failed[:5]
    assert load.crossed == []
    assert load.ok == 30 * RATE
    assert partner_counts(during, "wrong_partner_calls") == {n: 0 for n in PARTNERS}
    assert partner_counts(during, "logins") == {n: 1 for n in PARTNERS}
    refreshes = refreshes_of(before, during)
    assert all(1 <= r <= 30 / (0.75 * ACCESS_TTL) + 2 for r in refreshes.values()), refreshes
    # The refused optional profile never takes a replica out of its Service.
    assert [status for status, _ in readyz] == [200, 200, 200], readyz
    assert all(body["profiles"]["nz"]["codes"] == ["no_usable_token"] for _, body in readyz)

    assert revoke.failed == [] and revoke.crossed == [], revoke.failed[:5]
    assert {n: partner_counts(after, "logins")[n] - partner_counts(during, "logins")[n]
            for n in PARTNERS} == {"default": 0, "eu": 1, "au": 0}
    assert partner_counts(after, "wrong_partner_calls") == {n: 0 for n in PARTNERS}

    assert refused == [(503, "credentials_rejected")] * 3
    assert ids["default"] != ids["eu"]
    assert cached == "HIT"
    assert other == (404, "MISS")


#: The default's partner with another App Key: a profile only its scope keeps apart.
ALT = Credential("sandbox-app-key-alt", "sandbox-app-secret-alt", "sandbox-partner")


async def test_profiles_of_one_partner_and_a_required_refusal_over_processes(
        redis_server: RedisServer, http: aiohttp.ClientSession) -> None:
    """Two replicas, two workers each, one Redis (its shared GET cache too): the default
    profile and `alt` (the same Partner ID, another App Key) keep Idempotency-Key records and
    cached GETs apart, every booking in its account; a *required* profile whose credentials
    are refused makes every replica unready, naming it, while the others serve."""
    config = SandboxConfig(more_partners=(numbered_partner(2), ALT))
    async with Sandbox(config) as sb:
        env = profiles_env(sb, ("eu", "nz"), REPAIRY_PROFILE_NZ_APP_SECRET="refused",
                           REPAIRY_PROFILE_NZ_REQUIRED="true", GATEWAY_PROFILES="eu,nz,alt",
                           **profile_vars("alt", ALT))
        gateways = await start_fleet(sb, redis_server, env, 2)
        try:
            readyz = [await ready_but(http, gw, "nz") for gw in gateways]
            ids: dict[str, str] = {}
            for i, name in enumerate(("default", "alt", "eu", "default", "alt", "eu")):
                async with http.post(gateways[i % 2].url + "/bookings", json=BOOKING, headers={
                        HEADER: name, "Idempotency-Key": "one-key-three-profiles"}) as resp:
                    assert resp.status == 201, await resp.text()
                    got = (await resp.json())["data"]["id"]
                assert ids.setdefault(name, got) == got, name
            accounts = {b["id"]: b["partnerId"] for b in sb.state.data.bookings.values()}
            path = f"/bookings/{ids['default']}"
            caches = []
            for gw, name in zip((gateways[0], gateways[1], gateways[1], gateways[0]),
                                ("default", "default", "alt", "alt"), strict=True):
                async with http.get(gw.url + path, headers={HEADER: name}) as resp:
                    assert resp.status == 200
                    caches.append(resp.headers.get("X-Cache"))
            async with http.get(gateways[1].url + "/__sandbox/echo",
                                headers={HEADER: "nz"}) as resp:
                refused = (resp.status, (await resp.json())["error"]["code"])
        finally:
            codes = await asyncio.gather(*(gw.stop() for gw in gateways))
    assert all(c in (0, None) for c in codes), codes
    assert len(set(ids.values())) == 3, ids
    assert accounts == {ids["default"]: "sandbox-partner", ids["alt"]: "sandbox-partner",
                        ids["eu"]: "sandbox-partner-2"}
    # alt never gets default's cached answer, in its replica or through Redis (the others
    # may or may not be hits: the shared store is written after the answer).
    assert caches[0] == "MISS" and caches[2] == "MISS", caches
    assert refused == (503, "credentials_rejected")
    for status, body in readyz:
        assert status == 503 and body["codes"] == ["no_usable_token"]
        assert body["reasons"][0].startswith("profile nz: no usable token")
        assert body["profiles"]["eu"]["ready"] and body["profiles"]["alt"]["ready"]
