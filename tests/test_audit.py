"""The audit trail over real sockets (gateway in-process, the sandbox): one line per mutating
request that reached a decision (forwarded, replayed, refused), when the upstream exchange
ends, also for an Idempotency-Key request whose caller left; what a line holds and never
holds; and ``serve``'s audit target apart from the logs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import GatewayServer
from gateway.proxy.audit import booking_id, key_hash
from gateway.sandbox import Sandbox
from tests.conftest import LogCapture
from tests.gateway_helpers import SERVICES, wait_until
from tests.sandbox_helpers import faults

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

WORKSHOP = "5f1a2b3c4d5e6f7a8b9c0d01"
BOOKING = {"workshopId": WORKSHOP, "startTime": "2030-01-02T09:00:00+00:00",
           "serviceType": "Logbook service",
           "customer": {"firstName": "Ana", "phone": "+61400000000", "email": "a@example.com"},
           "car": {"rego": "ABC123"}}


def audit_lines(cap: LogCapture) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in cap.lines if line.startswith("{")]
    return [d for d in docs if d.get("logger") == "audit"]


async def test_audit_one_line_per_mutating_request_with_its_decision(
        gateway: GatewayServer, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    key = "order-7f3a9c2e-0001"
    async with http.get(gateway.url + SERVICES) as resp:  # a read: no line
        assert resp.status == 200
    async with http.post(gateway.url + "/bookings", json=BOOKING,
                         headers={"Idempotency-Key": key, "X-Request-ID": "req-1"}) as resp:
        assert resp.status == 201
        made = (await resp.json())["data"]["id"]
    async with http.post(gateway.url + "/bookings", json=BOOKING,
                         headers={"Idempotency-Key": key}) as resp:  # the retry: replayed
        assert resp.status == 201 and resp.headers["Idempotent-Replayed"] == "true"
    async with http.put(gateway.url + f"/bookings/{made}", json={"notes": "n"}) as resp:
        assert resp.status == 200
    async with http.post(gateway.url + "/auth/token", json={}) as resp:  # refused by us
        assert resp.status == 403
    lines = audit_lines(log_capture)
    assert [(d["method"], d["route"], d["status"], d["code"], d["replayed"]) for d in lines] == [
        ("POST", "/bookings", 201, None, False),
        ("POST", "/bookings", 201, None, True),
        ("PUT", "/bookings/{id}", 200, None, False),
        ("POST", "other", None, "auth_route_forbidden", False)]
    first, replay, update, _ = lines
    assert first["request_id"] == "req-1" and first["booking_id"] == made
    assert first["idempotency_key_sha256"] == key_hash(key) == replay["idempotency_key_sha256"]
    assert replay["booking_id"] == made
    assert update["booking_id"] == made  # from its path (the answer streams back unread)
    assert all(d["client"] == "127.0.0.1" and d["duration_ms"] >= 0 for d in lines)
    text = "\n".join(json.dumps(d) for d in lines)
    assert key not in text and "Ana" not in text and "ABC123" not in text  # no body, no key


async def test_audit_an_idempotent_request_whose_caller_left_is_written_once_repairy_answers(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        log_capture: LogCapture) -> None:
    await faults(http, sandbox, {"hold": "slow-booking", "path": "/bookings", "count": 1})
    caller = asyncio.create_task(http.post(gateway.url + "/bookings", json=BOOKING,
                                           headers={"Idempotency-Key": "order-left-0001"}))
    await wait_until(lambda: sandbox.state.control.counters["api_requests"] >= 1)
    caller.cancel()  # the caller leaves while Repairy works on it
    await asyncio.gather(caller, return_exceptions=True)
    await wait_until(lambda: any('"status": 499' in line for line in log_capture.lines))
    assert audit_lines(log_capture) == []  # not with the access line: the exchange goes on
    async with http.post(f"{sandbox.url}/__sandbox/gates/slow-booking") as resp:
        assert resp.status == 200
    await wait_until(lambda: audit_lines(log_capture) != [])
    (line,) = audit_lines(log_capture)
    assert line["status"] == 201 and line["booking_id"] and line["code"] is None


async def test_audit_an_upstream_failure_has_no_status_and_its_code(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        log_capture: LogCapture) -> None:
    await faults(http, sandbox, {"reset": True, "path": "/bookings", "count": 3})
    async with http.post(gateway.url + "/bookings", json=BOOKING) as resp:
        assert resp.status == 502
    (line,) = audit_lines(log_capture)
    assert line["status"] is None and line["code"] == "upstream_invalid_response"


def test_audit_booking_ids_come_from_a_location_or_a_body_read_whole() -> None:
    assert booking_id("https://x/api/bookings/abc123?x=1", None) == "abc123"
    assert booking_id(None, b'{"data": {"id": "f00d"}}') == "f00d"
    assert booking_id(None, b'{"id": "bad id with spaces"}') is None
    assert booking_id(None, b"not json") is None and booking_id(None, None) is None
    assert booking_id(None, None, "/bookings/b00k/confirmed") == "b00k"


async def test_audit_serve_writes_to_its_own_target_at_once(
        sandbox: Sandbox, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """GATEWAY_AUDIT_LOG=<file>: serve's audit lines go there (never into the logs), each one
    written as its exchange ends."""
    from tests.fleet_helpers import GatewayProcess

    target = tmp_path / "audit.jsonl"
    gw = GatewayProcess(sandbox, {"GATEWAY_AUDIT_LOG": str(target)})
    await gw.start()
    try:
        await gw.ready(http)
        async with http.post(gw.url + "/bookings", json=BOOKING) as resp:
            assert resp.status == 201
        await wait_until(lambda: target.exists() and target.read_text().strip() != "",
                         within=2)
        (line,) = [json.loads(x) for x in target.read_text().splitlines()]
        assert line["logger"] == "audit" and line["status"] == 201
    finally:
        assert await gw.stop() == 0
    assert '"logger": "audit"' not in gw.log.read_text()
