"""Pure renewal policy, driven by explicit times (no loop, no network)."""

from __future__ import annotations

import pytest

from gateway.token.auth_client import Exchange, token_from_exchange
from gateway.token.parse import Grant
from gateway.token.renewal import backoff
from gateway.token.value import (
    Token,
    can_refresh,
    choose_renewal,
    is_usable,
    renewal_due_at,
)

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py


def tok(lifetime: float = 100.0, refresh_life: float | None = 1000.0,
        refresh: str | None = "r") -> Token:
    return Token(access="a", refresh=refresh, generation=1, via="login", obtained_at=50.0,
                 expires_at=50.0 + lifetime,
                 refresh_expires_at=None if refresh_life is None else 50.0 + refresh_life,
                 obtained_wall=1_700_000_000.0, partner_id="p")


def test_policy_usable_until_margin_before_expiry() -> None:
    """A token stops being usable ``margin`` before expiry."""
    t = tok(lifetime=1000)
    assert is_usable(t, 50 + 939, margin=60)
    assert not is_usable(t, 50 + 940, margin=60)
    assert not is_usable(None, 0, margin=60)


def test_policy_margin_is_capped_for_short_tokens() -> None:
    """A 60 s margin on a 2 s token would make it useless; it is capped at 10% of life."""
    t = tok(lifetime=2)
    assert is_usable(t, 50 + 1.79, margin=60)
    assert not is_usable(t, 50 + 1.8, margin=60)


@pytest.mark.parametrize("u", [0.0, 0.5, 0.999])
def test_policy_renewal_due_within_jitter_window(u: float) -> None:
    """Renewal starts between (at - jitter) and ``at`` of the lifetime."""
    t = tok(lifetime=100)
    due = renewal_due_at(t, at_fraction=0.8, jitter_fraction=0.1, u=u)
    assert 50 + 70 < due <= 50 + 80
    assert due == pytest.approx(50 + 100 * (0.8 - 0.1 * u))


def test_policy_refresh_needs_live_refresh_and_access_tokens() -> None:
    """Refresh only with a refresh token inside its life and a usable access token."""
    assert can_refresh(tok(), 60, margin=1)
    assert not can_refresh(tok(refresh=None), 60, margin=1)
    assert not can_refresh(tok(refresh_life=20), 50 + 19.5, margin=1)  # refresh token ending
    assert not can_refresh(tok(lifetime=10), 50 + 9.99, margin=1)  # access token ending
    assert can_refresh(tok(refresh_life=None), 60, margin=1)  # expiry unknown: try it
    assert choose_renewal(tok(), 60, 1, refresh_allowed=True) == "refresh"
    assert choose_renewal(tok(), 60, 1, refresh_allowed=False) == "login"
    assert choose_renewal(None, 60, 1, refresh_allowed=True) == "login"


def test_policy_backoff_doubles_with_jitter_and_caps() -> None:
    """Back-off doubles per failure, stays within [half, full], and never passes the cap."""
    assert backoff(1, 1, 60, u=0.999) == pytest.approx(1, abs=0.01)
    assert backoff(1, 1, 60, u=0.0) == 0.5
    assert backoff(4, 1, 60, u=0.999) == pytest.approx(8, abs=0.01)
    assert backoff(30, 1, 60, u=0.999) <= 60
    assert backoff(30, 1, 60, u=0.0) == 30


@pytest.mark.parametrize("failures", [1025, 10**6, 10**18])
def test_policy_backoff_never_overflows(failures: int) -> None:
    """Any number of failures gives a finite back-off at the cap (2.0 ** 1025 overflowed)."""
    assert backoff(failures, 1, 60, u=0.999) == pytest.approx(60, abs=0.1)


def test_policy_expiry_counts_from_when_the_call_was_sent() -> None:
    """Lifetimes start at the send time, so a slow answer only makes us renew earlier."""
    ex = Exchange(Grant("a", "r", 100.0, 1000.0), sent_mono=10.0, sent_wall=1e9, partner_id="p")
    t = token_from_exchange(ex, generation=3, via="login", previous=None,
                            default_ttl=5, default_refresh_ttl=6)
    assert (t.obtained_at, t.expires_at, t.refresh_expires_at) == (10.0, 110.0, 1010.0)
    assert t.wall(t.expires_at) == 1e9 + 100


def test_policy_defaults_apply_when_response_states_no_lifetime() -> None:
    """No expiry in the response: the documented defaults (settings) apply."""
    ex = Exchange(Grant("a", "r", None, None), sent_mono=0.0, sent_wall=0.0, partner_id="p")
    t = token_from_exchange(ex, generation=1, via="login", previous=None,
                            default_ttl=48 * 3600, default_refresh_ttl=14 * 86400)
    assert t.expires_at == 48 * 3600
    assert t.refresh_expires_at == 14 * 86400


def test_policy_refresh_without_new_refresh_token_keeps_old_one() -> None:
    """A refresh answer with no refresh token keeps the previous one and its expiry."""
    prev = tok()
    ex = Exchange(Grant("a2", None, 100.0, None), sent_mono=80.0, sent_wall=0.0, partner_id="p")
    t = token_from_exchange(ex, generation=2, via="refresh", previous=prev,
                            default_ttl=1, default_refresh_ttl=1)
    assert t.refresh == "r"
    assert t.refresh_expires_at == prev.refresh_expires_at


def test_policy_token_repr_hides_tokens() -> None:
    """repr(Token) shows neither the access nor the refresh token."""
    t = Token(access="sekrit-access", refresh="sekrit-refresh", generation=1, via="login",
              obtained_at=0, expires_at=1, refresh_expires_at=None, obtained_wall=0,
              partner_id="p")
    assert "sekrit" not in repr(t)
