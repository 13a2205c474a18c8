"""Figures for the proxy path under failure, against the sandbox over real sockets:

    .venv/bin/python -m benchmarks.proxy_faults

* 503 bursts with ``GATEWAY_RETRY_ON_STATUS=503``: GETs succeed through retries, POSTs are not
  duplicated (the sandbox's counts prove it);
* 429 with ``Retry-After: 1``: honoured (the retried GET's latency);
* a 10 s outage (every upstream call hangs past the read timeout): the breaker opens, upstream
  traffic drops to probes, recovery is automatic (breaker cool-down 2 s here);
* 50 callers leaving mid-request with a pool of 10: no upstream request sent after its caller
  left, the pool free again at once;
* SIGTERM with slow requests in flight: the process exits within the grace.

The numbers are behaviour (counts and seconds), not speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import aiohttp

from benchmarks.harness import _wait_ready
from benchmarks.proxy_overhead import _free_port
from benchmarks.token_failures import _settings, _stats, _wait
from gateway.app import GatewayServer
from gateway.sandbox import Sandbox

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"
BOOKING = {"workshopId": "5f1a2b3c4d5e6f7a8b9c0d01", "serviceId": "svc", "start": "x"}


def _metric(gw: GatewayServer, name: str, **labels: str) -> float:
    return gw.metrics.registry.get_sample_value(f"repairy_gateway_{name}", labels) or 0.0


async def _fault(http: aiohttp.ClientSession, sb: Sandbox, spec: dict[str, Any]) -> None:
    async with http.post(f"{sb.url}/__sandbox/faults", json=spec) as resp:
        resp.raise_for_status()


async def bursts_of_503(http: aiohttp.ClientSession, burst: int) -> dict[str, Any]:
    """20 rounds of: ``burst`` x 503, then 10 GETs; then 20 rounds of one 503 and 2 POSTs."""
    async with Sandbox() as sb, GatewayServer(_settings(sb, retry_on_status="503")) as gw:
        await _wait(gw.state.tokens.ready, 10)
        gets = posts = gets_ok = post_503 = 0
        api_before = (await _stats(http, sb))["api_requests"]
        for _ in range(20):
            await _fault(http, sb, {"status": 503, "count": burst, "scope": "api"})
            for _ in range(10):
                async with http.get(gw.url + SERVICES) as resp:
                    gets += 1
                    gets_ok += resp.status == 200
        get_calls = (await _stats(http, sb))["api_requests"] - api_before
        post_before = (await _stats(http, sb))["api_requests"]
        for _ in range(20):
            await _fault(http, sb, {"status": 503, "count": 1, "scope": "api"})
            for _ in range(2):
                async with http.post(gw.url + "/bookings", json=BOOKING) as resp:
                    posts += 1
                    post_503 += resp.status == 503
        post_calls = (await _stats(http, sb))["api_requests"] - post_before
        return {"burst": burst, "gets": gets, "gets_200": gets_ok,
                "upstream_calls_for_gets": get_calls,
                "retries": _metric(gw, "retries_total", reason="status_503"),
                "posts": posts, "posts_503_passed_back": post_503,
                "upstream_calls_for_posts": post_calls,
                "budget_refusals": _metric(gw, "retry_budget_exhausted_total")}


async def retry_after(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with Sandbox() as sb, GatewayServer(_settings(sb, retry_on_status="429")) as gw:
        await _wait(gw.state.tokens.ready, 10)
        await _fault(http, sb, {"status": 429, "retry_after": 1, "scope": "api"})
        t0 = time.monotonic()
        async with http.get(gw.url + SERVICES) as resp:
            status = resp.status
        return {"status": status, "latency_s": round(time.monotonic() - t0, 3)}


async def long_outage(http: aiohttp.ClientSession, seconds: float) -> dict[str, Any]:
    async with Sandbox() as sb, GatewayServer(_settings(
            sb, read_timeout="0.2s", breaker_cooldown="2s")) as gw:
        await _wait(gw.state.tokens.ready, 10)
        await _fault(http, sb, {"latency": 1.0, "scope": "api", "duration": seconds})
        before = (await _stats(http, sb))["api_requests"]
        started = time.monotonic()
        statuses: dict[int, int] = {}
        opened_after = None
        recovered_after = None

        async def caller() -> None:
            nonlocal opened_after, recovered_after
            while time.monotonic() - started < seconds + 6:
                async with http.get(gw.url + SERVICES) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    now = time.monotonic() - started
                    if resp.status == 503 and opened_after is None:
                        opened_after = now
                    if resp.status == 200 and now > seconds and recovered_after is None:
                        recovered_after = now - seconds
                await asyncio.sleep(0.02)

        callers = [asyncio.create_task(caller()) for _ in range(10)]
        await asyncio.sleep(seconds)
        during = (await _stats(http, sb))["api_requests"] - before
        await asyncio.gather(*callers)
        return {"outage_s": seconds, "caller_requests": sum(statuses.values()),
                "statuses": statuses, "upstream_calls_during_outage": during,
                "breaker_opened_after_s": opened_after,
                "times_opened": _metric(gw, "circuit_breaker_opened_total"),
                "first_200_after_outage_s": recovered_after}


async def callers_leaving(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with Sandbox() as sb, GatewayServer(_settings(sb, pool_size="10")) as gw:
        await _wait(gw.state.tokens.ready, 10)
        await _fault(http, sb, {"latency": 2.0, "scope": "api", "duration": 5})
        before = (await _stats(http, sb))["api_requests"]
        host, _, port = gw.url.removeprefix("http://").rpartition(":")
        writers = []
        for _ in range(50):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {SERVICES} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            writers.append(writer)
        await _wait(lambda: _metric(gw, "inflight_requests") == 50, 5)
        await asyncio.sleep(0.3)
        for writer in writers:
            writer.close()
        left = time.monotonic()
        freed = await _wait(lambda: gw.state.upstream.slots.in_use == 0, 5)
        await asyncio.sleep(3)
        sent = (await _stats(http, sb))["api_requests"] - before
        return {"callers": 50, "pool": 10, "upstream_requests_sent": sent,
                "pool_free_after_ms": None if freed is None else round(freed * 1000, 1),
                "logged_499": _metric(gw, "responses_total", source="gateway", status="499",
                                      code="client_closed_request"),
                "since_leaving_s": round(time.monotonic() - left, 1)}


async def sigterm(http: aiohttp.ClientSession, grace: float) -> dict[str, Any]:
    async with Sandbox() as sb:
        await _fault(http, sb, {"latency": 30, "scope": "api", "duration": 60})
        cfg = sb.state.config
        port, admin = _free_port(), _free_port()
        env = {**os.environ, "REPAIRY_BASE_URL": sb.url, "REPAIRY_APP_KEY": cfg.app_key,
               "REPAIRY_APP_SECRET": cfg.app_secret, "REPAIRY_PARTNER_ID": cfg.partner_id,
               "GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_ADMIN_LISTEN":
               f"127.0.0.1:{admin}", "GATEWAY_SHUTDOWN_GRACE": f"{grace}s",
               "GATEWAY_LOG_LEVEL": "warning"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            # off the loop: the sandbox the gateway logs in to runs on it
            await asyncio.to_thread(_wait_ready, admin)
            pending = [asyncio.ensure_future(http.get(f"http://127.0.0.1:{port}{SERVICES}"))
                       for _ in range(5)]
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), grace + 10)
            took = time.monotonic() - t0
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return {"grace_s": grace, "in_flight": 5, "exit_code": code,
                "exit_after_sigterm_s": round(took, 2)}


async def main() -> None:
    async with aiohttp.ClientSession() as http:
        results = {
            "bursts_of_one_503": await bursts_of_503(http, 1),
            "bursts_of_five_503": await bursts_of_503(http, 5),
            "retry_after_429": await retry_after(http),
            "long_outage": await long_outage(http, 10.0),
            "callers_leaving": await callers_leaving(http),
            "sigterm": await sigterm(http, 3.0),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
