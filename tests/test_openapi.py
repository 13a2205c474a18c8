"""The OpenAPI 3.1 description of the sandbox's API: a valid document, served by the sandbox and
through the gateway, committed as docs/openapi.json, and true to the sandbox's real answers
(each checked with openapi-core, request and response, success and error alike)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_spec_validator import validate

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox
from gateway.sandbox.openapi import OPENAPI_PATH, openapi
from tests.sandbox_helpers import api_headers, login

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
WORKSHOP = "5f1a2b3c4d5e6f7a8b9c0d01"


@pytest.mark.unit
def test_openapi_document_is_valid_3_1_and_committed() -> None:
    doc = openapi()
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == doc, "regenerate docs/openapi.json from gateway.sandbox.openapi"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                assert body.get("examples"), f"{method.upper()} {path} has no example body"


async def test_openapi_served_by_the_sandbox_and_through_the_gateway(
        sandbox: Sandbox, gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    async with http.get(sandbox.url + OPENAPI_PATH) as resp:  # no token needed
        assert resp.status == 200
        assert await resp.json() == openapi()
    async with http.get(gateway.url + OPENAPI_PATH) as resp:  # what the demo serves
        assert resp.status == 200
        assert await resp.json() == openapi()


class Checker:
    """Calls the sandbox for real and checks each exchange against the document."""

    def __init__(self, http: aiohttp.ClientSession, sb: Sandbox, headers: dict[str, str]) -> None:
        self.http, self.sb, self.headers = http, sb, headers
        self.spec = OpenAPI.from_dict(openapi())
        self.seen: set[tuple[str, str, int]] = set()

    async def call(self, method: str, path: str, pattern: str, expect: int,
                   body: Any = None, query: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        sent = {**self.headers, **(headers or {})}
        if data is not None:
            sent["Content-Type"] = "application/json"
        async with self.http.request(method, self.sb.url + path, data=data, params=query,
                                     headers=sent) as resp:
            raw = await resp.read()
            status, content_type = resp.status, resp.content_type
            answer_headers = dict(resp.headers)
        assert status == expect, (method, path, status, raw[:300])
        request = MockRequest(self.sb.url, method.lower(), path, args=query, headers=sent,
                              data=data)  # openapi-core finds the path template itself
        if expect < 400:
            self.spec.validate_request(request)
        self.spec.validate_response(request, MockResponse(raw, status_code=status,
                                                          headers=answer_headers,
                                                          content_type=content_type))
        self.seen.add((method, pattern, status))
        return json.loads(raw)


async def test_openapi_matches_the_sandboxs_real_answers(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    grant = await login(http, sandbox)
    check = Checker(http, sandbox, api_headers(sandbox, grant["accessToken"]))
    cfg = sandbox.state.config
    auth = {"Authorization": ""}
    await check.call("POST", "/auth/token", "/auth/token", 200,
                     {"appKey": cfg.app_key, "appSecret": cfg.app_secret}, headers=auth)
    await check.call("POST", "/auth/token", "/auth/token", 401,
                     {"appKey": cfg.app_key, "appSecret": "wrong"}, headers=auth)
    fresh = await login(http, sandbox)
    await check.call("POST", "/auth/refresh", "/auth/refresh", 200,
                     {"refreshToken": fresh["refreshToken"]},
                     headers={"Authorization": f"Bearer {fresh['accessToken']}"})
    check.headers = api_headers(sandbox, (await login(http, sandbox))["accessToken"])
    services = f"/workshops/{WORKSHOP}/services"
    catalog = (await check.call("GET", services, "/workshops/{workshopId}/services", 200))["data"]
    await check.call("GET", f"/workshops/{'f' * 24}/services",
                     "/workshops/{workshopId}/services", 404)
    avail = "/workshops/{workshopId}/availabilities"
    await check.call("GET", f"/workshops/{WORKSHOP}/availabilities", avail, 200,
                     query={"from": "2026-12-01", "to": "2026-12-03"})
    await check.call("GET", f"/workshops/{WORKSHOP}/availabilities", avail, 400,
                     query={"from": "2026-12-01", "to": "2026-12-31"})
    example = openapi()["paths"]["/bookings"]["post"]["requestBody"]["content"][
        "application/json"]["examples"]
    legacy = (await check.call("POST", "/bookings", "/bookings", 201,
                               example["legacy"]["value"]))["data"]
    beta = dict(example["catalog"]["value"], services=[{"catalogId": catalog[0]["_id"]}],
                startTime="2026-12-01T10:00:00+11:00")
    await check.call("POST", "/bookings", "/bookings", 201, beta)
    await check.call("POST", "/bookings", "/bookings", 422, {"workshopId": WORKSHOP})
    one = "/bookings/{bookingId}"
    await check.call("GET", f"/bookings/{legacy['id']}", one, 200)
    await check.call("GET", f"/bookings/{'0' * 24}", one, 404)
    await check.call("PUT", f"/bookings/{legacy['id']}", one, 200,
                     {"startTime": "2026-12-02T10:00:00+11:00", "notes": "late"})
    await check.call("PUT", f"/bookings/{legacy['id']}", one, 422, {"status": "completed"})
    status = "/bookings/{bookingId}/{status}"
    await check.call("POST", f"/bookings/{legacy['id']}/confirmed", status, 200)
    await check.call("POST", f"/bookings/{legacy['id']}/pending", status, 409)
    await check.call("POST", f"/bookings/{legacy['id']}/cancelled", status, 200)
    await check.call("PUT", f"/bookings/{legacy['id']}", one, 409, {"notes": "too late"})
    quote = openapi()["paths"]["/quotes"]["post"]["requestBody"]["content"][
        "application/json"]["examples"]["quote"]["value"]
    await check.call("POST", "/quotes", "/quotes", 201, quote)
    await check.call("POST", "/quotes", "/quotes", 422, {"workshopId": WORKSHOP})
    reminder = (await check.call("POST", "/reminders/services", "/reminders/services", 201,
                                 {"workshopId": WORKSHOP,
                                  "customerPhone": "+61400000003"}))["data"]
    await check.call("POST", "/reminders/services", "/reminders/services", 422,
                     {"workshopId": WORKSHOP})
    by_id = "/reminders/services/{reminderId}"
    await check.call("GET", f"/reminders/services/{reminder['id']}", by_id, 200)
    await check.call("GET", f"/reminders/services/{'0' * 24}", by_id, 404)
    await check.call("GET", services, "/workshops/{workshopId}/services", 401,
                     headers={"Authorization": "Bearer nope"})
    await check.call("GET", services, "/workshops/{workshopId}/services", 403,
                     headers={"X-Partner-ID": "someone-else"})
    documented = {(m.upper(), p) for p, ops in openapi()["paths"].items() for m in ops}
    assert documented == {(m, p) for m, p, _ in check.seen}, "every operation is exercised"


async def test_openapi_describes_the_gateways_own_answers(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Answers the gateway makes itself validate too: a wrong client key (401), a refused
    Idempotency-Key repeat (422), an upstream the gateway cannot reach (502), no token (503)."""
    from tests.gateway_helpers import settings_for, wait_until
    from tests.test_sandbox_api import booking_body

    spec = OpenAPI.from_dict(openapi())
    keys = {"X-Gateway-Key": "client-key-orders-0001"}
    seen = []

    async def check(gw: GatewayServer, method: str, path: str, expect: int,
                    headers: dict[str, str], body: Any = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        sent = {**headers, **({"Content-Type": "application/json"} if data else {})}
        async with http.request(method, gw.url + path, data=data, headers=sent) as resp:
            raw, status = await resp.read(), resp.status
            answer = dict(resp.headers)
        assert status == expect, raw[:300]
        request = MockRequest(gw.url, method.lower(), path, headers=sent, data=data)
        spec.validate_response(request, MockResponse(raw, status_code=status, headers=answer))
        seen.append((status, answer.get("X-Repairy-Gateway-Error")))

    async with GatewayServer(settings_for(sandbox, client_keys="orders=client-key-orders-0001")
                             ) as gw:
        await wait_until(gw.state.tokens.ready)
        await check(gw, "GET", f"/workshops/{WORKSHOP}/services", 401, {})
        await check(gw, "POST", "/bookings", 201, {**keys, "Idempotency-Key": "k"},
                    booking_body())
        await check(gw, "POST", "/bookings", 422, {**keys, "Idempotency-Key": "k"},
                    booking_body(notes="other"))
    async with GatewayServer(settings_for("http://127.0.0.1:9", token_wait_timeout="0.1s")
                             ) as gw:
        await check(gw, "GET", f"/workshops/{WORKSHOP}/services", 503, {})
    assert [code for _, code in seen] == ["client_unauthenticated", None,
                                          "idempotency_key_mismatch", "token_unavailable"]
