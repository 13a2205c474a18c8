"""Readiness against Repairy's verdict, over real sockets (gateway in-process, the sandbox):
a refusal the probe confirms makes /readyz 503 with its code (a 403 at once, a 401 only after
a renewal and a second probe); timeouts and 5xx on the probe never do; live traffic full of
401/403 asks for a probe; /startz passes once the gateway has tried; the token keeps
serving throughout. Also the request histogram callers feel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox
from gateway.token.verdict import UpstreamVerdict
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

CHECK = "/bookings/000000000000000000000000"


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    value = metric_value(gw.metrics.registry, f"repairy_gateway_{name}", labels)
    return value or 0.0


async def admin(http: aiohttp.ClientSession, gw: GatewayServer, path: str
                ) -> tuple[int, dict[str, Any]]:
    async with http.get(gw.admin_url + path) as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


def verdict_of(gw: GatewayServer) -> UpstreamVerdict:
    verdict = gw.state.verdict
    assert verdict is not None
    return verdict


@pytest.fixture
async def probing(sandbox: Sandbox) -> AsyncIterator[GatewayServer]:
    """A gateway with the probe on, past its first round."""
    async with GatewayServer(settings_for(sandbox, check_path=CHECK)) as gw:
        await wait_until(lambda: verdict_of(gw).first_round_done)
        yield gw


async def test_a_wrong_partner_id_is_not_ready_with_its_reason_and_the_token_still_serves(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A 403 on the probe: /readyz 503 partner_refused within 15 s, /startz 200, the metric
    and /tokenz say it; calls still go out with the token (Repairy's 403 reaches callers:
    nothing is taken away)."""
    async with GatewayServer(settings_for(sandbox, check_path=CHECK,
                                          partner_id="someone-else")) as gw:
        await wait_until(lambda: verdict_of(gw).refusal is not None, within=15)
        status, body = await admin(http, gw, "/readyz")
        assert status == 503 and body["codes"] == ["partner_refused"]
        assert "REPAIRY_PARTNER_ID" in body["reasons"][0]
        assert (await admin(http, gw, "/startz"))[0] == 200
        _, tokenz = await admin(http, gw, "/tokenz")
        assert tokenz["usable"] and tokenz["upstream"]["refusal"] == "partner_refused"
        assert tokenz["upstream"]["last_probe"]["status"] == 403
        assert tokenz["upstream"]["since"].endswith("Z")
        assert sample(gw, "upstream_refused", reason="partner_refused") == 1
        assert sample(gw, "upstream_refused", reason="credentials_refused") == 0
        assert sample(gw, "ready") == 0
        assert sample(gw, "probes_total", outcome="partner_refused") == 1
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 403  # Repairy's own answer, passed back
        assert sample(gw, "token_invalidations_total", reason="upstream_401") == 0


async def test_a_401_on_the_probe_is_confirmed_only_after_one_renewal_and_a_second_probe(
        probing: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = probing
    assert (await admin(http, gw, "/readyz"))[0] == 200
    # One 401 (a token someone revoked): one renewal, the second probe passes.
    before = await stats(http, sandbox)
    await faults(http, sandbox, {"status": 401, "path": CHECK, "count": 1})
    verdict_of(gw).request_probe("test")
    await wait_until(lambda: sample(gw, "probes_total", outcome="ok") == 2, within=10)
    assert (await stats(http, sandbox))["token_requests"] - before["token_requests"] == 1
    assert verdict_of(gw).ready() and (await admin(http, gw, "/readyz"))[0] == 200
    # 401 whatever the token: credentials_refused, after exactly one more renewal.
    before = await stats(http, sandbox)
    await faults(http, sandbox, {"status": 401, "path": CHECK, "persistent": True})
    verdict_of(gw).request_probe("test")
    await wait_until(lambda: verdict_of(gw).refusal == "credentials_refused", within=10)
    assert (await stats(http, sandbox))["token_requests"] - before["token_requests"] == 1
    status, body = await admin(http, gw, "/readyz")
    assert status == 503 and body["codes"] == ["credentials_refused"]
    assert "REPAIRY_APP_KEY" in body["reasons"][0]
    assert sample(gw, "upstream_refused", reason="credentials_refused") == 1
    # Fixed upstream: the next probe of the back-off (the floor, 5 s) clears it.
    await http.delete(f"{sandbox.url}/__sandbox/faults")
    await wait_until(lambda: verdict_of(gw).ready(), within=12)
    assert (await admin(http, gw, "/readyz"))[0] == 200
    assert sample(gw, "upstream_refused", reason="credentials_refused") == 0


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 429}, {"reset": True},
                                   {"latency": 1.5}], ids=["503", "429", "reset", "timeout"])
async def test_a_probe_that_says_nothing_never_flips_readiness(
        sandbox: Sandbox, http: aiohttp.ClientSession, fault: dict[str, Any]) -> None:
    await faults(http, sandbox, {**fault, "path": CHECK, "persistent": True})
    async with GatewayServer(settings_for(sandbox, check_path=CHECK,
                                          auth_timeout="1s")) as gw:
        await wait_until(lambda: verdict_of(gw).first_round_done, within=10)
        assert (await admin(http, gw, "/startz"))[0] == 200
        assert (await admin(http, gw, "/readyz"))[0] == 200
        _, tokenz = await admin(http, gw, "/tokenz")
        assert tokenz["upstream"]["last_probe"]["outcome"] == "inconclusive"
        assert tokenz["upstream"]["next_probe_in_seconds"] is not None  # retried, backed off
        assert sample(gw, "probes_total", outcome="inconclusive") >= 1
        assert sample(gw, "token_invalidations_total", reason="probe_401") == 0


async def test_callers_getting_many_403s_ask_for_one_probe_which_decides(
        probing: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """25 of 30 calls answered 403 in a minute: one re-probe; it passes (one resource is
    forbidden to us), so readiness stays; more 403s within the minute ask for nothing."""
    gw = probing
    probes = sample(gw, "probes_total", outcome="ok")
    await faults(http, sandbox, {"status": 403, "path": "/workshops/*", "count": 25})
    for _ in range(30):
        async with http.get(gw.url + SERVICES) as resp:
            await resp.read()
    await wait_until(lambda: sample(gw, "probes_total", outcome="ok") == probes + 1,
                     within=8)
    assert (await admin(http, gw, "/readyz"))[0] == 200
    await faults(http, sandbox, {"status": 403, "path": "/workshops/*", "count": 25})
    for _ in range(25):
        async with http.get(gw.url + SERVICES) as resp:
            await resp.read()
    async def counted() -> bool:  # a tick took the second burst into the window
        _, tokenz = await admin(http, gw, "/tokenz")
        return bool(tokenz["upstream"]["traffic_last_minute"]["refused"] >= 50)

    await wait_until(counted, within=8)
    assert sample(gw, "probes_total", outcome="ok") == probes + 1  # at most one a minute


async def test_a_partner_refused_during_traffic_is_found_by_the_re_probe(
        probing: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Repairy starts refusing our Partner ID (every call 403, the probe too): the callers'
    403s ask for a probe, which confirms it; when Repairy takes it again, the back-off's next
    probe clears it."""
    gw = probing
    await faults(http, sandbox, {"status": 403, "persistent": True, "scope": "api"})
    for _ in range(25):
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 403
    await wait_until(lambda: verdict_of(gw).refusal == "partner_refused", within=8)
    assert (await admin(http, gw, "/readyz"))[1]["codes"] == ["partner_refused"]
    await http.delete(f"{sandbox.url}/__sandbox/faults")
    await wait_until(lambda: verdict_of(gw).ready(), within=12)


async def test_start_up_waits_for_the_first_attempt_and_probe_never_for_success(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Rejected credentials: /startz 200 once the first login failed (no restart loop),
    /readyz 503 no_usable_token naming the cause."""
    async with GatewayServer(settings_for(sandbox, check_path=CHECK,
                                          app_secret="wrong-secret")) as gw:
        async def started() -> bool:
            return (await admin(http, gw, "/startz"))[0] == 200

        await wait_until(started, within=10)
        status, body = await admin(http, gw, "/readyz")
        assert status == 503 and body["codes"] == ["no_usable_token"]
        assert "rejected the credentials" in body["reasons"][0]


async def test_a_gateway_is_not_started_before_its_first_probe(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    await faults(http, sandbox, {"latency": 2.0, "path": CHECK, "count": 1})
    async with GatewayServer(settings_for(sandbox, check_path=CHECK)) as gw:
        await wait_until(lambda: gw.state.tokens.ready())
        status, body = await admin(http, gw, "/startz")
        assert status == 503 and body["waiting_for"] == "the first probe"
        await wait_until(lambda: verdict_of(gw).first_round_done, within=10)
        assert (await admin(http, gw, "/startz"))[0] == 200


async def test_a_refused_token_keeps_the_gateway_ready_while_it_is_replaced(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A live 401 marks the token for renewal; it keeps serving, so readiness stays."""
    tok = gateway.state.tokens.current
    assert tok is not None
    await faults(http, sandbox, {"latency": 1.0, "path": "/auth/token", "count": 1})
    gateway.state.tokens.invalidate(tok.generation, "upstream_401")
    assert gateway.state.manager.state.stale
    assert (await admin(http, gateway, "/readyz"))[0] == 200


async def test_the_request_histogram_counts_what_callers_feel_by_route_and_class(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    await faults(http, sandbox, {"status": 502, "path": "/workshops/*", "count": 1})
    for _ in range(3):
        async with http.get(gateway.url + SERVICES) as resp:
            await resp.read()
    async with http.get(gateway.url + "/auth/token") as resp:  # the gateway refuses: 403
        await resp.read()
    route = "/workshops/{id}/services"
    count = "request_duration_seconds_count"
    assert sample(gateway, count, route=route, method="GET", code_class="5xx") == 1
    assert sample(gateway, count, route=route, method="GET", code_class="2xx") == 2
    assert sum(sample(gateway, count, route=r, method="GET", code_class="4xx")
               for r in ("/auth/token", "other")) == 1
    assert sample(gateway, "request_duration_seconds_bucket", route=route, method="GET",
                  code_class="2xx", le="30.0") == 2
    async with http.get(gateway.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'le="2.5"' in text and 'le="0.005"' in text
