"""The start-up probe: one cheap authenticated call that tells a wrong Partner ID or a refused
token, which a login alone cannot (``check`` fails on it; ``serve`` warns once)."""

from __future__ import annotations

import aiohttp

from gateway.settings import Settings
from gateway.urls import target_url


async def probe(session: aiohttp.ClientSession, settings: Settings, access_token: str,
                partner_id: str) -> str | None:
    """One cheap authenticated call (``GATEWAY_CHECK_PATH``) with a token and the Partner ID
    it was issued for (after a rotation, not the one the settings started with): None if
    Repairy took them (any 2xx, or 404: the resource need not exist), else what it refused.
    A login alone cannot tell a wrong Partner ID."""
    url = target_url(settings.partner.base_url, settings.auth.check_path)
    headers = {"Authorization": f"Bearer {access_token}", "X-Partner-ID": partner_id}
    try:
        timeout = aiohttp.ClientTimeout(total=settings.auth.auth_timeout,
                                        sock_connect=min(settings.upstream.connect_timeout,
                                                         settings.auth.auth_timeout))
        async with session.get(url, headers=headers, allow_redirects=False,
                               timeout=timeout) as resp:
            status = resp.status
    except TimeoutError:
        return (f"the probe GET {settings.auth.check_path} got no answer within "
                f"{settings.auth.auth_timeout:g}s")
    except aiohttp.ClientError as exc:
        return f"the probe GET {settings.auth.check_path} failed ({type(exc).__name__})"
    if 200 <= status < 300 or status == 404:
        return None
    if status == 401:
        return (f"Repairy refused the token on GET {settings.auth.check_path} (401): check "
                "REPAIRY_APP_KEY / REPAIRY_APP_SECRET and the auth settings")
    if status == 403:
        return (f"Repairy refused Partner ID {partner_id!r} on GET "
                f"{settings.auth.check_path} (403): check REPAIRY_PARTNER_ID")
    return f"GET {settings.auth.check_path} answered {status} (GATEWAY_CHECK_PATH)"
