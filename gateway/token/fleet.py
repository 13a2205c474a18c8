"""The fleet's side of renewal: what a replica does with the shared store around an attempt.

:class:`Fleet` wraps the store (:mod:`gateway.token.store`) with what the token manager needs:
load the shared state as a :class:`~gateway.token.renewal.RenewalState`, take, extend and
release the renewal lease, write a result (fenced), wait for another replica's result, and
track whether the store is reachable (a metric and a readiness note, never a failure).

When the store is down and a renewal is due, :func:`local_renewal_at` says when this replica
may renew on its own (policy ``local``: only in the last part of the token's usable life, so
a short Redis blip never makes every replica log in; ``wait``: never).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Final, Protocol

from gateway.clock import Clock
from gateway.coordination.sealing import SealedWithAnotherKey, StoreCorrupt, StoreError
from gateway.tasks import sleep_or_set
from gateway.token import renewal
from gateway.token.renewal import RenewalPolicy, RenewalState
from gateway.token.store import (
    LEASE_LOST,
    LIVE,
    LIVE_TTLS,
    WRITTEN,
    RedisStore,
)
from gateway.token.value import usable_until

log = logging.getLogger("gateway.token")
#: Share of the time between "renewal due" and "unusable" after which a replica that cannot
#: reach the store renews on its own (policy ``local``).
LOCAL_SHARE: Final = 0.5
#: Longest pause between reconnection attempts of the notification listener.
MAX_RECONNECT: Final = 10.0
#: How long a replica that found the fleet's entry sealed with another key keeps off it after
#: the store comes back or the entry vanishes: long enough for replicas with a lease TTL up to
#: 7.5 s (4 of them) to stamp or publish it again.
SETTLE_MIN: Final = 30.0


class EntryUnreadable(Exception):
    """The fleet's entry is live but sealed with another store key: this replica must not log
    in (it would replace the fleet's token) until its GATEWAY_STORE_KEY is fixed."""


class FleetEvents(Protocol):
    def adopted(self) -> None: ...

    def key_mismatch(self, on: bool) -> None: ...

    def lease_wait(self) -> None: ...

    def store_error(self, op: str) -> None: ...

    def store_is_up(self, up: bool) -> None: ...


class _NoFleetEvents:
    def adopted(self) -> None:
        pass

    def key_mismatch(self, on: bool) -> None:
        pass

    def lease_wait(self) -> None:
        pass

    def store_error(self, op: str) -> None:
        pass

    def store_is_up(self, up: bool) -> None:
        pass


def local_renewal_at(state: RenewalState, policy: RenewalPolicy, down_policy: str,
                     down_since: float, lease_ttl: float, local_renewals: int,
                     last_local: float, u: float) -> float:
    """When a replica that cannot reach the store may renew on its own (inf: never).

    With a usable token: in the last part of its usable life (from halfway between "due" and
    "unusable", plus up to a quarter at random per replica, so replicas do not all log in at
    once). With nothing usable (none, or refused by the upstream — perhaps by another
    replica's local login): after the store has been down a lease TTL, then with a back-off
    that doubles with each local renewal of this outage (lease TTL … ``retry_max``) and a
    random share of it, so replicas that revoke each other cannot churn.
    """
    if down_policy != "local":
        return float("inf")
    tok = state.token
    if tok is None or state.stale:
        if local_renewals == 0:
            return down_since + lease_ttl * (1 + u)
        step = min(lease_ttl * (2.0 ** min(local_renewals, 30)), max(policy.retry_max,
                                                                    lease_ttl))
        return last_local + step * (1 + u)
    end = usable_until(tok, policy.margin)
    due = min(state.due_at, end)
    return due + (end - due) * (LOCAL_SHARE + 0.25 * u)


class Fleet:
    def __init__(self, store: RedisStore, *, lease_ttl: float, down_policy: str, clock: Clock,
                 events: FleetEvents | None = None, rng: random.Random | None = None) -> None:
        self.store = store
        self.lease_ttl = lease_ttl
        self.down_policy = down_policy
        self._clock = clock
        self._events: FleetEvents = events or _NoFleetEvents()
        self.up = True
        self.down_since = 0.0
        self.local_renewals = 0  # during the current outage
        self.last_local = 0.0
        self.corrupt = False  # our entry is unreadable: the lease holder overwrites it
        #: Our entry is live but sealed with another store key: never log in meanwhile. It
        #: holds through a store outage and a vanished entry until the store has answered for
        #: ``_settle`` (:data:`SETTLE_MIN`, or LIVE_TTLS lease TTLs if longer) without it.
        self.key_mismatch = False
        self._settle = max(SETTLE_MIN, LIVE_TTLS * lease_ttl)
        self._back_at = -float("inf")  # when the store last came back after an outage
        self._missing_since: float | None = None
        #: The entry was opened with GATEWAY_STORE_KEY_PREVIOUS: seal it again with ours.
        self.resealable = False
        self.problem: str | None = None
        self.renewed_by: str | None = None
        #: This replica's share of the jitter, from the injected random source.
        self.u = (rng or random.Random()).random()
        self.seq = 0  # notifications seen
        self._changed = asyncio.Event()

    @property
    def replica(self) -> str:
        return self.store.replica

    def _down(self, op: str, exc: StoreError) -> None:
        self._events.store_error(op)
        if self.up:
            self.down_since = self._clock.monotonic()
            log.error("token store unavailable", extra={
                "fields": {"event": "store_down", "op": op, "error": str(exc)}})
        self.up, self.problem = False, str(exc)
        self._events.store_is_up(False)

    def _reached(self) -> None:
        if not self.up:
            self._back_at = self._clock.monotonic()
            log.warning("token store reachable again", extra={"fields": {"event": "store_up"}})
        self.up, self.problem = True, None
        self.local_renewals = 0
        self._events.store_is_up(True)

    def renewed_locally(self) -> None:
        self.local_renewals += 1
        self.last_local = self._clock.monotonic()

    async def load(self) -> RenewalState | None:
        """The fleet's state; None when there is none, or none we can read (logged, and the
        next lease holder overwrites it)."""
        try:
            stored = await self.store.load(self.lease_ttl)
        except SealedWithAnotherKey as exc:
            self._reached()
            self._events.store_error("decode")
            self._missing_since = None
            if exc.live:
                self._mismatch(True, str(exc))
                raise EntryUnreadable(str(exc)) from None
            if self.key_mismatch and self._clock.monotonic() < self._back_at + self._settle:
                # Its stamp lapsed while the store was down (nobody could stamp it): no proof
                # that nobody reads it. Wait for the fleet to stamp it again.
                raise EntryUnreadable(str(exc)) from None
            self._mismatch(False)
            self._unreadable(exc)
            return None
        except StoreCorrupt as exc:
            self._reached()
            self._events.store_error("decode")
            self._missing_since = None
            self._mismatch(False)
            self._unreadable(exc)
            return None
        except StoreError as exc:
            self._down("load", exc)
            raise
        self._reached()
        if stored is None and self.key_mismatch:
            # The fleet's entry vanished (a Redis restart, a flush): its replicas publish it
            # again within their lease TTL. Never log in over them meanwhile.
            now = self._clock.monotonic()
            if self._missing_since is None:
                self._missing_since = now
            if now < max(self._missing_since, self._back_at) + self._settle:
                raise EntryUnreadable("the fleet's entry is gone; waiting for its replicas "
                                      "to publish it again")
        self._missing_since = None
        self._mismatch(False)
        self.corrupt = False
        self.resealable = stored is not None and stored.resealable
        if stored is None:
            return None
        self.renewed_by = stored.by
        try:
            return renewal.from_dict(stored.state, self._clock.monotonic(), self._clock.time())
        except (KeyError, ValueError, TypeError) as exc:
            err = StoreError(f"the stored state is unreadable ({type(exc).__name__})")
            self._down("load", err)
            raise err from None

    def _unreadable(self, exc: StoreError) -> None:
        if not self.corrupt:
            log.error("ignoring an unreadable token store entry that no replica has read for "
                      "%d lease TTLs; it will be overwritten", LIVE_TTLS, extra={"fields": {
                          "event": "store_entry_unreadable", "error": str(exc)}})
        self.corrupt = True

    def _mismatch(self, on: bool, why: str = "") -> None:
        if on and not self.key_mismatch:
            log.error("the fleet's token entry is sealed with another GATEWAY_STORE_KEY and "
                      "another replica reads it: not logging in (that would replace the "
                      "fleet's token); give this replica the fleet's GATEWAY_STORE_KEY (or "
                      "the earlier one as GATEWAY_STORE_KEY_PREVIOUS)", extra={"fields": {
                          "event": "store_key_mismatch", "error": why}})
        elif not on and self.key_mismatch:
            log.warning("the fleet's token entry is readable again", extra={"fields": {
                "event": "store_key_match"}})
        if on != self.key_mismatch:
            self.key_mismatch = on
            self._events.key_mismatch(on)

    async def rotation_turn(self, owner: str, usable: Callable[[RenewalState], bool],
                            within: float) -> tuple[RenewalState | None, bool]:
        """A credential rotation's turn, under the new credentials' ``owner`` (the store is
        rekeyed to it; the caller rekeys back if the rotation fails). Another replica's token
        for them already stored: (its state, False), adopt it, no login. Else the lease: (None,
        True), log in once for the fleet. Store down, or no lease ``within`` seconds: (None,
        False), log in here. A live entry sealed with another key raises
        :class:`EntryUnreadable`: never log in over it."""
        self.store.rekey(owner)
        deadline = self._clock.monotonic() + within
        while True:
            try:
                seen = self.seq
                shared = await self.load()
                if shared is not None and usable(shared):
                    return shared, False
                got = await self.acquire()
            except StoreError:
                return None, False
            if got:
                try:
                    shared = await self.load()  # it may have landed just before the lease
                except StoreError:
                    return None, True  # the lease is ours for its TTL: log in under it
                except BaseException:
                    await self.release()
                    raise
                if shared is not None and usable(shared):
                    await self.release()
                    return shared, False
                return None, True
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return None, False
            self.lease_wait()
            # Polled a third of the lease TTL apart too: the listener may still be on the old
            # owner's channel for a moment after the rekey.
            await self.wait_for_change(seen, min(self.lease_ttl / 3, left))

    async def acquire(self) -> bool:
        try:
            got = await self.store.acquire(self.lease_ttl)
        except StoreError as exc:
            self._down("acquire", exc)
            raise
        return got

    def lease_wait(self) -> None:
        self._events.lease_wait()

    async def extend(self) -> bool:
        try:
            return await self.store.extend(self.lease_ttl)
        except StoreError as exc:
            self._down("extend", exc)
            return False

    async def release(self) -> None:
        try:
            await self.store.release()
        except StoreError as exc:
            self._down("release", exc)  # it runs out within the lease TTL anyway

    async def write(self, state: RenewalState) -> bool:
        doc = renewal.to_dict(state, self._clock.monotonic(), self._clock.time())
        try:
            result = await self.store.write(state.generation, doc, self.lease_ttl,
                                            force=self.corrupt)
        except StoreError as exc:
            self._down("write", exc)
            return False
        if result == WRITTEN:
            self.renewed_by, self.corrupt = self.replica, False
            return True
        why = {LEASE_LOST: "the lease is no longer ours",
               LIVE: "another replica reads the entry we cannot (a store key mismatch)"}.get(
            result, "the store holds a newer generation")
        log.warning("not writing the token: %s", why, extra={"fields": {
            "event": "store_write_fenced", "generation": state.generation,
            "lease_lost": result == LEASE_LOST}})
        return False

    def adopted(self) -> None:
        self._events.adopted()

    async def wait_for_change(self, seen: int, seconds: float) -> None:
        """Until a notification after the ``seen`` count (none is lost between a look at the
        store and this wait) or ``seconds`` pass."""
        while self.seq == seen:
            self._changed.clear()
            await sleep_or_set(self._clock, self._changed, seconds)
            if not self._changed.is_set():
                return  # the time passed

    async def listen(self, on_change: Callable[[], None]) -> None:
        """Forward notifications until cancelled, reconnecting with a capped back-off."""
        pause = 0.5
        while True:
            try:
                async for _ in self.store.notifications():
                    pause = 0.5
                    self.seq += 1
                    self._changed.set()
                    on_change()
                continue  # the store was rekeyed: subscribe to the new channel at once
            except StoreError as exc:
                self._down("subscribe", exc)
            await self._clock.sleep(pause)
            pause = min(pause * 2, MAX_RECONNECT)
