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
processes the supervisor holds one (:class:`~gateway.proxy.idempotency_remote.RemoteStore` is
a worker's view of it, over the worker's channel).
:class:`~gateway.proxy.idempotency_redis.RedisStore` is the fleet's: ``SET NX PX`` claims,
records sealed with the store key when one is set. Each store's waits poll or wake with a
floor delay and a deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Final, Protocol

from gateway.clock import Clock
from gateway.proxy.bounded import BoundedCache
from gateway.proxy.idempotency import IdempotencyUnavailable, Record

log = logging.getLogger("gateway.idempotency")
#: How often a claim reads the store's maxmemory-policy again (one CONFIG GET per process).
POLICY_RECHECK: Final = 10.0
#: Polling a shared store for a settling record: first delay, and the longest.
POLL_FLOOR: Final = 0.025
POLL_CAP: Final = 0.5
#: Most rounds of claiming a key that keeps changing hands (released, expired) in one request;
#: POLL_FLOOR apart.
CLAIM_ROUNDS: Final = 3
class IdempotencyStore(Protocol):
    async def claim(self, key: str, record: Record, ttl: float) -> Record | None: ...

    async def sending(self, key: str, record: Record) -> None: ...

    async def finish(self, key: str, record: Record, ttl: float) -> None: ...

    async def release(self, key: str, owner: str) -> None: ...

    async def wait(self, key: str, within: float) -> Record | None: ...

    async def close(self) -> None: ...


def claim_lost() -> IdempotencyUnavailable:
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
            raise claim_lost()
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


def millis(seconds: float) -> int:
    return max(1, min(int(seconds * 1000), 10**12))
