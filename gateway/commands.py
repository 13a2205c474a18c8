"""The ``check`` and ``demo`` commands (``serve`` lives in ``app``, ``sandbox`` in ``sandbox``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp

from gateway.app import GatewayServer, wait_for_signal
from gateway.clock import SystemClock
from gateway.coordination.sealing import StoreError
from gateway.errors import AuthError
from gateway.logs import setup_logging
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.settings import Settings, SettingsError, load_settings
from gateway.token import renewal
from gateway.token.auth_client import token_from_exchange
from gateway.token.config import CredentialProfile
from gateway.token.value import is_usable
from gateway.wiring import auth_client, auth_session, token_store

Print = Callable[[str], None]
#: What to look at when ``check``'s login fails, by reason.
_LOGIN_HINTS = {
    "invalid_credentials": "check REPAIRY_APP_KEY and REPAIRY_APP_SECRET (or their _FILE)",
    "endpoint_misconfigured": "check REPAIRY_BASE_URL and REPAIRY_AUTH_TOKEN_PATH",
    "request_rejected": "check the REPAIRY_AUTH_* body settings",
    "connect_error": "check REPAIRY_BASE_URL, the network path and GATEWAY_EGRESS_PROXY",
    "timeout": "check the network path to REPAIRY_BASE_URL (GATEWAY_AUTH_TIMEOUT)",
}


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


async def _check_store(settings: Settings, profile: CredentialProfile, out: Print,
                       tag: str) -> int | None:
    """With a shared store: report the fleet's token instead of logging in (a login would
    replace it, and an API with one live token per credential would revoke the fleet's).
    None: the store holds no token yet, a login is harmless."""
    clock = SystemClock()
    store = token_store(settings, 2.0, profile)
    try:
        stored = await store.load(settings.redis.redis_lease_ttl)
    except StoreError as exc:
        out(f"check failed{tag}: the token store at GATEWAY_REDIS_URL: {exc}")
        return 1
    finally:
        await store.close()
    if stored is None:
        return None
    state = renewal.from_dict(stored.state, clock.monotonic(), clock.time())
    tok = state.token
    if tok is None or not is_usable(tok, clock.monotonic(),
                                    profile.side.token.token_expiry_margin):
        return None
    out(f"ok{tag}: the fleet's token store holds a usable token for partner "
        f"{profile.partner.partner_id} "
        f"(renewed by {stored.by}); not logging in, which would replace it")
    out(f"  access token fp:{tok.fingerprint} generation {tok.generation} expires "
        f"{_iso(tok.wall(tok.expires_at))}")
    return 0


async def check(settings: Settings, out: Print) -> int:
    """Validate and probe every credential profile: log in once against its upstream and
    make one cheap authenticated call (or, with a shared store holding a usable token, report
    that one); print the expiry, never the token. Exit 1 names each profile that failed."""
    several = len(settings.profiles) > 1
    failed = []
    for profile in settings.profiles:
        tag = f" [profile {profile.name}]" if several else ""
        if await _check_profile(settings, profile, out, tag):
            failed.append(profile.name)
    if several:
        out(f"{len(settings.profiles) - len(failed)} of {len(settings.profiles)} profiles ok"
            + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


async def _check_profile(settings: Settings, profile: CredentialProfile, out: Print,
                         tag: str) -> int:
    if settings.redis.redis_url:
        code = await _check_store(settings, profile, out, tag)
        if code is not None:
            return code
    clock = SystemClock()
    partner, auth = profile.partner, profile.side.auth
    hints = {k: profile.own_variables(v) for k, v in _LOGIN_HINTS.items()}
    async with auth_session(settings) as session:
        client = auth_client(session, settings, clock, profile)
        try:
            ex = await client.login()
        except AuthError as exc:
            hint = hints.get(exc.reason)
            out(f"check failed{tag}: login to {partner.base_url} {exc.reason}: {exc.message}"
                + (f": {hint}" if hint else ""))
            return 1
        tok = token_from_exchange(ex, generation=1, via="login", previous=None,
                                  default_ttl=auth.access_token_default_ttl,
                                  default_refresh_ttl=auth.refresh_token_default_ttl)
        if auth.check_path:
            probed = await client.probe(tok)
            if probed.outcome != "ok":
                out(f"check failed{tag}: logged in, but {probed.detail}")
                return 1
    stated = "stated" if ex.grant.expires_in is not None else "assumed (not in the response)"
    out(f"ok{tag}: logged in to {partner.base_url} as partner {partner.partner_id}")
    if auth.check_path:
        out(f"  GET {auth.check_path} with the token: accepted (2xx or 404)")
    out(f"  access token fp:{tok.fingerprint} expires {_iso(tok.wall(tok.expires_at))} "
        f"(in {tok.lifetime:.0f}s, {stated})")
    if tok.refresh_expires_at is not None:
        out(f"  refresh token expires {_iso(tok.wall(tok.refresh_expires_at))} "
            f"(in {tok.refresh_expires_at - tok.obtained_at:.0f}s)")
    else:
        out("  no refresh token: the gateway will log in again before expiry")
    return 0


async def _sample(http: aiohttp.ClientSession, url: str, path: str, profile: str | None,
                  out: Print) -> int:
    """One sample call through the gateway (as ``profile``, if named), printed."""
    started = time.monotonic()
    headers = {"X-Repairy-Credential": profile} if profile else {}
    async with http.get(url + path, headers=headers) as resp:
        body = await resp.read()
    ms = (time.monotonic() - started) * 1000
    try:
        data = json.loads(body)["data"]
        summary = (f"sent as partner {data['headers']['X-Partner-ID']}" if profile
                   else f"{len(data)} services, first: {data[0]['name']!r}")
    except (ValueError, KeyError, IndexError, TypeError):
        summary = body[:200].decode(errors="replace")
    out(f"sample{f' as {profile}' if profile else ''}: GET {path} -> {resp.status} in "
        f"{ms:.0f} ms ({summary})")
    return resp.status


async def demo(config: SandboxConfig, listen: str, admin_listen: str, sandbox_port: int,
               once: bool, out: Print) -> int:
    """Sandbox + gateway on loopback, a sample call through the gateway, then serve."""
    async with Sandbox(config, port=sandbox_port) as sb:
        env = dict(os.environ)
        names = [f"partner{n}" for n in range(2, len(config.more_partners) + 2)]
        if names:  # the sandbox's further partners as profiles partner2, partner3...
            env["GATEWAY_PROFILES"] = ",".join(names)
            for name, cred in zip(names, config.more_partners, strict=True):
                up = f"REPAIRY_PROFILE_{name.upper()}_"
                env |= {up + "APP_KEY": cred.app_key, up + "APP_SECRET": cred.app_secret,
                        up + "PARTNER_ID": cred.partner_id}
        settings = load_settings(env, overrides={
            "base_url": sb.url, "app_key": config.app_key, "app_secret": config.app_secret,
            "partner_id": config.partner_id, "listen": listen, "admin_listen": admin_listen})
        setup_logging("info", settings.log.log_format)  # the file's format too, if one is set
        gw = GatewayServer(settings)
        try:
            await gw.start()
        except SettingsError as exc:  # the demo's listeners come from its options
            option = {"GATEWAY_LISTEN": "--listen",
                      "GATEWAY_ADMIN_LISTEN": "--admin-listen"}.get(exc.setting)
            if option is None:
                raise
            raise SettingsError(option, exc.problem) from None
        try:
            workshop = next(iter(sb.state.data.workshops))
            path = f"/workshops/{workshop}/services"
            out(f"sandbox (fake Repairy): {sb.url}")
            out(f"gateway proxy:          {gw.url}")
            out(f"gateway admin:          {gw.admin_url}/readyz")
            out("try:")
            out(f"  curl -s {gw.url}{path}")
            out(f"  curl -s {sb.url}/__sandbox/requests?limit=1   # what the sandbox received")
            for name in names:
                out(f"  curl -s -H 'X-Repairy-Credential: {name}' {gw.url}/__sandbox/echo"
                    f"   # as {name}")
            async with aiohttp.ClientSession() as http:
                if await _sample(http, gw.url, path, None, out) != 200:
                    return 1
                for name in names:
                    if await _sample(http, gw.url, "/__sandbox/echo", name, out) != 200:
                        return 1
            if once:
                return 0
            out("serving; Ctrl-C to stop")
            await wait_for_signal()
        finally:
            await gw.stop()
    return 0
