"""Where Idempotency-Key records live: in this process, in the supervisor, or in Redis.

Every store offers the same operations on a record (:class:`~gateway.proxy.idempotency.
Record`), named by its storage key:

* ``claim``: atomically, write the in-flight record if the key has none (or holds a claim
  abandoned before it sent anything) and return None (the caller leads), or return the record
  already there;
* ``sending``: mark the caller's claim as sending (before the first upstream send); an error
  if the claim is no longer the caller's;
* ``finish``: write the final record (kept for ``GATEWAY_IDEMPOTENCY_TTL``);
* ``release``: delete the key if it still holds the caller's claim (nothing was done);
* ``wait``: wait until the key's in-flight record settles (or ``timeout``), return the record;
* ``close``.

:class:`LocalStore` keeps answers in a :class:`~gateway.proxy.bounded.BoundedCache` (limits in
bytes and entries); in-flight claims sit apart from it, so memory pressure never evicts a claim
(their number is bounded by the requests in progress, and by ``max_entries``). With worker
processes the supervisor holds one (:class:`RemoteStore` is a worker's view of it, over the
worker's channel).
:class:`RedisStore` is the fleet's: ``SET NX PX`` claims, records sealed with the store key when
one is set. Each store's waits poll or wake with a floor delay and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, Protocol

from gateway.clock import Clock
from gateway.coordination.channel import Calls, ChannelClosed, Message
from gateway.coordination.redis_policy import EvictingStore, judge, read_policy
from gateway.coordination.sealing import seal, sealer_for, unseal
from gateway.proxy.bounded import BoundedCache
from gateway.proxy.idempotency import IdempotencyUnavailable, Record
from gateway.redact import Secret

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.idempotency")
#: How often a claim reads the store's maxmemory-policy again (one CONFIG GET per process).
POLICY_RECHECK: Final = 10.0
#: Polling a shared store for a settling record: first delay, and the longest.
POLL_FLOOR: Final = 0.025
POLL_CAP: Final = 0.5
#: Most rounds of claiming a key that keeps changing hands (released, expired) in one request;
#: POLL_FLOOR apart.
CLAIM_ROUNDS: Final = 3
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


class IdempotencyStore(Protocol):
    async def claim(self, key: str, record: Record, ttl: float) -> Record | None: ...

    async def sending(self, key: str, record: Record) -> None: ...

    async def finish(self, key: str, record: Record, ttl: float) -> None: ...

    async def release(self, key: str, owner: str) -> None: ...

    async def wait(self, key: str, within: float) -> Record | None: ...

    async def close(self) -> None: ...


def _claim_lost() -> IdempotencyUnavailable:
    return IdempotencyUnavailable("the Idempotency-Key claim was lost before sending: nothing "
                                  "was sent", retry_after=1.0)


class LocalStore:
    """Records in this process's memory (see the module's docstring)."""

    def __init__(self, *, max_bytes: int, max_entries: int, clock: Clock,
                 on_evict: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._max_entries = max_entries
        # Values: (record, when it expires on the monotonic clock).
        self._done: BoundedCache[str, tuple[Record, float]] = BoundedCache(
            max_size=max_bytes, max_entries=max_entries, expires=lambda value: value[1],
            timer=clock.monotonic, getsizeof=lambda value: value[0].size, on_evict=on_evict)
        #: Claims in flight, with the lifetime their record is to have.
        self._in_flight: dict[str, tuple[Record, float]] = {}
        self._settled: dict[str, asyncio.Future[None]] = {}

    @property
    def stored_bytes(self) -> int:
        return int(self._done.currsize) + sum(r.size for r, _ in self._in_flight.values())

    def __len__(self) -> int:
        return len(self._done) + len(self._in_flight)

    def _get(self, key: str) -> Record | None:
        held = self._in_flight.get(key)
        if held is not None:
            now = self._clock.time()
            if held[0].in_flight_at(now):
                return held[0]
            if held[0].abandoned_at(now):  # its leader is gone and never sent: free again
                del self._in_flight[key]
                self._wake(key)
                return None
            self._settle(key, held[0].settled("unknown"), held[1])  # gone while sending
        kept = self._done.get(key)
        return None if kept is None else kept[0]

    def _settle(self, key: str, record: Record, ttl: float) -> None:
        self._in_flight.pop(key, None)
        expires = self._clock.monotonic() + ttl
        if not self._done.put(key, (record, expires)):  # never forget that it was done
            self._done.put(key, (record.settled("not_kept", record.status), expires))
        self._wake(key)

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        existing = self._get(key)
        if existing is not None:
            return existing
        if len(self._in_flight) >= self._max_entries:
            for stale in list(self._in_flight):
                self._get(stale)  # claims past their lease settle or free their key
            if len(self._in_flight) >= self._max_entries:
                raise IdempotencyUnavailable("too many requests with an Idempotency-Key in "
                                             "flight", retry_after=1.0)
        self._in_flight[key] = (record, ttl)
        return None

    async def sending(self, key: str, record: Record) -> None:
        held = self._in_flight.get(key)
        if held is None or held[0].owner != record.owner:
            raise _claim_lost()
        self._in_flight[key] = (held[0].marked_sending(), held[1])

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        self._settle(key, record, ttl)

    async def release(self, key: str, owner: str) -> None:
        held = self._in_flight.get(key)
        if held is not None and held[0].owner == owner:
            del self._in_flight[key]
            self._wake(key)

    def orphan(self, claims: set[tuple[str, str]]) -> None:
        """The leaders of these (key, owner) claims are gone (their worker died): a claim
        that was sending may have made the upstream act, so its outcome is unknown; one that
        never sent is released."""
        for key, owner in claims:
            held = self._in_flight.get(key)
            if held is not None and held[0].owner == owner:
                if held[0].sending:
                    self._settle(key, held[0].settled("unknown"), held[1])
                else:
                    del self._in_flight[key]
                    self._wake(key)

    async def wait(self, key: str, within: float) -> Record | None:
        record = self._get(key)
        if record is None or record.state != "in_flight":
            return record
        future = self._settled.get(key)
        if future is None:
            future = self._settled[key] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(max(0.0, within)):
                await asyncio.shield(future)
        except TimeoutError:
            pass
        return self._get(key)

    def _wake(self, key: str) -> None:
        future = self._settled.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def close(self) -> None:
        return None


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
                if await self._call(self._redis.set(name, value, nx=True, px=_millis(ttl))):
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
                                                     _millis(ttl))):
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
            raise _claim_lost()

    async def _get(self, key: str) -> Record | None:
        value = await self._call(self._redis.get(self._prefix + key))
        return None if value is None else self._decode(key, value)

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        await self._call(self._redis.set(self._prefix + key, self._encode(key, record),
                                         px=_millis(ttl)))

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


def poll_delays(within: float) -> Iterator[float]:
    """The pauses between reads while waiting ``within`` seconds: POLL_FLOOR, doubling to
    POLL_CAP, the last one cut to what is left (so at most within / POLL_FLOOR + 1 reads,
    and about 7 + within / POLL_CAP)."""
    left = max(0.0, within) if within == within else 0.0  # NaN: no wait
    delay = POLL_FLOOR
    while left > 0:
        pause = min(delay, left)
        yield pause
        left -= pause
        delay = min(delay * 2, POLL_CAP)


class RemoteStore:
    """A worker's view of the supervisor's :class:`LocalStore`: each operation is one ``idem``
    call on the worker's channel (:mod:`gateway.coordination.channel`).

    Bodies cross once per worker, not once per waiter: concurrent waits for one key share one
    call, and a claim's reply never carries a kept body (a repeat that needs it fetches it
    through that shared wait)."""

    def __init__(self, calls: Calls, release: Callable[[str, str], object],
                 timeout: float) -> None:
        self._calls = calls
        self._release_later = release  # a fire-and-forget release (key, owner)
        self._timeout = timeout  # for an answer, beyond the operation's own wait
        #: The one wait each key has in the supervisor, shared by this worker's waiters.
        self._waits: dict[str, asyncio.Task[Record | None]] = {}

    async def _ask(self, op: str, key: str, record: Record | None = None, wait: float = 0.0,
                   **args: Any) -> Message:
        fields: dict[str, Any] = {"op": op, "key": key, **args}
        body = b""
        if record is not None:
            fields["record"], body = record.to_dict(body=False), record.body
        try:
            reply = await self._calls.call(fields, body, within=self._timeout + wait)
        except (TimeoutError, ChannelClosed):
            raise IdempotencyUnavailable("the supervisor did not answer for the "
                                         "Idempotency-Key store", retry_after=1.0) from None
        if reply.fields.get("error"):
            raise IdempotencyUnavailable(str(reply.fields["error"]), retry_after=1.0)
        return reply

    @staticmethod
    def _record(reply: Message) -> Record | None:
        raw = reply.fields.get("record")
        return None if raw is None else Record.from_dict(raw, reply.attachment)

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        try:
            reply = await self._ask("claim", key, record, ttl=ttl)
        except IdempotencyUnavailable:  # it may have landed: take it back, nothing was sent
            self._release_later(key, record.owner)
            raise
        found = self._record(reply)
        if found is None or not reply.fields.get("more"):
            return found
        full = await self.wait(key, 0.0)  # the kept body, fetched once for all who need it
        if full is None or full.owner != found.owner or full.state != found.state:
            raise IdempotencyUnavailable("the Idempotency-Key record changed while it was "
                                         "read", retry_after=1.0)
        return full

    async def sending(self, key: str, record: Record) -> None:
        await self._ask("sending", key, owner=record.owner)

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        await self._ask("finish", key, record, ttl=ttl)

    async def release(self, key: str, owner: str) -> None:
        await self._ask("release", key, owner=owner)

    async def wait(self, key: str, within: float) -> Record | None:
        """Wait through the key's shared wait; one that ends early for this caller (it began
        sooner, or was a fetch) is followed by another for what is left of ``within``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, within)
        while True:
            task = self._waits.get(key)
            if task is None or task.done():
                task = self._waits[key] = asyncio.ensure_future(
                    self._wait_once(key, max(0.0, until - loop.time())))
                task.add_done_callback(functools.partial(self._forget_wait, key))
            record = await asyncio.shield(task)
            if record is None or record.state != "in_flight" or (
                    loop.time() >= until - POLL_FLOOR):
                return record

    def _forget_wait(self, key: str, task: asyncio.Task[Record | None]) -> None:
        if self._waits.get(key) is task:
            del self._waits[key]

    async def _wait_once(self, key: str, within: float) -> Record | None:
        return self._record(await self._ask("wait", key, wait=within, within=within))

    async def close(self) -> None:
        for task in list(self._waits.values()):
            task.cancel()


async def serve_remote(store: LocalStore, message: Message,
                       claims: set[tuple[str, str]]) -> tuple[dict[str, Any], bytes]:
    """The supervisor's side of :class:`RemoteStore`: run one operation, make the reply's
    fields and attachment. ``claims`` tracks the asking worker's (key, owner) claims in
    flight (settled as a dead worker's if it dies)."""
    doc = message.fields
    reply: dict[str, Any] = {"id": doc["id"]}
    attachment = b""
    try:
        op, key = doc["op"], str(doc["key"])
        result: Record | None = None
        if op == "claim":
            record = Record.from_dict(doc["record"], message.attachment)
            result = await store.claim(key, record, float(doc["ttl"]))
            if result is None:
                claims.add((key, record.owner))
            elif result.body:  # the body crosses through the worker's shared wait, once,
                if result.fingerprint == record.fingerprint:  # and only to be replayed
                    reply["more"] = True
                result = replace(result, body=b"")
        elif op == "sending":
            await store.sending(key, Record("in_flight", "", str(doc["owner"]), ""))
        elif op == "finish":
            record = Record.from_dict(doc["record"], message.attachment)
            await store.finish(key, record, float(doc["ttl"]))
            claims.discard((key, record.owner))
        elif op == "release":
            await store.release(key, str(doc["owner"]))
            claims.discard((key, str(doc["owner"])))
        elif op == "wait":
            result = await store.wait(key, min(float(doc["within"]), 600.0))
        else:
            raise ValueError(f"unknown operation {op!r}")
        if result is not None:
            reply["record"], attachment = result.to_dict(body=False), result.body
        else:
            reply["record"] = None
    except IdempotencyUnavailable as exc:
        reply["error"] = exc.message
    except Exception as exc:  # a malformed call: answered, never left to time out
        log.warning("skipped a malformed Idempotency-Key call from a worker",
                    extra={"fields": {"event": "channel_malformed",
                                      "error": type(exc).__name__}})
        reply["error"] = f"bad idempotency message ({type(exc).__name__})"
    return reply, attachment


def _millis(seconds: float) -> int:
    return max(1, min(int(seconds * 1000), 10**12))
