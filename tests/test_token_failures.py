"""The token lifecycle against an upstream that misbehaves, over real sockets: answers in
chunks, auth outages past expiry, Retry-After as seconds and as a date, routes that always
answer 401, revocations under load, a busy proxy pool, odd expiry fields, echoed secrets,
configuration errors, and shutdown during a refresh."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.errors import GATEWAY_ERROR_HEADER
from gateway.sandbox import Sandbox, SandboxConfig
from tests.conftest import LogCapture
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

BOOKING = "/bookings/000000000000000000000000"


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    return metric_value(gw.metrics.registry, name, labels) or 0.0


def auth_calls(s: dict[str, Any]) -> int:
    return int(s["token_requests"]) + int(s["refresh_requests"])


async def test_token_auth_answer_sent_in_chunks_is_read_whole(
        http: aiohttp.ClientSession) -> None:
    """A login answer in 7-byte chunks (chunked transfer) is read to its end: ready, 200."""
    async with Sandbox() as sb:
        await faults(http, sb, {"chunk": 7, "chunk_delay": 0.005, "path": "/auth/token"})
        async with GatewayServer(settings_for(sb)) as gw:
            await wait_until(gw.state.tokens.ready, within=5)
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
        s = await stats(http, sb)
    assert s["faults_applied"] == 1
    assert s["token_requests"] == 1


@dataclass
class Outage:
    """What callers and the auth endpoint saw during an injected auth outage."""

    auth_calls: int = 0
    caller_statuses: list[int] = field(default_factory=list)
    slowest_refusal: float = 0.0
    refusals_without_retry_after: int = 0
    recovered_in: float | None = None
    stayed_ready: bool = False


async def run_outage(http: aiohttp.ClientSession, fault: dict[str, Any], seconds: float,
                     recover: bool, **overrides: Any) -> Outage:
    """A 2 s token, then every auth call faulted for ``seconds``: sample callers throughout;
    afterwards measure the time back to ready and whether it stays ready with no traffic."""
    out = Outage()
    async with Sandbox(SandboxConfig(access_ttl=2.0)) as sb, \
            GatewayServer(settings_for(sb, **overrides)) as gw:
        await wait_until(gw.state.tokens.ready)
        before = await stats(http, sb)
        await faults(http, sb, {**fault, "scope": "auth", "duration": seconds})
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            t0 = time.monotonic()
            async with http.get(gw.url + SERVICES) as resp:
                await resp.read()
                out.caller_statuses.append(resp.status)
                if resp.status != 200:
                    out.slowest_refusal = max(out.slowest_refusal, time.monotonic() - t0)
                    if "Retry-After" not in resp.headers:
                        out.refusals_without_retry_after += 1
            await asyncio.sleep(0.2)
        out.auth_calls = auth_calls(await stats(http, sb)) - auth_calls(before)
        if recover:
            ended = started + seconds
            await wait_until(gw.state.tokens.ready, within=10, interval=0.01)
            out.recovered_in = time.monotonic() - ended
            out.stayed_ready = True
            quiet_until = time.monotonic() + 3.0  # 1.5 token lifetimes, no traffic
            while time.monotonic() < quiet_until:
                out.stayed_ready &= gw.state.tokens.ready()
                await asyncio.sleep(0.02)
    return out


async def test_token_auth_outage_past_expiry_is_bounded_and_recovers(
        http: aiohttp.ClientSession) -> None:
    """Both auth endpoints answer 503 (or 429 with Retry-After as seconds or as a date) for
    8 s past a 2 s token's expiry: few auth calls, quick 503s with Retry-After for callers,
    ready within one back-off step of recovery, then stays ready. With default back-off
    settings the same bounds hold."""
    short = {"renew_retry_min": "1s", "renew_retry_max": "4s"}
    defaults = {"renew_retry_min": "1s", "renew_retry_max": "60s", "token_expiry_margin": "60s",
                "login_retry_interval": "30s", "token_wait_timeout": "10s"}
    s503, s429, d429, dflt = await asyncio.gather(
        run_outage(http, {"status": 503}, 8, True, **short),
        run_outage(http, {"status": 429, "retry_after": 5}, 8, True, **short),
        run_outage(http, {"status": 429, "retry_after": 5, "retry_after_date": True}, 8, True,
                   **short),
        run_outage(http, {"status": 503}, 8, False, **defaults),
    )
    assert s503.auth_calls <= 12, s503
    for o in (s429, d429):
        assert o.auth_calls <= 4, o
    assert dflt.auth_calls <= 12, dflt
    for o in (s503, s429, d429, dflt):
        assert 503 in o.caller_statuses, o
        assert set(o.caller_statuses) <= {200, 503}, o
        assert o.slowest_refusal < 2.0, o
        assert o.refusals_without_retry_after == 0, o
    for o in (s503, s429, d429):
        assert o.recovered_in is not None and o.recovered_in <= 4.5, o  # one step: retry max
        assert o.stayed_ready, o


async def test_token_always_401_route_costs_at_most_two_logins(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        log_capture: LogCapture) -> None:
    """50 sequential + 50 concurrent requests to a route that always answers 401: the 401s
    come back, with at most 2 logins beyond the first; the route is marked (metric, log line
    naming the template); then a revocation still heals at once on another route."""
    await faults(http, sandbox, {"status": 401, "path": "/bookings/*", "persistent": True})
    before = await stats(http, sandbox)

    async def one(path: str) -> int:
        async with http.get(gateway.url + path) as resp:
            await resp.read()
            return resp.status

    for _ in range(50):
        assert await one(BOOKING) == 401
    assert await asyncio.gather(*(one(BOOKING) for _ in range(50))) == [401] * 50
    after = await stats(http, sandbox)
    assert after["token_requests"] - before["token_requests"] <= 2
    assert sample(gateway, "repairy_gateway_persistent_401_total", route="/bookings/{id}") >= 1
    assert any('"route": "/bookings/{id}"' in line and "persistent_401" in line
               for line in log_capture.lines)
    assert BOOKING not in json.dumps(await tokenz(http, gateway))

    await faults(http, sandbox, {"revoke_tokens": True})
    before = await stats(http, sandbox)
    assert await one(SERVICES) == 200
    after = await stats(http, sandbox)
    assert after["token_requests"] - before["token_requests"] == 1


async def tokenz(http: aiohttp.ClientSession, gw: GatewayServer) -> dict[str, Any]:
    async with http.get(gw.admin_url + "/tokenz") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def test_token_two_revocations_under_load_one_login_each_no_errors(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Every token revoked twice, 1.5 s apart, under steady load: one re-login each and no
    caller sees an error."""
    before = await stats(http, sandbox)
    statuses: list[int] = []
    deadline = time.monotonic() + 4.0

    async def worker() -> None:
        while time.monotonic() < deadline:
            async with http.get(gateway.url + SERVICES) as resp:
                await resp.read()
                statuses.append(resp.status)

    async def revoke_twice() -> None:
        await asyncio.sleep(1.0)
        await faults(http, sandbox, {"revoke_tokens": True})
        await asyncio.sleep(1.5)
        await faults(http, sandbox, {"revoke_tokens": True})

    await asyncio.gather(revoke_twice(), *(worker() for _ in range(8)))
    after = await stats(http, sandbox)
    assert after["token_requests"] - before["token_requests"] == 2
    assert len(statuses) > 100
    assert set(statuses) == {200}
    assert sample(gateway, "repairy_gateway_persistent_401_total",
                  route="/workshops/{id}/services") == 0


async def test_token_refresh_uses_own_pool_when_proxy_pool_is_busy(
        http: aiohttp.ClientSession) -> None:
    """With the proxy's only connection held by a slow request, the refresh still goes out
    at once on the auth pool: no timeout, no wasted refresh token, no login."""
    async with Sandbox(SandboxConfig(access_ttl=3.0)) as sb, \
            GatewayServer(settings_for(sb, pool_size=1, auth_timeout="0.5s",
                                       renew_at_fraction=0.5, renew_jitter_fraction=0)) as gw:
        await wait_until(gw.state.tokens.ready)
        await faults(http, sb, {"latency": 2.5, "path": "/__sandbox/echo"})
        slow = asyncio.create_task(http.post(gw.url + "/__sandbox/echo", data=b"x"))
        await wait_until(lambda: (tok := gw.state.tokens.current) is not None
                         and tok.generation == 2, within=4)
        tok = gw.state.tokens.current
        assert tok is not None and tok.via == "refresh"
        resp = await slow
        assert resp.status == 200
        resp.release()
        assert gw.state.manager.status().last_error is None
        assert sample(gw, "repairy_gateway_token_renewals_total", kind="refresh",
                      outcome="failure", reason="timeout") == 0
        s = await stats(http, sb)
    assert (s["token_requests"], s["refresh_requests"]) == (1, 1)


def jwt_with_exp(seconds_ahead: float) -> str:
    """An (unsigned) JWT whose ``exp`` is that far ahead: the fallback after ignored fields."""

    def enc(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'none'})}.{enc({'exp': time.time() + seconds_ahead})}.c2ln"


@pytest.mark.parametrize(("grant", "lifetime"), [
    ({"expiresIn": "48h"}, 1200.0),  # unreadable: ignored, the JWT's exp applies
    ({"expiresIn": 1_800_000}, 1800.0),  # milliseconds
    ({"expiresIn": 10_000_000}, 3600.0),  # too long even in milliseconds: capped
    ({"expiresIn": True, "expiresAt": "2999-01-01T00:00:00"}, 3600.0),  # no zone, capped
    ({"expiresAt": "ZONELESS+600"}, 600.0),  # a time without a zone is UTC
], ids=["text", "milliseconds", "too-long", "bool-and-far-iso", "iso-without-zone"])
async def test_token_odd_expiry_fields_are_corrected_and_logged_once(
        http: aiohttp.ClientSession, log_capture: LogCapture, grant: dict[str, Any],
        lifetime: float) -> None:
    """An expiry field that cannot be read, or is implausible, never fails the login: it is
    corrected (UTC, milliseconds, capped at REPAIRY_ACCESS_TOKEN_TTL) with one warning."""
    from datetime import UTC, datetime, timedelta
    if grant.get("expiresAt") == "ZONELESS+600":
        when = datetime.now(UTC) + timedelta(seconds=600)
        grant = {"expiresAt": when.replace(tzinfo=None).isoformat(timespec="seconds")}
    # The access token is a JWT expiring in 1200 s: what the gateway falls back to when it
    # ignores a field, so "ignored" and "capped at the documented 3600 s" tell apart.
    body = json.dumps({"success": True, "data": {"accessToken": jwt_with_exp(1200), **grant}})
    async with Sandbox() as sb:
        await faults(http, sb, {"status": 200, "body": body, "path": "/auth/token",
                                "persistent": True})
        async with GatewayServer(settings_for(sb, access_token_default_ttl="1h")) as gw:
            await wait_until(gw.state.tokens.ready)
            tok = gw.state.tokens.current
            assert tok is not None
            assert tok.lifetime == pytest.approx(lifetime, abs=2)
            first = corrections(log_capture)
            gw.state.tokens.invalidate(tok.generation, "test")  # a second, identical answer
            await gw.state.tokens.get(newer_than=tok.generation)
    assert first, "the correction was not logged"
    assert corrections(log_capture) == first  # not again for the same answer


def corrections(log_capture: LogCapture) -> list[str]:
    return [line for line in log_capture.lines
            if line.startswith("{") and "auth_response_corrected" in line]


async def test_token_auth_error_echoing_the_secret_is_never_logged(
        http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """A login refused with the App Secret echoed as its error code: the code is dropped."""
    async with Sandbox() as sb:
        await faults(http, sb, {"status": 401, "body": json.dumps({"error": "sandbox-app-secret"}),
                                "path": "/auth/token", "persistent": True})
        async with GatewayServer(settings_for(sb)) as gw:
            await wait_until(lambda: gw.state.manager.status().credentials_rejected)
    secret = "sandbox-app-secret"
    log_capture.lines[:] = [line.replace(secret, "<FOUND>") for line in log_capture.lines]
    assert not any("<FOUND>" in line for line in log_capture.lines)
    assert any("login answered 401" in line for line in log_capture.lines)


@pytest.mark.parametrize(("status", "reason"), [
    (404, "endpoint_misconfigured"), (405, "endpoint_misconfigured"),
    (415, "endpoint_misconfigured"), (400, "request_rejected"), (422, "request_rejected"),
])
async def test_token_login_config_errors_have_their_own_reason_and_retry_slowly(
        http: aiohttp.ClientSession, status: int, reason: str) -> None:
    """A wrong login path or body is a configuration error, not rejected credentials: its own
    metric reason, not ready with a reason naming it, retried only every
    GATEWAY_LOGIN_RETRY_INTERVAL."""
    async with Sandbox() as sb:
        await faults(http, sb, {"status": status, "path": "/auth/token", "persistent": True})
        async with GatewayServer(settings_for(sb, login_retry_interval="0.5s")) as gw:
            await wait_until(lambda: gw.state.manager.status().blocked == reason)
            await asyncio.sleep(1.6)
            async with http.get(gw.admin_url + "/readyz") as resp:
                assert resp.status == 503
                assert reason in (await resp.json())["reasons"][0]
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 503
                assert resp.headers[GATEWAY_ERROR_HEADER] == "token_unavailable"
            assert sample(gw, "repairy_gateway_token_renewals_total", kind="login",
                          outcome="failure", reason=reason) >= 1
            assert sample(gw, "repairy_gateway_token_renewals_total", kind="login",
                          outcome="failure", reason="invalid_credentials") == 0
        s = await stats(http, sb)
    assert 2 <= s["token_requests"] <= 5  # every 0.5 s over ~1.7 s, not a loop


async def test_token_shutdown_lets_refresh_finish_and_keeps_rotated_token(
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Stopping during a slow refresh waits for it (within the auth timeout) and stores the
    rotated refresh token, so the next start can refresh with it."""
    path = tmp_path / "token.json"
    async with Sandbox(SandboxConfig(access_ttl=3.0)) as sb:
        settings = settings_for(sb, token_file=str(path), renew_at_fraction=0.3,
                                renew_jitter_fraction=0, auth_timeout="3s")
        gw = GatewayServer(settings)
        await gw.start()
        await wait_until(gw.state.tokens.ready)
        first = json.loads(path.read_text())
        await faults(http, sb, {"latency": 1.0, "path": "/auth/refresh"})
        await wait_until(lambda: sb.state.control.counters["refresh_requests"] == 1, within=3)
        await gw.stop()
        stored = json.loads(path.read_text())
        assert sb.state.control.counters["refreshes_succeeded"] == 1
        assert stored["generation"] == 2
        assert stored["refresh_token"] != first["refresh_token"]
        async with GatewayServer(settings_for(sb, token_file=str(path))) as again:
            assert again.state.tokens.ready()
            await again.state.tokens.get()
        s = await stats(http, sb)
    assert s["token_requests"] == 1  # the restart reused the stored, rotated token


async def test_token_file_with_a_bad_optional_field_is_used_with_a_warning(
        sandbox: Sandbox, tmp_path: Path, log_capture: LogCapture) -> None:
    """A stored token whose optional fields are garbage still starts (and is reused)."""
    path = tmp_path / "token.json"
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        await wait_until(gw.state.tokens.ready)
    doc = json.loads(path.read_text())
    doc.update(refresh_expires_at="soon", generation="seven", refresh_token=42)
    path.write_text(json.dumps(doc))
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        assert gw.state.tokens.ready()
    path.write_text(json.dumps(doc).replace('"soon"', "1" + "0" * 400))
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        assert gw.state.tokens.ready()
    assert sandbox.state.control.counters["token_requests"] == 1
    assert any("token_file_field_ignored" in line for line in log_capture.lines)


async def test_token_file_lifetime_is_capped_at_the_documented_one(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """A stored expiry far beyond REPAIRY_ACCESS_TOKEN_TTL (an old misread) is capped."""
    path = tmp_path / "token.json"
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        await wait_until(gw.state.tokens.ready)
    doc = json.loads(path.read_text())
    doc["expires_at"] = doc["obtained_at"] + 2000 * 86400
    path.write_text(json.dumps(doc))
    async with GatewayServer(settings_for(sandbox, token_file=str(path),
                                          access_token_default_ttl="1h")) as gw:
        tok = gw.state.tokens.current
        assert tok is not None
        assert tok.lifetime == pytest.approx(3600)


async def test_token_failed_relogin_after_401_keeps_the_old_token_serving(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A 401 invalidates the token while the auth endpoint is down: that caller gets a 503
    with Retry-After, but the old token keeps serving requests where it still works."""
    await faults(http, sandbox, {"faults": [
        {"status": 503, "scope": "auth", "duration": 3},
        {"status": 401, "path": BOOKING}]})
    async with http.get(gateway.url + BOOKING) as resp:
        assert resp.status == 503
        assert resp.headers[GATEWAY_ERROR_HEADER] == "token_unavailable"
        assert "Retry-After" in resp.headers
    for _ in range(5):
        async with http.get(gateway.url + SERVICES) as resp:
            assert resp.status == 200
    tok = gateway.state.tokens.current
    assert tok is not None and tok.generation == 1
    assert gateway.state.manager.status().stale
    await wait_until(lambda: (t := gateway.state.tokens.current) is not None
                     and t.generation == 2, within=6)
