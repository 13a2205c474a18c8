"""The one managed token: obtained, renewed ahead of expiry, shared by every request.

Everything that decides "when is the next auth call, and which kind?" is the one
:class:`~gateway.token.renewal.RenewalState` value; the manager applies what
:mod:`gateway.token.renewal` decides, on the injected :class:`~gateway.clock.Clock`.

* :meth:`TokenManager.get` returns a usable token at once (no lock, no I/O), else waits
  (bounded) for the one auth call under way (``_task``: a renewal or a rotation's login).
* The loop sleeps until the next attempt (at most :data:`MAX_SLEEP`: a host may be suspended).
* A refresh refused, or ended ambiguously (its refresh token may be used up), is followed by a
  login at once; other failures back off (a 429 or 5xx never turns into a login at once).
* :meth:`invalidate` means "renew now" for that generation only; the token keeps serving until
  its replacement lands (the kubernetes#99324 pitfall). Invalidations nobody explains are
  counted (:mod:`gateway.token.contention`): while contention lasts, auth calls are spaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Final

from gateway.clock import Clock
from gateway.errors import AuthError, StoreKeyMismatch, TokenUnavailable
from gateway.tasks import cancel_and_wait, log_task_failure, sleep_or_set, sleep_or_until
from gateway.token import renewal
from gateway.token.auth_client import Exchange, ProbeResult, token_from_exchange
from gateway.token.config import PartnerConfig, TokenSide
from gateway.token.contention import ContentionWatch
from gateway.token.fleet import Fleet
from gateway.token.fleet_sync import FleetSync
from gateway.token.renewal import Failure, RenewalState
from gateway.token.source import (
    AuthCalls,
    NoEvents,
    TokenEvents,
    TokenStatus,
)
from gateway.token.unavailable import unavailable
from gateway.token.value import RenewalKind, Token, is_usable, usable_until

log = logging.getLogger("gateway.token")
#: The longest the loop sleeps before deciding again (a host may be suspended meanwhile).
MAX_SLEEP: Final = 30.0


class _AttemptFailed(Exception):
    """An attempt's auth call failed: which one, and how."""

    def __init__(self, kind: RenewalKind, error: AuthError) -> None:
        super().__init__(kind, error.reason)
        self.kind = kind
        self.error = error


class TokenManager:
    def __init__(self, auth: AuthCalls, side: TokenSide, clock: Clock,
                 events: TokenEvents | None = None, rng: random.Random | None = None,
                 initial: Token | None = None,
                 persist: Callable[[Token, PartnerConfig], None] | None = None,
                 fleet: Fleet | None = None) -> None:
        self._auth = auth
        self._fleet = fleet
        self._fleet_task: asyncio.Task[None] | None = None
        self._s = side
        self._policy = side.policy()
        self._clock = clock
        self._events: TokenEvents = events or NoEvents()
        self._rng = rng or random.Random()
        self._persist = persist
        self._state = RenewalState()
        self._task: asyncio.Task[Any] | None = None  # the one auth call under way
        self._wake = asyncio.Event()
        self._landed = asyncio.Event()  # set (and replaced) whenever a token lands
        self._loop_task: asyncio.Task[None] | None = None
        self._last_outcome: str | None = None
        self._last_renewal_wall: float | None = None
        self._usable_token: Token | None = None  # usable(): its usable end, computed once
        self._usable_until = 0.0
        self._stopping = False  # stop() has begun: no new auth call starts
        self._sync = None if fleet is None else FleetSync(fleet, self, clock, self._policy)
        self._contention = ContentionWatch(side.token.contention_invalidations,
                                           side.token.contention_window)
        if initial is not None:  # a stored token from an earlier run
            self._state = renewal.succeeded(self._state, initial, self._policy,
                                            self._rng.random())
            self._events.token_changed(initial)

    # -- the request path ----------------------------------------------------------------------
    @property
    def partner_id(self) -> str:
        return self._s.partner.partner_id

    def usable(self) -> Token | None:
        tok = self._state.token
        if tok is None or self._mismatch():
            return None
        if tok is not self._usable_token:  # once per token, not per request
            self._usable_token = tok
            self._usable_until = usable_until(tok, self._policy.margin)
        return tok if self._clock.monotonic() < self._usable_until else None

    async def get(self, newer_than: int = 0) -> Token:
        """A usable token (of a generation above ``newer_than``), waiting (bounded) for the
        renewal under way if none is held; :class:`TokenUnavailable` when none can be had."""
        if self._mismatch():
            raise StoreKeyMismatch("the fleet's token is sealed with another "
                                   "GATEWAY_STORE_KEY: this replica cannot use it",
                                   retry_after=1.0)
        tok = self._state.token
        if tok is not None and tok.generation > newer_than and is_usable(
                tok, self._clock.monotonic(), self._policy.margin):
            return tok
        return await self._wait_for_token(newer_than)

    def _mismatch(self) -> bool:
        return self._fleet is not None and self._fleet.key_mismatch

    async def _wait_for_token(self, newer_than: int) -> Token:
        deadline = self._clock.monotonic() + self._s.token.token_wait_timeout
        while True:
            self._start_if_due()
            now = self._clock.monotonic()
            tok = self._state.token
            if tok is not None and tok.generation > newer_than and is_usable(
                    tok, now, self._policy.margin):
                return tok
            if now >= deadline:
                if self._contention.active(now) and self._state.stale:
                    raise unavailable(self._state, renewal.next_attempt(
                        self._state, now, self._policy), now, contended=True, store_down=False)
                raise TokenUnavailable("timed out waiting for an access token",
                                       retry_after=1.0)
            task = self._task
            if task is None and self._stopping:
                raise TokenUnavailable("the gateway is stopping", retry_after=1.0)
            if task is None:
                # Nothing under way: either a back-off after failures (answer now, with
                # Retry-After), or only the short floor between attempts (wait for it).
                st = self._state
                plan = renewal.next_attempt(st, now, self._policy)
                if self._sync is not None and self._contention.hold_until(
                        now, self._policy.login_retry_interval) is not None:
                    # Our login is held back; a fleet peer's token may land meanwhile.
                    await sleep_or_set(self._clock, self._landed, deadline - now)
                    continue
                if plan is None or (st.not_before is not None and st.not_before > now) or (
                        plan.when > deadline):
                    raise unavailable(st, plan, now, contended=self._contention.active(now),
                                      store_down=self._fleet is not None and not self._fleet.up)
                await sleep_or_until(self._clock, plan.when - now, None)
                continue
            await sleep_or_until(self._clock, deadline - now, task)

    def invalidate(self, generation: int, reason: str) -> bool:
        """The upstream refused the token of ``generation``: renew now. False if that token is
        already replaced or marked. The token keeps serving until its replacement lands."""
        before = self._state
        self._state = renewal.invalidated(before, generation)
        self._contention.invalidated(generation, reason, self._state is not before)
        if self._state is before:
            return False
        tok = before.token
        assert tok is not None
        log.warning("token invalidated", extra={"fields": {
            "event": "token_invalidated", "reason": reason, "generation": generation,
            "token_fp": tok.fingerprint}})
        self._events.invalidated(reason)
        self._wake.set()
        return True

    async def still_current(self, generation: int) -> bool:
        """Is ``generation`` still the newest token, here and in the fleet? Only then does a
        401 with it say anything about the route. Nobody can tell (False) with the store
        unreachable, or rekeyed to credentials a rotation is still switching to."""
        if self._sync is not None:
            flight = self._state.in_flight
            if flight is not None and flight.kind == "rotation":
                return False
            return await self._sync.still_current(generation)
        tok = self._state.token
        return tok is not None and tok.generation == generation

    def route_explained(self, generation: int) -> None:
        self._contention.retract(generation)

    def holds(self, token: Token) -> bool:
        """Is ``token`` the newest, not refused since?"""
        held = self._state.token
        return held is not None and held.access == token.access and not self._state.stale

    async def probe(self, token: Token) -> ProbeResult:  # with the current credentials
        return await self._auth.probe(token)

    # -- status --------------------------------------------------------------------------------
    def ready(self) -> bool:
        """A usable token (and the fleet's). A refused one serves until replaced: ready."""
        return not self._mismatch() and is_usable(self._state.token, self._clock.monotonic(),
                                                  self._policy.margin)

    def renewal_refused(self) -> bool:
        """The token held was refused, and so is the login to replace it (for the probe)."""
        return self._state.stale and self._state.blocked is not None

    def contended(self) -> bool:
        return self._contention.active(self._clock.monotonic())

    def status(self) -> TokenStatus:
        st = self._state
        now = self._clock.monotonic()
        plan = renewal.next_attempt(st, now, self._policy)
        return TokenStatus(st.token, self.ready(), st.stale, st.due_at,
                           None if plan is None else plan.when, self._last_outcome,
                           st.last_error, self._last_renewal_wall, st.failures, st.blocked,
                           self._contention.count(now), self._contention.remaining(now))

    @property
    def state(self) -> RenewalState:
        return self._state

    @state.setter
    def state(self, value: RenewalState) -> None:
        self._state = value

    # -- for the fleet sync (:class:`~gateway.token.fleet_sync.Renewer`) -----------------------
    def attempt_running(self) -> bool:
        return self._task is not None

    def wake(self) -> None:
        self._wake.set()

    def token_adopted(self, token: Token) -> None:
        self._events.token_changed(token)
        self._landed.set()
        self._landed = asyncio.Event()

    def held_back(self) -> bool:
        """While contention lasts, one auth call per GATEWAY_LOGIN_RETRY_INTERVAL: the next
        waits (checked after adopting the fleet's token, which is never held back)."""
        until = self._contention.hold_until(self._clock.monotonic(),
                                            self._policy.login_retry_interval)
        if until is not None:
            self._state = renewal.held_back(self._state, until)
        return until is not None

    @property
    def fleet(self) -> Fleet | None:
        return self._fleet

    @property
    def current(self) -> Token | None:
        return self._state.token

    @property
    def clock(self) -> Clock:
        return self._clock

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="token-renewal-loop")
        if self._sync is not None and self._fleet_task is None:
            self._fleet_task = asyncio.create_task(self._sync.run(), name="token-fleet-sync")

    async def stop(self, grace: float = 0.0) -> None:
        """Stop renewing. An auth call under way gets up to ``grace`` seconds to finish (a
        refresh Repairy has already answered must not be lost), then is cancelled. From here
        on no new auth call starts: a late request waiting for a token gets a 503, never a
        login on a session about to close."""
        self._stopping = True
        self._wake.set()
        for background in (self._loop_task, self._fleet_task):
            await cancel_and_wait(background)
        self._loop_task = self._fleet_task = None
        task = self._task
        if task is not None and not task.done():
            if grace > 0:
                log.info("waiting for the renewal under way", extra={"fields": {
                    "event": "renewal_drain", "grace_s": round(grace, 3)}})
                await asyncio.wait([task], timeout=grace)
            with contextlib.suppress(AuthError):  # its failure is in the state already
                await cancel_and_wait(task)
        if self._fleet is not None:
            await self._fleet.store.close()

    async def switch_credentials(self, partner: PartnerConfig, auth: AuthCalls) -> Token:
        """Log in with new credentials while the current token keeps serving; switch to the
        new credentials and token together only once that login worked. The login is the one
        auth call under way meanwhile; it counts as a rotation, never as a renewal."""
        while self._task is not None:
            await asyncio.wait([self._task])
        if self._stopping:
            raise TokenUnavailable("not rotating: the gateway is stopping", retry_after=1.0)
        self._state = renewal.started(self._state, "rotation", self._clock.monotonic())
        task = asyncio.create_task(self._rotate(partner, auth), name="credential-rotation")
        self._task = task
        task.add_done_callback(self._task_done)
        token: Token = await asyncio.shield(task)
        return token

    async def _rotate(self, partner: PartnerConfig, auth: AuthCalls) -> Token:
        """The rotation's one login. With a fleet, one login for the whole fleet: the new
        credentials' token lives under their own key, and a replica that finds it there (or
        waits for the replica holding their lease) adopts it instead of logging in, which
        with one live token per credential would revoke the other's."""
        sync = self._sync
        before = sync.owner if sync is not None else None
        owner = replace(self._s, partner=partner).owner
        holding = False
        try:
            if self._mismatch():  # a login here would fight the fleet (under the new owner)
                raise StoreKeyMismatch("not rotating: the fleet's token is sealed with another "
                                       "GATEWAY_STORE_KEY")
            # Only new credentials have a key of their own to look under: a new App Secret
            # alone keeps the owner (its token there is ours, from the old secret), and must be
            # proved by a login of its own.
            if sync is not None and owner != before:
                shared, holding = await sync.rotation_turn(owner)
                if shared is not None and shared.token is not None:
                    self._switch(partner, auth)
                    return self._adopt_rotated(shared.token)
                if not holding:
                    log.warning("rotation: logging in here (the store is down, or no replica "
                                "wrote the new credentials' token in time)", extra={
                                    "fields": {"event": "rotation_local_login"}})
            call = auth.login()
            exchange = await (sync.leased(call) if sync is not None and holding else call)
        except BaseException:
            if sync is not None and before is not None:
                await sync.rotation_failed(before, holding)
            self._state = renewal.ended(self._state)
            raise
        self._switch(partner, auth)
        token = self._accept(self._token_of(exchange, "login", None), "login")
        if holding:
            assert sync is not None
            await sync.rotation_logged_in(self._state)
        return token

    def _switch(self, partner: PartnerConfig, auth: AuthCalls) -> None:
        self._auth, self._s = auth, replace(self._s, partner=partner)
        self._usable_token = None  # the margin may have changed
        self._contention.clear()  # new credentials: whoever used the old ones is no matter

    def _adopt_rotated(self, shared: Token) -> Token:
        """Take the fleet's token for the new credentials as this rotation's result. Its
        generation stays above every one handed out here (a replay asks for a newer one)."""
        token = shared if shared.generation > self._state.generation else replace(
            shared, generation=self._state.generation + 1)
        self._state = renewal.succeeded(self._state, token, self._policy, self._rng.random())
        self._last_outcome = "rotation:adopted"
        self._last_renewal_wall = self._clock.time()
        self._events.token_changed(token)
        assert self._sync is not None
        renewed_by = self._sync.rotation_adopted()
        log.info("rotation: adopted the fleet's token for the new credentials", extra={
            "fields": {"event": "rotation_adopted", "generation": token.generation,
                       "token_fp": token.fingerprint, "renewed_by": renewed_by}})
        return token

    # -- renewal -------------------------------------------------------------------------------
    def _start_if_due(self) -> None:
        if self._task is not None or self._stopping:
            return
        now = self._clock.monotonic()
        plan = renewal.next_attempt(self._state, now, self._policy)
        if plan is None or plan.when > now:
            return
        previous = self._state.last_attempt_at
        self._state = renewal.started(self._state, plan.kind, now)
        self._task = asyncio.create_task(self._attempt(plan.kind, previous),
                                         name="token-renewal")
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._task is task:
            self._task = None
            if self._state.in_flight is not None:  # cancelled before it ever ran
                self._state = renewal.ended(self._state)
        if not task.cancelled() and not isinstance(task.exception(), AuthError | StoreKeyMismatch):
            # An auth failure is in the state, or the rotation's caller reports it; anything
            # else is a bug or a store fault nobody else will see: logged here, once.
            log_task_failure(task, log, task.get_name())
        self._wake.set()

    async def _attempt(self, kind: RenewalKind, previous: float | None = None) -> None:
        sync = self._sync
        holding = False  # the fleet's renewal lease
        try:
            if sync is not None:
                turn = await sync.turn(kind, previous)
                if turn is None:
                    return  # adopted the fleet's token, or waiting on the fleet
                kind, holding = turn
            if not holding and self.held_back():  # under the lease, the turn checked it
                return
            await self._renew(kind, holding)
            if sync is not None:
                await sync.publish_result(holding)
        finally:
            if holding:
                assert sync is not None
                await sync.fleet.release()
            if self._state.in_flight is not None:  # cancelled: never stuck
                self._state = renewal.ended(self._state)

    async def _renew(self, kind: RenewalKind, holding: bool) -> None:
        st = self._state
        if st.stale and st.token is not None:  # renewed here: no fleet peer explains it
            now = self._clock.monotonic()
            began = self._contention.renewing(now, st.token.generation,
                                              self._policy.login_retry_interval)
            if self._contention.active(now):
                self._events.contention(began)
        prev = None if st.stale else st.token
        if kind == "refresh" and prev is None:
            kind = "login"  # invalidated between the plan and now: nothing to refresh with
        try:
            kind, exchange = await self._exchange(kind, prev, holding)
            token = self._token_of(exchange, kind, prev)
        except _AttemptFailed as failed:
            exc = failed.error
            self._failed(Failure(failed.kind, exc.reason, exc.retry_after, exc.ambiguous),
                         exc.message)
            return
        except Exception as exc:  # a bug, or an answer nobody foresaw: back off all the same
            log.exception("token %s crashed", kind, extra={"fields": {
                "event": "token_renewal", "kind": kind, "outcome": "failure",
                "reason": "internal_error"}})
            self._events.renewal(kind, False, "internal_error", 0.0)
            # It may have reached Repairy: never send that refresh token again.
            self._failed(Failure(kind, "internal_error", ambiguous=True), type(exc).__name__)
            return
        # Only the auth calls are inside the try: what follows a success (the hooks, the
        # token file) can never turn it into a failure, nor ban the new refresh token.
        self._accept(token, kind)

    async def _exchange(self, kind: RenewalKind, prev: Token | None,
                        holding: bool) -> tuple[RenewalKind, Exchange]:
        """The auth call(s) of one attempt: a refresh, then a login at once if the refresh
        token cannot be sent again (refused, or the refresh ended ambiguously: it may have
        been used up); otherwise a login. A failure is :class:`_AttemptFailed` (which call)."""
        if kind == "refresh":
            assert prev is not None
            try:
                return "refresh", await self._timed("refresh", self._auth.refresh(prev),
                                                    holding)
            except AuthError as exc:
                if exc.reason in renewal.REFRESH_FALLBACK_REASONS:
                    event, why = "refresh_fallback", "refresh refused, logging in"
                elif exc.ambiguous and exc.reason in renewal.AMBIGUOUS_REFRESH_REASONS:
                    # A hung or cut refresh: the login presents another credential and
                    # re-sends nothing, so it starts now, and callers wait for it rather than
                    # for a back-off (the one exception to the floor between attempts).
                    event, why = "refresh_ambiguous", "refresh ended ambiguously, logging in"
                else:
                    raise _AttemptFailed("refresh", exc) from exc
                # That refresh token is never sent again.
                self._state = renewal.banned_refresh(self._state)
                log.info(why, extra={"fields": {"event": event, "reason": exc.reason}})
        try:
            return "login", await self._timed("login", self._auth.login(), holding)
        except AuthError as exc:
            raise _AttemptFailed("login", exc) from exc

    def _failed(self, failure: Failure, detail: str) -> None:
        self._state = renewal.failed(self._state, failure, self._clock.monotonic(),
                                     self._policy, self._rng.random())
        self._last_outcome = f"failure:{failure.reason}"
        self._last_renewal_wall = self._clock.time()
        if failure.reason in renewal.CONFIG_REASONS:
            log.error("Repairy refused the gateway's configuration; retrying in %gs",
                      self._policy.login_retry_interval, extra={"fields": {
                          "event": "token_config_error", "reason": failure.reason,
                          "detail": detail}})

    async def _timed(self, kind: RenewalKind, call: Awaitable[Exchange],
                     holding: bool = False) -> Exchange:
        started = self._clock.monotonic()
        self._contention.last_call = started
        try:
            result = await (self._sync.leased(call) if self._sync is not None and holding
                            else call)
        except AuthError as exc:
            self._events.renewal(kind, False, exc.reason, self._clock.monotonic() - started)
            log.warning("token %s failed", kind, extra={"fields": {
                "event": "token_renewal", "kind": kind, "outcome": "failure",
                "reason": exc.reason, "detail": exc.message}})
            raise
        self._events.renewal(kind, True, "ok", self._clock.monotonic() - started)
        return result

    def _token_of(self, exchange: Exchange, kind: RenewalKind, prev: Token | None) -> Token:
        return token_from_exchange(
            exchange, generation=self._state.generation + 1, via=kind, previous=prev,
            default_ttl=self._s.auth.access_token_default_ttl,
            default_refresh_ttl=self._s.auth.refresh_token_default_ttl)

    def _accept(self, token: Token, kind: RenewalKind) -> Token:
        self._state = renewal.succeeded(self._state, token, self._policy, self._rng.random())
        self._last_outcome = f"{kind}:ok"
        self._last_renewal_wall = self._clock.time()
        try:  # the success stands whatever an observer or the token file does
            self._events.token_changed(token)
            if self._persist is not None:
                self._persist(token, self._s.partner)
        except Exception:
            log.exception("token %s ok, but recording it failed", kind, extra={"fields": {
                "event": "token_hook_failed", "kind": kind}})
        log.info("token %s ok", kind, extra={"fields": {
            "event": "token_renewal", "kind": kind, "outcome": "success",
            "generation": token.generation, "token_fp": token.fingerprint,
            "expires_in": round(token.lifetime, 3),
            "renew_in": round(self._state.due_at - token.obtained_at, 3)}})
        return token

    async def _run(self) -> None:
        while True:
            try:
                self._start_if_due()
                task = self._task
                now = self._clock.monotonic()
                if task is not None:
                    await asyncio.wait([task])
                    continue
                plan = renewal.next_attempt(self._state, now, self._policy)
                delay = MAX_SLEEP if plan is None else min(max(plan.when - now, 0.0), MAX_SLEEP)
                self._wake.clear()
                await sleep_or_set(self._clock, self._wake, delay)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end renewal for good, nor spin
                log.exception("token renewal loop crashed; continuing")
                await self._clock.sleep(min(self._policy.retry_max, MAX_SLEEP))
