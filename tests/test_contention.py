"""Credential contention on a fake clock (gateway/token/contention.py and the manager): what
counts, what is taken back, what contention changes (logins slowed, callers told why), and
that a storm of other failures is never mistaken for it."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import CredentialContention, CredentialsRejected
from gateway.token.contention import ContentionWatch
from gateway.token.manager import TokenManager
from gateway.token.source import NoEvents
from tests.fake_clock import FakeAuth, FakeClock, Outcome, settle
from tests.gateway_helpers import settings_for

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

S = settings_for("http://127.0.0.1:9", renew_retry_min="1s", renew_retry_max="60s",
                 login_retry_interval="30s", token_wait_timeout="4s",
                 contention_invalidations="3", contention_window="10m")


class Seen(NoEvents):
    """TokenEvents that remembers contention."""

    def __init__(self) -> None:
        self.contentions = 0

    def contention(self, began: bool) -> None:
        self.contentions += began


def test_the_watch_needs_the_threshold_within_the_window_and_ends_a_window_after() -> None:
    w = ContentionWatch(3, 600)
    assert not w.record(0, 1, 30) and not w.record(300, 2, 30)
    assert not w.record(901, 3, 30)  # the first is older than the window
    assert not w.record(1000, 4, 30)  # and now the second
    assert w.record(1100, 5, 30) and w.active(1100) and w.detected == 1
    assert not w.record(1500, 6, 30)  # while it lasts: extends, never begins again
    assert w.active(2099) and not w.active(2100)
    assert w.count(2100) == 1


def test_the_watch_forgets_an_invalidation_a_route_explained() -> None:
    w = ContentionWatch(3, 600)
    w.record(0, 1, 30)
    w.record(10, 2, 30)
    assert w.retract(2) and not w.retract(2)
    assert not w.record(20, 3, 30) and w.count(20) == 2


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.floats(0, 1e6), max_size=200), threshold=st.integers(1, 10),
       window=st.floats(1, 1e5))
def test_the_watch_begins_only_with_the_threshold_inside_one_window(
        times: list[float], threshold: int, window: float) -> None:
    w = ContentionWatch(threshold, window)
    seen: list[float] = []
    for g, at in enumerate(sorted(times)):
        seen.append(at)
        began = w.record(at, g, 30)
        if began:
            assert sum(1 for t in seen if at - t <= window) >= threshold
        assert w.count(at) <= threshold


async def _manager(clock: FakeClock, seen: Seen) -> tuple[TokenManager, FakeAuth]:
    auth = FakeAuth(clock)
    manager = TokenManager(auth, S.token_side(), clock, seen, rng=random.Random(3))
    await manager.start()
    await settle()
    await clock.advance(0.1)
    return manager, auth


async def _revoke(manager: TokenManager, clock: FakeClock, after: float = 2.0) -> None:
    tok = manager.current
    assert tok is not None
    manager.invalidate(tok.generation, "upstream_401")
    await clock.advance(after)


def test_three_revocations_in_ten_minutes_are_contention_then_logins_slow_down() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        seen = Seen()
        manager, auth = await _manager(clock, seen)
        for _ in range(2):
            await _revoke(manager, clock, 60)
        assert not manager.contended() and seen.contentions == 0
        await _revoke(manager, clock)
        assert manager.contended() and seen.contentions == 1
        assert manager.status().contended and manager.status().contention_invalidations == 3
        logins = len(auth.calls)
        # Someone keeps revoking at once: at most one login per GATEWAY_LOGIN_RETRY_INTERVAL.
        for _ in range(40):
            tok = manager.current
            assert tok is not None
            manager.invalidate(tok.generation, "upstream_401")
            await clock.advance(3)
        assert len(auth.calls) - logins <= 120 / 30 + 1
        starts = [c.start for c in auth.calls[logins - 1:]]
        assert all(b - a >= 30 - 1e-6 for a, b in itertools.pairwise(starts))
        # A caller whose token died is told why, with Retry-After.
        tok = manager.current
        assert tok is not None
        manager.invalidate(tok.generation, "upstream_401")
        with pytest.raises(CredentialContention) as caught:
            await manager.get(tok.generation)
        assert caught.value.code == "credential_contention" and caught.value.status == 503
        assert caught.value.retry_after is not None and 1 <= caught.value.retry_after <= 30
        assert seen.contentions == 1  # it began once
        # The other holder stops: a window later, logins are prompt again.
        await clock.advance(11 * 60)
        assert not manager.contended()
        await _revoke(manager, clock, 1)
        assert manager.current is not None and manager.current.generation > tok.generation
        await manager.stop()

    asyncio.run(scenario())


def test_invalidations_a_route_explained_are_never_contention() -> None:
    """A route that refuses every token (marked persistent 401 after each cool-down) causes
    one invalidation per cool-down: each is taken back, never counted."""

    async def scenario() -> None:
        clock = FakeClock()
        seen = Seen()
        manager, _ = await _manager(clock, seen)
        for _ in range(10):
            tok = manager.current
            assert tok is not None
            manager.invalidate(tok.generation, "upstream_401")
            await clock.advance(1)
            manager.route_explained(tok.generation)
            await clock.advance(30)
        assert not manager.contended() and seen.contentions == 0
        await manager.stop()

    asyncio.run(scenario())


def test_scheduled_renewals_are_never_contention() -> None:
    """Dozens of ordinary renewals: no invalidation, no contention."""

    async def scenario() -> None:
        clock = FakeClock()
        seen = Seen()
        auth = FakeAuth(clock)
        manager = TokenManager(auth, S.token_side(), clock, seen, rng=random.Random(3))
        await manager.start()
        await clock.advance(5 * 3600)  # 600 s tokens: dozens of scheduled renewals
        assert len(auth.calls) > 20
        assert not manager.contended() and seen.contentions == 0
        await manager.stop()

    asyncio.run(scenario())


@settings(max_examples=30, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 120.0), min_size=1, max_size=60),
       seed=st.integers(0, 2**32 - 1))
def test_logins_under_any_revocation_history_keep_the_contention_floor(
        gaps: list[float], seed: int) -> None:
    """Revocations at any times: once contention began, no two auth calls come closer than
    GATEWAY_LOGIN_RETRY_INTERVAL while it lasts, and an hour never holds more than
    3600/30 + the threshold + 1 calls beyond the scheduled renewals."""

    async def scenario() -> tuple[list[float], list[tuple[float, float]]]:
        clock = FakeClock()
        seen = Seen()
        auth = FakeAuth(clock)
        manager = TokenManager(auth, S.token_side(), clock, seen, rng=random.Random(seed))
        await manager.start()
        await clock.advance(0.1)
        spans: list[tuple[float, float]] = []  # (from, until) of contention
        for gap in gaps:
            await clock.advance(gap)
            tok = manager.current
            if tok is not None:
                manager.invalidate(tok.generation, "upstream_401")
            await settle()
            until = manager._contention.until
            if until is not None and manager.contended():
                spans.append((clock.now, until))
        await clock.advance(60)
        await manager.stop()
        return [c.start for c in auth.calls], spans

    starts, spans = asyncio.run(scenario())
    for a, b in itertools.pairwise(starts):
        if any(lo <= a and b <= hi for lo, hi in spans):
            assert b - a >= 30 - 1e-6, (a, b)
    for i, first in enumerate(starts):
        within = [t for t in starts[i:] if t < first + 3600]
        assert len(within) <= 3600 / 30 + 3 + 1 + 3600 / 60, len(within)


def test_one_revocation_and_failing_re_logins_are_not_contention() -> None:
    """One 401, then the login fails again and again (Repairy's auth down): one generation,
    one count, however many attempts its renewal takes."""

    async def scenario() -> None:
        clock = FakeClock()
        seen = Seen()
        auth = FakeAuth(clock)
        manager = TokenManager(auth, S.token_side(), clock, seen, rng=random.Random(3))
        await manager.start()
        await clock.advance(0.1)
        auth.default = lambda: Outcome("server_error")
        await _revoke(manager, clock, 600)
        assert len(auth.calls) > 5
        assert not manager.contended() and seen.contentions == 0
        assert manager.status().contention_invalidations == 1
        await manager.stop()

    asyncio.run(scenario())


def test_a_revoked_secret_is_credentials_rejected_and_not_ready_never_contention() -> None:
    """A live 401, and every login since is refused: callers get credentials_rejected, the
    manager reports the refused renewal (for the probe), and no contention is claimed."""

    async def scenario() -> None:
        clock = FakeClock()
        seen = Seen()
        auth = FakeAuth(clock)
        manager = TokenManager(auth, S.token_side(), clock, seen, rng=random.Random(3))
        await manager.start()
        await clock.advance(0.1)
        auth.default = lambda: Outcome("invalid_credentials")
        for _ in range(4):
            await _revoke(manager, clock, 120)
        assert manager.renewal_refused()  # the probe's verdict decides readiness
        assert manager.ready()  # the refused token still serves: nothing is taken away
        tok = manager.current
        assert tok is not None
        with pytest.raises(CredentialsRejected):
            await manager.get(tok.generation)
        assert seen.contentions == 0
        await manager.stop()

    asyncio.run(scenario())


def test_invalidations_a_streamed_body_caused_never_count() -> None:
    """A 401 on a request that cannot be replayed gives its route no verdict: the renewal
    happens, but the invalidation is not counted (a forbidden upload route called now and
    then would otherwise look like contention)."""

    async def scenario() -> None:
        clock = FakeClock()
        seen = Seen()
        manager, _ = await _manager(clock, seen)
        for _ in range(5):
            tok = manager.current
            assert tok is not None
            manager.invalidate(tok.generation, "upstream_401_streamed")
            await clock.advance(40)
        assert manager.current is not None and manager.current.generation == 6
        assert not manager.contended() and manager.status().contention_invalidations == 0
        await manager.stop()

    asyncio.run(scenario())
