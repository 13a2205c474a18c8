"""Helpers for tests that talk to the sandbox directly."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.sandbox import Sandbox


async def login(http: aiohttp.ClientSession, sb: Sandbox) -> dict[str, Any]:
    cfg = sb.state.config
    async with http.post(f"{sb.url}/auth/token",
                         json={"appKey": cfg.app_key, "appSecret": cfg.app_secret}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    data: dict[str, Any] = body["data"]
    return data


def api_headers(sb: Sandbox, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Partner-ID": sb.state.config.partner_id}


async def stats(http: aiohttp.ClientSession, sb: Sandbox) -> dict[str, Any]:
    async with http.get(f"{sb.url}/__sandbox/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def faults(http: aiohttp.ClientSession, sb: Sandbox, spec: object) -> None:
    async with http.post(f"{sb.url}/__sandbox/faults", json=spec) as resp:
        assert resp.status == 200, await resp.text()
