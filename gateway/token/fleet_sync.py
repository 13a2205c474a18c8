"""Fleet coordination for one token manager: the side of renewal that talks to the fleet.

Before an auth call, :meth:`FleetSync.turn` adopts a newer token from the store, waits for the
replica holding the renewal lease, or takes the lease (store down: the down policy decides).
During the call, :meth:`FleetSync.leased` extends the lease. After it,
:meth:`FleetSync.publish_result` writes the result (fenced). In the background,
:meth:`FleetSync.run` adopts what other replicas write and publishes what was renewed here
while the store was away. A credential rotation takes its turn under the new credentials' key
(:meth:`FleetSync.rotation_turn`). The store protocol is :mod:`gateway.token.store`; the
decisions (lease waits, the down policy) are :mod:`gateway.token.fleet`'s.

The manager stays the owner of the one :class:`~gateway.token.renewal.RenewalState`: this
module reads and replaces it through :class:`Renewer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import replace
from typing import Protocol, TypeVar

from gateway.clock import Clock
from gateway.coordination.sealing import StoreError
from gateway.errors import AuthError, StoreKeyMismatch
from gateway.tasks import cancel_and_wait, sleep_or_set, sleep_or_until
from gateway.token import renewal
from gateway.token.fleet import EntryUnreadable, Fleet, local_renewal_at
from gateway.token.renewal import RenewalPolicy, RenewalState
from gateway.token.value import RenewalKind, Token, is_usable

log = logging.getLogger("gateway.token")
T = TypeVar("T")


class Renewer(Protocol):
    """What the fleet sync needs of the token manager it serves."""

    state: RenewalState

    def attempt_running(self) -> bool:
        """An auth call is under way (it reads the store itself)."""
        ...

    def wake(self) -> None:
        """Decide the next attempt again."""
        ...

    def token_adopted(self, token: Token) -> None:
        """A token written by another replica is now ours."""
        ...

    def held_back(self) -> bool:
        """Our own auth call must wait (credential contention): True, and the wait is in
        ``state``."""
        ...


class FleetSync:
    """Keeps one manager's renewal in step with the fleet's shared store."""

    def __init__(self, fleet: Fleet, host: Renewer, clock: Clock,
                 policy: RenewalPolicy) -> None:
        self.fleet, self._host, self._clock, self._policy = fleet, host, clock, policy
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Look at the store again now (a change was announced, or ours should be published)."""
        self._wake.set()

    # -- around one auth call ------------------------------------------------------------------
    def _due_kind(self, previous: float | None) -> RenewalKind | None:
        """Is an attempt due now (as if ours had not started), and of which kind?"""
        st = replace(self._host.state, in_flight=None, last_attempt_at=previous)
        now = self._clock.monotonic()
        plan = renewal.next_attempt(st, now, self._policy)
        return plan.kind if plan is not None and plan.when <= now else None

    def adopt(self, shared: RenewalState) -> None:
        """Merge the store's state into ours (a newer token is taken, with a log line)."""
        host = self._host
        before = host.state
        host.state = renewal.adopt(before, shared)
        tok = host.state.token
        if tok is not None and tok is not before.token and (
                before.token is None or tok.access != before.token.access):
            self.fleet.adopted()
            host.token_adopted(tok)
            log.info("token adopted from the store", extra={"fields": {
                "event": "token_adopted", "generation": tok.generation,
                "token_fp": tok.fingerprint, "renewed_by": self.fleet.renewed_by}})
            host.wake()

    async def turn(self, kind: RenewalKind,
                   previous: float | None) -> tuple[RenewalKind, bool] | None:
        """Before an auth call: adopt a newer token from the store, wait for the replica that
        holds the lease, or take the lease ourselves (kind, True). Store down: the down
        policy decides (kind, False) or None."""
        fleet, host = self.fleet, self._host
        waited = False
        while True:
            try:
                seen = fleet.seq
                shared = await fleet.load()
                if shared is not None:
                    self.adopt(shared)
                if self._due_kind(previous) is None:
                    return None
                if not await fleet.acquire():
                    if not waited:
                        fleet.lease_wait()
                        waited = True
                    await fleet.wait_for_change(seen, fleet.lease_ttl)
                    continue
                shared = await fleet.load()  # it may have changed just before we got the lease
            except StoreError:
                return self._store_down(kind)
            except EntryUnreadable:  # sealed with another key and live: never log in
                host.state = renewal.deferred(host.state,
                                              self._clock.monotonic() + fleet.lease_ttl)
                return None
            if shared is not None:
                self.adopt(shared)
                dead = shared.in_flight
                if dead is not None and dead.kind == "refresh" and (
                        shared.generation == host.state.generation):
                    # The last holder died during a refresh: that refresh token may be used up.
                    host.state = renewal.banned_refresh(host.state)
                    log.warning("taking over a renewal whose holder vanished: logging in",
                                extra={"fields": {"event": "lease_takeover"}})
            due = self._due_kind(previous)
            if due is None or host.held_back():  # nothing to do, or our call must wait
                await fleet.release()
                return None
            host.state = renewal.started(host.state, due, self._clock.monotonic())
            if not await fleet.write(host.state):  # our in-flight marker, for a successor
                await fleet.release()
                return None
            return due, True

    def _store_down(self, kind: RenewalKind) -> tuple[RenewalKind, bool] | None:
        fleet, host = self.fleet, self._host
        now = self._clock.monotonic()
        if fleet.key_mismatch:  # the fleet's token is not ours to replace, store or no store
            host.state = renewal.deferred(host.state, now + fleet.lease_ttl)
            return None
        at = local_renewal_at(host.state, self._policy, fleet.down_policy, fleet.down_since,
                              fleet.lease_ttl, fleet.local_renewals, fleet.last_local, fleet.u)
        if at <= now:
            log.warning("token store unavailable: renewing locally", extra={"fields": {
                "event": "store_down_local_renewal", "policy": fleet.down_policy}})
            return kind, False
        # Look at the store again soon; renew here only once the policy allows it.
        host.state = renewal.deferred(host.state, min(at, now + fleet.lease_ttl))
        return None

    async def leased(self, call: Awaitable[T]) -> T:
        """Run an auth call while extending the fleet's lease every third of its TTL; if the
        lease cannot be extended, abandon the call (another replica may take over)."""
        fleet = self.fleet
        task = asyncio.ensure_future(call)
        try:
            while not task.done():
                await sleep_or_until(self._clock, fleet.lease_ttl / 3, task)
                if not task.done() and not await fleet.extend():
                    raise AuthError("lease_lost", "the renewal lease could not be extended: "
                                    "abandoning the renewal", ambiguous=True)
            return task.result()
        finally:
            if not task.done():
                await cancel_and_wait(task)
            elif not task.cancelled():
                # It failed while the lease was being extended, and lease_lost is raised
                # instead: its own error is superseded, but retrieved (never "unretrieved").
                task.exception()

    async def publish_result(self, holding: bool) -> None:
        """After an attempt: with the lease, write its result (token or back-off); fenced
        off, someone else's result is the fleet's truth, and adopted. Without the lease (the
        store was down): count a local renewal."""
        if not holding:
            self.fleet.renewed_locally()
            return
        if not await self.fleet.write(self._host.state):
            with contextlib.suppress(StoreError, EntryUnreadable):
                shared = await self.fleet.load()
                if shared is not None:
                    self.adopt(shared)

    async def still_current(self, generation: int) -> bool:
        """Is ``generation`` the fleet's newest too? (Store unreachable: nobody can tell.)"""
        try:
            shared = await self.fleet.load()
        except (StoreError, EntryUnreadable):
            return False
        if shared is not None:
            self.adopt(shared)
        tok = self._host.state.token
        return tok is not None and tok.generation == generation

    # -- in the background ---------------------------------------------------------------------
    async def run(self) -> None:
        """Adopt what other replicas write (notified, and polled every lease TTL)."""
        fleet = self.fleet
        listener = asyncio.create_task(fleet.listen(self.poke), name="token-store-listener")
        try:
            while True:
                self._wake.clear()
                try:
                    await self._sync()
                except Exception:  # never let a bug stop the fleet sync
                    log.exception("token store sync crashed")
                await sleep_or_set(self._clock, self._wake, fleet.lease_ttl)
        finally:
            await cancel_and_wait(listener)

    async def _sync(self) -> None:
        fleet, host = self.fleet, self._host
        if host.attempt_running():
            return  # the attempt under way reads the store itself
        try:
            shared = await fleet.load()
        except (StoreError, EntryUnreadable):
            return
        if host.attempt_running():
            return
        if host.state.deferred:  # the store answers again: no more waiting on it
            host.state = renewal.undeferred(host.state)
            host.wake()
        if shared is not None:
            self.adopt(shared)
        if self._ours_is_newer(shared):
            # Renewed here while the store was down, or it is new, or it was opened with
            # GATEWAY_STORE_KEY_PREVIOUS: written (again) sealed with our key.
            await self._publish_ours()

    def _ours_is_newer(self, shared: RenewalState | None) -> bool:
        ours = self._host.state.token
        return ours is not None and (
            shared is None or shared.token is None or ours.generation > shared.generation
            or (self.fleet.resealable and ours.generation >= shared.generation))

    async def _publish_ours(self) -> None:
        fleet, host = self.fleet, self._host
        if fleet.key_mismatch:
            return
        owner = fleet.store.owner

        def moved() -> bool:
            """A rotation began meanwhile: the store may be keyed to the new credentials,
            whose entry and lease are not this publish's to touch."""
            return host.attempt_running() or fleet.store.owner != owner

        try:
            if not await fleet.acquire():
                return
        except StoreError:
            return
        try:
            shared = await fleet.load()
            if not moved() and self._ours_is_newer(shared):
                await fleet.write(renewal.ended(host.state))
        except (StoreError, EntryUnreadable):
            pass
        finally:
            if fleet.store.owner == owner:
                await fleet.release()

    # -- a credential rotation -----------------------------------------------------------------
    @property
    def owner(self) -> str:
        """Whose entry the store is keyed to now."""
        return self.fleet.store.owner

    async def rotation_turn(self, owner: str) -> tuple[RenewalState | None, bool]:
        """Key the store to the new credentials' ``owner``: their usable token if a replica
        wrote one (or does while we wait for its lease), else whether we hold their lease
        (then we log in for the fleet)."""
        margin, clock = self._policy.margin, self._clock
        try:
            return await self.fleet.rotation_turn(
                owner, lambda st: is_usable(st.token, clock.monotonic(), margin),
                within=self._policy.attempt_timeout + self.fleet.lease_ttl)
        except EntryUnreadable:
            raise StoreKeyMismatch("not rotating: the fleet's token for the new credentials "
                                   "is sealed with another GATEWAY_STORE_KEY") from None

    async def rotation_failed(self, before: str, holding: bool) -> None:
        """The rotation failed: release the new owner's lease, key the store back."""
        if holding:
            await self.fleet.release()
        self.fleet.store.rekey(before)

    async def rotation_logged_in(self, state: RenewalState) -> None:
        """Our login is the fleet's token for the new credentials: written, lease released."""
        try:
            await self.fleet.write(state)
        finally:
            await self.fleet.release()

    def rotation_adopted(self) -> str | None:
        """The fleet's token for the new credentials was adopted: published again soon under
        the generation given here. Returns who renewed it."""
        self.fleet.adopted()
        self.poke()
        return self.fleet.renewed_by
