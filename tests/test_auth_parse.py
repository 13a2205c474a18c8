"""Tolerant reading of auth responses."""

from __future__ import annotations

import base64
import json
from datetime import datetime

import pytest

from gateway.token.parse import Grant, MalformedAuthResponse, parse_auth_response

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

SENT = 1_800_000_000.0  # Unix time the auth call was sent


def parse(doc: object) -> Grant:
    return parse_auth_response(json.dumps(doc).encode(), SENT)


def jwt(claims: dict[str, object]) -> str:
    def enc(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'HS256'})}.{enc(claims)}.c2ln"


@pytest.mark.parametrize("doc", [
    {"accessToken": "A", "refreshToken": "R", "expiresIn": 3600, "refreshExpiresIn": 7200},
    {"access_token": "A", "refresh_token": "R", "expires_in": "3600",
     "refresh_expires_in": 7200},
    {"success": True, "data": {"accessToken": "A", "refreshToken": "R", "expiresIn": 3600,
                               "refreshTokenExpiresIn": 7200}},
    {"result": {"access_token": "A", "refresh_token": "R", "expires_at": SENT + 3600,
                "refresh_expires_at": SENT + 7200}},
    {"data": {"token": {"accessToken": "A", "refreshToken": "R"}, "expiresIn": 3600,
              "refreshExpiresIn": 7200}},
    {"accessToken": "A", "refreshToken": "R", "expiresAt": (SENT + 3600) * 1000,
     "refreshExpiresAt": (SENT + 7200) * 1000},
    {"accessToken": "A", "refreshToken": "R", "expiresAt": "2027-01-15T08:01:00Z",
     "refreshExpiresAt": "2027-01-15T09:01:00+00:00"},
], ids=["camel", "snake", "envelope-data", "envelope-result-absolute", "nested-token",
        "epoch-ms", "iso-8601"])
def test_parse_reads_common_shapes(doc: dict[str, object]) -> None:
    """camelCase, snake_case, envelopes, seconds, epoch s/ms and ISO-8601 all read alike."""
    sent = SENT
    if doc.get("expiresAt") == "2027-01-15T08:01:00Z":  # ISO: anchor an hour before expiry
        sent = datetime.fromisoformat("2027-01-15T07:01:00+00:00").timestamp()
    g = parse_auth_response(json.dumps(doc).encode(), sent)
    assert (g.access, g.refresh) == ("A", "R")
    assert g.expires_in == pytest.approx(3600)
    assert g.refresh_expires_in == pytest.approx(7200)


def test_parse_falls_back_to_jwt_exp_claim() -> None:
    """No expiry field: the access token's JWT ``exp`` claim gives the lifetime."""
    g = parse({"accessToken": jwt({"exp": SENT + 900}), "refreshToken": "R"})
    assert g.expires_in == pytest.approx(900)
    assert g.refresh_expires_in is None


def test_parse_without_any_expiry_leaves_lifetimes_unknown() -> None:
    """Opaque token, no fields: lifetimes are None (the documented defaults apply later)."""
    g = parse({"token": "opaque"})
    assert (g.access, g.refresh, g.expires_in, g.refresh_expires_in) == ("opaque", None, None,
                                                                          None)


@pytest.mark.parametrize("body", [
    b"", b"   ", b"not json", b"[]", b"null", b'{"success": true}',
    b'{"data": {"accessToken": ""}}', b'{"accessToken": 42}',
])
def test_parse_rejects_malformed_bodies(body: bytes) -> None:
    """A 2xx body without a usable token is an error, never a token."""
    with pytest.raises(MalformedAuthResponse):
        parse_auth_response(body, SENT)


def test_parse_error_messages_never_echo_the_body() -> None:
    """Error text names what is wrong, not the token that came with it."""
    with pytest.raises(MalformedAuthResponse) as info:
        parse_auth_response(b'{"token": {"accessToken": "SECRET-TOKEN"}, "x": 1', SENT)
    assert "SECRET-TOKEN" not in str(info.value)


def test_parse_grant_repr_hides_tokens() -> None:
    """repr(Grant) never shows the tokens."""
    g = parse({"accessToken": "SECRET-A", "refreshToken": "SECRET-R"})
    assert "SECRET" not in repr(g)


def test_parse_huge_numbers_are_ignored_not_fatal() -> None:
    """A 400-digit expiresIn or JWT exp is ignored (no OverflowError), the token kept."""
    huge = "1" + "0" * 400
    g = parse_auth_response(f'{{"accessToken": "A", "expiresIn": {huge}}}'.encode(), SENT)
    assert (g.access, g.expires_in) == ("A", None)
    g = parse({"accessToken": jwt({"exp": int(huge)}), "expiresIn": "x"})
    assert g.expires_in is None
