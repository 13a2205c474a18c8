"""The GET cache's fleet layer: answers shared through Redis (``GATEWAY_CACHE_SHARED``).

Beside each process's own cache (:mod:`gateway.proxy.cache`), a kept answer is also written to
Redis, ``<prefix>:cache:<digest of upstream and key>`` (the key holds the partner), expiring
with the answer (``PX``); a process that misses in memory reads it from there before going
upstream, so one replica's upstream call serves the fleet. Entries are sealed with the store key
when one is set. The layer never fails a request: Redis unreachable or an unreadable entry is a
miss, counted (``cache_shared_errors_total``), and writes go out in the background, at most
:data:`MAX_PENDING_WRITES` at once (the rest are dropped: the next miss writes again).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from gateway.clock import Clock
from gateway.proxy.cache import CachedAnswer
from gateway.redact import Secret
from gateway.token.store import Sealer, seal, unseal

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.cache")
MAX_PENDING_WRITES: Final = 64


class SharedCache:
    """Reads and writes of cached answers in Redis (see the module's docstring)."""

    def __init__(self, redis: Redis, *, prefix: str, scope: str, store_key: Secret | None,
                 clock: Clock, on_error: Callable[[str], None]) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:cache:"
        self._scope = scope
        self._clock = clock
        self._on_error = on_error
        self._sealer = (Sealer(store_key, "", info=b"get-cache-v1")
                        if store_key is not None else None)
        self._writes: set[asyncio.Task[None]] = set()

    def _name(self, key: str) -> str:
        return self._prefix + hashlib.sha256(f"{self._scope}\0{key}".encode()).hexdigest()[:40]

    async def get(self, key: str) -> CachedAnswer | None:
        """The fleet's entry for ``key`` (its remaining lifetime carried over), or None."""
        name = self._name(key)
        try:
            value = await self._redis.get(name)
        except Exception as exc:  # the store is down: a miss
            self._failed("get", exc)
            return None
        if not isinstance(value, str):
            return None
        try:
            doc = json.loads(unseal(self._sealer, value, name.encode()))
            left = float(doc["x"]) - self._clock.time()
            if left <= 0:
                return None
            return CachedAnswer(
                int(doc["s"]), str(doc["r"]), tuple((str(k), str(v)) for k, v in doc["h"]),
                base64.b64decode(doc["b"]), tuple(doc["v"]),
                tuple(None if v is None else str(v) for v in doc["vv"]), float(doc["t"]),
                self._clock.monotonic() + left, int(doc["z"]))
        except Exception as exc:  # another key, garbled: a miss
            self._failed("decode", exc)
            return None

    def put(self, key: str, entry: CachedAnswer) -> None:
        """Write ``entry`` in the background (dropped if too many writes are pending)."""
        ttl = entry.expires_at - self._clock.monotonic()
        if ttl <= 0 or len(self._writes) >= MAX_PENDING_WRITES:
            return
        task = asyncio.get_running_loop().create_task(self._write(key, entry, ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, entry: CachedAnswer, ttl: float) -> None:
        name = self._name(key)
        doc: dict[str, Any] = {
            "s": entry.status, "r": entry.reason, "h": [list(h) for h in entry.headers],
            "b": base64.b64encode(entry.body).decode(), "v": list(entry.vary),
            "vv": list(entry.vary_values), "t": entry.stored_at,
            "x": self._clock.time() + ttl, "z": entry.size}
        data = json.dumps(doc, separators=(",", ":")).encode()
        value = seal(self._sealer, data, name.encode())
        try:
            await self._redis.set(name, value, px=max(1, int(ttl * 1000)))
        except Exception as exc:
            self._failed("set", exc)

    def _failed(self, op: str, exc: Exception) -> None:
        self._on_error(op)
        log.debug("shared cache %s failed", op, extra={"fields": {
            "event": "cache_shared_error", "op": op, "error": type(exc).__name__}})

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)
        await self._redis.aclose()
