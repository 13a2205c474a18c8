"""Idempotency-Key records tell the truth: a claim whose reply was lost is released by its
owner, a claim that never sent is taken over once its lease passes (a sending one becomes
``unknown``), every key leaves 409 within the wait plus the leader's deadline plus 5 s, and
records written by the previous release (format 1, 1ca7d9a) and by this one are read by both
as they mean, never as absent. Real redis-server; the lease arithmetic on a fake clock."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.coordination.sealing import seal
from gateway.proxy.idempotency import (
    LEASE_MARGIN,
    RECORD_VERSION,
    IdempotencyUnavailable,
    Record,
    fingerprint,
    leader_deadline,
    storage_key,
)
from gateway.proxy.idempotency_redis import RedisStore
from gateway.proxy.idempotency_store import POLICY_RECHECK, LocalStore
from gateway.sandbox import Sandbox
from gateway.settings import SettingsError
from tests.fake_clock import FakeClock
from tests.fleet_helpers import RedisServer
from tests.gateway_helpers import settings_for, wait_until
from tests.redis_proxy import ReplyDropper
from tests.sandbox_helpers import faults
from tests.test_idempotency import book, booking_posts, bookings
from tests.test_proxy_failures import sample, started
from tests.test_sandbox_api import booking_body

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


def v1_from_dict(doc: dict[str, Any]) -> tuple[Any, ...]:
    """1ca7d9a's ``Record.from_dict`` (format 1), verbatim but for returning a tuple: what
    the previous release makes of a record this one wrote."""
    state = doc["s"]
    if state not in ("in_flight", "done", "not_kept", "unknown"):
        raise ValueError("unknown record state")
    return (state, str(doc["fp"]), str(doc["o"]), str(doc["rid"]),
            float(doc.get("l", 0.0)), int(doc.get("st", 0)), str(doc.get("r", "")),
            tuple((str(k), str(v)) for k, v in doc.get("h", ())),
            base64.b64decode(doc.get("b", "")))


def v1_value(owner: str, key: str, doc: dict[str, Any]) -> str:
    """A Redis value as 1ca7d9a wrote it (no store key): ``owner|plain:<JSON>``."""
    return f"{owner}|{seal(None, json.dumps(doc).encode(), key.encode())}"


def booking_fingerprint() -> str:
    """The fingerprint of :func:`book`'s request (aiohttp sends ``json.dumps`` of it)."""
    return fingerprint("POST", "/bookings", json.dumps(booking_body()).encode())


def gateway_key(sb: Sandbox, key: str) -> str:
    s = settings_for(sb)
    return storage_key(f"{s.partner.base_url}|{s.partner.partner_id}", "anonymous", key)


# -- the lease, on a fake clock ------------------------------------------------------------

@pytest.mark.unit
@settings(max_examples=100, deadline=None)
@given(st.floats(0.1, 60), st.floats(0.1, 60), st.floats(0.1, 600), st.booleans(),
       st.floats(0, 2000))
async def test_records_a_claim_past_its_lease_is_free_or_unknown_never_409(
        token_wait: float, connect: float, total: float, sent: bool, later: float) -> None:
    """Within the lease the key is in flight; past it, a claim that never sent is free again
    (a repeat leads) and one that was sending is ``unknown`` (502), never still in flight."""
    clock = FakeClock()
    store = LocalStore(max_bytes=1 << 20, max_entries=10, clock=clock)
    lease = leader_deadline(token_wait, connect, total) + LEASE_MARGIN
    claim = Record.claim("fp", "rid", clock.time() + lease)
    assert await store.claim("k", claim, 86400) is None
    if sent:
        await store.sending("k", claim)
    await clock.advance(later)
    found = await store.claim("k", Record.claim("fp", "r2", clock.time() + lease), 86400)
    if later < lease:
        assert found is not None and found.state == "in_flight"
    elif sent:
        assert found is not None and found.state == "unknown"
    else:
        assert found is None  # taken over: nothing was ever sent


async def test_records_redis_claims_lease_sending_and_takeover(
        redis_server: RedisServer) -> None:
    clock = FakeClock()
    client = await redis_server.client()
    store = RedisStore(client, prefix="t", store_key=None, clock=clock)
    try:
        abandoned = Record.claim("fp", "a", clock.time() + 10)
        assert await store.claim("k1", abandoned, 3600) is None
        busy = await store.claim("k1", Record.claim("fp", "b", clock.time() + 10), 3600)
        assert busy is not None and busy.owner == abandoned.owner and not busy.sending
        await clock.advance(11)
        taker = Record.claim("fp", "c", clock.time() + 10)
        assert await store.claim("k1", taker, 3600) is None  # nothing was sent: taken over
        with pytest.raises(Exception, match="claim was lost"):
            await store.sending("k1", abandoned)  # the old leader may not send any more
        await store.sending("k1", taker)
        held = await store.claim("k1", Record.claim("fp", "d", clock.time() + 10), 3600)
        assert held is not None and held.owner == taker.owner and held.sending
        await clock.advance(11)
        lapsed = await store.claim("k1", Record.claim("fp", "e", clock.time() + 10), 3600)
        assert lapsed is not None and lapsed.owner == taker.owner  # never taken over
        assert lapsed.lapsed(clock.time()).state == "unknown"
        assert await client.pttl("t:idem:k1") > 3_000_000  # the record outlives its leader
    finally:
        await client.aclose()


# -- formats across releases ---------------------------------------------------------------

@pytest.mark.unit
def test_records_formats_across_releases() -> None:
    done = Record.claim("fp", "rid", 12.5).settled("done", 201, "Created",
                                                   (("Content-Type", "application/json"),),
                                                   b'{"id": 1}')
    sending = Record.claim("fp", "rid", 99.0).marked_sending()
    # This release reads its own, and 1ca7d9a reads it as it means (ignoring v and snd).
    for record in (done, sending, Record.claim("fp", "rid", 5.0)):
        doc = json.loads(json.dumps(record.to_dict()))
        assert doc["v"] == RECORD_VERSION
        assert Record.from_dict(doc) == record
        old = v1_from_dict(doc)
        assert (old[0], old[2], old[4], old[5], old[8]) == (
            record.state, record.owner, record.lease_until, record.status, record.body)
    # A format 1 record: an in-flight one may have been sending (it did not say).
    v1 = {"s": "in_flight", "fp": "fp", "o": "own", "rid": "r", "l": 50.0}
    assert Record.from_dict(v1).sending
    # A format this release does not know: in flight until its lease, else unknown.
    future = {"v": RECORD_VERSION + 1, "s": "in_flight", "fp": "fp", "o": "o", "rid": "r",
              "l": 50.0, "new": {"x": 1}}
    read = Record.from_dict(future)
    assert read.state == "in_flight" and read.sending and read.in_flight_at(49.0)
    assert read.lapsed(50.0).state == "unknown"
    for state in ("done", "something-new"):
        other = Record.from_dict({**future, "s": state, "b": "eHl6"})
        assert other.state == "unknown" and other.body == b""


async def test_records_the_previous_releases_answer_is_replayed(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """A booking answered before the upgrade (a format 1 record in Redis, written as 1ca7d9a
    wrote it) is replayed after it: a retry across the upgrade does not book again."""
    key = gateway_key(sandbox, "before-upgrade")
    body = json.dumps({"success": True, "data": {"id": "old-booking"}}).encode()
    client = await redis_server.client()
    try:
        await client.set(f"repairy-gateway:idem:{key}", v1_value("owner1", key, {
            "s": "done", "fp": booking_fingerprint(), "o": "owner1", "rid": "old-request",
            "st": 201,
            "r": "Created", "h": [["Content-Type", "application/json"]],
            "b": base64.b64encode(body).decode()}), px=60_000)
    finally:
        await client.aclose()
    gw = await started(settings_for(sandbox, redis_url=redis_server.url))
    try:
        posts = booking_posts(sandbox)
        status, headers, answer = await book(http, gw.url, "before-upgrade")
        assert status == 201 and headers["Idempotent-Replayed"] == "true"
        assert headers["X-Request-ID"] == "old-request"
        assert answer["data"]["id"] == "old-booking"
        assert booking_posts(sandbox) == posts
    finally:
        await gw.stop()


# -- lost replies, against a real Redis ----------------------------------------------------

@pytest.mark.parametrize("marker", [b"NX", b"PTTL"], ids=["claim", "mark-sending"])
async def test_records_a_lost_redis_reply_is_released_by_owner_and_never_unknown(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer,
        marker: bytes) -> None:
    """Redis applies the claim (or the mark "sending") but its reply is lost, and so is the
    reply to the client's one retry of it: the caller gets 503 and nothing is sent; the claim
    is released by its owner, so the retry books at once (not 409 for minutes, then 502
    outcome_unknown for a day)."""
    proxy = ReplyDropper(redis_server.port)
    await proxy.start()
    gw = await started(settings_for(sandbox, redis_url=proxy.url, idempotency_wait="1s"))
    try:
        posts = booking_posts(sandbox)
        proxy.drop_reply_to(marker, count=2)
        status, _, answer = await book(http, gw.url, "lost-reply")
        assert proxy.dropped == 2
        assert status == 503 and answer["error"]["code"] == "idempotency_unavailable"
        assert booking_posts(sandbox) == posts  # nothing was sent
        status, headers, answer = await book(http, gw.url, "lost-reply")
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert booking_posts(sandbox) == posts + 1 and bookings(sandbox) == 1
        assert sample(gw, "idempotency_settled_total", state="unknown") == 0
    finally:
        await gw.stop()
        await proxy.stop()


async def test_records_a_leader_that_left_without_sending_frees_its_key(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """A claim left in Redis by a gateway that died before sending (its lease ran out) is
    taken over by the retry, which books; one that was sending gets 502 outcome_unknown."""
    gw = await started(settings_for(sandbox, redis_url=redis_server.url))
    client = await redis_server.client()
    try:
        fp_source = booking_fingerprint()
        now = gw.state.clock.time()
        for name, sending in (("never-sent", False), ("was-sending", True)):
            key = gateway_key(sandbox, name)
            record = Record("in_flight", fp_source, f"dead-{name}", "dead-request",
                            now - 1, sending=sending)
            await client.set(f"repairy-gateway:idem:{key}",
                             v1_value(record.owner, key, record.to_dict()), px=60_000)
        posts = booking_posts(sandbox)
        status, headers, _ = await book(http, gw.url, "never-sent")
        assert status == 201 and "Idempotent-Replayed" not in headers
        status, _, answer = await book(http, gw.url, "was-sending")
        assert status == 502 and answer["error"]["code"] == "outcome_unknown"
        assert booking_posts(sandbox) == posts + 1
    finally:
        await client.aclose()
        await gw.stop()


# -- what start-up refuses -----------------------------------------------------------------

def test_records_settings_bound_every_claim(sandbox: Sandbox) -> None:
    with pytest.raises(SettingsError) as info:
        settings_for(sandbox, idempotency_ttl="2s")
    assert info.value.setting == "GATEWAY_IDEMPOTENCY_TTL"
    assert "must be at least" in str(info.value)
    with pytest.raises(SettingsError) as info:
        settings_for(sandbox, total_timeout="0")
    assert info.value.setting == "GATEWAY_TOTAL_TIMEOUT"
    off = settings_for(sandbox, total_timeout="0", idempotency_routes="off")
    assert off.upstream.total_timeout == 0
    short = settings_for(sandbox, idempotency_ttl="8s", idempotency_wait="0.5s",
                         token_wait_timeout="0.5s", connect_timeout="0.5s",
                         total_timeout="1.5s")  # 0.5 + 0.5 + 0.5 + 1.5 + the 5 s margin
    assert short.idempotency.idempotency_ttl == 8.0
    with pytest.raises(SettingsError):
        settings_for(sandbox, idempotency_ttl="7.9s", idempotency_wait="0.5s",
                     token_wait_timeout="0.5s", connect_timeout="0.5s", total_timeout="1.5s")
    with pytest.raises(SettingsError) as info:
        settings_for(sandbox, workers="33")
    assert info.value.setting == "GATEWAY_WORKERS"
    assert settings_for(sandbox, workers="32").server.workers == 32


async def test_records_routes_match_as_the_target_check_compares(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """``/Bookings``, ``/bookings;v=1`` and ``/bookings//`` are the protected route: an
    upstream that ignores case, path parameters or doubled slashes cannot be reached twice
    past the Idempotency-Key."""
    gw = await started(settings_for(sandbox))
    try:
        for path in ("/Bookings", "/bookings;v=1", "/bookings/", "/bookings/x//confirm"):
            posts = sum(1 for r in sandbox.state.control.requests if r["method"] == "POST")
            statuses = []
            for _ in range(2):
                async with http.post(gw.url + path, json=booking_body(),
                                     headers={"Idempotency-Key": f"norm-{path}"}) as resp:
                    statuses.append((resp.status, resp.headers.get("Idempotent-Replayed")))
            assert statuses[1][1] == "true", (path, statuses)
            assert sum(1 for r in sandbox.state.control.requests
                       if r["method"] == "POST") == posts + 1
    finally:
        await gw.stop()


async def test_records_a_leader_is_cut_off_at_its_deadline(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """An upstream that never answers: the leader ends at its deadline with 504, the key is
    unknown (it was sent), and the repeat hears so at once."""
    gw = await started(settings_for(sandbox, idempotency_ttl="10s", idempotency_wait="0.5s",
                                    token_wait_timeout="0.5s", connect_timeout="0.5s",
                                    total_timeout="1s", read_timeout="30s",
                                    retry_attempts="1"))
    try:
        await faults(http, sandbox, {"latency": 5.0, "path": "/bookings", "count": 1})
        status, _, answer = await book(http, gw.url, "hung")
        assert status == 504
        status, _, answer = await book(http, gw.url, "hung")
        assert status == 502 and answer["error"]["code"] == "outcome_unknown"
    finally:
        await gw.stop()


async def test_records_a_leader_cut_off_after_sending_leaves_the_key_unknown(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """The store is slow to mark the claim "sending" (1.5 s), so the leader's own deadline,
    not the request's, ends it while Repairy works on the booking: the key is unknown, and
    the retry is told so rather than sent again."""
    proxy = ReplyDropper(redis_server.port)
    await proxy.start()
    gw = await started(settings_for(sandbox, redis_url=proxy.url, idempotency_ttl="10s",
                                    idempotency_wait="0.5s", token_wait_timeout="0.5s",
                                    connect_timeout="0.5s", total_timeout="2s",
                                    read_timeout="30s", retry_attempts="1"))
    try:
        await faults(http, sandbox, {"latency": 4.0, "path": "/bookings", "count": 1})
        posts = booking_posts(sandbox)
        proxy.delay_reply_to(b"PTTL", 1.5)
        status, _, answer = await book(http, gw.url, "cut-off")
        assert proxy.delayed == 1
        assert status == 504 and answer["error"]["code"] == "upstream_timeout"
        assert booking_posts(sandbox) == posts + 1
        status, _, answer = await book(http, gw.url, "cut-off")
        assert status == 502 and answer["error"]["code"] == "outcome_unknown"
        assert booking_posts(sandbox) == posts + 1
    finally:
        await gw.stop()
        await proxy.stop()


async def test_records_a_caller_who_leaves_during_its_claim_frees_the_key(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """The caller leaves while its claim is on its way to Redis (the reply held 1 s): the
    claim lands with nobody to lead it, and is released, so the retry books at once instead
    of hearing 409 until the lease runs out."""
    proxy = ReplyDropper(redis_server.port)
    await proxy.start()
    gw = await started(settings_for(sandbox, redis_url=proxy.url, idempotency_wait="0.5s"))
    try:
        posts = booking_posts(sandbox)
        proxy.delay_reply_to(b"NX", 1.0)
        with pytest.raises(TimeoutError):
            async with http.post(gw.url + "/bookings", json=booking_body(),
                                 headers={"Idempotency-Key": "gone"},
                                 timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
                await resp.read()

        async def released() -> bool:  # the claim landed, then was freed by its owner
            client = await redis_server.client()
            try:
                return proxy.delayed == 1 and not [
                    k async for k in client.scan_iter("repairy-gateway:idem:*")]
            finally:
                await client.aclose()

        await wait_until(released)
        status, headers, _ = await book(http, gw.url, "gone")
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert booking_posts(sandbox) == posts + 1
    finally:
        await gw.stop()
        await proxy.stop()


async def test_records_a_claim_slower_than_the_leaders_deadline_sends_nothing(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """The leader's deadline and its claim's lease start at one instant, before the claim:
    a claim whose reply takes longer than the whole deadline (1 s here; the reply comes at
    1.5 s, within Redis's 2 s socket timeout) is never led into a send after its lease: the
    caller gets 503 and the retry books once."""
    proxy = ReplyDropper(redis_server.port)
    await proxy.start()
    gw = await started(settings_for(sandbox, redis_url=proxy.url, idempotency_ttl="10s",
                                    idempotency_wait="0.5s", token_wait_timeout="0.2s",
                                    connect_timeout="0.2s", total_timeout="0.6s"))
    try:
        posts = booking_posts(sandbox)
        proxy.delay_reply_to(b"NX", 1.5)
        status, _, answer = await book(http, gw.url, "slow-claim")
        assert proxy.delayed == 1
        assert status == 503 and answer["error"]["code"] == "idempotency_unavailable"
        assert booking_posts(sandbox) == posts  # nothing was sent
        status, headers, _ = await book(http, gw.url, "slow-claim")
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert booking_posts(sandbox) == posts + 1
        assert sample(gw, "upstream_errors_total", kind="timeout") == 0  # not blamed upstream
    finally:
        await gw.stop()
        await proxy.stop()


async def test_records_redis_policy_is_read_again_and_refuses_an_evicting_one(
        redis_server: RedisServer) -> None:
    """The store's maxmemory-policy is read at a claim at most every POLICY_RECHECK seconds:
    a Redis reconfigured to evict (or restarted so) is refused within that time, and taken
    again once it no longer evicts (on the fake clock; the Redis is real)."""
    clock = FakeClock()
    client = await redis_server.client()
    store = RedisStore(client, prefix="t", store_key=None, clock=clock)
    try:
        assert await store.claim("p1", Record.claim("fp", "a", clock.time() + 10), 60) is None
        await client.config_set("maxmemory-policy", "volatile-lru")
        assert await store.claim("p2", Record.claim("fp", "b", clock.time() + 10), 60) is None
        await clock.advance(POLICY_RECHECK)
        with pytest.raises(IdempotencyUnavailable, match="maxmemory-policy volatile-lru"):
            await store.claim("p3", Record.claim("fp", "c", clock.time() + 10), 60)
        assert await client.get("t:p3") is None  # nothing claimed
        await client.config_set("maxmemory-policy", "noeviction")
        await clock.advance(POLICY_RECHECK)
        assert await store.claim("p3", Record.claim("fp", "c", clock.time() + 10), 60) is None
    finally:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()
