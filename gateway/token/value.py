"""The managed token as a small frozen value, and the pure renewal policy around it.

Every decision here ("is this token usable?", "when is it due for renewal?", "may we refresh
or must we log in?", "how long to back off?") is a plain function of its inputs, times on the
monotonic clock, so it is tested without a network or a running loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.redact import fingerprint

RenewalKind = Literal["login", "refresh"]
#: The expiry margin never eats more than this share of a token's lifetime (short tokens).
MAX_MARGIN_SHARE = 0.1


@dataclass(frozen=True)
class Token:
    """One access token (and its refresh token), with expiries on the monotonic clock.

    ``obtained_at`` is when the auth call that produced it was *sent*, so network time only
    ever makes us renew early, never late.
    """

    access: str = field(repr=False)
    refresh: str | None = field(repr=False)
    generation: int
    via: RenewalKind
    obtained_at: float
    expires_at: float
    refresh_expires_at: float | None
    obtained_wall: float
    partner_id: str  # the X-Partner-ID this token belongs to (switches with it on rotation)

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.access)

    def wall(self, monotonic_time: float) -> float:
        """Convert a monotonic instant of this token to Unix time (for display and metrics)."""
        return self.obtained_wall + (monotonic_time - self.obtained_at)


def effective_margin(token: Token, margin: float) -> float:
    return min(margin, token.lifetime * MAX_MARGIN_SHARE)


def usable_until(token: Token, margin: float) -> float:
    return token.expires_at - effective_margin(token, margin)


def is_usable(token: Token | None, now: float, margin: float) -> bool:
    """A token is usable until ``margin`` (capped at 10% of its lifetime) before expiry."""
    return token is not None and now < usable_until(token, margin)


def renewal_due_at(token: Token, at_fraction: float, jitter_fraction: float,
                   u: float) -> float:
    """When background renewal starts: at ``at_fraction`` of the lifetime, minus up to
    ``jitter_fraction`` of it (``u`` is a uniform random number in [0, 1))."""
    share = max(0.0, at_fraction - jitter_fraction * u)
    return token.obtained_at + token.lifetime * share


def can_refresh(token: Token | None, now: float, margin: float) -> bool:
    """Refresh needs a refresh token still inside its own lifetime and a usable access token
    (Repairy wants the current, still valid access token on refresh)."""
    if token is None or not token.refresh or not is_usable(token, now, margin):
        return False
    if token.refresh_expires_at is None:
        return True
    refresh_life = token.refresh_expires_at - token.obtained_at
    return now < token.refresh_expires_at - min(margin, refresh_life * MAX_MARGIN_SHARE)


def choose_renewal(token: Token | None, now: float, margin: float,
                   refresh_allowed: bool) -> RenewalKind:
    return "refresh" if refresh_allowed and can_refresh(token, now, margin) else "login"
