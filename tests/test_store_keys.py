"""A replica that cannot read the fleet's token entry does not fight it (issue 20, part 2),
over real redis-server and gateway processes against single-token sandboxes.

Invariant: *while a replica that can read the fleet's entry is running, a replica with
another GATEWAY_STORE_KEY never logs in* (a login would replace, and with one live token per
credential revoke, the fleet's token); it answers ``503 store_key_mismatch``. Only an entry
nobody has read for ``LIVE_TTLS`` lease TTLs is overwritten (through the lease). The
misconfiguration test failed on 1ca7d9a."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from gateway.sandbox import Sandbox, SandboxConfig
from tests.fleet_helpers import GatewayProcess, RedisServer
from tests.gateway_helpers import SERVICES, wait_until

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

KEY_A, KEY_B, KEY_C = ("a" * 40, "b" * 40, "c" * 40)


@asynccontextmanager
async def single_token(access_ttl: float) -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(access_ttl=access_ttl, single_token=True)) as sb:
        yield sb


def logins(sb: Sandbox) -> int:
    return int(sb.state.control.counters["token_requests"])


async def readyz(http: aiohttp.ClientSession, gw: GatewayProcess) -> tuple[int, Any]:
    async with http.get(gw.admin + "/readyz") as resp:
        return resp.status, await resp.json()


async def mismatched(http: aiohttp.ClientSession, gw: GatewayProcess) -> bool:
    try:
        return bool((await gw.tokenz(http))["store"]["key_mismatch"])
    except (aiohttp.ClientError, KeyError, TypeError):
        return False


async def answers(http: aiohttp.ClientSession, gw: GatewayProcess,
                  seconds: float) -> list[tuple[int, str]]:
    """GETs for ``seconds``, 20 a second: each status and error code."""
    found = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        async with http.get(gw.url + SERVICES) as resp:
            body = await resp.json(content_type=None)
            code = body.get("error", {}).get("code", "") if resp.status >= 400 else ""
            found.append((resp.status, code))
        await asyncio.sleep(0.05)
    return found


async def misconfiguration(http: aiohttp.ClientSession, access_ttl: float,
                           **wrong_env: str) -> None:
    """Two replicas with different store keys on one Redis, for 20 s: one login in the fleet,
    the right one serves every request, the wrong one (``wrong_env`` added) answers only 503
    store_key_mismatch (and says so on /readyz, /tokenz, /metrics and in its log)."""
    redis = RedisServer()
    await redis.start()
    try:
        async with single_token(access_ttl) as sb:
            right = GatewayProcess(sb, {"GATEWAY_REDIS_URL": redis.url,
                                        "GATEWAY_STORE_KEY": KEY_A})
            wrong = GatewayProcess(sb, {"GATEWAY_REDIS_URL": redis.url,
                                        "GATEWAY_STORE_KEY": KEY_B, **wrong_env})
            await right.start()
            try:
                await right.ready(http)
                await wrong.start()

                async def settled() -> bool:  # it found out, or (1ca7d9a) it fought
                    return logins(sb) > 1 or await mismatched(http, wrong)

                await wait_until(settled, within=15, interval=0.1)
                assert logins(sb) == 1, wrong.logs()[-3000:]
                good, bad = await asyncio.gather(answers(http, right, 20),
                                                 answers(http, wrong, 20))
                assert logins(sb) == 1, right.logs()[-3000:] + wrong.logs()[-3000:]
                assert good and set(good) == {(200, "")}
                assert bad and set(bad) == {(503, "store_key_mismatch")}
                status, body = await readyz(http, wrong)
                assert status == 503 and body["reasons"][0].startswith("store_key_mismatch")
                async with http.get(wrong.admin + "/metrics") as resp:
                    assert ('repairy_gateway_store_key_mismatch{credential="default"} 1.0'
                            in await resp.text())
                assert "GATEWAY_STORE_KEY" in wrong.logs()
                assert '"event": "store_key_mismatch"' in wrong.logs()
                assert (await readyz(http, right))[0] == 200
            finally:
                await wrong.stop()
                await right.stop()
    finally:
        await redis.stop()


async def test_a_replica_with_another_store_key_never_logs_in(
        http: aiohttp.ClientSession) -> None:
    """The issue's numbers, with 6 s tokens (refreshed during the run) and with 48 h tokens,
    side by side. With 48 h tokens the right replica writes nothing during the run (only its
    reads keep the entry live), and the wrong one has two worker processes and a lease TTL of
    1 s against the right one's 5 s: it must not judge the entry by its own, shorter, lease."""
    await asyncio.gather(misconfiguration(http, 6.0),
                         misconfiguration(http, 48 * 3600.0, GATEWAY_WORKERS="2",
                                          GATEWAY_REDIS_LEASE_TTL="1s"))


async def test_an_entry_nobody_reads_is_taken_over_and_a_previous_key_reads(
        http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """Switching a store key on: once no replica has read the entry for LIVE_TTLS lease TTLs
    (the right one stopped), the replica with the new key takes it over with one login. Then a
    replica with a newer key and GATEWAY_STORE_KEY_PREVIOUS reads it without logging in, and
    seals it again with its own key."""
    lease = {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_REDIS_LEASE_TTL": "1s"}
    async with single_token(48 * 3600.0) as sb:
        old = GatewayProcess(sb, {**lease, "GATEWAY_STORE_KEY": KEY_A})
        new = GatewayProcess(sb, {**lease, "GATEWAY_STORE_KEY": KEY_B})
        newer = GatewayProcess(sb, {**lease, "GATEWAY_STORE_KEY": KEY_C,
                                    "GATEWAY_STORE_KEY_PREVIOUS": KEY_B})
        try:
            await old.start()
            await old.ready(http)
            await new.start()
            await wait_until(lambda: mismatched(http, new), within=15, interval=0.1)
            assert logins(sb) == 1
            await old.stop()
            await new.ready(http, within=20)  # after 4 lease TTLs nobody read it: taken over
            assert logins(sb) == 2
            assert "store_key_match" in new.logs()
            await newer.start()
            await newer.ready(http)
            assert logins(sb) == 2  # read with the previous key: adopted, no login
            # It seals the entry again with its own key (within a lease TTL); a replica with
            # only the older key then cannot read it: what a one-step roll does.
            await wait_until(lambda: mismatched(http, new), within=15, interval=0.1)
            async with http.get(newer.url + SERVICES) as resp:
                assert resp.status == 200
            async with http.get(new.url + SERVICES) as resp:
                assert resp.status == 503
            assert logins(sb) == 2
        finally:
            for gw in (old, new, newer):
                await gw.stop()


async def test_a_mismatch_holds_through_outages_restarts_and_mixed_leases(
        http: aiohttp.ClientSession) -> None:
    """The right fleet has a slow reader (lease TTL 3 s) and a fast one (1 s); the wrong
    replica has a 1 s lease. In turn: the fast reader leaves (the slow one must keep the
    entry live by its own stamp), Redis is frozen for 8 s (SIGSTOP: no local login by the
    wrong replica), and Redis restarts empty (no persistence: the right replica publishes
    its token again before the wrong one may touch it). Through all of it: one login, and the
    wrong replica answers only 503 store_key_mismatch."""
    redis = RedisServer()
    await redis.start()
    try:
        async with single_token(48 * 3600.0) as sb:
            base = {"GATEWAY_REDIS_URL": redis.url}
            slow = GatewayProcess(sb, {**base, "GATEWAY_STORE_KEY": KEY_A,
                                       "GATEWAY_REDIS_LEASE_TTL": "3s"})
            fast = GatewayProcess(sb, {**base, "GATEWAY_STORE_KEY": KEY_A,
                                       "GATEWAY_REDIS_LEASE_TTL": "1s"})
            wrong = GatewayProcess(sb, {**base, "GATEWAY_STORE_KEY": KEY_B,
                                        "GATEWAY_REDIS_LEASE_TTL": "1s"})
            try:
                await slow.start()
                await slow.ready(http)
                await fast.start()
                await fast.ready(http)
                await wrong.start()
                await wait_until(lambda: mismatched(http, wrong), within=15, interval=0.1)
                await fast.stop()
                bad = await answers(http, wrong, 12)  # past the fast reader's stamp
                assert redis.proc is not None
                redis.proc.send_signal(signal.SIGSTOP)
                try:
                    bad += await answers(http, wrong, 8)
                finally:
                    redis.proc.send_signal(signal.SIGCONT)
                bad += await answers(http, wrong, 4)
                await redis.stop()
                await redis.start()  # empty: the entry is gone
                bad += await answers(http, wrong, 12)
                good = await answers(http, slow, 1)
                assert logins(sb) == 1, wrong.logs()[-3000:]
                assert set(bad) == {(503, "store_key_mismatch")}
                assert set(good) == {(200, "")}
                client = await redis.client()
                try:  # published again, sealed with the right key
                    assert (await client.hget(
                        next(iter([k async for k in client.scan_iter("*:state")])), "blob")
                    ).startswith("gcm:")
                finally:
                    await client.aclose()
                assert await mismatched(http, wrong)
            finally:
                for gw in (slow, fast, wrong):
                    await gw.stop()
    finally:
        await redis.stop()
