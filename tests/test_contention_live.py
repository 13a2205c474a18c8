"""Credential contention for real: two gateways without the shared store against a sandbox
that keeps one live token per credential (each login revokes the other's token), with a real
Prometheus evaluating the shipped alert rules; and one gateway alone under revocations, which
is never flagged."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value
from tests.prometheus_helpers import firing, prometheus
from tests.sandbox_helpers import faults, stats

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

LOGIN_EVERY = 2.0


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    value = metric_value(gw.metrics.registry, f"repairy_gateway_{name}", labels)
    return value or 0.0


async def _load(http: aiohttp.ClientSession, gw: GatewayServer, stop: asyncio.Event,
                codes: list[str], since: list[float] | None = None) -> None:
    """Requests until ``stop``; every answer other than 200 noted as its status and code
    (only for requests sent after ``since[0]``, when given)."""
    while not stop.is_set():
        sent = time.monotonic()
        async with http.get(gw.url + SERVICES) as resp:
            await resp.read()
            if resp.status != 200 and (since is None or sent > since[0]):
                codes.append(f"{resp.status} {resp.headers.get('X-Repairy-Gateway-Error')}")
        await asyncio.sleep(0.02)


async def test_two_gateways_without_redis_are_flagged_logins_bounded_and_the_alert_fires(
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Two gateways share credentials without GATEWAY_REDIS_URL on a one-live-token API:
    each detects contention within 60 s; from then on each logs in at most once per
    GATEWAY_LOGIN_RETRY_INTERVAL; callers whose token died get 503 credential_contention;
    the counter and gauge say so and RepairyGatewayCredentialContention fires in Prometheus."""
    async with Sandbox(SandboxConfig(single_token=True)) as sb:
        settings = [settings_for(sb, login_retry_interval=f"{LOGIN_EVERY}s",
                                 renew_retry_min="0.2s", token_wait_timeout="1s")
                    for _ in range(2)]
        async with GatewayServer(settings[0]) as a, GatewayServer(settings[1]) as b:
            gateways = (a, b)
            admins = [gw.admin_url.removeprefix("http://") for gw in gateways]
            async with prometheus(admins, tmp_path) as prom:
                stop = asyncio.Event()
                codes: list[str] = []
                started = time.monotonic()
                since = [float("inf")]  # what is sent once contention is known
                loads = [asyncio.create_task(_load(http, gw, stop, codes, since))
                         for gw in gateways for _ in range(3)]
                try:
                    await wait_until(lambda: all(gw.state.manager.contended()
                                                 for gw in gateways), within=60)
                    detected = time.monotonic() - started
                    since[0] = time.monotonic()
                    logins = (await stats(http, sb))["token_requests"]
                    await asyncio.sleep(5 * LOGIN_EVERY)  # the bound is over a span of time
                    more = (await stats(http, sb))["token_requests"] - logins

                    async def alert() -> bool:
                        return len(await firing(http, prom,
                                                "RepairyGatewayCredentialContention")) == 2

                    await wait_until(alert, within=30, interval=0.25)
                    marked = [gw.state.route_401.marked() for gw in gateways]
                finally:
                    stop.set()
                    await asyncio.gather(*loads)
    assert detected < 60
    # Each gateway: at most one login per interval over the span, and one already due.
    assert more <= 2 * (5 + 1), more
    for gw in gateways:
        assert sample(gw, "credential_contention_total") == 1
        assert sample(gw, "credential_contention_active") == 1
    # Once it is known, a caller whose token died is told so, never handed Repairy's 401
    # (and no route is marked persistent 401 for it).
    assert codes and set(codes) == {"503 credential_contention"}, set(codes)
    assert marked == [{}, {}]


async def test_one_gateway_under_repeated_revocations_is_never_flagged(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """The revoke-storm shape (every token revoked, 1.5 s apart, under load) on one gateway:
    one re-login each, and no contention (two in ten minutes are under the threshold)."""
    stop = asyncio.Event()
    codes: list[str] = []
    loads = [asyncio.create_task(_load(http, gateway, stop, codes)) for _ in range(4)]
    try:
        for _ in range(2):
            await asyncio.sleep(1.5)
            await faults(http, sandbox, {"revoke_tokens": True})
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.gather(*loads)
    assert codes == []
    assert not gateway.state.manager.contended()
    assert sample(gateway, "credential_contention_total") == 0
    assert gateway.state.manager.status().contention_invalidations == 2


async def test_contention_ends_when_the_other_holder_goes_even_with_a_route_that_401s(
        http: aiohttp.ClientSession) -> None:
    """Two gateways contend; then one stops. The other's traffic includes a route that
    answers 401 whatever the token: that route is marked persistent 401 once its refused
    token is seen alive on another route, and contention ends a window after the last
    unexplained revocation (it is never kept alive by the route)."""
    booking = "/bookings/0123456789abcdef01234567"
    async with Sandbox(SandboxConfig(single_token=True)) as sb:
        s = settings_for(sb, login_retry_interval=f"{LOGIN_EVERY}s", renew_retry_min="0.2s",
                         token_wait_timeout="1s", contention_window="6s")
        async with GatewayServer(s) as a:
            b = GatewayServer(s)
            await b.start()
            stop_b, stop_a = asyncio.Event(), asyncio.Event()
            codes: list[str] = []
            loads = [asyncio.create_task(_load(http, b, stop_b, codes)) for _ in range(3)]
            loads += [asyncio.create_task(_load(http, a, stop_a, codes)) for _ in range(3)]
            try:
                await wait_until(lambda: a.state.manager.contended(), within=60)
                stop_b.set()
                await asyncio.gather(*loads[:3])
                await b.stop()
                await faults(http, sb, {"status": 401, "path": "/bookings/*",
                                        "persistent": True})

                async def booking_calls() -> None:
                    while not stop_a.is_set():
                        async with http.get(a.url + booking) as resp:
                            await resp.read()
                        await asyncio.sleep(0.2)

                loads.append(asyncio.create_task(booking_calls()))
                await wait_until(lambda: "/bookings/{id}" in a.state.route_401.marked(),
                                 within=30)
                await wait_until(lambda: not a.state.manager.contended(), within=30)
            finally:
                stop_a.set()
                stop_b.set()
                await asyncio.gather(*loads)
