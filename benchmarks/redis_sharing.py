"""Redis memory of the shared GET cache under a flood, against its bound, on a real
redis-server (``noeviction``, ``maxmemory``), and whether a booking can still be claimed.

Writes ``--entries`` distinct answers of ``--body`` bytes through
:class:`~gateway.proxy.cache_shared.SharedCache` (sealed with a store key, as in a fleet), then
reports what the cache counts, what Redis really holds (``used_memory`` over an empty server's)
and an Idempotency-Key claim on the same Redis::

    .venv/bin/python -m benchmarks.redis_sharing --entries 400 --body 200000 --bound 8MiB
    .venv/bin/python -m benchmarks.redis_sharing --entries 400 --body 200000 --bound 1GiB

The second, effectively unbounded, is what 1ca7d9a did: Redis fills and the claim is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import tempfile
import time

from gateway.clock import SystemClock
from gateway.config_values import parse_size
from gateway.coordination.redis_client import redis_client
from gateway.proxy.cache import CachedAnswer
from gateway.proxy.cache_shared import SharedCache
from gateway.proxy.idempotency import IdempotencyUnavailable, Record, fingerprint
from gateway.proxy.idempotency_redis import RedisStore as RedisIdempotency
from gateway.redact import Secret

KEY = Secret("k" * 40)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(entries: int, body: int, bound: int, maxmemory: str) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
        "no", "--dir", tempfile.mkdtemp(), "--maxmemory", maxmemory, "--maxmemory-policy",
        "noeviction", stdout=asyncio.subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis_client(url, password=None, ca_file="", timeout=2.0)
        for _ in range(200):
            try:
                await client.ping()
                break
            except Exception:  # not up yet
                await asyncio.sleep(0.05)
        base = int((await client.info("memory"))["used_memory"])
        clock = SystemClock()
        errors: list[str] = []
        evicted = 0

        def on_evict(n: int) -> None:
            nonlocal evicted
            evicted += n

        cache = SharedCache(redis_client(url, password=None, ca_file="", timeout=2.0),
                            prefix="bench", scope="https://api", store_key=KEY, clock=clock,
                            on_error=errors.append, max_bytes=bound, on_evict=on_evict)
        started = time.perf_counter()
        gate = asyncio.Semaphore(32)  # writes in flight at once, as from a busy fleet

        async def write(i: int) -> None:
            entry = CachedAnswer(200, "OK", (("Content-Type", "application/octet-stream"),),
                                 os.urandom(body), (), (), clock.time(),
                                 clock.monotonic() + 600, body + 512)
            async with gate:
                await cache.write(f"partner\0GET /bytes/{body}?n={i}", entry, 600.0)

        await asyncio.gather(*(write(i) for i in range(entries)))
        elapsed = time.perf_counter() - started
        memory = await client.info("memory")
        # Client buffers (the writes' arguments) are counted in used_memory until Redis shrinks
        # them; what the keys hold is the rest.
        clients = int(memory.get("mem_clients_normal", 0))
        used = int(memory["used_memory"]) - base - clients
        left = int(memory["maxmemory"]) - int(memory["used_memory"])
        counted = int(await client.hget("bench:cache-sizes", "#") or 0)
        store = RedisIdempotency(redis_client(url, password=None, ca_file="", timeout=2.0),
                                 prefix="bench", store_key=KEY, clock=clock)
        claim = Record.claim(fingerprint("POST", "/bookings", b"{}"), "req-1", clock.time() + 60)
        try:
            claimed = "claimed" if await store.claim("booking-1", claim, 330) is None else "?"
        except IdempotencyUnavailable as exc:
            claimed = f"refused ({exc.message})"
        mib = 1024 * 1024
        print(f"flood                 {entries:,} answers of {body:,} B in {elapsed:.1f} s")
        print(f"bound                 {bound / mib:,.1f} MiB (maxmemory {maxmemory}, noeviction)")
        print(f"cache counts          {counted / mib:.1f} MiB ({evicted:,} evicted for room)")
        print(f"redis really holds    {used / mib:.1f} MiB over an empty server, without "
              f"client buffers ({clients / mib:.1f} MiB)")
        print(f"room left             {left / mib:.1f} MiB under maxmemory")
        print(f"real / counted        {used / counted:.2f}" if counted else "real / counted  -")
        print(f"failed writes         {len(errors):,} ({', '.join(sorted(set(errors))) or '-'})")
        print(f"a booking's claim     {claimed}")
        await cache.close()
        await store.close()
        await client.aclose()
    finally:
        proc.terminate()
        await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=400)
    parser.add_argument("--body", type=int, default=200_000)
    parser.add_argument("--bound", default="8MiB")
    parser.add_argument("--maxmemory", default="32mb")
    args = parser.parse_args()
    asyncio.run(run(args.entries, args.body, parse_size(args.bound), args.maxmemory))


if __name__ == "__main__":
    main()
