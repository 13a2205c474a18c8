"""The fleet's Idempotency-Key store in Redis: ``SET NX PX`` claims, records sealed with the
store key when one is set, a refusal while Redis may evict them (its maxmemory-policy). The
operations are :class:`~gateway.proxy.idempotency_store.IdempotencyStore`'s."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any, Final

from gateway.clock import Clock
from gateway.coordination.redis_policy import EvictingStore, judge, read_policy
from gateway.coordination.sealing import seal, sealer_for, unseal
from gateway.proxy.idempotency import IdempotencyUnavailable, Record
from gateway.proxy.idempotency_store import (
    CLAIM_ROUNDS,
    POLICY_RECHECK,
    POLL_FLOOR,
    claim_lost,
    millis,
    poll_delays,
)
from gateway.redact import Secret

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.idempotency")
#: Release a claim only if it is still the caller's (the owner id leads the stored value).
_RELEASE: Final = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
#: Mark a claim "sending" only if it is still the caller's; its expiry is kept (PTTL, not
#: KEEPTTL: Redis before 6.0 has no KEEPTTL). A key without an expiry is never written.
_MARK_SENDING: Final = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', left)
    return 1
  end
end
return 0
"""
#: Take over an abandoned claim: only if the key still holds exactly what was read.
_TAKE_OVER: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""



class RedisStore:
    """Records in the fleet's Redis: ``<prefix>:idem:<storage key>`` holds ``owner|payload``
    (payload: the record's JSON, or sealed with the store key), expiring on its own.

    A claim is written with ``SET NX`` and the record's TTL (which start-up checks is longer
    than the leader's deadline and the wait together); the leader marks it *sending* only if
    it still holds it (owner compared in a script); a claim abandoned before sending is taken
    over with a compare-and-set on the whole value. A claim whose reply was lost is released
    by owner before the error reaches the caller."""

    def __init__(self, redis: Redis, *, prefix: str, store_key: Secret | None,
                 clock: Clock, previous_key: Secret | None = None) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:idem:"
        self._clock = clock
        self._sealer = sealer_for(store_key, previous_key, info=b"idempotency-v1")
        self._policy_due = -float("inf")  # when to read the maxmemory-policy again
        self._refused: str | None = None  # an evicting maxmemory-policy: why we refuse

    def _encode(self, key: str, record: Record) -> str:
        data = json.dumps(record.to_dict(), separators=(",", ":")).encode()
        return f"{record.owner}|{seal(self._sealer, data, key.encode())}"

    def _decode(self, key: str, value: str) -> Record:
        _, _, payload = value.partition("|")
        try:
            return Record.from_dict(json.loads(unseal(self._sealer, payload, key.encode())))
        except Exception as exc:  # unreadable: another key, garbled
            raise IdempotencyUnavailable("the Idempotency-Key record in Redis is unreadable "
                                         f"({type(exc).__name__})") from None

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except Exception as exc:  # connection, timeout, full: the request cannot be protected
            # noeviction refusing writes at maxmemory (redis-py: OutOfMemoryError)
            full = type(exc).__name__ == "OutOfMemoryError" or str(exc).startswith("OOM")
            log.warning("idempotency store %s", "full" if full else "unreachable", extra={
                "fields": {"event": "idempotency_store_error",
                           "error": "oom" if full else type(exc).__name__}})
            raise IdempotencyUnavailable(
                "the Idempotency-Key store (Redis) is full (maxmemory)" if full else
                "the Idempotency-Key store (Redis) is unreachable", retry_after=1.0) from None

    async def _policy_refusal(self) -> str | None:
        """Why this Redis may not hold booking records (an evicting maxmemory-policy), read
        at a claim at most every :data:`POLICY_RECHECK` seconds (a Redis down at start-up,
        restarted or reconfigured since, is judged again); an unreachable one keeps the last
        verdict (the claim itself fails then)."""
        now = self._clock.monotonic()
        if now < self._policy_due:
            return self._refused
        policy, why = await read_policy(self._redis)
        if policy is None and not why.startswith("CONFIG"):
            return self._refused  # unreachable: the claim itself will say so
        self._policy_due = now + POLICY_RECHECK
        try:
            judge(policy, True, why)
        except EvictingStore as exc:
            if self._refused is None:
                log.error("refusing Idempotency-Key requests: %s", exc, extra={"fields": {
                    "event": "store_policy_refused", "maxmemory_policy": policy}})
            self._refused = str(exc)
            return self._refused
        self._refused = None
        return None

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        refused = await self._policy_refusal()
        if refused is not None:
            raise IdempotencyUnavailable(refused, retry_after=60.0)
        name = self._prefix + key
        value = self._encode(key, record)
        for _ in range(CLAIM_ROUNDS):  # the record expired or was freed meanwhile: again
            try:
                if await self._call(self._redis.set(name, value, nx=True, px=millis(ttl))):
                    return None
            except IdempotencyUnavailable:  # it may have landed, its reply lost: take it back
                await self._release_quietly(key, record.owner)
                raise
            current = await self._call(self._redis.get(name))
            if current is not None:
                found = self._decode(key, current)
                if not found.abandoned_at(self._clock.time()):
                    return found
                if await self._call(self._redis.eval(_TAKE_OVER, 1, name, current, value,
                                                     millis(ttl))):
                    return None
            await self._clock.sleep(POLL_FLOOR)
        raise IdempotencyUnavailable("the Idempotency-Key record kept changing", retry_after=1.0)

    async def sending(self, key: str, record: Record) -> None:
        try:
            marked = await self._call(self._redis.eval(
                _MARK_SENDING, 1, self._prefix + key, record.owner,
                self._encode(key, record.marked_sending())))
        except IdempotencyUnavailable:  # it may have landed: take the claim back, send nothing
            await self._release_quietly(key, record.owner)
            raise
        if not marked:
            raise claim_lost()

    async def _get(self, key: str) -> Record | None:
        value = await self._call(self._redis.get(self._prefix + key))
        return None if value is None else self._decode(key, value)

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        await self._call(self._redis.set(self._prefix + key, self._encode(key, record),
                                         px=millis(ttl)))

    async def release(self, key: str, owner: str) -> None:
        await self._call(self._redis.eval(_RELEASE, 1, self._prefix + key, owner))

    async def _release_quietly(self, key: str, owner: str) -> None:
        """Release a claim that may or may not have landed; if Redis cannot be reached, the
        claim (never sending) is freed by its lease instead."""
        with contextlib.suppress(IdempotencyUnavailable):
            await self.release(key, owner)

    async def wait(self, key: str, within: float) -> Record | None:
        """Poll until the record settles, on :func:`poll_delays`."""
        record = await self._get(key)
        for delay in poll_delays(within):
            if record is None or record.state != "in_flight":
                break
            await self._clock.sleep(delay)
            record = await self._get(key)
        return record

    async def close(self) -> None:
        await self._redis.aclose()


