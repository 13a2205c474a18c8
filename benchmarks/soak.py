"""A fault soak: random faults against real processes for N minutes, with the guarantees
checked all the time. A breach stops the soak and prints what broke and the seed.

    python -m benchmarks.soak --minutes 10 [--seed N]

The processes: the sandbox (served from this process on a real socket), one redis-server with
``--appendonly yes --appendfsync always`` behind a proxy that can lose its replies, and two
gateway replicas (``serve``, GATEWAY_WORKERS=2) sharing it. The faults, each kind on its own
seeded schedule, are in :data:`FAULTS`. The callers book with fresh Idempotency-Keys (the two
clients sometimes with the same key string), repeat a key after timeouts, 5xx and on purpose,
leave mid-request, and read catalogues through the GET cache. One fault makes Repairy book
and then lose or delay the answer (500, 502, 504, a reset, a cut body, 3 s late): the case
where only the Idempotency-Key record stands between a retry and a second booking. The
invariants are checked in :mod:`benchmarks.soak_checks`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.soak_checks import IDEMPOTENCY_MAX_BODY_KIB, Checks, Tally
from benchmarks.soak_parts import AofRedis, Replica
from gateway.sandbox import Sandbox, SandboxConfig
from tests.redis_proxy import ReplyDropper

#: Token lifetimes and the auth timeout the soak runs with (short, so renewals happen often).
ACCESS_TTL = 12.0
REFRESH_TTL = 300.0
AUTH_TIMEOUT = "5s"
CLIENTS = {"alpha": "soak-client-key-alpha-0001", "beta": "soak-client-key-beta-00002"}
WARM_UP = 30.0
#: Mean seconds between two faults of a kind (the first comes within the first 3/4 of a run).
FAULTS = {"worker_kill": 20.0, "supervisor_kill": 40.0, "redis_kill": 45.0,
          "redis_replies_lost": 30.0, "repairy_5xx": 25.0, "repairy_resets": 25.0,
          "slow_answers": 30.0, "slow_auth": 40.0, "credential_rotation": 45.0,
          "token_revocation": 60.0, "acted_answer_lost": 25.0, "refresh_answer_lost": 40.0}


class Soak:
    def __init__(self, minutes: float, seed: int) -> None:
        self.seconds = minutes * 60
        self.seed = seed
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.stopping = asyncio.Event()
        self.dir = Path(tempfile.mkdtemp(prefix="soak-"))
        self.rotation = 0
        self.replicas: list[Replica] = []

    # -- set-up ------------------------------------------------------------------------------
    def _write_credentials(self, sb: Sandbox, n: int) -> tuple[str, str, str]:
        cfg = sb.state.config
        key, secret = (cfg.app_key, cfg.app_secret) if n == 0 else (
            f"soak-app-key-{n}", f"soak-app-secret-{n}-{self.rng.getrandbits(64):x}")
        for name, value in (("app-key", key), ("app-secret", secret),
                            ("partner-id", cfg.partner_id)):
            tmp = self.dir / f".{name}"
            tmp.write_text(value)
            os.replace(tmp, self.dir / name)  # as a mounted secret changes: at once
        return key, secret, cfg.partner_id

    def _env(self, redis_url: str) -> dict[str, str]:
        return {
            "REPAIRY_APP_KEY_FILE": str(self.dir / "app-key"),
            "REPAIRY_APP_SECRET_FILE": str(self.dir / "app-secret"),
            "REPAIRY_PARTNER_ID_FILE": str(self.dir / "partner-id"),
            "GATEWAY_WORKERS": "2", "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_AUTH_TIMEOUT": AUTH_TIMEOUT, "GATEWAY_SHUTDOWN_GRACE": "3s",
            # As a mounted secret is watched; a SIGHUP also follows each rotation.
            "GATEWAY_SECRETS_POLL_INTERVAL": "1s",
            "GATEWAY_CLIENT_KEYS": ",".join(f"{n}={k}" for n, k in CLIENTS.items()),
            "GATEWAY_CACHE_ROUTES": "GET /workshops/*/services=2s",
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_IDEMPOTENCY_MAX_BODY": f"{IDEMPOTENCY_MAX_BODY_KIB}KiB",
        }

    async def run(self) -> int:
        print(f"soak: {self.seconds:g} s, seed {self.seed} (replay: --seed {self.seed})",
              flush=True)
        config = SandboxConfig(access_ttl=ACCESS_TTL, refresh_ttl=REFRESH_TTL,
                               single_token=True)
        redis = AofRedis()
        async with Sandbox(config) as sb, aiohttp.ClientSession() as http:
            self._write_credentials(sb, 0)
            await redis.start()
            proxy = ReplyDropper(redis.port)
            await proxy.start()
            self.replicas = [Replica.create(n, sb, self._env(proxy.url)) for n in ("a", "b")]
            checks = Checks(sb, self.replicas, redis, self.tally)
            try:
                for replica in self.replicas:
                    await replica.start(http)
                await asyncio.sleep(1.0)
                await checks.measure_idle(http)
                await self._soak(sb, http, redis, proxy, checks)
            finally:
                for replica in self.replicas:
                    await replica.proc.stop()
                checks.scan_logs()  # what the last moments and the shutdown logged
                await proxy.stop()
                await redis.stop()
        checks.finish(sb)
        print(checks.report(self.seed, self.seconds, AUTH_TIMEOUT, ACCESS_TTL, REFRESH_TTL))
        return 1 if checks.breaches else 0

    async def _soak(self, sb: Sandbox, http: aiohttp.ClientSession, redis: AofRedis,
                    proxy: ReplyDropper, checks: Checks) -> None:
        started = time.monotonic()
        end = started + self.seconds
        callers = [asyncio.create_task(self._booker(sb, http, i), name=f"booker-{i}")
                   for i in range(6)]
        callers += [asyncio.create_task(self._reader(sb, http, i), name=f"reader-{i}")
                    for i in range(2)]
        faults = [asyncio.create_task(self._fault_loop(kind, mean, started, end, sb, http,
                                                       redis, proxy), name=kind)
                  for kind, mean in FAULTS.items()]
        try:
            while time.monotonic() < end and not checks.breaches:
                await asyncio.sleep(0.5)
                await checks.step(http, time.monotonic() - started >= WARM_UP)
                for task in [*faults, *callers]:  # the harness's own errors never vanish
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        checks.tally.breach(f"the soak's task {task.get_name()} failed: "
                                            f"{task.exception()!r}")
        finally:
            self.stopping.set()
            # A fault under way finishes (a replica being restarted comes back up).
            await asyncio.wait(faults, timeout=90)
            for task in [*faults, *callers]:
                task.cancel()
            await asyncio.gather(*faults, *callers, return_exceptions=True)
            async with http.delete(sb.url + "/__sandbox/faults"):
                pass
            for replica in self.replicas:
                if replica.pid is None:
                    await replica.start(http)
            await checks.step(http, True)

    # -- faults --------------------------------------------------------------------------------
    async def _fault_loop(self, kind: str, mean: float, started: float, end: float,
                          sb: Sandbox, http: aiohttp.ClientSession, redis: AofRedis,
                          proxy: ReplyDropper) -> None:
        rng = random.Random(f"{self.seed}-{kind}")
        at = started + rng.uniform(3, max(4, 0.75 * (end - started)))
        while not self.stopping.is_set():
            wait = at - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), wait)
                if self.stopping.is_set() or time.monotonic() >= end - 5:
                    return
            self.tally.faults[kind] += 1  # credited before it acts: a login may come at once
            if not await self._inject(kind, rng, sb, http, redis, proxy):
                self.tally.faults[kind] -= 1
                at = time.monotonic() + 1.0  # nothing to hit just now: try again soon
                continue
            at = time.monotonic() + rng.expovariate(1 / mean)

    async def _inject(self, kind: str, rng: random.Random, sb: Sandbox,
                      http: aiohttp.ClientSession, redis: AofRedis,
                      proxy: ReplyDropper) -> bool:
        """Inject one fault of ``kind``; False if there was nothing to hit."""
        running = [r for r in self.replicas if r.up]
        if kind == "worker_kill":
            pids = await rng.choice(running).refresh_workers(http) if running else []
            if not pids:
                return False
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(pids), signal.SIGKILL)
        elif kind == "supervisor_kill":
            if len(running) < len(self.replicas):
                return False
            replica = rng.choice(running)  # one replica down at a time: the other serves
            if await self.tally_lease_holder(redis, replica):
                self.tally.holders_killed += 1
            await replica.kill_and_restart(http, rng.uniform(0.2, 2.0))
        elif kind == "redis_kill":
            await redis.kill()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            await redis.start()
        elif kind == "redis_replies_lost":
            proxy.blackout(2.0)
        elif kind == "repairy_5xx":
            await self._fault(http, sb, {"status": rng.choice([500, 502, 503, 504]),
                                         "scope": rng.choice(["api", "any"]),
                                         "duration": rng.uniform(1, 4)})
        elif kind == "repairy_resets":
            await self._fault(http, sb, {"reset": True, "scope": rng.choice(["api", "any"]),
                                         "duration": rng.uniform(1, 3)})
        elif kind == "slow_answers":
            await self._fault(http, sb, {"latency": 3.0, "scope": "api",
                                         "duration": rng.uniform(2, 6)})
        elif kind == "slow_auth":
            await self._fault(http, sb, {"latency": 7.0, "scope": "auth",
                                         "duration": rng.uniform(5, 15)})
        elif kind == "credential_rotation":
            await self._rotate(sb, http)
        elif kind == "token_revocation":
            await self._fault(http, sb, {"revoke_tokens": True})
        elif kind == "refresh_answer_lost":  # the refresh token is used up; the answer lost
            await self._fault(http, sb, {"after": True, "scope": "auth", "path": "/auth/refresh",
                                         "reset": True, "count": 1})
        elif kind == "acted_answer_lost":  # the booking is made; its answer fails or is late
            spoil: dict[str, Any] = rng.choice([{"status": 500}, {"status": 502}, {"status": 504},
                                {"reset": True}, {"drop": True, "length": 4096},
                                {"latency": 3.0}])
            await self._fault(http, sb, {"after": True, "path": "/bookings", **spoil,
                                         "duration": rng.uniform(1, 3)})
        return True

    async def tally_lease_holder(self, redis: AofRedis, replica: Replica) -> bool:
        """Does the replica about to be killed hold the fleet's renewal lease (so it may die
        mid-renewal)? Redis unreachable: counted as if it did (an upper bound)."""
        pid = replica.pid
        try:
            client = await redis.client()
            try:
                async for key in client.scan_iter(match="*:lease"):
                    if f"-{pid}-" in (await client.get(key) or ""):
                        return True
            finally:
                await client.aclose()
        except Exception:  # Redis down or restarting: unknown
            return True
        return False

    async def _fault(self, http: aiohttp.ClientSession, sb: Sandbox,
                     spec: dict[str, Any]) -> None:
        async with http.post(sb.url + "/__sandbox/faults", json=spec) as resp:
            assert resp.status == 200, await resp.text()

    async def _rotate(self, sb: Sandbox, http: aiohttp.ClientSession) -> None:
        """New App Key and Secret (the Partner ID stays: it scopes the Idempotency-Keys), in
        the files first, then at Repairy, then a SIGHUP to each running supervisor (one being
        restarted reads the files at its start, or at its next poll)."""
        self.rotation += 1
        self.tally.rotation_logins_allowed += 1  # one login for the fleet
        key, secret, partner = self._write_credentials(sb, self.rotation)
        async with http.post(sb.url + "/__sandbox/credentials", json={
                "app_key": key, "app_secret": secret, "partner_id": partner}) as resp:
            assert resp.status == 200, await resp.text()
        for replica in self.replicas:
            pid = replica.pid
            if replica.up and pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    # -- callers -------------------------------------------------------------------------------
    async def _booker(self, sb: Sandbox, http: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(f"{self.seed}-booker-{n}")
        workshop = next(iter(sb.state.data.workshops))
        while not self.stopping.is_set():
            client = rng.choice(list(CLIENTS))
            # Now and then both clients use one key string: their scopes must stay apart.
            key = (f"shared-{rng.randrange(10**6)}" if rng.random() < 0.1
                   else f"k{n}-{rng.getrandbits(48):x}")
            await self._book_until_answered(sb, http, rng, client, key, workshop)

    async def _book_until_answered(self, sb: Sandbox, http: aiohttp.ClientSession,
                                   rng: random.Random, client: str, key: str,
                                   workshop: str) -> None:
        body = {"workshopId": workshop, "startTime": "2027-03-01T09:00:00+11:00",
                "externalId": key, "notes": f"soak|{client}|{key}",
                "serviceType": "Logbook service",
                "customer": {"firstName": "Sam", "lastName": "Lee", "email": "sam@example.com",
                             "phone": "+61400000002"},
                "car": {"rego": "ABC123", "make": "Toyota", "model": "Corolla", "year": 2019}}
        headers = {"Idempotency-Key": key, "X-Gateway-Key": CLIENTS[client]}
        booked: str | None = None
        for attempt in range(8):
            if self.stopping.is_set():
                return
            replica = rng.choice([r for r in self.replicas if r.up] or self.replicas)
            leave = rng.random() < 0.08  # the caller leaves mid-request
            limit = rng.uniform(0.05, 1.0) if leave else rng.choice([2.0, 6.0, 12.0])
            status, doc, replayed = await self._post(http, replica.proc.url + "/bookings",
                                                     body, headers, limit)
            self.tally.requests += 1
            self.tally.statuses[status] += 1
            if status == 0:
                self.tally.left_or_timed_out += 1
            code = (doc.get("error") or {}).get("code") if isinstance(doc, dict) else None
            if code:
                self.tally.codes[code] += 1
            if code == "internal_error":  # a 500 Repairy sent is passed on: not ours
                self.tally.breach(f"500 {code} for key {key} ({client})")
                return
            if 200 <= status < 300:
                booking = self.tally.answer(sb, client, key, doc, replayed)
                if booking is None:
                    return  # a breach was recorded
                if booked is not None and booking != booked:
                    self.tally.breach(f"key {key} ({client}) answered two bookings: {booked}, "
                                      f"{booking}")
                    return
                booked = booking
                if attempt > 0 or rng.random() > 0.15:
                    return
                continue  # repeat a booked key on purpose: it must be replayed
            await asyncio.sleep(rng.uniform(0.1, 0.8))
        if booked is None:
            self.tally.unresolved += 1

    async def _post(self, http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                    headers: dict[str, str], limit: float) -> tuple[int, Any, bool]:
        try:
            async with http.post(url, json=body, headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=limit)) as resp:
                raw = await resp.read()
                replayed = resp.headers.get("Idempotent-Replayed") == "true"
                try:
                    return resp.status, json.loads(raw), replayed
                except ValueError:
                    return resp.status, None, replayed
        except (aiohttp.ClientError, TimeoutError):
            return 0, None, False

    async def _reader(self, sb: Sandbox, http: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(f"{self.seed}-reader-{n}")
        workshops = list(sb.state.data.workshops)
        while not self.stopping.is_set():
            replica = rng.choice([r for r in self.replicas if r.up] or self.replicas)
            client = rng.choice(list(CLIENTS))
            url = f"{replica.proc.url}/workshops/{rng.choice(workshops)}/services"
            try:
                async with http.get(url, headers={"X-Gateway-Key": CLIENTS[client]},
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    raw = await resp.read()
                    self.tally.reads[resp.status] += 1
                    if resp.status == 500 and b"internal_error" in raw:
                        self.tally.breach(f"500 internal_error on {url}")
            except (aiohttp.ClientError, TimeoutError):
                self.tally.reads[0] += 1
            await asyncio.sleep(rng.uniform(0.01, 0.1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    sys.exit(asyncio.run(Soak(args.minutes, seed).run()))


if __name__ == "__main__":
    main()
