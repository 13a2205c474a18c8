"""The sandbox control API: stats, faults, reset, request log, diagnostics."""

from __future__ import annotations

import asyncio
import hashlib
import time
from email.utils import parsedate_to_datetime

import aiohttp
import pytest

from gateway.redact import fingerprint
from gateway.sandbox import Sandbox, pattern_bytes
from tests.gateway_helpers import wait_until
from tests.sandbox_helpers import api_headers, faults, login, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"


async def test_sandbox_stats_count_requests_by_kind_and_status(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """token/refresh/api/rejected counters and per-status counts add up."""
    data = await login(http, sandbox)
    async with http.post(f"{sandbox.url}/auth/refresh", json={"refreshToken": data["refreshToken"]},
                         headers={"Authorization": f"Bearer {data['accessToken']}"}):
        pass
    async with http.get(sandbox.url + SERVICES):
        pass
    s = await stats(http, sandbox)
    assert (s["token_requests"], s["refresh_requests"], s["api_requests"]) == (1, 1, 1)
    assert s["rejected_requests"] == 1
    assert s["statuses"] == {"200": 2, "401": 1}


async def test_sandbox_fault_status_with_retry_after_applies_n_times(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A status fault answers the next N matching requests, with Retry-After, then stops."""
    data = await login(http, sandbox)
    await faults(http, sandbox, {"status": 503, "count": 2, "retry_after": 3,
                                 "path": "/workshops/*"})
    seen = []
    for _ in range(3):
        async with http.get(sandbox.url + SERVICES,
                            headers=api_headers(sandbox, data["accessToken"])) as resp:
            seen.append((resp.status, resp.headers.get("Retry-After")))
    assert seen == [(503, "3"), (503, "3"), (200, None)]
    assert (await stats(http, sandbox))["faults_applied"] == 2


async def test_sandbox_fault_scope_and_path_filter(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """An auth-scoped fault hits only auth calls; a path glob hits only matching paths."""
    await faults(http, sandbox, {"faults": [{"status": 500, "scope": "auth"},
                                            {"status": 429, "path": "/bookings/*"}]})
    data_url = sandbox.url + SERVICES
    async with http.get(data_url) as resp:
        assert resp.status == 401  # an API call: auth fault not consumed
    cfg = sandbox.state.config
    async with http.post(f"{sandbox.url}/auth/token",
                         json={"appKey": cfg.app_key, "appSecret": cfg.app_secret}) as resp:
        assert resp.status == 500
    data = await login(http, sandbox)
    headers = api_headers(sandbox, data["accessToken"])
    async with http.get(data_url, headers=headers) as resp:
        assert resp.status == 200
    async with http.get(f"{sandbox.url}/bookings/abc", headers=headers) as resp:
        assert resp.status == 429


async def test_sandbox_fault_latency_delays_response(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A latency fault delays the response by about that long."""
    data = await login(http, sandbox)
    await faults(http, sandbox, {"latency": 0.3})
    t0 = time.monotonic()
    async with http.get(sandbox.url + SERVICES,
                        headers=api_headers(sandbox, data["accessToken"])) as resp:
        assert resp.status == 200
    assert time.monotonic() - t0 >= 0.3


async def test_sandbox_fault_drop_cuts_connection_mid_response(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A drop fault sends headers and part of the body, then the client sees a broken body."""
    data = await login(http, sandbox)
    await faults(http, sandbox, {"drop": True})
    async with http.get(sandbox.url + SERVICES,
                        headers=api_headers(sandbox, data["accessToken"])) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_sandbox_fault_spec_is_validated(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A nonsense fault spec is 400 with a reason."""
    for spec in ({"status": 99}, {"count": 0, "status": 500}, {"colour": "red"}, {},
                 {"status": 500, "scope": "elsewhere"}):
        async with http.post(f"{sandbox.url}/__sandbox/faults", json=spec) as resp:
            assert resp.status == 400, spec
            assert (await resp.json())["error"]["code"] == "invalid_fault"


async def test_sandbox_revoke_tokens_invalidates_live_tokens(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """revoke_tokens makes every issued token fail with 401."""
    data = await login(http, sandbox)
    await faults(http, sandbox, {"revoke_tokens": True})
    async with http.get(sandbox.url + SERVICES,
                        headers=api_headers(sandbox, data["accessToken"])) as resp:
        assert resp.status == 401


async def test_sandbox_reset_clears_counters_faults_and_data(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Reset zeroes counters, drops faults and forgets created bookings."""
    data = await login(http, sandbox)
    await faults(http, sandbox, {"status": 500, "count": 5})
    sandbox.state.data.bookings["x"] = {"id": "x"}
    async with http.post(f"{sandbox.url}/__sandbox/reset") as resp:
        assert resp.status == 200
    s = await stats(http, sandbox)
    assert s["token_requests"] == 0 and s["active_faults"] == 0
    assert sandbox.state.data.bookings == {}
    async with http.get(sandbox.url + SERVICES,
                        headers=api_headers(sandbox, data["accessToken"])) as resp:
        assert resp.status == 200  # tokens survive a reset


async def test_sandbox_request_log_shows_fingerprint_not_token(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """The request log keeps method, raw path, query and headers; the token only as a print."""
    data = await login(http, sandbox)
    token = data["accessToken"]
    async with http.get(f"{sandbox.url}/workshops/a%2Fb/services?x=1&y=%20",
                        headers={**api_headers(sandbox, token), "X-Extra": "1"}):
        pass
    async with http.get(f"{sandbox.url}/__sandbox/requests?limit=1") as resp:
        (entry,) = (await resp.json())["requests"]
    assert entry["method"] == "GET"
    assert entry["path"] == "/workshops/a%2Fb/services"
    assert entry["query"] == "x=1&y=%20"
    headers = dict(entry["headers"])
    assert headers["Authorization"] == f"Bearer fp:{fingerprint(token)}"
    assert headers["X-Extra"] == "1"
    assert token not in str(entry)


async def test_sandbox_echo_and_bytes_stream_bodies(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """/__sandbox/echo hashes a streamed body; /__sandbox/bytes sends a known pattern."""
    data = await login(http, sandbox)
    headers = api_headers(sandbox, data["accessToken"])
    payload = b"x" * 300_000
    async with http.put(f"{sandbox.url}/__sandbox/echo", data=payload, headers=headers) as resp:
        body = (await resp.json())["data"]
    assert body["size"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()
    for query in ("", "?chunked=1"):
        async with http.get(f"{sandbox.url}/__sandbox/bytes/100000{query}",
                            headers=headers) as resp:
            assert await resp.read() == pattern_bytes(100_000)
            assert (resp.headers.get("Content-Length") is None) == bool(query)
    async with http.get(f"{sandbox.url}/__sandbox/bytes/10") as resp:
        assert resp.status == 401  # diagnostics are authenticated like the API


async def test_sandbox_many_concurrent_logins_are_served(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Fifty logins at once all succeed with distinct tokens."""
    results = await asyncio.gather(*(login(http, sandbox) for _ in range(50)))
    assert len({r["accessToken"] for r in results}) == 50


async def test_sandbox_fault_chunk_sends_the_real_answer_in_pieces(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """``chunk`` re-sends the real login answer with chunked transfer, N bytes a piece."""
    await faults(http, sandbox, {"chunk": 5, "chunk_delay": 0.01, "path": "/auth/token"})
    cfg = sandbox.state.config
    async with http.post(f"{sandbox.url}/auth/token",
                         json={"appKey": cfg.app_key, "appSecret": cfg.app_secret}) as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in resp.headers
        pieces = [chunk async for chunk, _ in resp.content.iter_chunks()]
    assert len(pieces) > 10
    assert max(len(p) for p in pieces) <= 5
    body = b"".join(pieces)
    assert b'"accessToken"' in body


async def test_sandbox_fault_duration_and_persistent(http: aiohttp.ClientSession) -> None:
    """``duration`` applies to every matching request until it runs out (sandbox clock);
    ``persistent`` never runs out."""
    now = [100.0]
    async with Sandbox(clock=lambda: now[0]) as sb:
        await faults(http, sb, {"faults": [
            {"status": 503, "path": "/auth/token", "duration": 10},
            {"status": 401, "path": "/bookings/*", "persistent": True}]})

        async def status(method: str, path: str) -> int:
            async with http.request(method, sb.url + path, json={}) as resp:
                return resp.status

        assert [await status("POST", "/auth/token") for _ in range(5)] == [503] * 5
        now[0] = 110.0
        assert await status("POST", "/auth/token") == 400  # the fault ran out
        now[0] = 1e9
        assert [await status("GET", "/bookings/x") for _ in range(3)] == [401] * 3


async def test_sandbox_fault_retry_after_as_http_date(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """``retry_after_date`` sends Retry-After as an HTTP date that far ahead."""
    await faults(http, sandbox, {"status": 429, "retry_after": 120, "retry_after_date": True})
    async with http.post(f"{sandbox.url}/auth/token", json={}) as resp:
        assert resp.status == 429
        when = parsedate_to_datetime(resp.headers["Retry-After"])
    assert 110 <= when.timestamp() - time.time() <= 121


@pytest.mark.parametrize("spec", [
    {"chunk": 0}, {"chunk": "5"}, {"status": 500, "duration": 0},
    {"status": 500, "persistent": "yes"}, {"chunk": 4, "chunk_delay": -1},
])
async def test_sandbox_new_fault_fields_are_validated(
        sandbox: Sandbox, http: aiohttp.ClientSession, spec: dict[str, object]) -> None:
    """Bad chunk, duration, persistent and chunk_delay values are refused with 400."""
    async with http.post(f"{sandbox.url}/__sandbox/faults", json=spec) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_fault"


async def test_sandbox_a_held_request_waits_for_its_gate(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """``hold`` keeps the matching request until its gate opens (the test decides when
    Repairy answers); stats show what each gate holds; an open gate lets later ones pass."""
    data = await login(http, sandbox)
    headers = api_headers(sandbox, data["accessToken"])
    await faults(http, sandbox, {"hold": "g1", "path": "/workshops/*", "count": 2})
    first = asyncio.ensure_future(http.get(sandbox.url + SERVICES, headers=headers))

    async def holding() -> bool:
        return int((await stats(http, sandbox))["held"].get("g1", 0)) == 1

    await wait_until(holding)
    assert not first.done()
    async with http.post(f"{sandbox.url}/__sandbox/gates/g1") as resp:
        assert (await resp.json()) == {"gate": "g1", "released": 1}
    async with await first as resp:
        assert resp.status == 200
    async with http.get(sandbox.url + SERVICES, headers=headers) as resp:
        assert resp.status == 200  # the gate stays open
    assert (await stats(http, sandbox))["held"] == {}
    async with http.post(f"{sandbox.url}/__sandbox/faults", json={"hold": "no spaces"}) as resp:
        assert resp.status == 400
    async with http.post(f"{sandbox.url}/__sandbox/gates/{'x' * 65}") as resp:
        assert resp.status == 400


async def test_sandbox_fault_after_acts_first_then_spoils_the_answer(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """``after``: the booking is made, then its answer is replaced by a 502, or the
    connection is reset: Repairy acted and the caller cannot tell."""
    data = await login(http, sandbox)
    workshop = next(iter(sandbox.state.data.workshops))
    body = {"workshopId": workshop, "startTime": "2027-03-01T09:00:00+11:00",
            "serviceType": "Logbook service",
            "customer": {"firstName": "Sam", "lastName": "Lee", "email": "sam@example.com",
                         "phone": "+61400000002"},
            "car": {"rego": "ABC123", "make": "Toyota", "model": "Corolla", "year": 2019}}
    await faults(http, sandbox, {"faults": [
        {"after": True, "status": 502, "path": "/bookings"},
        {"after": True, "reset": True, "path": "/bookings"}]})
    async with http.post(sandbox.url + "/bookings", json=body,
                         headers=api_headers(sandbox, data["accessToken"])) as resp:
        assert resp.status == 502
    assert len(sandbox.state.data.bookings) == 1
    with pytest.raises(aiohttp.ClientError):
        async with http.post(sandbox.url + "/bookings", json=body,
                             headers=api_headers(sandbox, data["accessToken"])) as resp:
            await resp.read()
    assert len(sandbox.state.data.bookings) == 2
    async with http.post(sandbox.url + "/__sandbox/faults", json={"after": "yes",
                                                                  "status": 502}) as resp:
        assert resp.status == 400
