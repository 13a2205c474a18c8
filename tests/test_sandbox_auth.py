"""Sandbox token rules, over real sockets."""

from __future__ import annotations

import aiohttp

from gateway.sandbox import Sandbox, SandboxConfig
from tests.sandbox_helpers import api_headers, login, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_sandbox_login_returns_tokens_and_lifetimes(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A good login returns an access token, a refresh token and the documented lifetimes."""
    data = await login(http, sandbox)
    assert data["accessToken"] and data["refreshToken"]
    assert data["expiresIn"] == 48 * 3600
    assert data["refreshExpiresIn"] == 14 * 86400


async def test_sandbox_login_bad_credentials_is_401(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Wrong App Secret → 401 with a JSON error; missing fields → 400."""
    async with http.post(f"{sandbox.url}/auth/token",
                         json={"appKey": "sandbox-app-key", "appSecret": "nope"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_credentials"
    async with http.post(f"{sandbox.url}/auth/token", json={"appKey": "x"}) as resp:
        assert resp.status == 400
    async with http.post(f"{sandbox.url}/auth/token", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"
    assert (await stats(http, sandbox))["rejected_requests"] == 2


async def test_sandbox_tokens_are_random_and_distinct(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Tokens are long random strings: twenty logins give forty distinct values."""
    seen: set[str] = set()
    for _ in range(20):
        data = await login(http, sandbox)
        seen.update((data["accessToken"], data["refreshToken"]))
    assert len(seen) == 40
    assert all(len(t) >= 40 for t in seen)


async def test_sandbox_refresh_needs_valid_access_and_refresh_token(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Refresh works with both tokens; wrong or missing pieces are 401/400."""
    data = await login(http, sandbox)
    url = f"{sandbox.url}/auth/refresh"
    bearer = {"Authorization": f"Bearer {data['accessToken']}"}
    async with http.post(url, json={"refreshToken": data["refreshToken"]}) as resp:
        assert resp.status == 401  # no access token
        assert (await resp.json())["error"]["code"] == "token_missing"
    async with http.post(url, json={"refreshToken": "sbx_rt_unknown"}, headers=bearer) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "refresh_token_invalid"
    async with http.post(url, json={}, headers=bearer) as resp:
        assert resp.status == 400
    async with http.post(url, json={"refreshToken": data["refreshToken"]},
                         headers=bearer) as resp:
        assert resp.status == 200
        new = (await resp.json())["data"]
    assert new["accessToken"] != data["accessToken"]
    assert new["refreshToken"] != data["refreshToken"]  # rotation is on by default
    async with http.get(sandbox.url + SERVICES,
                        headers=api_headers(sandbox, new["accessToken"])) as resp:
        assert resp.status == 200


async def test_sandbox_rotated_refresh_token_is_rejected(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """With rotation, a refresh token works once; its reuse is 401."""
    data = await login(http, sandbox)
    url = f"{sandbox.url}/auth/refresh"
    body = {"refreshToken": data["refreshToken"]}
    async with http.post(url, json=body,
                         headers={"Authorization": f"Bearer {data['accessToken']}"}) as resp:
        new = (await resp.json())["data"]
    async with http.post(url, json=body,
                         headers={"Authorization": f"Bearer {new['accessToken']}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "refresh_token_invalid"


async def test_sandbox_without_rotation_reuses_refresh_token(
        http: aiohttp.ClientSession) -> None:
    """Rotation off: the same refresh token comes back and keeps working."""
    async with Sandbox(SandboxConfig(rotate_refresh=False)) as sb:
        data = await login(http, sb)
        for _ in range(2):
            async with http.post(f"{sb.url}/auth/refresh",
                                 json={"refreshToken": data["refreshToken"]},
                                 headers={"Authorization": f"Bearer {data['accessToken']}"}
                                 ) as resp:
                assert resp.status == 200
                new = (await resp.json())["data"]
            assert new["refreshToken"] == data["refreshToken"]
            data = new


async def test_sandbox_expiry_of_access_and_refresh_tokens(http: aiohttp.ClientSession) -> None:
    """Past its lifetime an access token is 401 token_expired, and so is a refresh token."""
    clock = FakeClock()
    async with Sandbox(SandboxConfig(access_ttl=10, refresh_ttl=100), clock=clock) as sb:
        data = await login(http, sb)
        headers = api_headers(sb, data["accessToken"])
        async with http.get(sb.url + SERVICES, headers=headers) as resp:
            assert resp.status == 200
        clock.now += 10
        async with http.get(sb.url + SERVICES, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "token_expired"
        # An expired access token cannot be refreshed either.
        async with http.post(f"{sb.url}/auth/refresh",
                             json={"refreshToken": data["refreshToken"]},
                             headers={"Authorization": f"Bearer {data['accessToken']}"}) as resp:
            assert resp.status == 401
        data = await login(http, sb)
        clock.now += 101 - 0.5  # access token expired again; refresh token too
        data2 = await login(http, sb)  # a fresh access token to carry the stale refresh token
        async with http.post(f"{sb.url}/auth/refresh",
                             json={"refreshToken": data["refreshToken"]},
                             headers={"Authorization": f"Bearer {data2['accessToken']}"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "refresh_token_expired"


async def test_sandbox_single_token_mode_invalidates_earlier_tokens(
        http: aiohttp.ClientSession) -> None:
    """One live token per credential: a second login knocks out the first token."""
    async with Sandbox(SandboxConfig(single_token=True)) as sb:
        first = await login(http, sb)
        second = await login(http, sb)
        async with http.get(sb.url + SERVICES,
                            headers=api_headers(sb, first["accessToken"])) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "token_invalid"
        async with http.get(sb.url + SERVICES,
                            headers=api_headers(sb, second["accessToken"])) as resp:
            assert resp.status == 200
        assert (await stats(http, sb))["live_access_tokens"] == 1


async def test_sandbox_multi_token_mode_keeps_earlier_tokens(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Default mode: several logins give several working tokens."""
    first = await login(http, sandbox)
    await login(http, sandbox)
    async with http.get(sandbox.url + SERVICES,
                        headers=api_headers(sandbox, first["accessToken"])) as resp:
        assert resp.status == 200


async def test_sandbox_api_requires_token_and_matching_partner(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Missing/unknown token → 401; missing or wrong X-Partner-ID → 403; each names why."""
    data = await login(http, sandbox)
    url = sandbox.url + SERVICES
    cases = [
        ({}, 401, "token_missing"),
        ({"Authorization": "Bearer sbx_at_made_up"}, 401, "token_invalid"),
        ({"Authorization": f"Basic {data['accessToken']}"}, 401, "token_missing"),
        ({"Authorization": f"Bearer {data['accessToken']}"}, 403, "partner_id_missing"),
        ({"Authorization": f"Bearer {data['accessToken']}", "X-Partner-ID": "other"}, 403,
         "partner_id_mismatch"),
    ]
    for headers, status, code in cases:
        async with http.get(url, headers=headers) as resp:
            assert resp.status == status, code
            assert (await resp.json())["error"]["code"] == code
    assert (await stats(http, sandbox))["rejected_requests"] == len(cases)
