"""Sandbox resource endpoints: catalog, availability, bookings, quotes, reminders."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import aiohttp
import pytest

from gateway.sandbox import Sandbox
from tests.sandbox_helpers import api_headers, login

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

WORKSHOP = "5f1a2b3c4d5e6f7a8b9c0d01"


class Api:
    """A tiny authenticated client for the sandbox."""

    def __init__(self, http: aiohttp.ClientSession, sb: Sandbox, token: str) -> None:
        self.http, self.sb, self.headers = http, sb, api_headers(sb, token)

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kw.pop("headers", {})}
        async with self.http.request(method, self.sb.url + path, headers=headers,
                                     **kw) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def api(sandbox: Sandbox, http: aiohttp.ClientSession) -> Api:
    data = await login(http, sandbox)
    return Api(http, sandbox, data["accessToken"])


def booking_body(catalog_id: str | None = None, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "workshopId": WORKSHOP,
        "startTime": "2026-12-01T09:00:00+11:00",
        "externalId": "partner-ref-1",
        "customer": {"firstName": "Sam", "lastName": "Lee", "email": "sam@example.com",
                     "phone": "+61400000002"},
        "car": {"rego": "ABC123", "make": "Toyota", "model": "Corolla", "year": 2019},
    }
    if catalog_id:
        body.update(serviceCategory="service", services=[{"catalogId": catalog_id}])
    else:
        body["serviceType"] = "Logbook service"
    body.update(over)
    return body


async def test_sandbox_catalog_lists_services_with_ids(api: Api) -> None:
    """The catalog has items with 24-hex ``_id`` and a known category; unknown workshop 404."""
    status, body = await api.call("GET", f"/workshops/{WORKSHOP}/services")
    assert status == 200
    items = body["data"]
    assert len(items) >= 4
    assert all(len(i["_id"]) == 24 and int(i["_id"], 16) >= 0 for i in items)
    assert {i["category"] for i in items} <= {"service", "tyres", "repair", "others"}
    status, body = await api.call("GET", "/workshops/000000000000000000000000/services")
    assert status == 404
    assert body["error"]["code"] == "workshop_not_found"


async def test_sandbox_availability_range_rules(api: Api) -> None:
    """Up to 7 days gives slots per day; 8 days, bad or reversed dates → 400."""
    start = date(2026, 12, 1)
    path = f"/workshops/{WORKSHOP}/availabilities"
    status, body = await api.call(
        "GET", path, params={"from": start.isoformat(),
                             "to": (start + timedelta(days=6)).isoformat()})
    assert status == 200
    assert len(body["data"]["days"]) == 7
    assert any(s["available"] for d in body["data"]["days"] for s in d["slots"])
    for params, code in [
        ({"from": start.isoformat(), "to": (start + timedelta(days=7)).isoformat()},
         "date_range_too_long"),
        ({"from": "2026-13-01", "to": "2026-12-02"}, "invalid_date"),
        ({"from": "2026-12-05", "to": "2026-12-01"}, "invalid_date_range"),
        ({}, "invalid_date"),
    ]:
        status, body = await api.call("GET", path, params=params)
        assert status == 400, params
        assert body["error"]["code"] == code


async def test_sandbox_booking_create_get_update(api: Api) -> None:
    """Create (beta form) → 201 with the Booking shape; get and update it."""
    _, cat = await api.call("GET", f"/workshops/{WORKSHOP}/services")
    status, body = await api.call("POST", "/bookings", json=booking_body(cat["data"][0]["_id"]))
    assert status == 201, body
    b = body["data"]
    for key in ("id", "code", "carId", "customerId", "workshopId", "externalId", "car",
                "customer"):
        assert key in b
    assert b["car"]["customerId"] == b["customerId"] and b["status"] == "pending"
    status, got = await api.call("GET", f"/bookings/{b['id']}")
    assert status == 200 and got["data"]["id"] == b["id"]
    status, upd = await api.call("PUT", f"/bookings/{b['id']}",
                                 json={"notes": "bring the spare key", "externalId": "ref-2"})
    assert status == 200
    assert upd["data"]["notes"] == "bring the spare key" and upd["data"]["externalId"] == "ref-2"
    status, err = await api.call("PUT", f"/bookings/{b['id']}", json={"status": "completed"})
    assert status == 422 and err["error"]["fields"] == {"status": "not editable"}
    status, _ = await api.call("GET", "/bookings/000000000000000000000000")
    assert status == 404


async def test_sandbox_booking_validation_errors(api: Api) -> None:
    """Bad email, missing fields, unknown catalog id → 422 with field errors; bad JSON → 400."""
    status, body = await api.call(
        "POST", "/bookings",
        json=booking_body(customer={"firstName": "Sam", "email": "not-an-email",
                                    "phone": "+61400000002"}))
    assert status == 422
    assert body["error"]["fields"]["customer.email"] == "not a valid email address"
    status, body = await api.call("POST", "/bookings", json={"workshopId": WORKSHOP})
    assert status == 422
    assert {"startTime", "customer", "car", "serviceType"} <= set(body["error"]["fields"])
    status, body = await api.call("POST", "/bookings", json=booking_body("f" * 24))
    assert status == 422 and "services[0].catalogId" in body["error"]["fields"]
    status, body = await api.call("POST", "/bookings", data=b"{",
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json"


async def test_sandbox_booking_status_transitions(api: Api) -> None:
    """Legal transitions pass; an illegal one is 409; an unknown status 400."""
    _, body = await api.call("POST", "/bookings", json=booking_body())
    bid = body["data"]["id"]
    status, body = await api.call("POST", f"/bookings/{bid}/completed")
    assert status == 409 and body["error"]["code"] == "illegal_transition"
    for step in ("confirmed", "in_progress", "completed"):
        status, body = await api.call("POST", f"/bookings/{bid}/{step}")
        assert status == 200 and body["data"]["status"] == step
    status, body = await api.call("POST", f"/bookings/{bid}/cancelled")
    assert status == 409
    status, body = await api.call("POST", f"/bookings/{bid}/teleported")
    assert status == 400 and body["error"]["code"] == "unknown_status"
    status, body = await api.call("PUT", f"/bookings/{bid}", json={"notes": "late"})
    assert status == 409 and body["error"]["code"] == "booking_closed"


async def test_sandbox_quote_and_reminders(api: Api) -> None:
    """Quote request → 201; reminder by phone → 201 and readable; no customer → 422."""
    status, body = await api.call("POST", "/quotes", json={
        "workshopId": WORKSHOP, "description": "Grinding noise when braking",
        "customer": {"firstName": "Kim", "email": "kim@example.com", "phone": "0400000003"}})
    assert status == 201 and body["data"]["status"] == "requested"
    status, body = await api.call("POST", "/quotes", json={"workshopId": WORKSHOP})
    assert status == 422
    status, body = await api.call("POST", "/reminders/services", json={
        "workshopId": WORKSHOP, "customerPhone": "+61400000004"})
    assert status == 201
    rid = body["data"]["id"]
    status, body = await api.call("GET", f"/reminders/services/{rid}")
    assert status == 200 and body["data"]["customerPhone"] == "+61400000004"
    status, body = await api.call("POST", "/reminders/services", json={"workshopId": WORKSHOP})
    assert status == 422 and "customerId" in body["error"]["fields"]
    status, body = await api.call("POST", "/reminders/services", json={
        "workshopId": WORKSHOP, "customerId": "5f1a2b3c4d5e6f7a8b9c0e01"})
    assert status == 201 and body["data"]["customerPhone"] == "+61400000001"


async def test_sandbox_unknown_route_is_json_404(api: Api) -> None:
    """An authenticated request to an unknown path gets a JSON 404."""
    status, body = await api.call("GET", "/no/such/thing")
    assert status == 404 and body["error"]["code"] == "not_found"
