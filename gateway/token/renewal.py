"""The renewal decision: one immutable state value and pure functions over it.

:class:`RenewalState` holds everything that bears on "when is the next auth call, and which
kind?": the token held, whether the upstream rejected it, the back-off after failures, a ban
on refresh, when the last attempt was made and the attempt in flight.
:func:`next_attempt` answers the question; :func:`started`, :func:`succeeded`,
:func:`failed` and :func:`invalidated` return the next state. Nothing here does I/O, reads a
clock or draws a random number: times and the uniform draw ``u`` are arguments.

After a failed attempt the wait is decided in this order of precedence:

1. the endpoint refused our configuration (rejected credentials, a wrong path or method, a
   rejected body): wait ``login_retry_interval``;
2. ``Retry-After`` (capped at ``retry_max``) is a floor that nothing below may undercut;
3. while the token held is still usable, the next attempt is pulled forward so that it comes
   before the end of the token's usable life (at most once per token: see :func:`failed`);
4. otherwise capped exponential back-off with jitter.

Whatever caused it, an attempt is never sooner than ``retry_min / 2`` after the previous one,
and every number is bounded, so no sequence of failures can overflow or spin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from gateway.token.value import (
    RenewalKind,
    Token,
    choose_renewal,
    is_usable,
    renewal_due_at,
    usable_until,
)

#: Consecutive failures are counted up to here (the back-off saturates long before).
FAILURE_CAP: Final = 10_000
#: Failures that mean "our configuration is wrong": retried slowly, never in a loop.
CONFIG_REASONS: Final = frozenset({"invalid_credentials", "endpoint_misconfigured",
                                   "request_rejected"})
#: Refresh failures after which a login follows at once, in the same attempt.
REFRESH_FALLBACK_REASONS: Final = frozenset({"refresh_rejected", "endpoint_misconfigured",
                                             "request_rejected"})
#: Ambiguous refresh failures after which a login follows at once, in the same attempt: the
#: refresh may have used up its token and nothing told us (no answer, a cut one, a garbled
#: 2xx). Never a 429 or a 5xx: those answered, and are backed off.
AMBIGUOUS_REFRESH_REASONS: Final = frozenset({"timeout", "connect_error", "malformed_response"})
AttemptKind = Literal["login", "refresh", "rotation"]


@dataclass(frozen=True)
class RenewalPolicy:
    """The settings the decision depends on (seconds and fractions)."""

    margin: float
    at_fraction: float
    jitter_fraction: float
    retry_min: float
    retry_max: float
    login_retry_interval: float
    #: An attempt marked in flight for longer than this is taken as dead (a crashed holder of
    #: a serialised state): at most a refresh and a login, each within the auth timeout.
    attempt_timeout: float = 21.0

    @property
    def floor(self) -> float:
        """The least time between two attempts, whatever caused them."""
        return self.retry_min / 2


@dataclass(frozen=True)
class Failure:
    """What an auth call that failed tells the decision (no secrets, no messages)."""

    kind: RenewalKind
    reason: str
    retry_after: float | None = None
    ambiguous: bool = False


@dataclass(frozen=True)
class InFlight:
    kind: AttemptKind
    started_at: float


@dataclass(frozen=True)
class Attempt:
    """The next attempt: not before ``when``, of this ``kind``."""

    when: float
    kind: RenewalKind


@dataclass(frozen=True)
class RenewalState:
    token: Token | None = None
    #: The upstream answered 401 to ``token``: renew now (it keeps serving until replaced).
    stale: bool = False
    #: When background renewal of ``token`` starts (jitter already drawn).
    due_at: float = 0.0
    failures: int = 0
    #: No attempt before this (back-off after a failure).
    not_before: float | None = None
    #: The configuration-class failure reason the back-off is for, if any.
    blocked: str | None = None
    #: The refresh token held must not be sent again (an ambiguous failure): log in next.
    refresh_banned: bool = False
    last_attempt_at: float | None = None
    last_error: str | None = None
    in_flight: InFlight | None = None
    #: ``not_before`` is only a wait on the fleet's store, not a back-off: a 401 or the store
    #: coming back ends it.
    deferred: bool = False

    @property
    def generation(self) -> int:
        return self.token.generation if self.token is not None else 0


def backoff(failures: int, minimum: float, maximum: float, u: float) -> float:
    """Capped exponential back-off with jitter: between half and all of min·2^(n-1), capped.

    The exponent is bounded before it is used, so any ``failures`` is safe.
    """
    exponent = min(max(0, failures - 1), 60)
    base = min(maximum, minimum * math.ldexp(1.0, exponent))
    return base * (0.5 + 0.5 * min(max(u, 0.0), 1.0))


def due_at(token: Token, policy: RenewalPolicy, u: float) -> float:
    """When background renewal of ``token`` starts: at the configured (jittered) share of its
    lifetime, and never later than ``retry_min`` before the end of its usable life."""
    planned = renewal_due_at(token, policy.at_fraction, policy.jitter_fraction, u)
    latest = usable_until(token, policy.margin) - policy.retry_min
    return max(token.obtained_at, min(planned, latest))


def next_attempt(state: RenewalState, now: float, policy: RenewalPolicy) -> Attempt | None:
    """The next attempt, or None while one is in flight."""
    if state.in_flight is not None and now < state.in_flight.started_at + policy.attempt_timeout:
        return None
    tok = state.token
    if tok is None or state.stale or not is_usable(tok, now, policy.margin):
        when = now
    else:
        when = state.due_at
    if state.not_before is not None:
        when = max(when, state.not_before)
    if state.last_attempt_at is not None:
        when = max(when, state.last_attempt_at + policy.floor)
    at = max(when, now)
    usable = None if state.stale else tok
    kind = choose_renewal(usable, at, policy.margin, not state.refresh_banned)
    return Attempt(when, kind)


def started(state: RenewalState, kind: AttemptKind, now: float) -> RenewalState:
    return replace(state, in_flight=InFlight(kind, now), last_attempt_at=now)


def succeeded(state: RenewalState, token: Token, policy: RenewalPolicy,
              u: float) -> RenewalState:
    """A new token landed: everything about the old one and its failures is forgotten."""
    return replace(state, token=token, stale=False, due_at=due_at(token, policy, u), failures=0,
                   not_before=None, blocked=None, refresh_banned=False, last_error=None,
                   in_flight=None, deferred=False)


def ended(state: RenewalState) -> RenewalState:
    """An attempt ended with neither a token nor a failure to count (cancelled, rotation)."""
    return replace(state, in_flight=None)


def banned_refresh(state: RenewalState) -> RenewalState:
    return replace(state, refresh_banned=True)


def failed(state: RenewalState, failure: Failure, now: float, policy: RenewalPolicy,
           u: float) -> RenewalState:
    """The attempt failed: count it and decide the back-off (precedence in the docstring)."""
    failures = min(state.failures + 1, FAILURE_CAP)
    banned = state.refresh_banned or (failure.kind == "refresh" and failure.ambiguous)
    blocked: str | None = None
    if failure.reason in CONFIG_REASONS:
        delay = policy.login_retry_interval
        blocked = failure.reason
    else:
        delay = backoff(failures, policy.retry_min, policy.retry_max, u)
        tok = state.token
        if tok is not None and not state.stale:
            # Pull the next attempt forward to just before the token stops being usable. Once
            # that moment is closer than the floor, the token is as good as gone: plain
            # back-off again (so this shortens at most once per token).
            ahead = usable_until(tok, policy.margin) - policy.retry_min - now
            if ahead >= policy.floor:
                delay = min(delay, ahead)
        if failure.retry_after is not None and math.isfinite(failure.retry_after):
            delay = max(delay, min(max(failure.retry_after, 0.0), policy.retry_max))
    delay = max(delay, policy.floor)
    return replace(state, failures=failures, not_before=now + delay, blocked=blocked,
                   refresh_banned=banned, last_error=failure.reason, in_flight=None,
                   deferred=False)


def deferred(state: RenewalState, until: float) -> RenewalState:
    """Nothing to do before ``until`` (waiting on the fleet's store); no failure is counted.
    A back-off already in force is kept if it ends later."""
    if state.not_before is not None and not state.deferred and state.not_before >= until:
        return replace(state, in_flight=None)
    return replace(state, not_before=until, in_flight=None, deferred=True)


def held_back(state: RenewalState, until: float) -> RenewalState:
    """No auth call before ``until`` (credential contention: one login per
    ``login_retry_interval``); no failure is counted, and a 401 does not end it."""
    return replace(state, not_before=until, in_flight=None, deferred=False)


def undeferred(state: RenewalState) -> RenewalState:
    """The wait on the store is over (it answers again, or the upstream refused the token)."""
    return replace(state, not_before=None, deferred=False) if state.deferred else state


def adopt(local: RenewalState, shared: RenewalState) -> RenewalState:
    """Merge the fleet's state into ours. The store is the fleet's truth: its token wins when
    its generation is at least ours and the token differs (two replicas that renewed apart
    while the store was down converge on the stored one); our attempt in flight, if any, stays
    ours. For the same token (or none stored yet), the fleet's back-off after a failure and a
    ban on the shared refresh token are taken over, so replicas do not stampede."""
    lt, st = local.token, shared.token
    if st is not None and (lt is None or st.generation > lt.generation or (
            st.generation == lt.generation and st.access != lt.access)):
        return replace(shared, in_flight=local.in_flight, last_attempt_at=local.last_attempt_at)
    same = st is None or (lt is not None and st.access == lt.access)
    if not same:
        return local  # the store is behind us: ours gets published
    later = shared.not_before is not None and (
        local.not_before is None or shared.not_before > local.not_before)
    if later or (shared.refresh_banned and not local.refresh_banned):
        return replace(local, failures=max(local.failures, shared.failures),
                       not_before=shared.not_before if later else local.not_before,
                       blocked=shared.blocked if later else local.blocked,
                       last_error=shared.last_error if later else local.last_error,
                       refresh_banned=local.refresh_banned or (
                           st is not None and shared.refresh_banned))
    return local


def invalidated(state: RenewalState, generation: int) -> RenewalState:
    """The upstream answered 401 to ``generation``: renew now, unless that token is already
    replaced or marked. The back-off of earlier failures stays in force."""
    tok = state.token
    if tok is None or tok.generation != generation or state.stale:
        return state
    return replace(undeferred(state), stale=True)


# -- serialising (a shared store keeps this value) ---------------------------------------------
def token_to_dict(tok: Token, shift: float = 0.0) -> dict[str, Any]:
    """A token, JSON-ready, its clock times moved by ``shift`` (0 between the processes of one
    host, which share CLOCK_BOOTTIME; wall minus monotonic for a store shared by hosts). It
    holds the tokens: keep it secret."""
    refresh_at = tok.refresh_expires_at
    return {"access": tok.access, "refresh": tok.refresh, "generation": tok.generation,
            "via": tok.via, "obtained_at": tok.obtained_at + shift,
            "expires_at": tok.expires_at + shift,
            "refresh_expires_at": None if refresh_at is None else refresh_at + shift,
            "obtained_wall": tok.obtained_wall, "partner_id": tok.partner_id}


def token_to_wire(tok: Token) -> dict[str, Any]:
    """A token for a worker, without its refresh token (workers never renew). Times stay on
    CLOCK_BOOTTIME, the same in every process of a host."""
    return token_to_dict(replace(tok, refresh=None, refresh_expires_at=None))


def token_from_dict(doc: dict[str, Any], shift: float = 0.0) -> Token:
    """The inverse of :func:`token_to_dict` (times moved back by ``shift``)."""
    refresh_at = doc.get("refresh_expires_at")
    return Token(access=str(doc["access"]), refresh=doc.get("refresh"),
                 generation=int(doc["generation"]),
                 via="refresh" if doc.get("via") == "refresh" else "login",
                 obtained_at=float(doc["obtained_at"]) - shift,
                 expires_at=float(doc["expires_at"]) - shift,
                 refresh_expires_at=None if refresh_at is None else float(refresh_at) - shift,
                 obtained_wall=float(doc["obtained_wall"]), partner_id=str(doc["partner_id"]))


def to_dict(state: RenewalState, now_mono: float, now_wall: float) -> dict[str, Any]:
    """A JSON-ready form with times as Unix times. It holds the tokens: keep it secret."""

    def wall(mono: float | None) -> float | None:
        return None if mono is None else now_wall + (mono - now_mono)

    tok = state.token
    return {
        "token": None if tok is None else token_to_dict(tok, now_wall - now_mono),
        "stale": state.stale, "due_at": wall(state.due_at),
        "failures": state.failures, "not_before": wall(state.not_before),
        "blocked": state.blocked, "refresh_banned": state.refresh_banned,
        "last_attempt_at": wall(state.last_attempt_at), "last_error": state.last_error,
        "deferred": state.deferred,
        "in_flight": None if state.in_flight is None else {
            "kind": state.in_flight.kind, "started_at": wall(state.in_flight.started_at)},
    }


def from_dict(doc: dict[str, Any], now_mono: float, now_wall: float) -> RenewalState:
    """The inverse of :func:`to_dict` (times back on this process's monotonic clock)."""

    def mono(unix: Any) -> float | None:
        return None if unix is None else now_mono + (float(unix) - now_wall)

    def need(unix: Any) -> float:
        value = mono(unix)
        if value is None:
            raise ValueError("a required time is missing")
        return value

    t = doc.get("token")
    token = None if t is None else token_from_dict(t, now_wall - now_mono)
    f = doc.get("in_flight")
    kinds: dict[str, AttemptKind] = {"login": "login", "refresh": "refresh",
                                     "rotation": "rotation"}
    in_flight = None if f is None else InFlight(kinds[f["kind"]], need(f["started_at"]))
    return RenewalState(
        token=token, stale=bool(doc["stale"]), due_at=need(doc["due_at"]),
        failures=min(max(int(doc["failures"]), 0), FAILURE_CAP),
        not_before=mono(doc.get("not_before")), blocked=doc.get("blocked"),
        refresh_banned=bool(doc["refresh_banned"]),
        last_attempt_at=mono(doc.get("last_attempt_at")), last_error=doc.get("last_error"),
        in_flight=in_flight, deferred=bool(doc.get("deferred", False)))
