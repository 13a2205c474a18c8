"""Figures for the token lifecycle under failure, against the in-process sandbox:

    .venv/bin/python -m benchmarks.token_failures [--outage 10]

* an auth outage (both auth endpoints answer 503, or 429 with ``Retry-After: 5``) lasting
  ``--outage`` seconds past the expiry of a 2 s token: the auth calls made during it, the
  slowest refusal a caller saw, and the time from the end of the outage to ready again;
  once with ``GATEWAY_RENEW_RETRY_MAX=4s`` and once with the default back-off settings;
* 100 requests (50 sequential, 50 concurrent) to a route that always answers 401: the logins.

The numbers are behaviour (counts and seconds), not speed: they do not depend much on the
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import aiohttp

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.settings import load_settings

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"
BOOKING = "/bookings/000000000000000000000000"


def _settings(sb: Sandbox, **overrides: str) -> Any:
    cfg = sb.state.config
    values: dict[str, object] = {
        "base_url": sb.url, "app_key": cfg.app_key, "app_secret": cfg.app_secret,
        "partner_id": cfg.partner_id, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "log_level": "error", **overrides}
    return load_settings({}, overrides=values)


async def _stats(http: aiohttp.ClientSession, sb: Sandbox) -> dict[str, Any]:
    async with http.get(f"{sb.url}/__sandbox/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def _wait(predicate: Any, within: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    return None


async def outage(http: aiohttp.ClientSession, fault: dict[str, Any], seconds: float,
                 **overrides: str) -> dict[str, Any]:
    async with Sandbox(SandboxConfig(access_ttl=2.0)) as sb, \
            GatewayServer(_settings(sb, **overrides)) as gw:
        await _wait(gw.state.tokens.ready, 10)
        before = await _stats(http, sb)
        await asyncio.sleep(2.0)  # let the token run out first: the outage is past expiry
        async with http.post(f"{sb.url}/__sandbox/faults", json={
                **fault, "scope": "auth", "duration": seconds}) as resp:
            resp.raise_for_status()
        started = time.monotonic()
        slowest, statuses = 0.0, set()
        while time.monotonic() - started < seconds:
            t0 = time.monotonic()
            async with http.get(gw.url + SERVICES) as resp:
                await resp.read()
                statuses.add(resp.status)
                if resp.status != 200:
                    slowest = max(slowest, time.monotonic() - t0)
            await asyncio.sleep(0.2)
        during = await _stats(http, sb)
        recovered = await _wait(gw.state.tokens.ready, 120)
    calls = (during["token_requests"] + during["refresh_requests"]
             - before["token_requests"] - before["refresh_requests"])
    return {"auth_calls": calls, "slowest_refusal_s": round(slowest, 3),
            "caller_statuses": sorted(statuses),
            "recovered_in_s": None if recovered is None else round(recovered, 2)}


async def always_401(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with Sandbox() as sb, GatewayServer(_settings(sb)) as gw:
        await _wait(gw.state.tokens.ready, 10)
        async with http.post(f"{sb.url}/__sandbox/faults", json={
                "status": 401, "path": "/bookings/*", "persistent": True}) as resp:
            resp.raise_for_status()
        before = await _stats(http, sb)

        async def one() -> int:
            async with http.get(gw.url + BOOKING) as resp:
                await resp.read()
                return resp.status

        statuses = [await one() for _ in range(50)]
        statuses += await asyncio.gather(*(one() for _ in range(50)))
        after = await _stats(http, sb)
    return {"requests": len(statuses), "answered_401": statuses.count(401),
            "logins": after["token_requests"] - before["token_requests"]}


async def main(seconds: float) -> None:
    short = {"renew_retry_max": "4s", "token_expiry_margin": "0.2s"}
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            outage(http, {"status": 503}, seconds, **short),
            outage(http, {"status": 429, "retry_after": 5}, seconds, **short),
            outage(http, {"status": 503}, seconds),
            outage(http, {"status": 429, "retry_after": 5}, seconds),
        )
        names = ("503, RETRY_MAX=4s", "429 Retry-After 5, RETRY_MAX=4s", "503, defaults",
                 "429 Retry-After 5, defaults")
        print(f"auth outage of {seconds:g} s past the expiry of a 2 s token:")
        print("| case | auth calls | slowest 503 to a caller | ready again after |")
        print("|---|---|---|---|")
        for name, r in zip(names, results, strict=True):
            print(f"| {name} | {r['auth_calls']} | {r['slowest_refusal_s']} s | "
                  f"{r['recovered_in_s']} s |")
        r401 = await always_401(http)
        print(f"\n{r401['requests']} requests to an always-401 route: "
              f"{r401['answered_401']} answered 401, {r401['logins']} logins beyond the first")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=10.0, help="outage length, seconds")
    asyncio.run(main(parser.parse_args().outage))
