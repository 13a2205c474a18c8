"""Memory of the in-process Idempotency-Key store under a flood of distinct keys.

Claims and settles ``--keys`` distinct keys, each with a booking-sized answer (the sandbox's
``POST /bookings`` answer and headers), into a :class:`~gateway.proxy.idempotency_store.
LocalStore` with the configured limits, and reports what the store counts
(``idempotency_bytes``) beside what Python really holds for it (``tracemalloc``), so the
configured ``GATEWAY_IDEMPOTENCY_MAX_BYTES`` is shown to bound the real memory::

    .venv/bin/python -m benchmarks.idempotency_flood --keys 300000 --max-bytes 64MiB
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import secrets
import time
import tracemalloc

from gateway.clock import SystemClock
from gateway.config_values import parse_size
from gateway.proxy.idempotency import Record, fingerprint, storage_key
from gateway.proxy.idempotency_store import LocalStore

HEADERS = (("Content-Type", "application/json; charset=utf-8"), ("Content-Length", "812"),
           ("Server", "Python/3.11 aiohttp/3.14"))


def booking(i: int) -> bytes:
    return json.dumps({"success": True, "data": {
        "id": secrets.token_hex(12), "code": f"RP{i:06X}", "status": "pending",
        "partnerId": "sandbox-partner", "workshopId": "5f1a2b3c4d5e6f7a8b9c0d01",
        "startTime": "2026-12-01T09:00:00+11:00", "externalId": f"partner-ref-{i}",
        "customer": {"firstName": "Sam", "lastName": "Lee", "email": "sam@example.com",
                     "phone": "+61400000002", "id": secrets.token_hex(12)},
        "car": {"rego": "ABC123", "make": "Toyota", "model": "Corolla", "year": 2019},
        "serviceType": "Logbook service", "createdAt": "2026-12-04T10:00:00Z"}}).encode()


async def flood(keys: int, max_bytes: int, max_entries: int) -> float:
    """Run the flood, print the figures; returns real memory / the bytes limit."""
    evictions = 0

    def evicted() -> None:
        nonlocal evictions
        evictions += 1

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = LocalStore(max_bytes=max_bytes, max_entries=max_entries, clock=SystemClock(),
                       on_evict=evicted)
    started = time.perf_counter()
    peak_real = 0
    for i in range(keys):
        key = storage_key("https://api.repairy.example|partner", "billing", f"key-{i}")
        body = booking(i)
        claim = Record.claim(fingerprint("POST", "/bookings", body), f"req-{i:08d}", 1e12)
        assert await store.claim(key, claim, 86400) is None
        await store.finish(key, claim.settled("done", 201, "Created", HEADERS, body), 86400)
        if i % 20000 == 0 or i == keys - 1:
            peak_real = max(peak_real, tracemalloc.get_traced_memory()[0] - base)
    elapsed = time.perf_counter() - started
    gc.collect()
    real = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    mib = 1024 * 1024
    print(f"keys flooded          {keys:,} in {elapsed:.1f} s ({keys / elapsed:,.0f}/s)")
    print(f"limits                {max_bytes / mib:.1f} MiB, {max_entries:,} entries")
    print(f"store counts          {store.stored_bytes / mib:.1f} MiB in {len(store):,} entries "
          f"({evictions:,} evicted)")
    print(f"python really holds   {real / mib:.1f} MiB (peak seen {peak_real / mib:.1f} MiB)")
    print(f"real / limit          {real / max_bytes:.2f}")
    return real / max_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keys", type=int, default=300_000)
    parser.add_argument("--max-bytes", default="64MiB")
    parser.add_argument("--max-entries", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(flood(args.keys, parse_size(args.max_bytes), args.max_entries))


if __name__ == "__main__":
    main()
