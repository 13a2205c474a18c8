"""Calls to Repairy's two auth endpoints (log in, refresh), and nothing else.

These requests are built here from settings, never through the proxy path that injects the
managed token. Every failure becomes an :class:`~gateway.errors.AuthError` with a fixed
``reason``; error bodies from the auth endpoint are reduced to a short code before anyone can
log them, since they may echo what we sent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp

from gateway.clock import Clock
from gateway.errors import AuthError, AuthReason
from gateway.settings import Settings
from gateway.token.parse import Grant, MalformedAuthResponse, parse_auth_response
from gateway.token.value import RenewalKind, Token
from gateway.urls import target_url

MAX_AUTH_BODY = 64 * 1024
_CODE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Exchange:
    """A grant and when the call that produced it was sent."""

    grant: Grant
    sent_mono: float
    sent_wall: float
    partner_id: str


class AuthClient:
    """Logs in and refreshes against the configured upstream."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, clock: Clock) -> None:
        self._session = session
        self._settings = settings
        self._clock = clock

    async def login(self) -> Exchange:
        s = self._settings
        body = {s.auth_app_key_field: s.app_key.reveal(),
                s.auth_app_secret_field: s.app_secret.reveal()}
        return await self._call("login", s.auth_token_path, body, bearer=None)

    async def refresh(self, token: Token) -> Exchange:
        s = self._settings
        if not token.refresh:
            raise AuthError("refresh_rejected", "no refresh token held")
        bearer = token.access if s.auth_refresh_bearer else None
        return await self._call("refresh", s.auth_refresh_path,
                                {s.auth_refresh_token_field: token.refresh}, bearer=bearer)

    async def _call(self, kind: RenewalKind, path: str, body: dict[str, str],
                    bearer: str | None) -> Exchange:
        s = self._settings
        url = target_url(s.base_url, path)
        headers = {"X-Partner-ID": s.partner_id, "Accept": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if s.auth_body_format == "json":
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        else:
            data = urlencode(body).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        sent_mono, sent_wall = self._clock.monotonic(), self._clock.time()
        try:
            async with self._session.post(
                url, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=s.auth_timeout),
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(MAX_AUTH_BODY + 1)
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise AuthError("timeout", f"{kind} timed out after {s.auth_timeout:g}s",
                            ambiguous=True) from None
        except aiohttp.ClientConnectorError as exc:
            raise AuthError("connect_error", f"{kind}: cannot connect: {exc.os_error}") from None
        except aiohttp.ClientError as exc:
            raise AuthError("connect_error", f"{kind}: connection failed: {type(exc).__name__}",
                            ambiguous=True) from None
        if 200 <= status < 300:
            if len(raw) > MAX_AUTH_BODY:
                raise AuthError("malformed_response", f"{kind} response too large", status=status)
            try:
                grant = parse_auth_response(raw, sent_wall)
            except MalformedAuthResponse as exc:
                raise AuthError("malformed_response", f"{kind}: {exc}", status=status) from None
            return Exchange(grant, sent_mono, sent_wall, s.partner_id)
        reason: AuthReason
        if status == 429:
            reason = "rate_limited"
        elif status >= 500:
            reason = "server_error"
        elif kind == "login":
            reason = "invalid_credentials"
        else:
            reason = "refresh_rejected"
        detail = _error_code(raw)
        raise AuthError(reason, f"{kind} answered {status}" + (f" ({detail})" if detail else ""),
                        status=status, retry_after=retry_after)


def token_from_exchange(ex: Exchange, *, generation: int, via: RenewalKind,
                        previous: Token | None, default_ttl: float,
                        default_refresh_ttl: float) -> Token:
    """Build the managed token; a refresh that returns no refresh token keeps the old one."""
    g = ex.grant
    expires_in = g.expires_in if g.expires_in is not None else default_ttl
    refresh, refresh_expires_at = g.refresh, None
    if refresh:
        refresh_in = g.refresh_expires_in
        if refresh_in is None:
            refresh_in = default_refresh_ttl
            if via == "refresh" and previous is not None and previous.refresh == refresh:
                refresh_expires_at = previous.refresh_expires_at  # same token, same expiry
        if refresh_expires_at is None:
            refresh_expires_at = ex.sent_mono + refresh_in
    elif via == "refresh" and previous is not None:
        refresh, refresh_expires_at = previous.refresh, previous.refresh_expires_at
    return Token(access=g.access, refresh=refresh, generation=generation, via=via,
                 obtained_at=ex.sent_mono, expires_at=ex.sent_mono + expires_in,
                 refresh_expires_at=refresh_expires_at, obtained_wall=ex.sent_wall,
                 partner_id=ex.partner_id)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: ignored, our own back-off applies


def _error_code(raw: bytes) -> str | None:
    """A short, safe code from an error body (``error.code``/``code``/``error``), else None."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    candidates: list[object] = []
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            candidates.append(err.get("code"))
        candidates += [err, doc.get("code")]
    for c in candidates:
        if isinstance(c, str) and _CODE_RE.match(c):
            return c
    return None
