"""The Redis side of the fleet protocol against a real redis-server: fenced writes, the lease,
owner-bound keys and encryption, and the adoption rule; then a fleet of 50 token managers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.clock import SystemClock
from gateway.coordination.sealing import SealedWithAnotherKey, StoreError
from gateway.redact import Secret
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.token import renewal
from gateway.token.fleet import Fleet
from gateway.token.manager import TokenManager
from gateway.token.renewal import RenewalState
from gateway.token.store import (
    LEASE_LOST,
    LIVE,
    OLDER,
    WRITTEN,
    RedisStore,
)
from gateway.token.value import Token
from gateway.wiring import auth_client, auth_session
from tests.fleet_helpers import RedisServer
from tests.gateway_helpers import settings_for, wait_until

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


def store(server: RedisServer, owner: str = "owner-a", key: str | None = None,
          previous: str | None = None) -> RedisStore:
    return RedisStore(server.url, owner=owner, prefix="t", password=None, ca_file="",
                      store_key=Secret(key) if key else None, timeout=1.0,
                      previous_key=Secret(previous) if previous else None)


def tok(generation: int, access: str = "access-token-") -> Token:
    return Token(access=f"{access}{generation}", refresh=f"refresh-token-{generation}",
                 generation=generation,
                 via="login", obtained_at=0, expires_at=100, refresh_expires_at=1000,
                 obtained_wall=1.8e9, partner_id="p")


def doc(generation: int) -> dict[str, object]:
    return renewal.to_dict(RenewalState(token=tok(generation)), 0, 1.8e9)


async def test_store_write_is_fenced_by_lease_and_generation(redis_server: RedisServer) -> None:
    """Only the lease holder writes, and never an older generation: a paused ex-holder whose
    lease ran out cannot overwrite the newer token."""
    a, b = store(redis_server), store(redis_server)
    try:
        assert await a.write(1, doc(1), 5.0) == LEASE_LOST  # no lease
        assert await a.acquire(0.2)
        assert await b.acquire(0.2) is False
        assert await a.write(1, doc(1), 5.0) == WRITTEN
        await asyncio.sleep(0.3)  # a pauses; its lease runs out
        assert await b.acquire(5)
        assert await b.write(2, doc(2), 5.0) == WRITTEN
        assert await a.write(2, doc(2), 5.0) == LEASE_LOST  # a wakes up: fenced
        assert await a.extend(5) is False
        assert await b.write(1, doc(1), 5.0) == OLDER  # backwards
        assert await b.write(1, doc(1), 5.0, force=True) == LIVE  # b stamped it: live
        client = await redis_server.client()
        try:  # the stamp runs out (nobody read it for 4 of the stamper's lease TTLs)
            await client.hset("t:owner-a:state", "live", "1")
        finally:
            await client.aclose()
        assert await b.write(1, doc(1), 5.0, force=True) == WRITTEN  # not live: overwritten
        assert await b.write(2, doc(2), 5.0) == WRITTEN
        stored = await a.load(5.0)
        assert stored is not None and (stored.generation, stored.by) == (2, b.replica)
        await b.release()
        assert await a.acquire(1)
    finally:
        await a.close()
        await b.close()


async def test_store_keys_are_per_owner_and_encrypted_when_keyed(
        redis_server: RedisServer) -> None:
    """Another owner sees nothing; with a store key the blob is AES-GCM, unreadable without
    it or with another key."""
    a = store(redis_server, "owner-a", key="k" * 32)
    other = store(redis_server, "owner-b", key="k" * 32)
    plain = store(redis_server, "owner-a")
    wrong = store(redis_server, "owner-a", key="x" * 32)
    client = await redis_server.client()
    try:
        assert await a.acquire(5)
        assert await a.write(3, doc(3), 5.0)
        assert await other.load(5.0) is None
        blob = await client.hget("t:owner-a:state", "blob")
        assert blob.startswith("gcm:") and "access-token-3" not in blob
        loaded = await a.load(5.0)
        assert loaded is not None and loaded.state["token"]["access"] == "access-token-3"
        for reader in (plain, wrong):
            with pytest.raises(StoreError):
                await reader.load(5.0)
    finally:
        await client.aclose()
        for s in (a, other, plain, wrong):
            await s.close()


async def test_store_down_is_a_store_error(redis_server: RedisServer) -> None:
    """A stopped Redis is a StoreError (fast), never a hang or another exception."""
    s = store(redis_server)
    await redis_server.stop()
    try:
        with pytest.raises(StoreError):
            await s.load(5.0)
        with pytest.raises(StoreError):
            await s.acquire(1)
    finally:
        await s.close()


@pytest.mark.unit
def test_adopt_takes_newer_tokens_and_shared_back_off() -> None:
    """A newer generation wins; the same token's shared back-off and refresh ban are taken
    over; a different token of the same generation replaces ours only once ours was refused."""
    ours = RenewalState(token=tok(2))
    assert renewal.adopt(ours, RenewalState(token=tok(3))).token == tok(3)
    assert renewal.adopt(ours, RenewalState(token=tok(1))) is ours
    shared = RenewalState(token=tok(2), failures=3, not_before=50.0, refresh_banned=True,
                          last_error="server_error")
    merged = renewal.adopt(ours, shared)
    assert (merged.failures, merged.not_before, merged.refresh_banned) == (3, 50.0, True)
    twin = RenewalState(token=tok(2, access="other"))
    assert renewal.adopt(ours, twin).token == tok(2, access="other")  # the store's wins
    failing = RenewalState(failures=2, not_before=80.0, blocked="invalid_credentials")
    merged = renewal.adopt(RenewalState(), failing)  # no token stored yet: back-off shared
    assert (merged.token, merged.not_before, merged.blocked) == (None, 80.0,
                                                                 "invalid_credentials")


async def test_store_fleet_of_50_makes_one_auth_call_per_window(
        redis_server: RedisServer, http: aiohttp.ClientSession) -> None:
    """50 token managers (one per replica, each with its own Redis connection) against the
    one-live-token sandbox with 3 s tokens, for 8 s: one login and one refresh per window
    for the whole fleet, and every replica ends on the same token."""
    async with Sandbox(SandboxConfig(access_ttl=3.0, refresh_ttl=60, single_token=True)) as sb:
        s = settings_for(sb, renew_retry_min="0.2s", renew_retry_max="2s",
                         redis_url=redis_server.url, redis_lease_ttl="2s")
        clock = SystemClock()
        async with auth_session(s) as session:
            managers = []
            for _ in range(50):
                fleet = Fleet(store(redis_server, "fleet-50"), lease_ttl=2.0,
                              down_policy="local", clock=clock)
                managers.append(TokenManager(auth_client(session, s, clock), s.token_side(), clock,
                                             fleet=fleet))
            await asyncio.gather(*(m.start() for m in managers))
            await asyncio.sleep(8.0)

            def agreed() -> bool:  # a renewal may be landing right now: give it a moment
                return len({m.current.access if m.current else None for m in managers}) == 1

            await wait_until(agreed, within=3)
            tokens = {m.current.access if m.current else None for m in managers}
            await asyncio.gather(*(m.stop() for m in managers))
        counters = sb.state.control.counters
    assert counters["token_requests"] == 1
    # 8-11 s of 3 s tokens renewed at ~70-80 %: one per window, never one per manager.
    assert 2 <= counters["refresh_requests"] <= 5
    assert len(tokens) == 1 and None not in tokens


async def test_store_key_steps_read_what_the_other_step_wrote(redis_server: RedisServer) -> None:
    """The steps of switching a store key on, rotating it and switching it off: in each, a
    replica of either step reads what the other wrote (GATEWAY_STORE_KEY_PREVIOUS); without
    the reading key it is a mismatch (SealedWithAnotherKey), never read as absent."""
    new, old = "n" * 40, "o" * 40
    steps = [  # (writer's key, previous), (reader's key, previous)
        ((None, new), (new, "plain")),  # switching on: step 1 writes plain, step 2 reads it
        ((new, "plain"), (None, new)),  # ... and step 1 reads step 2's sealed entries
        ((old, new), (new, old)),  # rotating: both ways
        ((new, old), (old, new)),
        ((old, "plain"), (None, old)),  # switching off
        ((None, old), (old, "plain")),
    ]
    for n, ((wkey, wprev), (rkey, rprev)) in enumerate(steps):
        owner = f"steps-{n}"
        writer, reader = store(redis_server, owner, wkey, wprev), store(redis_server, owner,
                                                                         rkey, rprev)
        bare = store(redis_server, owner, rkey)
        try:
            assert await writer.acquire(5)
            assert await writer.write(n + 1, doc(n + 1), 5.0) == WRITTEN
            loaded = await reader.load(5.0)
            assert loaded is not None and loaded.generation == n + 1, n
            if rkey is not None and (wkey != rkey):
                with pytest.raises(SealedWithAnotherKey):
                    await bare.load(5.0)
        finally:
            for s in (writer, reader, bare):
                await s.close()
