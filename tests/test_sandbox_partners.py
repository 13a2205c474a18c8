"""The sandbox with several partners: each with its own credentials, tokens and bookings;
per-partner counters (logins, refreshes, calls, wrong-partner calls), faults and revocation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.sandbox import Sandbox, SandboxConfig
from gateway.sandbox.state import numbered_partner
from gateway.sandbox.tokens import Credential
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"


@pytest.fixture
async def two() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(more_partners=(numbered_partner(2),))) as sb:
        yield sb


async def _login(http: aiohttp.ClientSession, sb: Sandbox, cred: Credential) -> dict[str, Any]:
    async with http.post(f"{sb.url}/auth/token", json={"appKey": cred.app_key,
                                                      "appSecret": cred.app_secret},
                         headers={"X-Partner-ID": cred.partner_id}) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = (await resp.json())["data"]
        return data


async def _get(http: aiohttp.ClientSession, sb: Sandbox, token: str, partner: str) -> int:
    async with http.get(sb.url + SERVICES, headers={"Authorization": f"Bearer {token}",
                                                    "X-Partner-ID": partner}) as resp:
        return resp.status


async def test_sandbox_partners_are_counted_apart_and_a_wrong_partner_call_is_seen(
        two: Sandbox, http: aiohttp.ClientSession) -> None:
    one_cred, two_cred = two.state.config.partners()
    one, other = await _login(http, two, one_cred), await _login(http, two, two_cred)
    assert await _get(http, two, one["accessToken"], one_cred.partner_id) == 200
    assert await _get(http, two, other["accessToken"], two_cred.partner_id) == 200
    # Partner 1's token sent as partner 2: refused, and counted against partner 2.
    assert await _get(http, two, one["accessToken"], two_cred.partner_id) == 403
    async with http.post(f"{two.url}/auth/refresh", json={"refreshToken": other["refreshToken"]},
                         headers={"Authorization": f"Bearer {other['accessToken']}"}) as resp:
        assert resp.status == 200
    s = await stats(http, two)
    assert s["partners"] == {
        "sandbox-partner": {"logins": 1, "refreshes": 0, "calls": 1, "wrong_partner_calls": 0},
        "sandbox-partner-2": {"logins": 1, "refreshes": 1, "calls": 2,
                              "wrong_partner_calls": 1}}


async def test_sandbox_faults_and_revocation_per_partner(
        two: Sandbox, http: aiohttp.ClientSession) -> None:
    one_cred, two_cred = two.state.config.partners()
    one, other = await _login(http, two, one_cred), await _login(http, two, two_cred)
    await faults(http, two, {"status": 503, "partner": two_cred.partner_id, "count": 5})
    assert await _get(http, two, one["accessToken"], one_cred.partner_id) == 200
    assert await _get(http, two, other["accessToken"], two_cred.partner_id) == 503
    await faults(http, two, {"revoke_tokens": two_cred.partner_id})
    async with http.delete(f"{two.url}/__sandbox/faults"):
        pass
    assert await _get(http, two, one["accessToken"], one_cred.partner_id) == 200
    assert await _get(http, two, other["accessToken"], two_cred.partner_id) == 401
    # Replace one partner's credentials only: the other still logs in.
    async with http.post(f"{two.url}/__sandbox/credentials", json={"replace": {
            "app_key": "new-key", "app_secret": "new-secret",
            "partner_id": two_cred.partner_id}}) as resp:
        assert (await resp.json())["partners"] == ["sandbox-partner", "sandbox-partner-2"]
    await _login(http, two, one_cred)
    await _login(http, two, Credential("new-key", "new-secret", two_cred.partner_id))
    async with http.post(f"{two.url}/auth/token", json={
            "appKey": two_cred.app_key, "appSecret": two_cred.app_secret}) as resp:
        assert resp.status == 401


async def test_sandbox_bookings_are_each_partners_own(
        two: Sandbox, http: aiohttp.ClientSession) -> None:
    one_cred, two_cred = two.state.config.partners()
    one, other = await _login(http, two, one_cred), await _login(http, two, two_cred)
    booking = {"workshopId": "5f1a2b3c4d5e6f7a8b9c0d01",
               "startTime": "2030-01-02T09:00:00+00:00", "serviceType": "Logbook service",
               "customer": {"firstName": "Ana", "phone": "+61400000000",
                            "email": "a@example.com"},
               "car": {"rego": "ABC123"}}
    async with http.post(f"{two.url}/bookings", json=booking, headers={
            "Authorization": f"Bearer {one['accessToken']}",
            "X-Partner-ID": one_cred.partner_id}) as resp:
        assert resp.status == 201
        booking_id = (await resp.json())["data"]["id"]
    async with http.get(f"{two.url}/bookings/{booking_id}", headers={
            "Authorization": f"Bearer {other['accessToken']}",
            "X-Partner-ID": two_cred.partner_id}) as resp:
        assert resp.status == 404
