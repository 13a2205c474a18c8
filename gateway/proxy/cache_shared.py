"""The GET cache's fleet layer: answers shared through Redis (``GATEWAY_CACHE_SHARED``).

Beside each process's own cache (:mod:`gateway.proxy.cache`), a kept answer is also written to
Redis, ``<prefix>:cache:<digest of upstream and key>`` (the key holds the partner), expiring
with the answer (``PX``); a process that misses in memory reads it from there before going
upstream, so one replica's upstream call serves the fleet. Entries are sealed with the store key
when one is set. The layer never fails a request: Redis unreachable or an unreadable entry is a
miss, counted (``cache_shared_errors_total``), and writes go out in the background, at most
:data:`MAX_PENDING_WRITES` at once (the rest are dropped: the next miss writes again).

**A bound for the fleet** (``GATEWAY_CACHE_SHARED_MAX_BYTES``). GET traffic must never fill
the Redis that holds the booking records and the token: every write goes through one script
that keeps an index (``<prefix>:cache-index``, entries by expiry, and ``<prefix>:cache-sizes``,
what each takes, counted with its key and index overhead) and, atomically, forgets what has
expired, then drops the entries soonest to expire until the new one fits. Whatever the number
of replicas, the cache's entries stay within the bound; an entry larger than it is not kept.
The bound counts bytes as written (plus :data:`ENTRY_OVERHEAD`); Redis's own allocations add
up to about 30 % more (measured), which docs/deployment.md asks ``maxmemory`` to leave room for.
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
from gateway.coordination.sealing import seal, sealer_for, unseal
from gateway.proxy.cache import CachedAnswer
from gateway.redact import Secret

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.cache")
MAX_PENDING_WRITES: Final = 64
#: Bytes counted per entry beyond its value and three copies of its name (key, index, sizes).
ENTRY_OVERHEAD: Final = 256
#: Write an entry within the fleet's bound (see the module's docstring). KEYS: the entry, the
#: index (a sorted set by expiry, ms), the sizes (a hash; '#' holds the total). ARGV: the
#: value, its lifetime (ms), its size, the bound. Answers 0 (too large) or 1 + the evicted.
_PUT: Final = """
local index, sizes = KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function forget(name)
  local size = tonumber(redis.call('HGET', sizes, name) or '0')
  redis.call('HDEL', sizes, name)
  redis.call('ZREM', index, name)
  redis.call('HINCRBY', sizes, '#', -size)
  return size
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, 256)) do
  forget(name)
  redis.call('DEL', name)  -- expired: free it now, not when Redis gets round to it
end
if redis.call('HEXISTS', sizes, KEYS[1]) == 1 then forget(KEYS[1]) end
local ttl, size, bound = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if size > bound then return 0 end
local total = tonumber(redis.call('HGET', sizes, '#') or '0')
local evicted = 0
while total + size > bound do
  local soonest = redis.call('ZRANGE', index, 0, 0)
  if #soonest == 0 then break end
  total = total - forget(soonest[1])
  redis.call('DEL', soonest[1])
  evicted = evicted + 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', index, now + ttl, KEYS[1])
redis.call('HSET', sizes, KEYS[1], size)
redis.call('HINCRBY', sizes, '#', size)
local left = redis.call('PTTL', index)
if left == -1 or left < ttl then  -- the index lives as long as its longest entry
  redis.call('PEXPIRE', index, ttl)
  redis.call('PEXPIRE', sizes, ttl)
end
return 1 + evicted
"""


class SharedCache:
    """Reads and writes of cached answers in Redis (see the module's docstring)."""

    def __init__(self, redis: Redis, *, prefix: str, scope: str, store_key: Secret | None,
                 clock: Clock, on_error: Callable[[str], None], max_bytes: int,
                 previous_key: Secret | None = None,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:cache:"
        self._index = (f"{prefix}:cache-index", f"{prefix}:cache-sizes")
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._scope = scope
        self._clock = clock
        self._on_error = on_error
        self._sealer = sealer_for(store_key, previous_key, info=b"get-cache-v1")
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
        task = asyncio.get_running_loop().create_task(self.write(key, entry, ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def write(self, key: str, entry: CachedAnswer, ttl: float) -> None:
        """Write ``entry`` now, within the bound (failures counted, never raised)."""
        name = self._name(key)
        doc: dict[str, Any] = {
            "s": entry.status, "r": entry.reason, "h": [list(h) for h in entry.headers],
            "b": base64.b64encode(entry.body).decode(), "v": list(entry.vary),
            "vv": list(entry.vary_values), "t": entry.stored_at,
            "x": self._clock.time() + ttl, "z": entry.size}
        data = json.dumps(doc, separators=(",", ":")).encode()
        value = seal(self._sealer, data, name.encode())
        size = len(value) + 3 * len(name) + ENTRY_OVERHEAD
        try:
            done = int(await self._redis.eval(
                _PUT, 3, name, *self._index, value, str(max(1, int(ttl * 1000))), str(size),
                str(self.max_bytes)))
        except Exception as exc:
            self._failed("set", exc)
            return
        if done > 1 and self._on_evict is not None:
            self._on_evict(done - 1)

    def _failed(self, op: str, exc: Exception) -> None:
        self._on_error(op)
        log.debug("shared cache %s failed", op, extra={"fields": {
            "event": "cache_shared_error", "op": op, "error": type(exc).__name__}})

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)
        await self._redis.aclose()
