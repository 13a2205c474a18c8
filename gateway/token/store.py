"""The shared token store of a fleet: the renewal state in Redis, a fenced renewal lease, and a
notification when a new token lands.

One Redis hash per *owner* (upstream, App Key fingerprint, Partner ID: a credential rotation or
another partner never collides) holds the fleet's :class:`~gateway.token.renewal.RenewalState`
in its serialised form (``blob``), its generation (``gen``) and who wrote it (``by``). Beside it:

* a lease key, taken with ``SET NX PX`` and a unique owner id, held by the one replica that
  renews; it is extended while the renewal runs and released after;
* every write of the state is *fenced* by a Lua script that checks, atomically, that the writer
  still holds the lease and that the generation does not go backwards, so a paused ex-holder
  can never overwrite a newer token;
* a pub/sub channel announces each write; replicas also poll, in case a message is lost.

Blobs are encrypted with AES-GCM (``cryptography``) when a store key is configured, with the
owner as associated data. ``redis`` and ``cryptography`` are imported only when used. Nothing
here decides anything about renewal: see :mod:`gateway.token.fleet`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from gateway.coordination.config import RedisConfig
from gateway.coordination.redis_client import redis_client
from gateway.coordination.sealing import (
    SealedWithAnotherKey,
    StoreCorrupt,
    StoreError,
    seal,
    sealer_for,
    unseal,
)
from gateway.redact import Secret

#: Redis's own clock, in ms (one clock for the whole fleet: no skew between replicas).
_NOW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
#: A reader's stamp: ``seen`` (now) and ``live`` (until when the entry counts as read: the
#: later of what is there and now + ARGV[n] ms, the stamping replica's own window, so a
#: replica with a shorter lease TTL never judges a slower fleet's entry dead).
_STAMP: Final = """
local live = tonumber(redis.call('HGET', KEYS[1], 'live') or '') or 0
redis.call('HSET', KEYS[1], 'seen', now, 'live', math.max(live, now + tonumber(ARGV[%d])))
"""
#: Fence for writes: the lease must be ours, the generation must not go backwards; a forced
#: write (over an entry we cannot read) only once its ``live`` stamp has passed. Every write
#: stamps it.
_WRITE: Final = _NOW + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0') or 0
local new = tonumber(ARGV[2])
if ARGV[5] == '1' then
  local live = tonumber(redis.call('HGET', KEYS[1], 'live') or '')
  if live and now < live then return -2 end
elseif new < current then return -1 end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'blob', ARGV[3], 'by', ARGV[4])
""" + _STAMP % 6 + """
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 1
"""
#: The entry and Redis's time, in one call.
_LOAD: Final = _NOW + """
return {now, redis.call('HGETALL', KEYS[1])}
"""
#: A replica that read the entry says so (only if it is still there).
_SEEN: Final = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
""" + _STAMP % 1 + """
return 1
"""
_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_BLOB_VERSION: Final = "v1"


#: What a fenced write can answer.
WRITTEN, LEASE_LOST, OLDER, LIVE = 1, 0, -1, -2
#: An entry is *live* while a replica that can read it has stamped it within this many of its
#: lease TTLs. Readers poll at least once a lease TTL and stamp once less than LIVE_TTLS - 1 of
#: their lease TTLs is left, so a fleet that reads it keeps ``live`` at least about 2 lease
#: TTLs ahead; 4 leaves a missed poll and a store timeout of slack. Past it, nobody running can
#: read the entry, and it may be overwritten (through the lease): that is how a store key is
#: switched on.
LIVE_TTLS: Final = 4


@dataclass(frozen=True)
class Stored:
    """What the store holds for our owner: the serialised state, and who wrote it."""

    generation: int
    state: dict[str, Any]
    by: str
    #: Opened with GATEWAY_STORE_KEY_PREVIOUS (or in clear while a key is set): to be sealed
    #: again with the current key.
    resealable: bool = False


class RedisStore:
    """The Redis side of the fleet protocol, for one owner."""

    def __init__(self, url: str, *, owner: str, prefix: str, password: Secret | None,
                 ca_file: str, store_key: Secret | None, timeout: float,
                 previous_key: Secret | None = None) -> None:
        self._redis = redis_client(url, password=password, ca_file=ca_file, timeout=timeout)
        self._prefix, self._store_key, self._previous_key = prefix, store_key, previous_key
        self.rekey(owner)
        #: This process's id in the fleet: who holds the lease, who renewed last.
        self.replica = f"{os.uname().nodename[:40]}-{os.getpid()}-{secrets.token_hex(3)}"

    def rekey(self, owner: str) -> None:
        """Use the keys of ``owner`` (after a credential rotation)."""
        self.owner = owner
        base = f"{self._prefix}:{owner}"
        self._state_key, self._lease_key, self._channel = (f"{base}:state", f"{base}:lease",
                                                           f"{base}:events")
        self._sealer = sealer_for(self._store_key, self._previous_key, owner)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except Exception as exc:  # connection, timeout, protocol: all "the store is down"
            raise StoreError(f"redis: {type(exc).__name__}") from None

    async def load(self, lease_ttl: float) -> Stored | None:
        """The entry (None: there is none). Read with this replica's keys, it is stamped
        ``seen`` and ``live`` (at most once a lease TTL); else :class:`SealedWithAnotherKey`,
        ``live`` while a reader's stamp (:data:`LIVE_TTLS` of its lease TTLs) lasts."""
        now, flat = await self._call(self._redis.eval(_LOAD, 1, self._state_key))
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        if not fields:
            return None
        live = _number(fields.get("live"))
        try:
            blob = fields["blob"]
            try:
                data = unseal(self._sealer, blob)
            except SealedWithAnotherKey as exc:
                # No stamp at all: written by a release before the stamps; its pods may still
                # be running, so it counts as live (delete it by hand if nobody can open it).
                exc.live = live is None or int(now) < live
                raise
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("owner") != self.owner:
                raise StoreCorrupt("the stored state belongs to another owner")
            stored = Stored(int(fields["gen"]), doc["state"], str(fields.get("by", "")),
                            self._sealer is not None and not self._sealer.last_current)
        except StoreError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreCorrupt(f"the stored state is unreadable ({type(exc).__name__})") from None
        # Read: say so, once the stamp has less than LIVE_TTLS - 1 of our lease TTLs left (not by
        # the age of `seen`: a faster reader's stamp must not stop ours).
        if live is None or live - int(now) < (LIVE_TTLS - 1) * lease_ttl * 1000:
            await self._call(self._redis.eval(_SEEN, 1, self._state_key,
                                              str(int(LIVE_TTLS * lease_ttl * 1000))))
        return stored

    async def acquire(self, ttl: float) -> bool:
        result = await self._call(self._redis.set(self._lease_key, self.replica, nx=True,
                                                  px=max(1, int(ttl * 1000))))
        return bool(result)

    async def extend(self, ttl: float) -> bool:
        result = await self._call(self._redis.eval(_EXTEND, 1, self._lease_key, self.replica,
                                                   str(max(1, int(ttl * 1000)))))
        return bool(result)

    async def release(self) -> None:
        await self._call(self._redis.eval(_RELEASE, 1, self._lease_key, self.replica))

    async def write(self, generation: int, state: dict[str, Any], lease_ttl: float,
                    force: bool = False) -> int:
        """Write the state, fenced: :data:`WRITTEN`, or :data:`LEASE_LOST` if the lease is no
        longer ours, or :data:`OLDER` if the store holds a newer generation (``force``: write
        over an entry we cannot read, unless it is live: :data:`LIVE`)."""
        data = json.dumps({"owner": self.owner, "state": state}).encode()
        blob = seal(self._sealer, data)
        result = await self._call(self._redis.eval(
            _WRITE, 3, self._state_key, self._lease_key, self._channel, self.replica,
            str(generation), blob, self.replica, "1" if force else "0",
            str(int(LIVE_TTLS * lease_ttl * 1000))))
        return int(result)

    async def notifications(self) -> AsyncIterator[None]:
        """Yields each time another replica writes the state (until the connection fails)."""
        pubsub = self._redis.pubsub()
        channel = self._channel
        try:
            await self._call(pubsub.subscribe(channel))
            while channel == self._channel:  # ends after a rekey: the caller subscribes anew
                message = await self._call(pubsub.get_message(ignore_subscribe_messages=True,
                                                              timeout=5.0))
                if message is not None:
                    yield None
        finally:
            with contextlib.suppress(Exception):  # the connection is gone already
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]


def store_for(redis: RedisConfig, owner: str, timeout: float) -> RedisStore:
    """The store of the configured GATEWAY_REDIS_URL, keyed for ``owner``'s token."""
    return RedisStore(redis.redis_url, owner=owner, prefix=redis.redis_key_prefix,
                      password=redis.redis_password, ca_file=redis.redis_ca_file,
                      store_key=redis.store_key, timeout=timeout,
                      previous_key=redis.store_key_previous)


def _number(text: object) -> int | None:
    try:
        return int(str(text))
    except ValueError:
        return None
