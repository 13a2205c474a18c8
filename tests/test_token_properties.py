"""Property tests: the real TokenManager on a fake clock against a scripted auth client.

Hypothesis draws sequences of auth answers (successes and failures of every class, with
``Retry-After`` values and durations), of time passing (in steps and in jumps, as after a
suspend), of requests and of upstream 401s, and checks the invariants the gateway promises:

* never two auth calls in flight;
* never an attempt sooner than ``retry_min / 2`` after the previous one, nor sooner than the
  back-off after a failure allows (rejected configuration: ``login_retry_interval``;
  ``Retry-After``: the value capped at ``retry_max``). The one exception: the login that
  follows, in the same attempt and at once, a refresh the endpoint refused or one that ended
  ambiguously (a timeout or a cut connection after sending): it presents another credential
  and re-sends nothing, and callers wait for it;
* never a refresh token sent again after a failure that may have used it up;
* never an unusable token handed to a request (nor one not newer than a replay asked for),
  and every request answered or refused within the wait timeout;
* credential rotations (a login with new credentials) never overlap another auth call, and
  an auth client that raises something unforeseen is backed off like any failure;
* always an attempt before the usable life of the token held runs out;
* during an outage, attempts per hour bounded (back-off ramp plus one per ``retry_max / 2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import AuthError, TokenUnavailable
from gateway.settings import Settings
from gateway.token import renewal
from gateway.token.manager import MAX_SLEEP, TokenManager
from gateway.token.value import Token, is_usable
from tests.fake_clock import Call, FakeAuth, FakeClock, Outcome, settle
from tests.gateway_helpers import settings_for

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

S: Settings = settings_for("http://127.0.0.1:9", renew_retry_min="1s", renew_retry_max="60s",
                           login_retry_interval="30s", token_expiry_margin="60s",
                           token_wait_timeout="4s", auth_timeout="10s")
FLOOR = S.token.renew_retry_min / 2
EPS = 1e-6

REASONS = st.sampled_from([None, None, None, "timeout", "connect_error", "server_error",
                           "rate_limited", "invalid_credentials", "endpoint_misconfigured",
                           "request_rejected", "refresh_rejected", "malformed_response",
                           "crash"])
OUTCOMES = st.builds(
    Outcome, reason=REASONS, duration=st.floats(0, 3) | st.floats(0, S.auth.auth_timeout),
    retry_after=st.none() | st.floats(0, 1e7, allow_nan=False) | st.just(math.inf),
    ambiguous=st.booleans(), lifetime=st.floats(5, 7200))
ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(0, 900)),
    st.tuples(st.just("jump"), st.floats(0, 200_000)),
    st.tuples(st.just("request"), st.just(0.0)),
    st.tuples(st.just("401"), st.just(0.0)),
    st.tuples(st.just("replay"), st.just(0.0)),
    st.tuples(st.just("rotate"), st.just(0.0)),
), min_size=1, max_size=40)


@dataclass
class Run:
    clock: FakeClock
    auth: FakeAuth
    manager: TokenManager
    jumps: list[tuple[float, float]] = field(default_factory=list)
    got: list[tuple[float, Token]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


#: Written out, not imported: the issue's exception (no answer, a cut or a garbled one), never
#: a 429 or a 5xx, whatever the code under test says.
AMBIGUOUS_LOGIN_AT_ONCE = frozenset({"timeout", "connect_error", "malformed_response"})


def _fallback(call: Call) -> bool:
    """A refresh whose refresh token cannot be sent again: refused by the endpoint, or ended
    ambiguously (it may have been used up). The login that follows belongs to the same
    attempt and starts at once: the one exception to the floor between attempts."""
    reason = call.outcome.reason
    return call.kind == "refresh" and reason is not None and (
        reason in renewal.REFRESH_FALLBACK_REASONS
        or (reason in AMBIGUOUS_LOGIN_AT_ONCE and call.outcome.ambiguous))


async def _scenario(script: list[Outcome], outage: bool, actions: list[tuple[str, float]],
                    seed: int) -> Run:
    clock = FakeClock()
    default = (lambda: Outcome("server_error", duration=0.5)) if outage else Outcome
    auth = FakeAuth(clock, script, default)
    manager = TokenManager(auth, S.token_side(), clock, rng=random.Random(seed))
    run = Run(clock, auth, manager)
    requests: list[asyncio.Task[None]] = []

    async def request(newer_than: int = 0) -> None:
        started = clock.now
        try:
            tok = await manager.get(newer_than)
        except TokenUnavailable:
            tok = None
        slept = any(a < clock.now and b > started for a, b in run.jumps)  # host suspended
        if clock.now - started > S.token.token_wait_timeout + EPS and not slept:
            run.problems.append(f"a request waited {clock.now - started:g}s")
        if tok is None:
            return
        run.got.append((clock.now, tok))
        if not is_usable(tok, clock.now, S.token.token_expiry_margin):
            run.problems.append(f"unusable token handed out at {clock.now}")
        if tok.generation <= newer_than:
            run.problems.append(f"replay got generation {tok.generation} <= {newer_than}")

    async def rotate() -> None:
        with contextlib.suppress(AuthError, ValueError):
            await manager.switch_credentials(S.partner, auth.for_rotation())

    await manager.start()
    await settle()
    for action, amount in actions:
        if action == "advance":
            await clock.advance(amount)
        elif action == "jump":
            run.jumps.append((clock.now, clock.now + amount))
            await clock.jump(amount)
        elif action == "request":
            requests.append(asyncio.create_task(request()))
            await settle()
        elif action == "replay":
            requests.append(asyncio.create_task(request(manager.state.generation)))
            await settle()
        elif action == "rotate":
            requests.append(asyncio.create_task(rotate()))
            await settle()
        elif (tok := manager.current) is not None:
            manager.invalidate(tok.generation, "upstream_401")
            await settle()
    started = clock.now
    # Every request must be answered by now; a rotation may wait for the call under way.
    await clock.advance(S.token.token_wait_timeout + 3 * S.auth.auth_timeout + 1)
    if not all(t.done() for t in requests):
        run.problems.append(f"a request still waited {clock.now - started:g}s later")
    await manager.stop()
    for t in requests:
        t.cancel()
    await settle()
    return run


def _check(run: Run) -> None:
    calls = run.auth.calls
    assert not run.problems, run.problems
    assert run.auth.max_inflight <= 1, "two auth calls in flight"
    banned: set[str] = set()
    for prev, call in itertools.pairwise(calls):
        assert prev.end is not None
        same_attempt = _fallback(prev) and call.kind == "login" and call.start == prev.end
        if same_attempt or prev.rotation or call.rotation:
            continue  # a rotation login runs when asked, right after the auth call under way
        assert call.start >= prev.start + FLOOR - EPS, f"attempts {prev.start} → {call.start}"
        reason = prev.outcome.reason
        if reason is None:
            continue
        need = FLOOR
        if reason in renewal.CONFIG_REASONS:
            need = S.token.login_retry_interval
        elif reason != "crash" and prev.outcome.retry_after is not None and math.isfinite(
                prev.outcome.retry_after):
            need = max(need, min(prev.outcome.retry_after, S.token.renew_retry_max))
        assert call.start >= prev.end + need - EPS, (
            f"{reason} at {prev.end}, retry-after {prev.outcome.retry_after}: next attempt "
            f"at {call.start}, {need}s required")
    for call in calls:
        if call.kind == "refresh":
            assert call.refresh_sent not in banned, "refresh token sent again"
            if call.outcome.ambiguous or _fallback(call) or call.outcome.reason == "crash":
                assert call.refresh_sent is not None
                banned.add(call.refresh_sent)
    _check_renews_in_time(run)
    _check_outage_rate(calls)


def _check_renews_in_time(run: Run) -> None:
    """Each token held past the end of its usable life had an attempt before that end."""
    calls = run.auth.calls
    margin = S.token.token_expiry_margin
    for i, call in enumerate(calls):
        if call.outcome.reason is not None or call.end is None:
            continue
        lifetime = call.outcome.lifetime
        end = call.start + lifetime - min(margin, lifetime * 0.1)
        if run.clock.now < end or call.end >= end - FLOOR:
            continue  # not over yet, or the answer itself came too late to act on
        if any(a < end and b > call.start for a, b in run.jumps):
            continue  # the host "slept" through it: nothing could have run
        later = [c.start for c in calls[i + 1:]]
        assert any(t < end for t in later), (
            f"token from {call.start} (usable until {end}) got no renewal attempt in time")


def _check_outage_rate(calls: list[Call]) -> None:
    """In a run of failures, attempts over any window W: at most 10 + W / (retry_max / 2)."""
    run: list[float] = []
    for call in [*calls, Call("login", math.inf)]:
        if call.outcome.reason is None or call.start == math.inf:
            for i, first in enumerate(run):
                for j in range(i, len(run)):
                    window = run[j] - first
                    assert j - i + 1 <= 10 + window / (S.token.renew_retry_max / 2), (
                        f"{j - i + 1} attempts in {window:g}s of outage")
            run = []
        elif not _fallback(call) and not call.rotation:
            run.append(call.start)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(OUTCOMES, max_size=30), outage=st.booleans(), actions=ACTIONS,
       seed=st.integers(0, 2**32 - 1))
def test_token_manager_invariants_hold_on_any_history(script: list[Outcome], outage: bool,
                                                      actions: list[tuple[str, float]],
                                                      seed: int) -> None:
    """Random auth answers, time, requests and 401s never break the lifecycle's invariants."""
    _check(asyncio.run(_scenario(script, outage, actions, seed)))


@settings(max_examples=60, deadline=None)
@given(reason=st.sampled_from(["server_error", "rate_limited", "timeout", "connect_error"]),
       retry_after=st.none() | st.floats(0, 1e9), hours=st.floats(1, 6))
def test_token_outage_attempts_per_hour_are_bounded(reason: str, retry_after: float | None,
                                                    hours: float) -> None:
    """A long outage past expiry: attempts stay at about one per retry_max/2 (no hot loop,
    no overflow), and the gateway answers requests at once meanwhile."""

    async def scenario() -> tuple[int, int]:
        clock = FakeClock()
        auth = FakeAuth(clock, [Outcome(lifetime=30)],
                        lambda: Outcome(reason, retry_after=retry_after))  # type: ignore[arg-type]
        manager = TokenManager(auth, S.token_side(), clock, rng=random.Random(1))
        await manager.start()
        await settle()
        await clock.advance(30)  # the token is gone by now
        before = len(auth.calls)
        await clock.advance(hours * 3600)
        task = asyncio.create_task(manager.get())
        await settle()
        refused_at_once = task.done() and isinstance(task.exception(), TokenUnavailable)
        await manager.stop()
        return len(auth.calls) - before, int(refused_at_once)

    attempts, refused = asyncio.run(scenario())
    assert attempts <= 10 + hours * 3600 / (S.token.renew_retry_max / 2)
    assert refused == 1


def test_token_manager_loop_never_sleeps_longer_than_the_cap() -> None:
    """With a 48 h token the loop still wakes every MAX_SLEEP to decide again (suspend)."""

    async def scenario() -> list[float]:
        clock = FakeClock()
        auth = FakeAuth(clock, [Outcome(lifetime=48 * 3600)])
        manager = TokenManager(auth, S.token_side(), clock)
        await manager.start()
        await clock.advance(600)
        await manager.stop()
        return clock.sleeps

    sleeps = asyncio.run(scenario())
    assert sleeps and max(sleeps) <= MAX_SLEEP
    assert len(sleeps) >= 600 / MAX_SLEEP


def test_token_renewal_after_a_jump_past_expiry_happens_at_once() -> None:
    """A host that slept past the token's expiry renews as soon as it wakes (BOOTTIME)."""

    async def scenario() -> tuple[int, bool]:
        clock = FakeClock()
        auth = FakeAuth(clock, [Outcome(lifetime=3600)])
        manager = TokenManager(auth, S.token_side(), clock)
        await manager.start()
        await settle()
        await clock.jump(5 * 3600)
        await settle()
        ready = manager.ready()
        await manager.stop()
        return len(auth.calls), ready

    calls, ready = asyncio.run(scenario())
    assert calls == 2
    assert ready


@pytest.mark.parametrize("reason", ["server_error", "rate_limited"])
def test_token_refresh_429_or_5xx_backs_off_without_login(reason: str) -> None:
    """A 429 or 5xx on refresh is not a rejection: no login in the same attempt."""

    async def scenario() -> list[tuple[str, float]]:
        clock = FakeClock()
        auth = FakeAuth(clock, [Outcome(lifetime=100), Outcome(reason)])  # type: ignore[arg-type]
        manager = TokenManager(auth, S.token_side(), clock, rng=random.Random(3))
        await manager.start()
        await clock.advance(90)
        await manager.stop()
        return [(c.kind, c.start) for c in auth.calls]

    calls = asyncio.run(scenario())
    assert calls[1][0] == "refresh"
    assert calls[2][0] == "refresh"  # the refresh token is still good: tried again, later
    assert calls[2][1] - calls[1][1] >= FLOOR
