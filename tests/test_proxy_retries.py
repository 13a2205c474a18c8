"""Retries, the retry budget, the circuit breaker and the limits, over real sockets against the
sandbox (and a closed port for refused connections)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp

from gateway.app import GatewayServer
from gateway.clock import SystemClock
from gateway.sandbox import Sandbox
from gateway.settings import Settings
from gateway.token.file import save_token
from gateway.token.value import Token
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.sandbox_helpers import faults, stats
from tests.test_proxy_failures import sample, started

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

BOOKING = {"workshopId": "5f1a2b3c4d5e6f7a8b9c0d01", "serviceId": "svc", "start": "x"}


async def api_count(http: aiohttp.ClientSession, sb: Sandbox) -> int:
    return int((await stats(http, sb))["api_requests"])


# -- retries on status -----------------------------------------------------------------------
async def test_503_burst_is_retried_for_get_and_never_for_post(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """GATEWAY_RETRY_ON_STATUS=503, 3 attempts: a GET through a burst of two 503s succeeds on
    the third send; a POST gets the 503 and Repairy saw it once (no duplicate booking)."""
    gw = await started(settings_for(sandbox, retry_on_status="503,502", retry_attempts="3"))
    try:
        before = await api_count(http, sandbox)
        await faults(http, sandbox, {"status": 503, "count": 2, "scope": "api"})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200
        assert await api_count(http, sandbox) - before == 3
        assert sample(gw, "retries_total", reason="status_503") == 2
        before = await api_count(http, sandbox)
        await faults(http, sandbox, {"status": 503, "count": 1, "scope": "api"})
        async with http.post(gw.url + "/bookings", json=BOOKING) as resp:
            assert resp.status == 503
        assert await api_count(http, sandbox) - before == 1
        assert sample(gw, "retries_total", reason="status_503") == 2
    finally:
        await gw.stop()


async def test_statuses_pass_through_unchanged_by_default(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    before = await api_count(http, sandbox)
    await faults(http, sandbox, {"status": 503, "count": 1, "scope": "api"})
    async with http.get(gateway.url + SERVICES) as resp:
        assert resp.status == 503
    assert await api_count(http, sandbox) - before == 1


async def test_retry_after_in_seconds_and_as_a_date_is_waited_on(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A 429 with Retry-After (seconds, then an HTTP date) is retried after that long."""
    gw = await started(settings_for(sandbox, retry_on_status="429"))
    try:
        # As a date (whole seconds), "in 2 s" is between 1 and 2 s from now.
        for as_date, after in ((False, 1), (True, 2)):
            await faults(http, sandbox, {"status": 429, "retry_after": after, "scope": "api",
                                         "retry_after_date": as_date})
            t0 = time.monotonic()
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
            assert 0.9 <= time.monotonic() - t0 < 2.5
        assert sample(gw, "retries_total", reason="status_429") == 2
    finally:
        await gw.stop()


async def test_retry_after_longer_than_the_cap_is_passed_back_at_once(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, retry_on_status="503", retry_after_max="2s"))
    try:
        await faults(http, sandbox, {"status": 503, "retry_after": 30, "scope": "api"})
        t0 = time.monotonic()
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "30"
        assert time.monotonic() - t0 < 1.0
        assert sample(gw, "retries_total", reason="status_503") == 0
    finally:
        await gw.stop()


async def test_timeouts_and_cut_bodies_are_never_retried(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, read_timeout="0.3s", retry_on_status="503"))
    try:
        before = await api_count(http, sandbox)
        await faults(http, sandbox, {"latency": 1.0, "scope": "api"})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 504
        await faults(http, sandbox, {"drop": True, "length": 4096, "scope": "api"})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 502
        assert await api_count(http, sandbox) - before == 2
    finally:
        await gw.stop()


async def test_retry_budget_refuses_retries_beyond_it(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """With a budget of 0 % and no floor, a retryable 503 is passed back and counted."""
    gw = await started(settings_for(sandbox, retry_on_status="503", retry_budget_ratio="0",
                                    retry_budget_min_per_second="0"))
    try:
        await faults(http, sandbox, {"status": 503, "count": 1, "scope": "api"})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
        assert sample(gw, "retry_budget_exhausted_total") == 1
        assert sample(gw, "retries_total", reason="status_503") == 0
    finally:
        await gw.stop()


async def test_total_timeout_is_one_deadline_over_all_attempts(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Retries stop when the next wait (plus GATEWAY_CONNECT_TIMEOUT for the attempt) would
    pass GATEWAY_TOTAL_TIMEOUT: the caller gets the upstream's 503, not a 504."""
    gw = await started(settings_for(sandbox, retry_on_status="503", retry_attempts="10",
                                    retry_backoff_min="0.4s", retry_backoff_max="0.4s",
                                    total_timeout="1s", connect_timeout="0.1s"))
    try:
        await faults(http, sandbox, {"status": 503, "count": 20, "scope": "api"})
        t0 = time.monotonic()
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
        assert time.monotonic() - t0 < 1.2
        assert 1 <= sample(gw, "retries_total", reason="status_503") <= 3
    finally:
        await gw.stop()


# -- refused connections and the breaker -----------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_stored_token(tmp_path: Path, settings: Settings) -> Settings:
    """Settings whose token file holds a usable token, so no login is needed."""
    clock = SystemClock()
    now, wall = clock.monotonic(), clock.time()
    token = Token("at-stored", "rt-stored", 1, "login", now, now + 3600, now + 7200, wall,
                  settings.partner.partner_id)
    save_token(tmp_path / "token.json", token, settings.partner)
    return settings


async def test_refused_connection_is_retried_for_any_method_then_502(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    s = with_stored_token(tmp_path, settings_for(url, token_file=str(tmp_path / "token.json")))
    async with GatewayServer(s) as gw:
        assert gw.state.tokens.ready()
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_unreachable"
        async with http.post(gw.url + "/bookings", json=BOOKING) as resp:
            assert resp.status == 502
        assert sample(gw, "retries_total", reason="connection_refused") == 2
        assert sample(gw, "upstream_errors_total", kind="connect") == 4


async def test_breaker_opens_on_connection_failures_and_answers_503_at_once(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    s = with_stored_token(tmp_path, settings_for(
        url, token_file=str(tmp_path / "token.json"), breaker_failures="3",
        breaker_cooldown="0.5s", retry_attempts="1"))
    async with GatewayServer(s) as gw:
        for _ in range(3):
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 502
        assert sample(gw, "circuit_breaker_state") == 2
        assert sample(gw, "circuit_breaker_opened_total") == 1
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "upstream_circuit_open"
            assert int(resp.headers["Retry-After"]) >= 1
        assert sample(gw, "upstream_errors_total", kind="connect") == 3  # not asked again
        await asyncio.sleep(0.6)
        async with http.get(gw.url + SERVICES) as resp:  # the probe: fails, opens again
            assert resp.status == 502
        assert sample(gw, "circuit_breaker_opened_total") == 2


async def test_breaker_counts_timeouts_not_statuses_and_recovers_by_itself(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Answered 5xx never open it; timeouts do; after the cool-down one probe that gets an
    answer closes it, and upstream traffic meanwhile is the probes only."""
    gw = await started(settings_for(sandbox, read_timeout="0.2s", breaker_failures="3",
                                    breaker_cooldown="0.5s"))
    try:
        await faults(http, sandbox, {"status": 500, "count": 5, "scope": "api"})
        for _ in range(5):
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 500
        assert sample(gw, "circuit_breaker_state") == 0
        await faults(http, sandbox, {"latency": 0.5, "scope": "api", "duration": 30})
        for _ in range(3):
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 504
        assert sample(gw, "circuit_breaker_state") == 2
        before = await api_count(http, sandbox)
        codes = []
        for _ in range(20):
            async with http.get(gw.url + SERVICES) as resp:
                codes.append(resp.status)
        assert codes == [503] * 20
        assert await api_count(http, sandbox) == before
        await http.delete(f"{sandbox.url}/__sandbox/faults")
        await asyncio.sleep(0.6)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200
        assert sample(gw, "circuit_breaker_state") == 0
    finally:
        await gw.stop()


# -- limits ----------------------------------------------------------------------------------
async def test_concurrency_limit_answers_503_upstream_busy_not_504(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, upstream_concurrency="2", connect_timeout="0.3s"))
    try:
        await faults(http, sandbox, {"latency": 1.5, "scope": "api", "duration": 10})
        slow = [asyncio.ensure_future(http.get(gw.url + SERVICES)) for _ in range(2)]
        await wait_until(lambda: gw.state.upstream.slots.in_use == 2)
        t0 = time.monotonic()
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "upstream_busy"
        assert time.monotonic() - t0 < 1.0
        for fut in slow:
            (await fut).release()
        assert sample(gw, "limited_requests_total", limit="upstream_slots",
                      client="anonymous") == 1
    finally:
        await gw.stop()


async def test_exhausted_pool_is_upstream_busy_too(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, pool_size="1", connect_timeout="0.3s"))
    try:
        await faults(http, sandbox, {"latency": 1.5, "scope": "api", "duration": 10})
        slow = asyncio.ensure_future(http.get(gw.url + SERVICES))
        await wait_until(lambda: gw.state.upstream.slots.in_use == 1)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "upstream_busy"
        (await slow).release()
    finally:
        await gw.stop()


async def test_rate_limit_answers_429_with_retry_after(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, rate_limit="2", rate_limit_burst="2"))
    try:
        codes = []
        for _ in range(3):
            async with http.get(gw.url + SERVICES) as resp:
                codes.append(resp.status)
                if resp.status == 429:
                    assert (await resp.json())["error"]["code"] == "rate_limited"
                    assert int(resp.headers["Retry-After"]) >= 1
        assert codes == [200, 200, 429]
        assert sample(gw, "limited_requests_total", limit="rate", client="anonymous") == 1
    finally:
        await gw.stop()


KEYS = "alpha=client-key-alpha-0123456789,beta=client-key-beta-01234567890"


async def test_per_client_limits_keep_one_noisy_client_from_the_rest(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, client_keys=KEYS,
                                    client_rate_limit="1", client_rate_limit_burst="2",
                                    client_concurrency="1"))
    alpha = {"X-Gateway-Key": "client-key-alpha-0123456789"}
    beta = {"X-Gateway-Key": "client-key-beta-01234567890"}
    try:
        codes = []
        for _ in range(3):
            async with http.get(gw.url + SERVICES, headers=alpha) as resp:
                codes.append(resp.status)
        assert codes == [200, 200, 429]
        async with http.get(gw.url + SERVICES, headers=beta) as resp:
            assert resp.status == 200
        await faults(http, sandbox, {"latency": 1.0, "scope": "api", "count": 1})
        slow = asyncio.ensure_future(http.get(gw.url + SERVICES, headers=beta))
        await wait_until(lambda: gw.state.upstream.slots.in_use == 1)
        async with http.get(gw.url + SERVICES, headers=beta) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["code"] == "client_busy"
        (await slow).release()
        assert sample(gw, "limited_requests_total", limit="client_rate", client="alpha") == 1
        assert sample(gw, "limited_requests_total", limit="client_concurrency",
                      client="beta") == 1
    finally:
        await gw.stop()


async def test_a_retried_answer_is_released_before_the_next_attempt(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """With a pool of one connection, the retry needs the connection the 503 came on."""
    gw = await started(settings_for(sandbox, pool_size="1", connect_timeout="0.5s",
                                    retry_on_status="503"))
    try:
        for _ in range(3):
            await faults(http, sandbox, {"status": 503, "count": 1, "scope": "api"})
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
        assert sample(gw, "retries_total", reason="status_503") == 3
    finally:
        await gw.stop()


async def test_breaker_switched_off_never_opens(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    s = with_stored_token(tmp_path, settings_for(
        url, token_file=str(tmp_path / "token.json"), breaker_failures="0",
        retry_attempts="1"))
    async with GatewayServer(s) as gw:
        for _ in range(30):
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 502
        assert sample(gw, "circuit_breaker_state") == 0
        assert sample(gw, "circuit_breaker_opened_total") == 0


async def test_per_client_in_flight_count_returns_to_zero_when_callers_leave(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, client_concurrency="1"))
    try:
        await faults(http, sandbox, {"latency": 2.0, "scope": "api", "count": 1})
        host, _, port = gw.url.removeprefix("http://").rpartition(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {SERVICES} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        await wait_until(lambda: gw.state.upstream.slots.in_use == 1)
        writer.close()
        await wait_until(lambda: sample(gw, "responses_total", source="gateway",
                                        status="499", code="client_closed_request") == 1)
        async with http.get(gw.url + SERVICES) as resp:  # not refused as client_busy
            assert resp.status == 200
    finally:
        await gw.stop()
