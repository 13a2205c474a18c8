"""One booking per key when processes die (real supervisor, worker and sandbox processes):
a dead worker's pending reply never reaches its successor, a dead supervisor never costs the
caller its answer, a big kept answer crosses to each worker once, and a broken answer is
never taken for a kept one.

Each caller's connection is pinned to one worker (:meth:`GatewayProcess.pinned`), and every
step waits on what it needs (the sandbox saw the request, the supervisor holds the call),
never on a guess of how long that takes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.sandbox import Sandbox
from tests.fleet_helpers import GatewayProcess, RedisServer
from tests.gateway_helpers import settings_for, wait_until
from tests.redis_proxy import ReplyDropper
from tests.sandbox_helpers import faults
from tests.test_idempotency import book, booking_posts, bookings, open_gate
from tests.test_proxy_failures import sample, started

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def store_calls(http: aiohttp.ClientSession, gw: GatewayProcess, slot: int) -> int:
    """Idempotency-Key calls of worker ``slot`` the supervisor is working on."""
    return int((await gw.workers(http))[slot]["store_calls"])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_death_a_dead_waiters_reply_never_reaches_its_successor(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Worker 1 waits on key k1 and is SIGKILLed. Its successor (call ids from 1 again) then
    waits on k2. When k1 settles, the supervisor's reply to the dead worker's wait must not
    reach the successor: k2's caller gets k2's booking, never k1's."""
    gw = GatewayProcess(sandbox, {"GATEWAY_WORKERS": "2"})
    await gw.start()
    sessions: list[aiohttp.ClientSession] = []
    try:
        await gw.ready(http)
        sessions += [await gw.pinned(http, 0), await gw.pinned(http, 0),
                     await gw.pinned(http, 1)]
        lead_k1, lead_k2, waiter = sessions
        held = sandbox.state.control.holding
        # Repairy answers k1 and k2 only when the test opens their gates.
        await faults(http, sandbox, {"faults": [
            {"hold": "k1", "path": "/bookings", "count": 1},
            {"hold": "k2", "path": "/bookings", "count": 1}]})
        k1 = asyncio.ensure_future(book(lead_k1, gw.url, "k1"))
        await wait_until(lambda: held["k1"] == 1)
        doomed = asyncio.ensure_future(book(waiter, gw.url, "k1"))
        await wait_until(lambda: store_calls(http, gw, 1))  # its wait is in the supervisor
        victim = (await gw.workers(http))[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(aiohttp.ClientError):
            await doomed
        k2 = asyncio.ensure_future(book(lead_k2, gw.url, "k2"))
        await wait_until(lambda: held["k2"] == 1)

        async def succeeded() -> bool:
            w = (await gw.workers(http))[1]
            return bool(w["alive"] and w["pid"] != victim)

        await wait_until(succeeded, within=10)
        sessions.append(await gw.pinned(http, 1))
        repeat = asyncio.ensure_future(book(sessions[-1], gw.url, "k2"))
        await wait_until(lambda: store_calls(http, gw, 1))  # the successor waits on k2
        await open_gate(http, sandbox, "k1")  # k1 settles: the dead worker's reply is due
        await k1
        await open_gate(http, sandbox, "k2")
        first, second, again = await k1, await k2, await repeat
        assert first[0] == second[0] == 201
        assert first[2]["data"]["id"] != second[2]["data"]["id"]
        assert again[0] == 201 and again[1]["Idempotent-Replayed"] == "true"
        assert again[2]["data"]["id"] == second[2]["data"]["id"]
        assert bookings(sandbox) == 2
    finally:
        for session in sessions:
            await session.close()
        assert await gw.stop() == 0
    assert '"event": "worker_died"' in gw.logs()


async def test_death_supervisor_killed_after_the_answer_caller_still_gets_it(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """The supervisor is SIGKILLed while Repairy works on a booking. The worker cannot keep
    the answer (its channel is gone), but its caller gets Repairy's 201, a warning says the
    answer was not kept, and the access line is true: no 500, no traceback."""
    gw = GatewayProcess(sandbox, {"GATEWAY_WORKERS": "2"})
    await gw.start()
    session = None
    try:
        await gw.ready(http)
        session = await gw.pinned(http, 0)
        await faults(http, sandbox, {"hold": "answer", "path": "/bookings", "count": 1})
        answer = asyncio.ensure_future(book(session, gw.url, "orphan-1"))
        await wait_until(lambda: sandbox.state.control.holding["answer"] == 1)
        gw.kill()
        assert gw.proc is not None
        await gw.proc.wait()
        await open_gate(http, sandbox, "answer")  # Repairy answers once the supervisor is gone
        status, headers, body = await answer
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert body["data"]["id"] in sandbox.state.data.bookings
    finally:
        if session is not None:
            await session.close()
        await gw.stop()

    def posts_logged() -> list[dict[str, object]]:
        lines = [json.loads(x) for x in gw.logs().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("event") == "request" and x.get("method") == "POST"]

    await wait_until(posts_logged, within=10)  # the worker's access line, once it is out
    logs = gw.logs()
    assert '"event": "idempotency_settle_failed"' in logs
    assert "Traceback" not in logs and "internal_error" not in logs
    access = posts_logged()
    assert [x["status"] for x in access] == [201]
    assert access[0]["idempotency"] == "new"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_death_a_big_kept_answer_crosses_to_each_worker_once(
        sandbox: Sandbox, http: aiohttp.ClientSession, loop: str) -> None:
    """An 8 MiB answer with 200 callers of one key waiting on two workers: every one gets the
    replay, and the supervisor's memory grows by at most 3 x GATEWAY_IDEMPOTENCY_MAX_BODY
    (the body crosses to each worker once, not once per waiter, a chunk at a time), on
    either event loop."""
    max_body = 8 * 1024 * 1024
    big = json.dumps({"success": True, "data": {"id": "c" * 24,
                                                "pad": "y" * (max_body - 100)}})
    assert len(big) <= max_body
    gw = GatewayProcess(sandbox, {"GATEWAY_WORKERS": "2", "GATEWAY_EVENT_LOOP": loop,
                                  "GATEWAY_IDEMPOTENCY_MAX_BODY": str(max_body)})
    await gw.start()
    sessions: list[aiohttp.ClientSession] = []
    try:
        await gw.ready(http)
        sessions = [await gw.pinned(http, slot % 2) for slot in range(200)]
        assert gw.proc is not None
        idle = rss_kib(gw.proc.pid)
        peak = idle
        posts = booking_posts(sandbox)
        await faults(http, sandbox, {"status": 201, "body": big, "latency": 3.0,
                                     "path": "/bookings", "count": 1})

        async def one(session: aiohttp.ClientSession) -> tuple[int, str, int]:
            async with session.post(gw.url + "/bookings", json={"workshopId": "w"},
                                    headers={"Idempotency-Key": "big-1"}) as resp:
                body = await resp.read()
                return resp.status, resp.headers.get("Idempotent-Replayed", ""), len(body)

        leader = asyncio.ensure_future(one(sessions[0]))
        await wait_until(lambda: booking_posts(sandbox) == posts + 1)
        waiters = asyncio.ensure_future(asyncio.gather(*(one(s) for s in sessions[1:])))
        while not waiters.done():
            peak = max(peak, rss_kib(gw.proc.pid))
            await asyncio.sleep(0.005)
        results = [await leader, *await waiters]
        peak = max(peak, rss_kib(gw.proc.pid))
        assert [s for s, _, _ in results] == [201] * 200
        assert sum(r == "true" for _, r, _ in results) == 199
        assert {n for _, _, n in results} == {len(big)}
        assert booking_posts(sandbox) == posts + 1
        grown = (peak - idle) * 1024
        assert grown <= 3 * max_body, f"supervisor grew {grown / 2**20:.1f} MiB"
    finally:
        for session in sessions:
            await session.close()
        assert await gw.stop() == 0


@pytest.mark.parametrize("max_body", ["100", "256KiB"], ids=["streamed", "read-whole"])
async def test_death_a_2xx_whose_body_breaks_is_unknown_never_not_kept(
        sandbox: Sandbox, http: aiohttp.ClientSession, max_body: str) -> None:
    """Repairy's 200 status line came (the booking was made) but its body broke: repeats get
    502 outcome_unknown, whether the answer was too large to keep (streamed to the caller,
    the key settled when the stream ended) or read whole."""
    gw = await started(settings_for(sandbox, idempotency_max_body=max_body))
    try:
        await faults(http, sandbox, {"drop": True, "length": 5000, "path": "/bookings",
                                     "count": 1})
        try:  # cut in the middle (streamed), or a 502 (read whole first)
            status, _, body = await book(http, gw.url, "cut-1")
            assert status == 502 and body["error"]["code"] == "upstream_invalid_response"
        except aiohttp.ClientError:
            assert max_body == "100"
        await wait_until(lambda: sample(gw, "idempotency_settled_total", state="unknown") == 1)
        posts = booking_posts(sandbox)
        status, _, body = await book(http, gw.url, "cut-1")
        assert status == 502 and body["error"]["code"] == "outcome_unknown"
        assert booking_posts(sandbox) == posts
        assert sample(gw, "idempotency_settled_total", state="not_kept") == 0
    finally:
        await gw.stop()


async def test_death_a_caller_who_leaves_a_streamed_answer_leaves_not_kept(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Too large to keep, and the caller leaves mid-stream: the booking exists, its answer
    was whole so far, so repeats hear 409 idempotent_answer_not_kept (never a second send)."""
    gw = await started(settings_for(sandbox, idempotency_max_body="100"))
    try:
        big = json.dumps({"success": True, "data": {"id": "d" * 24, "pad": "z" * 200_000}})
        await faults(http, sandbox, {"status": 201, "body": big, "chunk": 1000,
                                     "chunk_delay": 0.01, "path": "/bookings", "count": 1})
        async with http.post(gw.url + "/bookings", json={"workshopId": "w"},
                             headers={"Idempotency-Key": "left-mid"}) as resp:
            assert resp.status == 201
            await resp.content.read(10)
            resp.close()  # the caller leaves
        await wait_until(lambda: sample(gw, "idempotency_settled_total",
                                        state="not_kept") == 1)
        posts = booking_posts(sandbox)
        async with http.post(gw.url + "/bookings", json={"workshopId": "w"},
                             headers={"Idempotency-Key": "left-mid"}) as resp:
            assert resp.status == 409
            assert (await resp.json())["error"]["code"] == "idempotent_answer_not_kept"
        assert booking_posts(sandbox) == posts
    finally:
        await gw.stop()



async def test_death_busy_workers_replaying_big_answers_are_never_cut_off(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Fourteen 8 MiB answers of different keys replayed at once on one worker: a burst its
    channel queues and writes out as the worker reads, never an overflow that would kill a
    healthy worker and its requests."""
    max_body = 8 * 1024 * 1024
    big = json.dumps({"success": True, "data": {"id": "e" * 24,
                                                "pad": "w" * (max_body - 100)}})
    gw = GatewayProcess(sandbox, {"GATEWAY_WORKERS": "2",
                                  "GATEWAY_IDEMPOTENCY_MAX_BODY": str(max_body),
                                  "GATEWAY_IDEMPOTENCY_MAX_BYTES": "256MiB"})
    await gw.start()
    sessions: list[aiohttp.ClientSession] = []
    try:
        await gw.ready(http)
        sessions = [await gw.pinned(http, 0) for _ in range(14)]
        for i, session in enumerate(sessions):
            await faults(http, sandbox, {"status": 201, "body": big, "path": "/bookings",
                                         "count": 1})
            async with session.post(gw.url + "/bookings", json={"workshopId": "w"},
                                    headers={"Idempotency-Key": f"burst-{i}"}) as resp:
                assert resp.status == 201
                await resp.read()
        posts = booking_posts(sandbox)
        before = await gw.workers(http)

        async def replay(i: int) -> tuple[int, str, int]:
            async with sessions[i].post(gw.url + "/bookings", json={"workshopId": "w"},
                                        headers={"Idempotency-Key": f"burst-{i}"}) as resp:
                body = await resp.read()
                return resp.status, resp.headers.get("Idempotent-Replayed", ""), len(body)

        results = await asyncio.gather(*(replay(i) for i in range(14)))
        assert results == [(201, "true", len(big))] * 14
        assert booking_posts(sandbox) == posts
        after = await gw.workers(http)
        assert [w["restarts"] for w in after] == [w["restarts"] for w in before]
        assert [w["pid"] for w in after] == [w["pid"] for w in before]
    finally:
        for session in sessions:
            await session.close()
        assert await gw.stop() == 0
    assert "channel_overflow" not in gw.logs()


@pytest.mark.parametrize("slow_store", [False, True], ids=["request-deadline",
                                                         "leader-deadline"])
async def test_death_a_streamed_answer_is_cut_off_at_the_leaders_deadline(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer,
        slow_store: bool) -> None:
    """An answer too large to keep that trickles past the deadline: the caller's stream is
    cut there (by the request's own deadline, or by the leader's when a slow store made it
    the earlier one), and the key is settled as for any answer whose body did not come whole
    (unknown) while its claim still lives, so no retry is ever sent."""
    proxy = ReplyDropper(redis_server.port)
    await proxy.start()
    gw = await started(settings_for(sandbox, idempotency_max_body="100",
                                    idempotency_ttl="10s", idempotency_wait="0.5s",
                                    token_wait_timeout="0.5s", connect_timeout="0.5s",
                                    total_timeout="1s", read_timeout="30s",
                                    redis_url=proxy.url))
    if slow_store:
        proxy.delay_reply_to(b"PTTL", 1.5)  # the mark "sending", while the leader's clock runs
    try:
        big = json.dumps({"success": True, "data": {"id": "f" * 24, "pad": "q" * 50_000}})
        await faults(http, sandbox, {"status": 201, "body": big, "chunk": 1000,
                                     "chunk_delay": 0.1, "path": "/bookings", "count": 1})
        posts = booking_posts(sandbox)
        async with http.post(gw.url + "/bookings", json={"workshopId": "w"},
                             headers={"Idempotency-Key": "trickle"}) as resp:
            assert resp.status == 201
            with pytest.raises(aiohttp.ClientError):
                await resp.read()  # cut at the deadline
        await wait_until(lambda: sample(gw, "idempotency_settled_total",
                                        state="unknown") == 1)
        async with http.post(gw.url + "/bookings", json={"workshopId": "w"},
                             headers={"Idempotency-Key": "trickle"}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "outcome_unknown"
        assert booking_posts(sandbox) == posts + 1
    finally:
        await gw.stop()
        await proxy.stop()
    assert proxy.delayed == int(slow_store)
