"""Calls to Repairy's two auth endpoints (log in, refresh), and the probe that asks whether
Repairy takes a token with its Partner ID (:meth:`AuthClient.probe`).

These requests are built here from settings, never through the proxy path that injects the
managed token, and travel on their own small connection pool (:func:`create_auth_session`),
so a busy proxy pool can never delay them. Every failure becomes an
:class:`~gateway.errors.AuthError` with a fixed ``reason``:

* ``timeout`` and dropped connections are *ambiguous* only if the request may have been sent
  (a trace hook records when the headers went out), since then a refresh token may have been
  used up; a connection that never opened is not ambiguous;
* login: 401/403 ``invalid_credentials``; 404/405/415 ``endpoint_misconfigured``; other 4xx
  ``request_rejected``; refresh: 404/405/415 ``endpoint_misconfigured``, other 4xx
  ``refresh_rejected``; both: 429 ``rate_limited``, 5xx and the "not now" 408/409/425
  ``server_error``;
* ``Retry-After`` is read as seconds or as an HTTP date;
* error bodies are reduced to a short code before anyone can log them, and a code that equals
  or contains a credential is dropped (an endpoint may echo what we sent).

The answer is read to its end (bounded by :data:`MAX_AUTH_BODY`), however it is chunked.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal
from urllib.parse import urlencode

import aiohttp

from gateway.clock import Clock
from gateway.errors import AuthError, AuthReason
from gateway.redact import Secret
from gateway.retry_after import parse_retry_after
from gateway.token.config import AuthConfig, PartnerConfig
from gateway.token.parse import Grant, MalformedAuthResponse, parse_auth_response
from gateway.token.value import RenewalKind, Token
from gateway.urls import egress_session, read_up_to, target_url, upstream_tls

log = logging.getLogger("gateway.token")
MAX_AUTH_BODY = 64 * 1024
#: Connections of the auth pool: renewal is single-flight, a spare covers a rotation login.
AUTH_POOL_SIZE = 2
_CODE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_NUMBERS = re.compile(r"[-+]?\d[\d.e+-]*")
_MISCONFIGURED = frozenset({404, 405, 415})
#: 4xx that say "not now" rather than "never": backed off like a 5xx, nothing used up.
_TRANSIENT_4XX = frozenset({408, 409, 425})


@dataclass(frozen=True)
class Exchange:
    """A grant and when the call that produced it was sent."""

    grant: Grant
    sent_mono: float
    sent_wall: float
    partner_id: str


#: What one probe showed: Repairy took the token and the Partner ID (``ok``), refused the
#: Partner ID (403), refused the token (401), or said nothing that decides (no answer, a 5xx
#: or 429, another status).
ProbeOutcome = Literal["ok", "partner_refused", "token_refused", "inconclusive"]


@dataclass(frozen=True)
class ProbeResult:
    """One probe's answer: its outcome, the status (None: no answer) and a line for humans
    (no secret: a path, a status, a setting to check)."""

    outcome: ProbeOutcome
    status: int | None
    detail: str


async def _on_headers_sent(session: aiohttp.ClientSession, ctx: SimpleNamespace,
                           params: aiohttp.TraceRequestHeadersSentParams) -> None:
    if ctx.trace_request_ctx is not None:
        ctx.trace_request_ctx["sent"] = True


def create_auth_session(ca_file: str, egress_proxy: str,
                        egress_password: Secret | None) -> aiohttp.ClientSession:
    """The auth calls' own session and small pool (create inside the running loop), through
    the upstream's CA bundle and egress proxy."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    # A fresh connection per call: calls are minutes or hours apart, and a kept connection the
    # server has meanwhile closed would turn a refresh into an ambiguous failure.
    connector = aiohttp.TCPConnector(limit=AUTH_POOL_SIZE,
                                     ssl=upstream_tls(ca_file),
                                     force_close=True)
    return egress_session(egress_proxy, egress_password,
                          connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                          trust_env=False, trace_configs=[trace])


class AuthClient:
    """Logs in and refreshes against the configured upstream."""

    def __init__(self, session: aiohttp.ClientSession, partner: PartnerConfig,
                 auth: AuthConfig, clock: Clock, connect_timeout: float) -> None:
        self._session = session
        self._partner = partner
        self._auth = auth
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._noted: set[str] = set()

    async def login(self) -> Exchange:
        s, p = self._auth, self._partner
        body = {s.auth_app_key_field: p.app_key.reveal(),
                s.auth_app_secret_field: p.app_secret.reveal()}
        return await self._call("login", s.auth_token_path, body, bearer=None)

    async def refresh(self, token: Token) -> Exchange:
        s = self._auth
        if not token.refresh:
            raise AuthError("refresh_rejected", "no refresh token held")
        bearer = token.access if s.auth_refresh_bearer else None
        return await self._call("refresh", s.auth_refresh_path,
                                {s.auth_refresh_token_field: token.refresh}, bearer=bearer)

    async def _call(self, kind: RenewalKind, path: str, body: dict[str, str],
                    bearer: str | None) -> Exchange:
        s, p = self._auth, self._partner
        url = target_url(p.base_url, path)
        headers = {"X-Partner-ID": p.partner_id, "Accept": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if s.auth_body_format == "json":
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        else:
            data = urlencode(body).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        sent_mono, sent_wall = self._clock.monotonic(), self._clock.time()
        trace: dict[str, bool] = {"sent": False}
        timeout = aiohttp.ClientTimeout(total=s.auth_timeout,
                                        sock_connect=min(self._connect_timeout, s.auth_timeout))
        try:
            async with self._session.post(url, data=data, headers=headers, timeout=timeout,
                                          allow_redirects=False,
                                          trace_request_ctx=trace) as resp:
                raw = await read_up_to(resp, MAX_AUTH_BODY)
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"),
                                                self._clock.time())
        except TimeoutError:
            if trace["sent"]:
                raise AuthError("timeout", f"{kind} sent, no answer within {s.auth_timeout:g}s",
                                ambiguous=True) from None
            raise AuthError("timeout", f"{kind} not sent: no connection in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise AuthError("connect_error", f"{kind}: cannot connect: {exc.os_error}") from None
        except aiohttp.ClientHttpProxyError as exc:
            raise AuthError("connect_error", f"{kind}: the egress proxy refused the connection "
                            f"({exc.status})") from None
        except aiohttp.ClientError as exc:
            raise AuthError("connect_error", f"{kind}: connection failed: {type(exc).__name__}",
                            ambiguous=trace["sent"]) from None
        if 200 <= status < 300:
            if len(raw) > MAX_AUTH_BODY:
                raise AuthError("malformed_response", f"{kind} response too large", status=status,
                                ambiguous=kind == "refresh")
            try:
                grant = parse_auth_response(raw, sent_wall, max_access=s.access_token_default_ttl,
                                            max_refresh=s.refresh_token_default_ttl)
            except MalformedAuthResponse as exc:
                # A refresh answered 2xx may have used up the refresh token: ambiguous.
                raise AuthError("malformed_response", f"{kind}: {exc}", status=status,
                                ambiguous=kind == "refresh") from None
            self._note(kind, grant.notes)
            return Exchange(grant, sent_mono, sent_wall, p.partner_id)
        reason = _reason(kind, status)
        detail = self._error_code(raw, body, bearer)
        raise AuthError(reason, f"{kind} answered {status}" + (f" ({detail})" if detail else ""),
                        status=status, retry_after=retry_after)

    async def probe(self, token: Token) -> ProbeResult:
        """One cheap authenticated call (``GATEWAY_CHECK_PATH``) with ``token`` and the Partner
        ID it was issued for: 2xx, or 404 (the resource need not exist), means Repairy took
        both; 403 refuses the Partner ID, 401 the token. A login alone cannot tell a wrong
        Partner ID."""
        s, path = self._auth, self._auth.check_path
        url = target_url(self._partner.base_url, path)
        headers = {"Authorization": f"Bearer {token.access}", "X-Partner-ID": token.partner_id,
                   "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=s.auth_timeout,
                                        sock_connect=min(self._connect_timeout, s.auth_timeout))
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False,
                                         timeout=timeout) as resp:
                status = resp.status
                await read_up_to(resp, MAX_AUTH_BODY)
        except TimeoutError:
            return ProbeResult("inconclusive", None, f"the probe GET {path} got no answer "
                                                     f"within {s.auth_timeout:g}s")
        except aiohttp.ClientError as exc:
            return ProbeResult("inconclusive", None,
                               f"the probe GET {path} failed ({type(exc).__name__})")
        if 200 <= status < 300 or status == 404:
            return ProbeResult("ok", status, f"Repairy took the token and the Partner ID on "
                                             f"GET {path} ({status})")
        if status == 401:
            return ProbeResult("token_refused", status, f"Repairy refused the token on GET "
                               f"{path} (401): check REPAIRY_APP_KEY / REPAIRY_APP_SECRET and "
                               "the auth settings")
        if status == 403:
            return ProbeResult("partner_refused", status, f"Repairy refused Partner ID "
                               f"{token.partner_id!r} on GET {path} (403): check "
                               "REPAIRY_PARTNER_ID")
        return ProbeResult("inconclusive", status, f"the probe GET {path} answered {status} "
                                                   "(GATEWAY_CHECK_PATH)")

    def _note(self, kind: RenewalKind, notes: tuple[str, ...]) -> None:
        """Log each correction of an auth answer once per process, not on every renewal."""
        for note in notes:
            key = _NUMBERS.sub("#", note)  # "expiresIn: 172800000 read as ms" once, any value
            if key not in self._noted and len(self._noted) < 100:
                self._noted.add(key)
                log.warning("auth response corrected: %s", note, extra={"fields": {
                    "event": "auth_response_corrected", "kind": kind, "note": note}})

    def _error_code(self, raw: bytes, sent: dict[str, str], bearer: str | None) -> str | None:
        p = self._partner
        secrets = [p.app_key.reveal(), p.app_secret.reveal(), *sent.values()]
        if bearer:
            secrets.append(bearer)
        return error_code(raw, secrets)


def _reason(kind: RenewalKind, status: int) -> AuthReason:
    if status == 429:
        return "rate_limited"
    if status >= 500 or status in _TRANSIENT_4XX:
        return "server_error"
    if status in _MISCONFIGURED:
        return "endpoint_misconfigured"
    if kind == "refresh":
        return "refresh_rejected"
    if status in (401, 403):
        return "invalid_credentials"
    return "request_rejected"


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


def error_code(raw: bytes, secrets: list[str]) -> str | None:
    """A short, safe code from an error body (``error.code``/``code``/``error``), else None.
    A candidate equal to, containing or contained in one of ``secrets`` is never returned."""
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
        if isinstance(c, str) and _CODE_RE.match(c) and not _touches(c, secrets):
            return c
    return None


def _touches(code: str, secrets: list[str]) -> bool:
    low = code.lower()
    for secret in secrets:
        s = secret.lower()
        if s and (s in low or (len(code) >= 4 and low in s)):
            return True
    return False
