"""Helpers for tests that run the gateway against the sandbox."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from gateway.sandbox import Sandbox
from gateway.settings import Settings, load_settings

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"


def settings_for(sb: Sandbox | str, env: dict[str, str] | None = None,
                 **overrides: Any) -> Settings:
    """Settings pointing at a sandbox (or any URL), listeners on free loopback ports.

    ``env`` is the environment to load from (default: none); ``overrides`` win over it,
    except that credentials given in ``env`` (as *_FILE) are not overridden. The probe
    (``GATEWAY_CHECK_PATH``) is off unless asked for, so that tests counting upstream calls
    see only their own (tests/test_readiness.py and the CLI tests run it).
    """
    url = sb if isinstance(sb, str) else sb.url
    cfg = None if isinstance(sb, str) else sb.state.config
    values: dict[str, object] = {
        "base_url": url,
        "app_key": cfg.app_key if cfg else "k",
        "app_secret": cfg.app_secret if cfg else "s",
        "partner_id": cfg.partner_id if cfg else "p",
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "token_expiry_margin": "0.2s",
        "renew_retry_min": "0.05s",
        "renew_retry_max": "0.5s",
        "login_retry_interval": "0.3s",
        "token_wait_timeout": "3s",
        "shutdown_grace": "5s",
        "check_path": "",
    }
    env = env or {}
    for key in ("app_key", "app_secret", "partner_id"):
        if f"REPAIRY_{key.upper()}_FILE" in env:
            values.pop(key)
    values.update(overrides)
    return load_settings(env, overrides=values)


async def wait_until(predicate: Any, within: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` (sync or async) until true, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)
