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
import contextlib
import logging
from collections.abc import Callable
from typing import Final, Protocol

from gateway.clock import Clock
from gateway.token import renewal
from gateway.token.renewal import RenewalPolicy, RenewalState
from gateway.token.store import RedisStore, StoreError
from gateway.token.value import usable_until

log = logging.getLogger("gateway.token")
#: Share of the time between "renewal due" and "unusable" after which a replica that cannot
#: reach the store renews on its own (policy ``local``).
LOCAL_SHARE: Final = 0.5
#: Longest pause between reconnection attempts of the notification listener.
MAX_RECONNECT: Final = 10.0


class FleetEvents(Protocol):
    def adopted(self) -> None: ...

    def lease_wait(self) -> None: ...

    def store_error(self, op: str) -> None: ...

    def store_is_up(self, up: bool) -> None: ...


class _NoFleetEvents:
    def adopted(self) -> None:
        pass

    def lease_wait(self) -> None:
        pass

    def store_error(self, op: str) -> None:
        pass

    def store_is_up(self, up: bool) -> None:
        pass


def local_renewal_at(state: RenewalState, policy: RenewalPolicy, down_policy: str,
                     down_since: float, lease_ttl: float) -> float:
    """When a replica that cannot reach the store may renew on its own (inf: never). With
    nothing usable to serve with, after the store has been down for a lease TTL (a blip
    passes without a login per replica); else in the last part of the usable life."""
    if down_policy != "local":
        return float("inf")
    tok = state.token
    if tok is None or state.stale:
        return down_since + lease_ttl
    end = usable_until(tok, policy.margin)
    due = min(state.due_at, end)
    return due + (end - due) * LOCAL_SHARE


class Fleet:
    def __init__(self, store: RedisStore, *, lease_ttl: float, down_policy: str, clock: Clock,
                 events: FleetEvents | None = None) -> None:
        self.store = store
        self.lease_ttl = lease_ttl
        self.down_policy = down_policy
        self._clock = clock
        self._events: FleetEvents = events or _NoFleetEvents()
        self.up = True
        self.down_since = 0.0
        self.problem: str | None = None
        self.renewed_by: str | None = None
        self._changed = asyncio.Event()

    @property
    def replica(self) -> str:
        return self.store.replica

    def _down(self, op: str, exc: StoreError) -> None:
        self._events.store_error(op)
        if self.up:
            self.down_since = self._clock.monotonic()
            log.error("token store unavailable: serving with the token held", extra={
                "fields": {"event": "store_down", "op": op, "error": str(exc)}})
        self.up, self.problem = False, str(exc)
        self._events.store_is_up(False)

    def _reached(self) -> None:
        if not self.up:
            log.warning("token store reachable again", extra={"fields": {"event": "store_up"}})
        self.up, self.problem = True, None
        self._events.store_is_up(True)

    async def load(self) -> RenewalState | None:
        try:
            stored = await self.store.load()
        except StoreError as exc:
            self._down("load", exc)
            raise
        self._reached()
        if stored is None:
            return None
        self.renewed_by = stored.by
        try:
            return renewal.from_dict(stored.state, self._clock.monotonic(), self._clock.time())
        except (KeyError, ValueError, TypeError) as exc:
            err = StoreError(f"the stored state is unreadable ({type(exc).__name__})")
            self._down("load", err)
            raise err from None

    async def acquire(self) -> bool:
        try:
            got = await self.store.acquire(self.lease_ttl)
        except StoreError as exc:
            self._down("acquire", exc)
            raise
        if not got:
            self._events.lease_wait()
        return got

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
            ok = await self.store.write(state.generation, doc)
        except StoreError as exc:
            self._down("write", exc)
            return False
        if ok:
            self.renewed_by = self.replica
        else:
            log.warning("not writing the token: the lease is no longer ours or the store holds "
                        "a newer one", extra={"fields": {"event": "store_write_fenced",
                                                         "generation": state.generation}})
        return ok

    def adopted(self) -> None:
        self._events.adopted()

    async def wait_for_change(self, seconds: float) -> None:
        """Until another replica writes the state (notification) or ``seconds`` pass."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    async def listen(self, on_change: Callable[[], None]) -> None:
        """Forward notifications until cancelled, reconnecting with a capped back-off."""
        pause = 0.5
        while True:
            try:
                async for _ in self.store.notifications():
                    pause = 0.5
                    self._changed.set()
                    on_change()
            except StoreError as exc:
                self._down("subscribe", exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RECONNECT)
