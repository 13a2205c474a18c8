"""Make ``previous_release.json``: the Redis records a gateway of the release before
credential profiles wrote (the fleet's token entry, an Idempotency-Key record, a shared GET
cache entry), for ``tests/test_profiles_upgrade.py``.

Run it with the *previous* release on the path, from a checkout of it::

    git worktree add /tmp/previous d3289cc
    PYTHONPATH=/tmp/previous python tests/records/make_previous_release.py

The sandbox listens on :data:`PORT` (the scopes name the upstream URL), issues tokens that
live ten years, and the gateway keeps records as long: the records stay usable.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.settings import load_settings
from tests.gateway_helpers import wait_until

PORT = 29517
TEN_YEARS = 10 * 365 * 86400.0
KEY = "previous-release-key"
BOOKING = {"workshopId": "5f1a2b3c4d5e6f7a8b9c0d01", "startTime": "2030-01-02T09:00:00+00:00",
           "serviceType": "Logbook service",
           "customer": {"firstName": "Ana", "phone": "+61400000000", "email": "a@example.com"},
           "car": {"rego": "ABC123"}}
#: The request body, as sent (a repeat must send the same bytes).
BODY = json.dumps(BOOKING)
SETTINGS = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "check_path": "",
            "cache_routes": "GET /bookings/*=3650d", "cache_shared": "true",
            "idempotency_ttl": "3650d", "access_token_default_ttl": "3650d",
            "refresh_token_default_ttl": "3650d"}


async def dump(port: int) -> list[dict[str, Any]]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
    found = []
    async for key in client.scan_iter():
        kind = await client.type(key)
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        else:
            raise SystemExit(f"unexpected {kind!r} at {key!r}")
        found.append({"key": key, "type": kind, "value": value})
    await client.aclose()
    return sorted(found, key=lambda r: r["key"])


async def main() -> None:
    port = 29518
    workdir = tempfile.mkdtemp()
    redis = await asyncio.create_subprocess_exec(
        shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
        "--appendonly", "no", "--dir", workdir)
    try:
        await asyncio.sleep(0.5)
        async with Sandbox(SandboxConfig(access_ttl=TEN_YEARS, refresh_ttl=TEN_YEARS),
                           port=PORT) as sb:
            s = load_settings(overrides={**SETTINGS, "base_url": sb.url,
                                         "app_key": sb.state.config.app_key,
                                         "app_secret": sb.state.config.app_secret,
                                         "partner_id": sb.state.config.partner_id,
                                         "redis_url": f"redis://127.0.0.1:{port}/0"})
            async with GatewayServer(s) as gw, aiohttp.ClientSession() as http:
                await wait_until(gw.state.tokens.ready)
                async with http.post(gw.url + "/bookings", data=BODY, headers={
                        "Idempotency-Key": KEY, "Content-Type": "application/json"}) as resp:
                    status, booking = resp.status, await resp.json()
                path = f"/bookings/{booking['data']['id']}"
                async with http.get(gw.url + path) as resp:
                    assert resp.status == 200
        records = await dump(port)
    finally:
        redis.terminate()
        await redis.wait()
    out = {"made_by": "the release before credential profiles (d3289cc)",
           "sandbox_port": PORT, "settings": SETTINGS, "idempotency_key": KEY,
           "body": BODY, "answer_status": status, "answer": booking,
           "cached_path": path, "records": records}
    target = Path(__file__).with_name("previous_release.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}: {len(records)} records")


if __name__ == "__main__":
    asyncio.run(main())
