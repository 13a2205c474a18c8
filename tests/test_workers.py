"""GATEWAY_WORKERS: a supervisor process with the one token manager and the admin listener,
and worker processes sharing the proxy listener (real ``serve`` processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp

from gateway.sandbox import Sandbox, SandboxConfig
from tests.fleet_helpers import GatewayProcess
from tests.gateway_helpers import SERVICES, wait_until
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def healthz(http: aiohttp.ClientSession, gw: GatewayProcess) -> dict[str, Any]:
    async with http.get(gw.admin + "/healthz") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def metric(http: aiohttp.ClientSession, gw: GatewayProcess, line_start: str) -> float:
    async with http.get(gw.admin + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(line_start))


async def test_workers_two_share_one_token_one_login_one_admin(
        http: aiohttp.ClientSession) -> None:
    """GATEWAY_WORKERS=2 over 15 s of 4 s tokens, one live token per credential: one login,
    one refresh per window, both workers serving with the same token, no failed request, and
    one admin listener whose /metrics counts both workers' requests."""
    async with Sandbox(SandboxConfig(access_ttl=4.0, refresh_ttl=120, single_token=True)) as sb:
        gw = GatewayProcess(sb, {"GATEWAY_WORKERS": "2"})
        await gw.start()
        try:
            await gw.ready(http)
            sessions = [await gw.pinned(http, slot) for slot in (0, 1, 0, 1)]
            statuses: list[int] = [200] * len(sessions)  # the pinning requests
            deadline = time.monotonic() + 15.0

            async def worker(session: aiohttp.ClientSession) -> None:
                while time.monotonic() < deadline:
                    async with session.get(gw.url + SERVICES) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                    await asyncio.sleep(0.01)

            try:
                await asyncio.gather(*(worker(x) for x in sessions))
            finally:
                for session in sessions:
                    await session.close()

            async def all_counted() -> bool:  # the workers' metrics pushes
                return await metric(http, gw, "repairy_gateway_client_requests_total") == len(
                    statuses)

            await wait_until(all_counted)
            health = await healthz(http, gw)
            s = await stats(http, sb)
        finally:
            assert await gw.stop() == 0
    assert set(statuses) == {200}, [x for x in statuses if x != 200][:5]
    assert len(statuses) > 200
    assert s["token_requests"] == 1
    assert 3 <= s["refresh_requests"] <= 6, s
    workers = health["workers"]
    assert len(workers) == 2 and all(w["alive"] for w in workers)
    assert all(w["requests"] > 0 for w in workers), workers
    assert sum(w["requests"] for w in workers) == len(statuses)


async def test_workers_a_dead_worker_is_restarted_and_logged(
        http: aiohttp.ClientSession) -> None:
    """A worker killed with SIGKILL is logged and restarted; requests keep being served."""
    async with Sandbox() as sb:
        gw = GatewayProcess(sb, {"GATEWAY_WORKERS": "2"})
        await gw.start()
        try:
            await gw.ready(http)
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as fresh:
                for _ in range(40):
                    async with fresh.get(gw.url + SERVICES) as resp:
                        assert resp.status == 200

            async def all_counted() -> bool:  # the workers' metrics pushes
                return await metric(http, gw, "repairy_gateway_client_requests_total") == 40

            await wait_until(all_counted)
            counted = 40.0
            workers = (await healthz(http, gw))["workers"]
            victim = max(workers, key=lambda w: w["requests"])  # one that counted something
            assert victim["requests"] > 0
            os.kill(victim["pid"], signal.SIGKILL)

            async def restarted() -> bool:
                now = (await healthz(http, gw))["workers"][victim["slot"]]
                return bool(now["alive"] and now["restarts"] == 1
                            and now["pid"] != victim["pid"])

            await wait_until(restarted, within=5)
            # The dead worker's counts stay in the totals: counters never go backwards.
            assert await metric(http, gw, "repairy_gateway_client_requests_total") >= counted
            for _ in range(20):
                async with http.get(gw.url + SERVICES) as resp:
                    assert resp.status == 200
            assert sb.state.control.counters["token_requests"] == 1
        finally:
            assert await gw.stop() == 0
    assert '"event": "worker_died"' in gw.logs()


async def test_workers_metrics_are_collected_at_scrape_time_and_their_403s_ask_a_probe(
        http: aiohttp.ClientSession) -> None:
    """GATEWAY_WORKERS=2: a scrape right after each burst of requests counts every one of
    them (collected from the workers at scrape time, not up to a push old); the workers'
    callers getting 403s reach the supervisor's probe, which runs once and passes."""
    async with Sandbox() as sb:
        gw = GatewayProcess(sb, {"GATEWAY_WORKERS": "2"})
        await gw.start()
        try:
            await gw.ready(http)

            async def probes() -> float:
                return await metric(http, gw, 'repairy_gateway_probes_total{credential="default",'
                                              'outcome="ok"}')

            await wait_until(lambda: probes())  # the start-up probe
            assert await probes() == 1
            sessions = [await gw.pinned(http, slot) for slot in (0, 1)]
            sent = 2  # the pinning requests
            try:
                for burst in range(6):
                    for session in sessions:
                        for _ in range(burst + 1):
                            async with session.get(gw.url + SERVICES) as resp:
                                await resp.read()
                                assert resp.status == 200
                            sent += 1
                    counted = await metric(http, gw, "repairy_gateway_client_requests_total")
                    assert counted == sent, (burst, counted, sent)
                # More 403s than the minute's 44 good answers: past both numbers.
                await faults(http, sb, {"status": 403, "path": "/workshops/*", "count": 60})
                for _ in range(30):
                    for session in sessions:
                        async with session.get(gw.url + SERVICES) as resp:
                            await resp.read()
                            assert resp.status == 403
            finally:
                for session in sessions:
                    await session.close()
            await wait_until(lambda: probes_are(probes, 2), within=10)
            async with http.get(gw.admin + "/readyz") as resp:
                assert resp.status == 200
        finally:
            assert await gw.stop() == 0


async def probes_are(probes: Any, n: int) -> bool:
    return bool(await probes() == n)
