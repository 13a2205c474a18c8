"""Reading an ``AuthResponse`` tolerantly, since Repairy's field names are not documented.

Accepted: camelCase or snake_case names; an envelope (``data``, ``result``, ``token``…);
expiry as relative seconds (or milliseconds), or an absolute time (epoch seconds, epoch
milliseconds, ISO-8601, read as UTC when it has no zone); else a JWT ``exp`` claim; else
nothing (the caller falls back to the documented lifetimes). A body without an access token is
malformed, never a token.

A stated lifetime is never trusted beyond the documented one (the caller passes the bounds),
nor below :data:`MIN_LIFETIME`: a relative value too large in seconds that fits when read as
milliseconds is read as milliseconds; one still too large is capped; an unreadable or
implausible one is ignored. Each such correction is returned in :attr:`Grant.notes` (field
names and numbers only, never a token) for the caller to log once.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ACCESS_KEYS = ("accessToken", "access_token", "token", "jwt", "idToken", "id_token")
REFRESH_KEYS = ("refreshToken", "refresh_token")
EXPIRES_IN_KEYS = ("expiresIn", "expires_in", "accessTokenExpiresIn", "access_token_expires_in",
                   "expiresInSeconds", "ttl")
EXPIRES_AT_KEYS = ("expiresAt", "expires_at", "accessTokenExpiresAt", "access_token_expires_at",
                   "expiry", "expires", "exp", "expirationTime", "expiration")
REFRESH_IN_KEYS = ("refreshExpiresIn", "refresh_expires_in", "refreshTokenExpiresIn",
                   "refresh_token_expires_in")
REFRESH_AT_KEYS = ("refreshExpiresAt", "refresh_expires_at", "refreshTokenExpiresAt",
                   "refresh_token_expires_at")
ENVELOPE_KEYS = ("data", "result", "payload", "token", "tokens", "auth", "body")
_MS_THRESHOLD = 1e11  # larger epoch numbers are milliseconds (1e11 s is the year 5138)
_EPOCH_THRESHOLD = 1e9  # a relative value this large is an absolute epoch time (2001+)
#: The shortest lifetime believed (tests run 2 s tokens).
MIN_LIFETIME = 1.0
#: Used when the caller gives no bounds (tools, tests): generous, still finite.
_NO_BOUND = 10 * 365 * 86400.0


class MalformedAuthResponse(ValueError):
    """The auth endpoint said 2xx but gave no usable token. The message never holds a token."""


@dataclass(frozen=True)
class Grant:
    """What an auth response grants; lifetimes in seconds from when the call was sent."""

    access: str = field(repr=False)
    refresh: str | None = field(repr=False)
    expires_in: float | None
    refresh_expires_in: float | None
    #: Corrections made while reading (field names and numbers only; safe to log).
    notes: tuple[str, ...] = ()


def parse_auth_response(body: bytes, sent_wall: float, *, max_access: float = _NO_BOUND,
                        max_refresh: float = _NO_BOUND) -> Grant:
    """Parse an auth response body; ``sent_wall`` (Unix time) anchors absolute expiries;
    ``max_access``/``max_refresh`` are the documented lifetimes, never exceeded."""
    try:
        doc = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError):
        raise MalformedAuthResponse("auth response is not JSON") from None
    found = _find_grant(doc, depth=0)
    if found is None:
        raise MalformedAuthResponse("auth response holds no access token")
    grant_doc, access = found
    refresh = _first_str(grant_doc, REFRESH_KEYS)
    notes: list[str] = []
    expires_in = _lifetime(grant_doc, EXPIRES_IN_KEYS, EXPIRES_AT_KEYS, sent_wall, max_access,
                           notes)
    if expires_in is None:
        expires_in = _jwt_lifetime(access, "access token", sent_wall, max_access, notes)
    refresh_in = None
    if refresh:
        refresh_in = _lifetime(grant_doc, REFRESH_IN_KEYS, REFRESH_AT_KEYS, sent_wall,
                               max_refresh, notes)
        if refresh_in is None:
            refresh_in = _jwt_lifetime(refresh, "refresh token", sent_wall, max_refresh, notes)
    return Grant(access, refresh, expires_in, refresh_in, tuple(notes))


def _find_grant(doc: object, depth: int) -> tuple[dict[str, Any], str] | None:
    if not isinstance(doc, dict) or depth > 3:
        return None
    access = _first_str(doc, ACCESS_KEYS)
    if access:
        return doc, access
    for key in ENVELOPE_KEYS:
        found = _find_grant(doc.get(key), depth + 1)
        if found is not None:
            # Expiry fields may sit beside a nested token object: merge the outer level in.
            inner, token = found
            return {**{k: v for k, v in doc.items() if k not in ENVELOPE_KEYS}, **inner}, token
    return None


def _first_str(doc: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _lifetime(doc: dict[str, Any], rel_keys: tuple[str, ...], abs_keys: tuple[str, ...],
              sent_wall: float, bound: float, notes: list[str]) -> float | None:
    """The first readable, plausible lifetime among the fields; corrections go to ``notes``."""
    for key in rel_keys:
        if doc.get(key) is None:
            continue
        seconds = _number(doc[key])
        if seconds is None:
            notes.append(f"{key}: not a number, ignored")
            continue
        if seconds >= _EPOCH_THRESHOLD:  # some APIs put an absolute epoch into *_in fields
            seconds = _absolute(seconds) - sent_wall
        elif seconds > bound and MIN_LIFETIME <= seconds / 1000.0 <= bound:
            notes.append(f"{key}: {seconds:g} read as milliseconds")
            seconds /= 1000.0
        found = _plausible(key, seconds, bound, notes)
        if found is not None:
            return found
    for key in abs_keys:
        if doc.get(key) is None:
            continue
        when = _absolute_any(doc[key], key, notes)
        if when is None:
            notes.append(f"{key}: not a time, ignored")
            continue
        found = _plausible(key, when - sent_wall, bound, notes)
        if found is not None:
            return found
    return None


def _plausible(key: str, seconds: float, bound: float, notes: list[str]) -> float | None:
    if not seconds >= MIN_LIFETIME:  # also catches NaN
        notes.append(f"{key}: lifetime {seconds:.3g}s is implausible, ignored")
        return None
    if seconds > bound:
        notes.append(f"{key}: lifetime {seconds:.6g}s capped at the documented {bound:g}s")
        return bound
    return seconds


def _jwt_lifetime(token: str, what: str, sent_wall: float, bound: float,
                  notes: list[str]) -> float | None:
    exp = jwt_exp(token)
    if exp is None:
        return None
    return _plausible(f"{what} JWT exp", exp - sent_wall, bound, notes)


def _number(value: object) -> float | None:
    """A finite number, or None (booleans, text that is not a number, NaN, infinities)."""
    if isinstance(value, bool):
        return None
    number: float | None = None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            return None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except (ValueError, OverflowError):
            return None
    if number is None or number != number or number in (float("inf"), float("-inf")):
        return None
    return number


def _absolute(number: float) -> float:
    return number / 1000.0 if number >= _MS_THRESHOLD else number


def _absolute_any(value: object, key: str, notes: list[str]) -> float | None:
    number = _number(value)
    if number is not None:
        return _absolute(number)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            notes.append(f"{key}: time without a zone, read as UTC")
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return None


def jwt_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified: only used to schedule renewal), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    number = _number(exp)
    return _absolute(number) if number is not None else None
