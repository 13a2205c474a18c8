"""Reading an ``AuthResponse`` tolerantly, since Repairy's field names are not documented.

Accepted: camelCase or snake_case names; an envelope (``data``, ``result``, ``token``…);
expiry as relative seconds, or an absolute time (epoch seconds, epoch milliseconds, ISO-8601);
else a JWT ``exp`` claim; else nothing (the caller falls back to the documented lifetimes).
A body without an access token is malformed, never a token.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime
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


class MalformedAuthResponse(ValueError):
    """The auth endpoint said 2xx but gave no usable token. The message never holds a token."""


@dataclass(frozen=True)
class Grant:
    """What an auth response grants; lifetimes in seconds from when the call was sent."""

    access: str = field(repr=False)
    refresh: str | None = field(repr=False)
    expires_in: float | None
    refresh_expires_in: float | None


def parse_auth_response(body: bytes, sent_wall: float) -> Grant:
    """Parse an auth response body; ``sent_wall`` (Unix time) anchors absolute expiries."""
    try:
        doc = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError):
        raise MalformedAuthResponse("auth response is not JSON") from None
    found = _find_grant(doc, depth=0)
    if found is None:
        raise MalformedAuthResponse("auth response holds no access token")
    access = found[1]
    grant_doc = found[0]
    refresh = _first_str(grant_doc, REFRESH_KEYS)
    expires_in = _lifetime(grant_doc, EXPIRES_IN_KEYS, EXPIRES_AT_KEYS, sent_wall, "access")
    if expires_in is None:
        exp = jwt_exp(access)
        expires_in = exp - sent_wall if exp is not None else None
    refresh_in = _lifetime(grant_doc, REFRESH_IN_KEYS, REFRESH_AT_KEYS, sent_wall, "refresh")
    if refresh_in is None and refresh:
        exp = jwt_exp(refresh)
        refresh_in = exp - sent_wall if exp is not None else None
    if expires_in is not None and expires_in <= 0:
        raise MalformedAuthResponse("auth response says the access token is already expired")
    if refresh_in is not None and refresh_in <= 0:
        refresh, refresh_in = None, None  # a dead refresh token is no refresh token
    return Grant(access, refresh, expires_in, refresh_in)


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
              sent_wall: float, what: str) -> float | None:
    for key in rel_keys:
        if key in doc and doc[key] is not None:
            seconds = _number(doc[key])
            if seconds is None:
                raise MalformedAuthResponse(f"{what} token lifetime {key} is not a number")
            # Some APIs put an absolute epoch into *_in fields; tell them apart by size.
            return seconds if seconds < 1e9 else _absolute(seconds) - sent_wall
    for key in abs_keys:
        if key in doc and doc[key] is not None:
            when = _absolute_any(doc[key])
            if when is None:
                raise MalformedAuthResponse(f"{what} token expiry {key} is not a time")
            return when - sent_wall
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _absolute(number: float) -> float:
    return number / 1000.0 if number >= _MS_THRESHOLD else number


def _absolute_any(value: object) -> float | None:
    number = _number(value)
    if number is not None:
        return _absolute(number)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None  # a time without a zone is a guess, not a fact
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
