"""``repairy-gateway sandbox`` as a real process."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def test_cli_sandbox_picks_free_port_prints_url_and_stops_on_sigterm(
        http: aiohttp.ClientSession) -> None:
    """--port 0 prints the chosen URL; the sandbox answers there; SIGTERM exits 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "sandbox", "--port", "0", "--access-ttl", "3s",
        "--partner-id", "p-42", stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert line.startswith("repairy sandbox listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with http.post(f"{url}/auth/token", json={"appKey": "sandbox-app-key",
                                                        "appSecret": "sandbox-app-secret"}) as r:
            data = (await r.json())["data"]
        assert data["expiresIn"] == 3
        async with http.get(f"{url}/__sandbox/config") as r:
            assert (await r.json())["partner_id"] == "p-42"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
