"""Idempotency-Key over real sockets against the sandbox: one booking per key whatever the
caller does (leaves, retries, races, retries on another worker or replica), the right answer
for every repeat, and bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy.idempotency import (
    Record,
    parse_idempotency_routes,
    parse_key,
    protected,
    settle_status,
)
from gateway.proxy.idempotency_store import POLL_CAP, POLL_FLOOR, LocalStore, poll_delays
from gateway.sandbox import Sandbox
from gateway.settings import SettingsError
from tests.docs_helpers import python_block
from tests.fake_clock import FakeClock
from tests.fleet_helpers import GatewayProcess, RedisServer
from tests.gateway_helpers import settings_for, wait_until
from tests.sandbox_helpers import faults
from tests.test_proxy_failures import sample, started
from tests.test_proxy_retries import closed_port
from tests.test_sandbox_api import booking_body

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

KEYS = "billing=client-key-billing-0001,crm=client-key-crm-000002"


async def open_gate(http: aiohttp.ClientSession, sb: Sandbox, gate: str) -> None:
    """Let the requests the sandbox holds at ``gate`` (a ``hold`` fault) be answered."""
    async with http.post(f"{sb.url}/__sandbox/gates/{gate}") as resp:
        assert resp.status == 200


async def leave_while_held(http: aiohttp.ClientSession, sb: Sandbox, url: str, gate: str,
                           headers: dict[str, str]) -> None:
    """Send a booking and leave (close the connection) once Repairy holds it at ``gate``."""
    request = asyncio.ensure_future(http.post(url, json=booking_body(), headers=headers))
    await wait_until(lambda: sb.state.control.holding[gate] == 1)
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request


def bookings(sb: Sandbox) -> int:
    return len(sb.state.data.bookings)


def booking_posts(sb: Sandbox) -> int:
    """POSTs that reached the sandbox's booking routes (answered or not)."""
    return sum(1 for r in sb.state.control.requests
               if r["method"] == "POST" and r["path"].startswith("/bookings"))


async def book(http: aiohttp.ClientSession, url: str, key: str | None,
               body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    hdrs = {**({"Idempotency-Key": key} if key is not None else {}), **(headers or {})}
    async with http.post(url + "/bookings", json=body or booking_body(),
                         headers=hdrs) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def test_idempotency_caller_leaves_then_retry_gets_the_first_answer_one_booking(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """The caller gives up before Repairy answers; the gateway still completes the booking,
    and the retry with the same key gets that answer, not a second booking."""
    gw = await started(settings_for(sandbox))
    try:
        await faults(http, sandbox, {"hold": "first", "path": "/bookings", "count": 1})
        await leave_while_held(http, sandbox, gw.url + "/bookings", "first",
                               {"Idempotency-Key": "order-1", "X-Request-ID": "first-try"})
        await open_gate(http, sandbox, "first")  # the shielded request lands now
        await wait_until(lambda: sample(gw, "idempotency_settled_total", state="done") == 1)
        assert bookings(sandbox) == 1
        status, headers, body = await book(http, gw.url, "order-1")
        assert status == 201
        assert headers["Idempotent-Replayed"] == "true"
        assert headers["X-Request-ID"] == "first-try"
        assert body["data"]["id"] in sandbox.state.data.bookings
        assert bookings(sandbox) == 1
        assert sample(gw, "idempotency_requests_total", result="replayed") == 1
        assert sample(gw, "idempotency_settled_total", state="done") == 1
    finally:
        await gw.stop()


async def test_idempotency_retry_while_in_flight_waits_for_the_answer(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox))
    try:
        await faults(http, sandbox, {"latency": 0.5, "path": "/bookings", "count": 1})
        results = await asyncio.gather(*(book(http, gw.url, "same") for _ in range(10)))
        assert [s for s, _, _ in results] == [201] * 10
        assert len({b["data"]["id"] for _, _, b in results}) == 1
        assert sum(h.get("Idempotent-Replayed") == "true" for _, h, _ in results) == 9
        assert bookings(sandbox) == 1
    finally:
        await gw.stop()


async def test_idempotency_in_flight_past_the_wait_is_409(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, idempotency_wait="0.2s"))
    try:
        await faults(http, sandbox, {"hold": "slow", "path": "/bookings", "count": 1})
        first = asyncio.ensure_future(book(http, gw.url, "slow"))
        await wait_until(lambda: sandbox.state.control.holding["slow"] == 1)
        status, headers, body = await book(http, gw.url, "slow")
        assert status == 409 and body["error"]["code"] == "idempotency_in_flight"
        assert headers["Retry-After"] == "1"
        await open_gate(http, sandbox, "slow")
        assert (await first)[0] == 201
        assert bookings(sandbox) == 1
    finally:
        await gw.stop()


async def test_idempotency_same_key_other_body_is_422(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox))
    try:
        assert (await book(http, gw.url, "k1"))[0] == 201
        status, _, body = await book(http, gw.url, "k1", booking_body(notes="changed"))
        assert status == 422 and body["error"]["code"] == "idempotency_key_mismatch"
        assert bookings(sandbox) == 1
        # The same key on another route is another request too.
        async with http.post(gw.url + f"/bookings/{'0' * 24}/confirmed",
                             headers={"Idempotency-Key": "k1"}) as resp:
            assert resp.status == 422
    finally:
        await gw.stop()


async def test_idempotency_upstream_may_have_acted_repeats_get_outcome_unknown(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, read_timeout="0.3s"))
    try:
        await faults(http, sandbox, {"latency": 1.0, "path": "/bookings", "count": 1})
        assert (await book(http, gw.url, "timed-out"))[0] == 504
        await faults(http, sandbox, {"status": 502, "path": "/bookings", "count": 1})
        assert (await book(http, gw.url, "bad-gateway"))[0] == 502
        for key in ("timed-out", "bad-gateway"):
            status, headers, body = await book(http, gw.url, key)
            assert status == 502, key
            assert body["error"]["code"] == "outcome_unknown"
            assert headers["X-Repairy-Gateway-Error"] == "outcome_unknown"
        assert sample(gw, "idempotency_settled_total", state="unknown") == 2
        assert sample(gw, "idempotency_requests_total", result="outcome_unknown") == 2
    finally:
        await gw.stop()


async def test_idempotency_try_again_answers_are_not_kept(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """503, 429, 408 and 425 from Repairy: the key is free again, and the retry books."""
    gw = await started(settings_for(sandbox))
    try:
        for status in (503, 429, 408, 425):
            await faults(http, sandbox, {"status": status, "path": "/bookings", "count": 1})
            assert (await book(http, gw.url, f"busy-{status}"))[0] == status
            assert (await book(http, gw.url, f"busy-{status}"))[0] == 201
        assert bookings(sandbox) == 4
        assert sample(gw, "idempotency_settled_total", state="released") == 4
    finally:
        await gw.stop()


async def test_idempotency_unreachable_upstream_releases_the_key(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox))
    try:  # point the default profile's target at a closed port, then back
        lane = gw.state.lanes.default
        url, port = lane.base_url, closed_port()
        lane.base_url = url.with_port(port)
        status, _, body = await book(http, gw.url, "refused")
        assert status == 502 and body["error"]["code"] == "upstream_unreachable"
        lane.base_url = url
        assert (await book(http, gw.url, "refused"))[0] == 201
        assert bookings(sandbox) == 1
    finally:
        await gw.stop()


async def test_idempotency_too_large_answer_leaves_a_done_record(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, idempotency_max_body="100"))
    try:
        status, _, body = await book(http, gw.url, "big")
        assert status == 201 and body["data"]["id"]  # passed on whole, streamed
        status, _, err = await book(http, gw.url, "big")
        assert status == 409 and err["error"]["code"] == "idempotent_answer_not_kept"
        assert "201" in err["error"]["message"]
        assert bookings(sandbox) == 1
    finally:
        await gw.stop()


async def test_idempotency_keys_are_scoped_per_client(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, client_keys=KEYS))
    try:
        billing = {"X-Gateway-Key": "client-key-billing-0001"}
        crm = {"X-Gateway-Key": "client-key-crm-000002"}
        _, _, first = await book(http, gw.url, "shared", headers=billing)
        status, headers, second = await book(http, gw.url, "shared", headers=crm)
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert first["data"]["id"] != second["data"]["id"]
        assert (await book(http, gw.url, "shared", headers=billing))[1][
            "Idempotent-Replayed"] == "true"
        assert bookings(sandbox) == 2
    finally:
        await gw.stop()


async def test_idempotency_key_forms_and_limits(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox))
    try:
        assert (await book(http, gw.url, "plain-key"))[0] == 201
        status, headers, _ = await book(http, gw.url, '"plain-key"')  # a structured string
        assert status == 201 and headers["Idempotent-Replayed"] == "true"
        status, _, body = await book(http, gw.url, "x" * 256)
        assert status == 400 and body["error"]["code"] == "invalid_idempotency_key"
        assert (await book(http, gw.url, "x" * 255))[0] == 201
        assert (await book(http, gw.url, None))[0] == 201  # no key: no protection
        assert (await book(http, gw.url, None))[0] == 201
        assert bookings(sandbox) == 4
    finally:
        await gw.stop()


async def test_idempotency_routes_off_forwards_every_repeat(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, idempotency_routes="off"))
    try:
        for _ in range(2):
            assert (await book(http, gw.url, "ignored"))[0] == 201
        assert bookings(sandbox) == 2
        assert gw.state.idempotency is None
    finally:
        await gw.stop()


async def test_idempotency_two_replicas_sharing_redis_one_booking(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """A retry that lands on another replica is answered from the first one's result; the
    record in Redis is sealed with the store key (no booking data in clear)."""
    store_key = "k" * 40
    one = await started(settings_for(sandbox, redis_url=redis_server.url, store_key=store_key))
    two = await started(settings_for(sandbox, redis_url=redis_server.url, store_key=store_key))
    try:
        await faults(http, sandbox, {"latency": 0.4, "path": "/bookings", "count": 1})
        first = asyncio.ensure_future(book(http, one.url, "fleet-1"))
        await wait_until(lambda: booking_posts(sandbox) == 1)  # replica one holds the claim
        status, headers, body = await book(http, two.url, "fleet-1")  # waits for replica one
        assert status == 201 and headers["Idempotent-Replayed"] == "true"
        assert (await first)[2]["data"]["id"] == body["data"]["id"]
        assert bookings(sandbox) == 1
        client = await redis_server.client()
        try:
            values = [await client.get(k) async for k in client.scan_iter("*:idem:*")]
        finally:
            await client.aclose()
        assert len(values) == 1
        _, _, sealed = values[0].partition("|")
        assert sealed.startswith("gcm:") and body["data"]["id"] not in values[0]
    finally:
        await one.stop()
        await two.stop()


async def test_idempotency_workers_share_the_supervisors_store(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """GATEWAY_WORKERS=2 without Redis: repeats on either worker (each caller's connection
    pinned to one) are answered from the supervisor's store (a 100 KiB answer crosses the
    channel), one upstream call in all."""
    big = json.dumps({"success": True, "data": {"id": "b" * 24, "pad": "x" * 100_000}})
    gw = GatewayProcess(sandbox, {"GATEWAY_WORKERS": "2"})
    await gw.start()
    sessions: list[aiohttp.ClientSession] = []
    try:
        await gw.ready(http)
        sessions = [await gw.pinned(http, slot) for slot in (0, 1, 0, 1)]
        await faults(http, sandbox, {"status": 201, "body": big, "path": "/bookings",
                                     "count": 1})
        before = booking_posts(sandbox)

        async def stream(session: aiohttp.ClientSession) -> list[tuple[int, dict[str, str],
                                                                        Any]]:
            return [await book(session, gw.url, "w-1") for _ in range(10)]

        results = [r for part in await asyncio.gather(*(stream(x) for x in sessions))
                   for r in part]
        assert {s for s, _, _ in results} == {201}
        assert {b["data"]["id"] for _, _, b in results} == {"b" * 24}
        assert sum(h.get("Idempotent-Replayed") == "true" for _, h, _ in results) == 39
        assert booking_posts(sandbox) - before == 1

        async def both_counted() -> bool:  # the workers' metrics pushes
            return all(w["alive"] and w["requests"] >= 21 for w in await gw.workers(http))

        await wait_until(both_counted)
    finally:
        for session in sessions:
            await session.close()
        assert await gw.stop() == 0


async def test_idempotency_a_dead_workers_claims_become_unknown(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A worker killed mid-request: the upstream may have acted, so a repeat gets 502
    outcome_unknown at once (not 409 after waiting, and never a second send)."""
    gw = GatewayProcess(sandbox, {"GATEWAY_WORKERS": "2"})
    await gw.start()
    try:
        await gw.ready(http)
        await faults(http, sandbox, {"latency": 3.0, "path": "/bookings", "count": 1})
        posts = booking_posts(sandbox)
        first = asyncio.ensure_future(book(http, gw.url, "doomed"))
        await wait_until(lambda: booking_posts(sandbox) == posts + 1)  # it was sent
        pids = [w["pid"] for w in await gw.workers(http)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(aiohttp.ClientError):
            await first
        before = booking_posts(sandbox)
        status, _, body = await book(http, gw.url, "doomed")
        assert status == 502 and body["error"]["code"] == "outcome_unknown"
        assert booking_posts(sandbox) == before
    finally:
        assert await gw.stop() == 0


async def test_idempotency_memory_stays_within_limits_under_a_key_flood(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox, idempotency_max_bytes="64KiB",
                                    idempotency_max_body="8KiB", idempotency_max_entries="40"))
    try:
        sem = asyncio.Semaphore(20)

        async def one(i: int) -> int:
            async with sem:
                return (await book(http, gw.url, f"flood-{i}"))[0]

        statuses = await asyncio.gather(*(one(i) for i in range(300)))
        assert set(statuses) == {201}
        assert sample(gw, "idempotency_entries") <= 40
        assert 0 < sample(gw, "idempotency_bytes") <= 64 * 1024
        assert sample(gw, "idempotency_evictions_total") >= 260
    finally:
        await gw.stop()


async def test_idempotency_upstream_401_is_replayed_with_a_new_token_and_kept(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox))
    try:
        await faults(http, sandbox, {"status": 401, "path": "/bookings", "count": 1})
        status, headers, first = await book(http, gw.url, "after-401")
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert sample(gw, "requests_replayed_total", reason="upstream_401") == 1
        status, headers, again = await book(http, gw.url, "after-401")
        assert headers["Idempotent-Replayed"] == "true"
        assert again["data"]["id"] == first["data"]["id"] and bookings(sandbox) == 1
    finally:
        await gw.stop()


@pytest.mark.parametrize("fault", [{"status": 502}, {"drop": True, "length": 5000}],
                         ids=["then-502", "then-cut"])
async def test_idempotency_caller_leaves_and_upstream_then_fails_outcome_unknown(
        sandbox: Sandbox, http: aiohttp.ClientSession, fault: dict[str, Any]) -> None:
    """The caller left; the shielded request then fails in a way Repairy may have acted on:
    the repeat is told so, and nothing leaks (an unretrieved exception fails the test)."""
    gw = await started(settings_for(sandbox))
    try:
        await faults(http, sandbox, {"hold": "left", "path": "/bookings", "count": 1,
                                     **fault})
        await leave_while_held(http, sandbox, gw.url + "/bookings", "left",
                               {"Idempotency-Key": "left"})
        await open_gate(http, sandbox, "left")
        await wait_until(lambda: sample(gw, "idempotency_settled_total", state="unknown") == 1)
        status, _, body = await book(http, gw.url, "left")
        assert status == 502 and body["error"]["code"] == "outcome_unknown"
        assert sample(gw, "idempotency_settled_total", state="unknown") == 1
        assert gw.state.upstream.slots.in_use == 0
    finally:
        await gw.stop()


async def test_idempotency_shutdown_waits_for_a_leader_whose_caller_left(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await started(settings_for(sandbox))
    await faults(http, sandbox, {"hold": "drain", "path": "/bookings", "count": 1})
    await leave_while_held(http, sandbox, gw.url + "/bookings", "drain",
                           {"Idempotency-Key": "drain"})
    store = gw.state.idempotency
    assert isinstance(store, LocalStore)
    stopping = asyncio.ensure_future(gw.stop())  # drains: the leader finishes its booking
    await wait_until(lambda: gw.state.draining)
    assert not stopping.done()
    await open_gate(http, sandbox, "drain")
    await stopping
    assert bookings(sandbox) == 1
    assert (await store.claim("x", Record.claim("fp", "r", 1e12), 60)) is None
    assert len(store) == 2  # the settled key, and the probe


# -- the policy and the store, without sockets ---------------------------------------------


@pytest.mark.unit
def test_idempotency_settings_parse_routes_and_name_bad_ones() -> None:
    rules = parse_idempotency_routes("POST /bookings, PUT /bookings/*")
    assert [(r.method, r.pattern) for r in rules] == [("POST", "/bookings"),
                                                       ("PUT", "/bookings/*")]
    post, put = (rules[:1], rules[1:])
    assert protected(post, "POST", "/bookings") and protected(post, "POST", "/bookings/")
    assert not protected(post, "PUT", "/bookings")
    assert not protected(post, "POST", "/bookingsx")
    assert protected(put, "PUT", "/bookings/abc") and protected(put, "PUT", "/bookings/abc/")
    assert not protected(put, "PUT", "/bookings/abc/def")
    assert not protected(put, "PUT", "/bookings/")
    assert parse_idempotency_routes("off") == ()
    with pytest.raises(SettingsError) as info:
        settings_for("http://127.0.0.1:1", idempotency_routes="GET /bookings")
    assert info.value.setting == "GATEWAY_IDEMPOTENCY_ROUTES"


@pytest.mark.unit
def test_idempotency_key_parsing() -> None:
    assert parse_key('"a \\"quoted\\" key"') == 'a "quoted" key'
    assert parse_key("  bare-key ") == "bare-key"
    for bad in ("", '""', "x" * 256):
        with pytest.raises(Exception, match="Idempotency-Key"):
            parse_key(bad)


@pytest.mark.unit
def test_idempotency_what_each_status_makes_of_the_key() -> None:
    assert [settle_status(s) for s in (200, 201, 302, 400, 404, 409, 422)] == ["done"] * 7
    assert [settle_status(s) for s in (401, 408, 425, 429, 503)] == [None] * 5
    assert [settle_status(s) for s in (500, 502, 504)] == ["unknown"] * 3


@pytest.mark.unit
def test_idempotency_record_survives_its_wire_form() -> None:
    record = Record.claim("fp", "rid", 12.5).settled("done", 201, "Created",
                                                     (("Content-Type", "application/json"),),
                                                     b"\x00\xffbody")
    assert Record.from_dict(json.loads(json.dumps(record.to_dict()))) == record


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 5000), st.booleans()),
                max_size=200),
       st.integers(1000, 50_000), st.integers(1, 50))
def test_idempotency_local_store_never_exceeds_its_limits(
        ops: list[tuple[int, int, bool]], max_bytes: int, max_entries: int) -> None:
    """Whatever is claimed and settled, kept answers stay within the bytes and entries
    limits, and claims are never evicted (their number is itself bounded)."""

    async def run() -> None:
        store = LocalStore(max_bytes=max_bytes, max_entries=max_entries, clock=FakeClock())
        claims: dict[str, Record] = {}
        for key_no, body_size, settle in ops:
            key = f"k{key_no}"
            if settle and key in claims:
                await store.finish(key, claims.pop(key).settled("done", 201, "",
                                                                (), b"x" * body_size), 60)
            elif key not in claims:
                claim = Record.claim("fp", "rid", 1e12)
                try:
                    if await store.claim(key, claim, 60) is None:
                        claims[key] = claim
                except Exception:
                    assert len(claims) >= max_entries
            done_bytes = store.stored_bytes - sum(r.size for r in claims.values())
            assert done_bytes <= max_bytes
            assert len(store) - len(claims) <= max_entries
            assert all(store._get(k) is claims[k] for k in claims)

    asyncio.run(run())


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.floats(0, 3600, allow_nan=False))
def test_idempotency_polling_a_shared_store_is_floored_capped_and_bounded(
        within: float) -> None:
    delays = list(poll_delays(within))
    assert sum(delays) <= within + 1e-9
    assert all(d <= POLL_CAP for d in delays)
    assert all(d >= POLL_FLOOR for d in delays[:-1])
    assert len(delays) <= within / POLL_FLOOR + 1
    assert len(delays) <= 7 + within / POLL_CAP  # doubling to the cap, then at the cap


async def test_idempotency_readme_safe_booking_example_books_once(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """The README's safe-booking code, against the gateway: its first attempt times out on
    the caller's side and a 503 follows; it still ends with exactly one booking."""
    book_once = python_block("README.md", "safe-booking")["book"]
    gw = await started(settings_for(sandbox))
    try:
        await faults(http, sandbox, {"latency": 0.6, "path": "/bookings", "count": 1})
        booking = await book_once(gw.url, booking_body(), timeout=0.3)
        assert booking["id"] in sandbox.state.data.bookings
        assert bookings(sandbox) == 1
        assert sample(gw, "idempotency_requests_total", result="replayed") == 1
        await faults(http, sandbox, {"status": 503, "path": "/bookings", "count": 1})
        second = await book_once(gw.url, booking_body(startTime="2026-12-02T09:00:00+11:00"))
        assert second["id"] != booking["id"] and bookings(sandbox) == 2
    finally:
        await gw.stop()
