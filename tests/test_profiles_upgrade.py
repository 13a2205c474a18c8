"""An upgrade keeps the default profile's keys: records the release before credential profiles
wrote to Redis (``tests/records/previous_release.json``, made by running that release:
``tests/records/make_previous_release.py``) are read by this one, with a second profile
configured beside ``default``: the fleet's token is adopted (no login), a retried booking is
replayed (no second booking), the shared GET cache answers; the new profile has keys of its
own."""

from __future__ import annotations

import asyncio
import errno
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.sandbox.state import numbered_partner
from gateway.settings import load_settings
from tests.fleet_helpers import RedisServer
from tests.gateway_helpers import wait_until
from tests.test_profiles import HEADER

CATEGORY = "integration"

RECORDS = json.loads((Path(__file__).parent / "records" / "previous_release.json").read_text())
TEN_YEARS = 10 * 365 * 86400.0


async def _restore(redis: RedisServer, records: list[dict[str, Any]]) -> None:
    client = await redis.client()
    for r in records:
        if r["type"] == "string":
            await client.set(r["key"], r["value"])
        elif r["type"] == "hash":
            await client.hset(r["key"], mapping=r["value"])
        else:
            await client.zadd(r["key"], {member: score for member, score in r["value"]})
    await client.aclose()


async def _sandbox_on_the_recorded_port(config: SandboxConfig) -> Sandbox:
    """The sandbox on the port the records name (their scopes hold the upstream's URL); while
    another run holds it, wait for it (up to a minute), then fail naming it."""
    deadline = time.monotonic() + 60
    while True:
        sb = Sandbox(config, port=RECORDS["sandbox_port"])
        try:
            await sb.start()
            return sb
        except OSError as exc:
            await sb.stop()  # what start set up before the bind failed
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise AssertionError(f"port {RECORDS['sandbox_port']} is taken: this test "
                                     "needs it (the recorded scopes name it)") from exc
            await asyncio.sleep(0.5)


async def test_records_of_the_previous_release_are_read_after_the_upgrade(
        redis_server: RedisServer, http: aiohttp.ClientSession) -> None:
    await _restore(redis_server, RECORDS["records"])
    config = SandboxConfig(access_ttl=TEN_YEARS, refresh_ttl=TEN_YEARS,
                           more_partners=(numbered_partner(2),))
    sb = await _sandbox_on_the_recorded_port(config)
    try:
        eu = numbered_partner(2)
        env = {"GATEWAY_PROFILES": "eu", "REPAIRY_PROFILE_EU_APP_KEY": eu.app_key,
               "REPAIRY_PROFILE_EU_APP_SECRET": eu.app_secret,
               "REPAIRY_PROFILE_EU_PARTNER_ID": eu.partner_id}
        s = load_settings(env, overrides={
            **RECORDS["settings"], "base_url": sb.url, "app_key": config.app_key,
            "app_secret": config.app_secret, "partner_id": config.partner_id,
            "redis_url": redis_server.url})
        async with GatewayServer(s) as gw:
            await wait_until(lambda: all(p.manager.ready() for p in gw.state.profiles.values()))
            default = gw.state.profiles["default"].manager
            assert default.current is not None and default.current.via == "login"
            assert default.current.generation == 1  # the stored token, adopted
            key = {"Idempotency-Key": RECORDS["idempotency_key"]}
            key["Content-Type"] = "application/json"
            async with http.post(gw.url + "/bookings", data=RECORDS["body"],
                                 headers=key) as resp:
                assert resp.status == RECORDS["answer_status"]
                replayed = await resp.json()
            async with http.get(gw.url + RECORDS["cached_path"]) as resp:
                assert resp.status == 200 and resp.headers["X-Cache"] == "HIT"
            partners = sb.state.control.stats()["partners"]
            # The default profile called nothing: no login, no booking, no GET.
            assert "sandbox-partner" not in partners, partners
            assert replayed == RECORDS["answer"]
            # The same key under the new profile: its own booking, in its own account.
            async with http.post(gw.url + "/bookings", data=RECORDS["body"],
                                 headers={**key, HEADER: "eu"}) as resp:
                assert resp.status == 201
                own = (await resp.json())["data"]
            assert own["partnerId"] == "sandbox-partner-2"
            assert own["id"] != RECORDS["answer"]["data"]["id"]
        client = await redis_server.client()
        keys = sorted(await client.keys("*"))
        await client.aclose()
    finally:
        await sb.stop()
    old = {r["key"] for r in RECORDS["records"]}
    assert old <= set(keys)  # nothing of the previous release's was replaced or renamed
    assert len([k for k in keys if k.endswith(":state")]) == 2  # one token entry per profile
