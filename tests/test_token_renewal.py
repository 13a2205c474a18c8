"""The pure renewal decision (``gateway.token.renewal``), by example: precedence of the
back-off rules, the floor, the due time, invalidation, and the serialised state."""

from __future__ import annotations

import math

import pytest

from gateway.token import renewal
from gateway.token.renewal import Failure, RenewalPolicy, RenewalState
from gateway.token.value import Token

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

P = RenewalPolicy(margin=60, at_fraction=0.8, jitter_fraction=0.1, retry_min=1, retry_max=60,
                  login_retry_interval=30)


def tok(lifetime: float = 1000.0, at: float = 0.0, generation: int = 1) -> Token:
    return Token(access="a", refresh="r", generation=generation, via="login", obtained_at=at,
                 expires_at=at + lifetime, refresh_expires_at=at + 10 * lifetime,
                 obtained_wall=1.8e9, partner_id="p")


def held(lifetime: float = 1000.0) -> RenewalState:
    return renewal.succeeded(RenewalState(), tok(lifetime), P, u=0.0)


def test_renewal_first_attempt_is_a_login_now() -> None:
    """No token: log in at once."""
    assert renewal.next_attempt(RenewalState(), 5.0, P) == renewal.Attempt(5.0, "login")


def test_renewal_due_at_share_of_lifetime_and_before_usable_end() -> None:
    """Renewal is due at the configured share, but never later than the end of the usable
    life minus retry_min (a short token with a large share still renews in time)."""
    assert held(1000).due_at == pytest.approx(800)
    late = RenewalPolicy(60, 0.95, 0.0, 1, 60, 30)
    t = tok(10)  # usable until 9 (margin capped at 10%)
    assert renewal.due_at(t, late, 0.0) == pytest.approx(8.0)
    assert renewal.next_attempt(held(1000), 10.0, P) == renewal.Attempt(800, "refresh")


def test_renewal_config_error_blocks_for_login_interval() -> None:
    """Rejected credentials (or a wrong path/body) wait login_retry_interval, whatever else."""
    st = renewal.failed(RenewalState(), Failure("login", "invalid_credentials", 1.0), 10, P, 0.5)
    assert (st.not_before, st.blocked) == (40, "invalid_credentials")
    st = renewal.failed(RenewalState(), Failure("login", "endpoint_misconfigured"), 10, P, 0.5)
    assert (st.not_before, st.blocked) == (40, "endpoint_misconfigured")


def test_renewal_retry_after_is_a_floor_capped_at_retry_max() -> None:
    """Retry-After (capped at retry_max) is never undercut, even by the pull toward expiry."""
    st = held(1000)
    st = renewal.failed(st, Failure("refresh", "rate_limited", retry_after=45), 800, P, 0.0)
    assert st.not_before == pytest.approx(845)
    st = renewal.failed(held(1000), Failure("refresh", "rate_limited", retry_after=1e9), 800, P,
                        0.0)
    assert st.not_before == pytest.approx(860)
    near_end = renewal.failed(held(1000), Failure("refresh", "rate_limited", retry_after=30),
                              935, P, 0.0)
    assert near_end.not_before == pytest.approx(965)  # past the usable end: Retry-After rules


def test_renewal_pulls_the_retry_before_the_usable_end_only_while_usable() -> None:
    """A long back-off is shortened to land before the token's usable life ends (usable until
    940, retry_min 1: at 939); once that moment has passed, plain back-off (never 0)."""
    st = renewal.failed(held(1000), Failure("refresh", "server_error"), 900, P, 0.999)
    st = renewal.failed(st, Failure("refresh", "server_error"), 901, P, 0.999)
    st = renewal.failed(st, Failure("refresh", "server_error"), 903, P, 0.999)
    st = renewal.failed(st, Failure("refresh", "server_error"), 907, P, 0.999)
    st = renewal.failed(st, Failure("refresh", "server_error"), 915, P, 0.999)
    st = renewal.failed(st, Failure("refresh", "server_error"), 931, P, 0.999)
    assert st.not_before == pytest.approx(939)  # 32 s back-off, pulled forward
    st = renewal.failed(st, Failure("refresh", "server_error"), 939, P, 0.999)
    assert st.not_before == pytest.approx(939 + 60, abs=0.1)  # capped back-off, not 0
    gone = renewal.failed(st, Failure("login", "server_error"), 2000, P, 0.0)
    assert gone.not_before is not None and gone.not_before >= 2000 + 30


def test_renewal_floor_applies_to_every_attempt() -> None:
    """Retry-After: 0, or an invalidation right after a renewal, still waits retry_min/2."""
    st = renewal.started(held(1000), "refresh", 100)
    st = renewal.failed(st, Failure("refresh", "server_error", retry_after=0), 100, P, 0.0)
    assert st.not_before == pytest.approx(100.5)
    st = renewal.succeeded(renewal.started(RenewalState(), "login", 0), tok(), P, 0.0)
    st = renewal.invalidated(st, 1)
    plan = renewal.next_attempt(st, 0.1, P)
    assert plan == renewal.Attempt(0.5, "login")


def test_renewal_invalidation_keeps_the_back_off_and_only_its_generation() -> None:
    """An upstream 401 does not clear a back-off, nor touch a newer token."""
    st = renewal.failed(held(1000), Failure("refresh", "server_error"), 800, P, 0.0)
    after = renewal.invalidated(st, 1)
    assert after.stale and after.not_before == st.not_before
    assert renewal.invalidated(after, 1) is after  # already marked
    assert renewal.invalidated(held(1000), 7) == held(1000)  # another generation


def test_renewal_ambiguous_refresh_bans_that_refresh_token() -> None:
    """A refresh that may have reached Repairy is never repeated: the next attempt logs in."""
    st = renewal.failed(held(1000), Failure("refresh", "timeout", ambiguous=True), 800, P, 0.0)
    assert renewal.next_attempt(st, 900, P) == renewal.Attempt(800.5, "login")
    st = renewal.failed(held(1000), Failure("refresh", "connect_error"), 800, P, 0.0)
    assert renewal.next_attempt(st, 900, P) == renewal.Attempt(800.5, "refresh")


@pytest.mark.parametrize("failures", [10**6, renewal.FAILURE_CAP])
def test_renewal_failure_count_is_capped(failures: int) -> None:
    """The failure counter stops at its cap; the back-off stays finite."""
    st = RenewalState(failures=failures)
    st = renewal.failed(st, Failure("login", "server_error"), 0, P, 1.0)
    assert st.failures <= renewal.FAILURE_CAP
    assert st.not_before is not None and math.isfinite(st.not_before)


def test_renewal_state_round_trips_through_its_serialised_form() -> None:
    """The state value serialises (times as Unix times) and reads back on another clock."""
    st = renewal.failed(renewal.started(held(1000), "refresh", 850),
                        Failure("refresh", "timeout", ambiguous=True), 851, P, 0.3)
    st = renewal.invalidated(st, 1)
    doc = renewal.to_dict(st, now_mono=900, now_wall=1.8e9)
    back = renewal.from_dict(doc, now_mono=5900, now_wall=1.8e9)
    assert back.token is not None and st.token is not None
    assert back.token.expires_at == pytest.approx(st.token.expires_at + 5000)
    assert back.not_before == pytest.approx((st.not_before or 0) + 5000)
    assert (back.stale, back.refresh_banned, back.failures, back.last_error) == (
        True, True, 1, "timeout")
    assert "'a'" not in repr(back)
