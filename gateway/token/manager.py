"""The one managed token: obtained, renewed ahead of expiry, shared by every request.

* Requests call :meth:`TokenManager.get`; while the current token is usable it returns at once,
  without a lock or an await on I/O.
* Renewal is single-flight: one task at a time calls the auth endpoints, whoever asked for it
  (the background loop, a request that found no usable token, a 401 invalidation).
* The background loop renews when a share of the lifetime has passed (jittered), backs off on
  failure, and retries slowly while the credentials are rejected.
* Refresh is tried first when allowed; a rejected refresh, an expired refresh token, or an
  ambiguous failure (timeout: the refresh token may have been rotated) leads to a login.
* :meth:`invalidate` drops only the generation a caller used, so a token renewed meanwhile by
  another request survives (the kubernetes#99324 pitfall).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.clock import Clock
from gateway.errors import AuthError, CredentialsRejected, TokenUnavailable
from gateway.settings import Settings
from gateway.token.auth_client import AuthClient, Exchange, token_from_exchange
from gateway.token.value import (
    RenewalKind,
    Token,
    backoff,
    choose_renewal,
    is_usable,
    renewal_due_at,
    usable_until,
)

log = logging.getLogger("gateway.token")


class TokenEvents(Protocol):
    """Hooks for observers (metrics); every method must be cheap and never raise."""

    def renewal(self, kind: RenewalKind, ok: bool, reason: str, seconds: float) -> None: ...

    def token_changed(self, token: Token | None) -> None: ...

    def invalidated(self, reason: str) -> None: ...


class _NoEvents:
    def renewal(self, kind: RenewalKind, ok: bool, reason: str, seconds: float) -> None:
        pass

    def token_changed(self, token: Token | None) -> None:
        pass

    def invalidated(self, reason: str) -> None:
        pass


@dataclass(frozen=True)
class TokenStatus:
    """A snapshot for health and debug endpoints (never holds the token itself)."""

    token: Token | None
    usable: bool
    stale: bool
    renewal_due_at: float
    last_outcome: str | None
    last_error: str | None
    last_renewal_wall: float | None
    consecutive_failures: int
    credentials_rejected: bool


class TokenManager:
    def __init__(self, auth: AuthClient, settings: Settings, clock: Clock,
                 events: TokenEvents | None = None, rng: random.Random | None = None,
                 initial: Token | None = None,
                 persist: Callable[[Token, Settings], None] | None = None) -> None:
        self._auth = auth
        self._s = settings
        self._clock = clock
        self._events: TokenEvents = events or _NoEvents()
        self._rng = rng or random.Random()
        self._token: Token | None = None
        self._generation = 0
        self._stale = False  # current token invalidated (upstream said 401)
        self._refresh_banned = False  # after an ambiguous refresh: log in next time
        self._due_at = 0.0
        self._inflight: asyncio.Task[Token] | None = None
        self._retry_at: float | None = None  # back-off after a transient failure
        self._blocked_until: float | None = None  # back-off while credentials are rejected
        self._failures = 0
        self._last_outcome: str | None = None
        self._last_error: str | None = None
        self._last_renewal_wall: float | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._persist = persist
        if initial is not None:  # a stored token from an earlier run
            self._install(initial)

    # -- the request path ----------------------------------------------------------------------
    async def get(self) -> Token:
        """The current usable token, or wait (bounded) for the one renewal in flight."""
        tok = self._token
        now = self._clock.monotonic()
        if not self._stale and is_usable(tok, now, self._s.token_expiry_margin):
            assert tok is not None
            return tok
        if self._inflight is None or self._inflight.done():
            self._raise_if_backing_off(now)
        task = self._start_renewal()
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._s.token_wait_timeout)
        except TimeoutError:
            raise TokenUnavailable("timed out waiting for an access token",
                                   retry_after=1.0) from None
        except AuthError as exc:
            raise self._unavailable(exc) from None

    def invalidate(self, generation: int, reason: str) -> bool:
        """Mark the token of ``generation`` unusable; False if a newer token is already held."""
        tok = self._token
        if tok is None or tok.generation != generation or self._stale:
            return False
        self._stale = True
        self._retry_at = None
        log.warning("token invalidated", extra={"fields": {
            "event": "token_invalidated", "reason": reason, "generation": generation,
            "token_fp": tok.fingerprint}})
        self._events.invalidated(reason)
        self._wake.set()
        return True

    # -- status --------------------------------------------------------------------------------
    def ready(self) -> bool:
        return not self._stale and is_usable(self._token, self._clock.monotonic(),
                                             self._s.token_expiry_margin)

    def status(self) -> TokenStatus:
        return TokenStatus(self._token, self.ready(), self._stale, self._due_at,
                           self._last_outcome,
                           self._last_error, self._last_renewal_wall, self._failures,
                           self._blocked_until is not None)

    @property
    def current(self) -> Token | None:
        return self._token

    @property
    def clock(self) -> Clock:
        return self._clock

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="token-renewal-loop")

    async def stop(self) -> None:
        for task in (self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, AuthError):
                    await task
        self._loop_task = None

    async def switch_credentials(self, settings: Settings, auth: AuthClient) -> Token:
        """Log in with new credentials while the current token keeps serving; switch to the
        new credentials and token together only once that login worked."""
        exchange = await self._timed("login", auth.login())
        while self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(AuthError):
                await asyncio.shield(self._inflight)  # let an old-credential renewal land first
        self._auth, self._s = auth, settings
        return self._accept(exchange, "login", None)

    # -- renewal -------------------------------------------------------------------------------
    def _raise_if_backing_off(self, now: float) -> None:
        if self._blocked_until is not None and now < self._blocked_until:
            raise CredentialsRejected(
                "Repairy rejected the gateway's credentials; retrying in the background",
                retry_after=self._blocked_until - now)
        if self._retry_at is not None and now < self._retry_at:
            raise TokenUnavailable(
                f"no usable access token: last renewal failed ({self._last_error})",
                retry_after=self._retry_at - now)

    def _unavailable(self, exc: AuthError) -> TokenUnavailable:
        if exc.reason == "invalid_credentials":
            return CredentialsRejected(
                "Repairy rejected the gateway's credentials; retrying in the background",
                retry_after=self._s.login_retry_interval)
        return TokenUnavailable(f"no usable access token: renewal failed ({exc.reason})",
                                retry_after=self._s.renew_retry_min)

    def _start_renewal(self) -> asyncio.Task[Token]:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._renew(), name="token-renewal")
            # Consume the exception here too, so an unobserved failure is never reported.
            self._inflight.add_done_callback(_swallow)
        return self._inflight

    async def _renew(self) -> Token:
        now = self._clock.monotonic()
        prev = None if self._stale else self._token
        allowed = not self._refresh_banned
        kind = choose_renewal(prev, now, self._s.token_expiry_margin, allowed)
        if kind == "refresh":
            assert prev is not None
            try:
                return self._accept(await self._timed("refresh", self._auth.refresh(prev)),
                                    "refresh", prev)
            except AuthError as exc:
                if exc.reason == "rate_limited":
                    self._failed(exc)
                    raise
                # Rejected, failed or ambiguous: that refresh token is never sent again.
                self._refresh_banned = True
                log.info("refresh failed, logging in", extra={"fields": {
                    "event": "refresh_fallback", "reason": exc.reason}})
        try:
            exchange = await self._timed("login", self._auth.login())
        except AuthError as exc:
            self._failed(exc)
            raise
        return self._accept(exchange, "login", prev)

    async def _timed(self, kind: RenewalKind, call: Awaitable[Exchange]) -> Exchange:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result = await call
        except AuthError as exc:
            self._events.renewal(kind, False, exc.reason, loop.time() - started)
            log.warning("token %s failed", kind, extra={"fields": {
                "event": "token_renewal", "kind": kind, "outcome": "failure",
                "reason": exc.reason, "detail": exc.message}})
            raise
        self._events.renewal(kind, True, "ok", loop.time() - started)
        return result

    def _accept(self, exchange: Exchange, kind: RenewalKind, prev: Token | None) -> Token:
        token = token_from_exchange(
            exchange, generation=self._generation + 1, via=kind, previous=prev,
            default_ttl=self._s.access_token_default_ttl,
            default_refresh_ttl=self._s.refresh_token_default_ttl)
        self._install(token)
        self._last_outcome, self._last_error = f"{kind}:ok", None
        self._last_renewal_wall = self._clock.time()
        if self._persist is not None:
            self._persist(token, self._s)
        log.info("token %s ok", kind, extra={"fields": {
            "event": "token_renewal", "kind": kind, "outcome": "success",
            "generation": token.generation, "token_fp": token.fingerprint,
            "expires_in": round(token.lifetime, 3),
            "renew_in": round(self._due_at - token.obtained_at, 3)}})
        self._wake.set()
        return token

    def _install(self, token: Token) -> None:
        self._generation = token.generation
        self._token = token
        self._stale = False
        self._refresh_banned = False
        self._failures = 0
        self._retry_at = self._blocked_until = None
        self._due_at = renewal_due_at(token, self._s.renew_at_fraction,
                                      self._s.renew_jitter_fraction, self._rng.random())
        self._events.token_changed(token)

    def _failed(self, exc: AuthError) -> None:
        now = self._clock.monotonic()
        self._failures += 1
        self._last_outcome, self._last_error = f"failure:{exc.reason}", exc.reason
        self._last_renewal_wall = self._clock.time()
        if exc.ambiguous:
            self._refresh_banned = True
        if exc.reason == "invalid_credentials":
            self._blocked_until = now + self._s.login_retry_interval
            return
        delay = backoff(self._failures, self._s.renew_retry_min, self._s.renew_retry_max,
                        self._rng.random())
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self._s.renew_retry_max))
        tok = self._token
        if tok is not None and not self._stale:
            # Try again before the current token stops being usable, whatever the back-off.
            delay = min(delay, max(0.0, usable_until(tok, self._s.token_expiry_margin) - now))
        self._retry_at = now + delay

    def _next_delay(self, now: float) -> float:
        """Seconds until the loop should act (0 = now)."""
        for until in (self._blocked_until, self._retry_at):
            if until is not None:
                return max(0.0, until - now)
        if self._token is None or self._stale:
            return 0.0
        return max(0.0, self._due_at - now)

    async def _run(self) -> None:
        while True:
            if self._inflight is not None and not self._inflight.done():
                with contextlib.suppress(AuthError):
                    await asyncio.shield(self._inflight)
                continue
            delay = self._next_delay(self._clock.monotonic())
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            self._retry_at = self._blocked_until = None
            try:
                await asyncio.shield(self._start_renewal())
            except AuthError:
                pass  # recorded by _failed; the back-off decides the next attempt
            except Exception:  # a bug must not kill renewal for good
                log.exception("token renewal crashed")
                self._retry_at = self._clock.monotonic() + self._s.renew_retry_max


def _swallow(task: asyncio.Task[Token]) -> None:
    if not task.cancelled():
        task.exception()
