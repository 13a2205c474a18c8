"""Sandbox token rules: issuing, checking, refreshing and revoking access/refresh tokens.

Mirrors what Repairy documents: App Key + App Secret log in, access tokens and refresh tokens
have separate lifetimes, a refresh needs the still-valid access token *and* the refresh token.
Two behaviours the docs leave open are switches: refresh-token rotation, and "one live token
per credential" (a new access token invalidates every earlier one for that credential).
Tokens are random opaque strings from ``secrets``; time is an injected monotonic clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

_EXPIRED_GRACE = 3600.0


@dataclass(frozen=True)
class Credential:
    """One partner's credentials as Repairy support would issue them."""

    app_key: str
    app_secret: str = field(repr=False)
    partner_id: str


@dataclass
class _AccessRecord:
    credential: Credential
    expires_at: float
    refresh_token: str


@dataclass
class _RefreshRecord:
    credential: Credential
    expires_at: float
    access_token: str


@dataclass(frozen=True)
class Issued:
    """What a successful login or refresh hands out."""

    access_token: str
    refresh_token: str
    access_ttl: float
    refresh_ttl: float
    partner_id: str


class TokenRejected(Exception):
    """A token or credential check failed; ``code`` names why (stable, shown in error bodies)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TokenStore:
    """In-memory token state of the sandbox."""

    def __init__(
        self,
        credentials: list[Credential],
        *,
        access_ttl: float,
        refresh_ttl: float,
        rotate_refresh: bool,
        single_token: bool,
        clock: Callable[[], float],
    ) -> None:
        self.credentials = list(credentials)
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.rotate_refresh = rotate_refresh
        self.single_token = single_token
        self._clock = clock
        self._access: dict[str, _AccessRecord] = {}
        self._refresh: dict[str, _RefreshRecord] = {}

    # -- issuing -----------------------------------------------------------------------------
    def login(self, app_key: object, app_secret: object) -> Issued:
        if not isinstance(app_key, str) or not isinstance(app_secret, str):
            raise TokenRejected("invalid_request", "appKey and appSecret are required strings")
        for cred in self.credentials:
            if secrets.compare_digest(cred.app_key, app_key) and secrets.compare_digest(
                cred.app_secret, app_secret
            ):
                return self._issue(cred, refresh_token=None)
        raise TokenRejected("invalid_credentials", "unknown appKey or wrong appSecret")

    def refresh(self, access_token: str | None, refresh_token: object) -> Issued:
        record = self.check(access_token)
        if not isinstance(refresh_token, str) or not refresh_token:
            raise TokenRejected("invalid_request", "refreshToken is required")
        ref = self._refresh.get(refresh_token)
        if ref is None:
            raise TokenRejected("refresh_token_invalid", "refresh token unknown, used or revoked")
        if ref.credential != record.credential:
            raise TokenRejected("refresh_token_invalid", "refresh token belongs to another token")
        if self._clock() >= ref.expires_at:
            raise TokenRejected("refresh_token_expired", "refresh token has expired")
        if self.rotate_refresh:
            del self._refresh[refresh_token]
            return self._issue(ref.credential, refresh_token=None)
        return self._issue(ref.credential, refresh_token=refresh_token)

    def _issue(self, cred: Credential, refresh_token: str | None) -> Issued:
        now = self._clock()
        self._purge(now)
        if self.single_token:
            self._revoke_credential(cred, keep_refresh=refresh_token)
        access = "sbx_at_" + secrets.token_urlsafe(32)
        if refresh_token is None:
            refresh_token = "sbx_rt_" + secrets.token_urlsafe(32)
            self._refresh[refresh_token] = _RefreshRecord(cred, now + self.refresh_ttl, access)
            refresh_left = self.refresh_ttl
        else:
            ref = self._refresh[refresh_token]
            ref.access_token = access
            refresh_left = max(0.0, ref.expires_at - now)
        self._access[access] = _AccessRecord(cred, now + self.access_ttl, refresh_token)
        return Issued(access, refresh_token, self.access_ttl, refresh_left, cred.partner_id)

    # -- checking ----------------------------------------------------------------------------
    def check(self, access_token: str | None) -> _AccessRecord:
        if not access_token:
            raise TokenRejected("token_missing", "Authorization: Bearer <token> is required")
        record = self._access.get(access_token)
        if record is None:
            raise TokenRejected("token_invalid", "access token unknown or revoked")
        if self._clock() >= record.expires_at:
            raise TokenRejected("token_expired", "access token has expired")
        return record

    # -- revoking ----------------------------------------------------------------------------
    def revoke_partner(self, partner_id: str) -> int:
        """Revoke every token of one partner's credentials (as Repairy support might)."""
        access = [t for t, r in self._access.items() if r.credential.partner_id == partner_id]
        refresh = [t for t, r in self._refresh.items() if r.credential.partner_id == partner_id]
        for tok in access:
            del self._access[tok]
        for tok in refresh:
            del self._refresh[tok]
        return len(access) + len(refresh)

    def revoke_all(self) -> int:
        n = len(self._access) + len(self._refresh)
        self._access.clear()
        self._refresh.clear()
        return n

    def _revoke_credential(self, cred: Credential, keep_refresh: str | None) -> None:
        for tok in [t for t, r in self._access.items() if r.credential == cred]:
            del self._access[tok]
        for tok in [t for t, r in self._refresh.items() if r.credential == cred]:
            if tok != keep_refresh:
                del self._refresh[tok]

    def _purge(self, now: float) -> None:
        # Keep expired records for a while so a late caller still hears "expired", not "invalid".
        cutoff = now - _EXPIRED_GRACE
        for tok in [t for t, r in self._access.items() if r.expires_at <= cutoff]:
            del self._access[tok]
        for tok in [t for t, r in self._refresh.items() if r.expires_at <= cutoff]:
            del self._refresh[tok]

    @property
    def live_access_tokens(self) -> int:
        now = self._clock()
        return sum(1 for r in self._access.values() if r.expires_at > now)
