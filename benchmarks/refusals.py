"""Figures for Repairy's verdict and credential contention, against the in-process sandbox:

    .venv/bin/python -m benchmarks.refusals [--contention-seconds 20]

* a ``serve`` process started with a wrong Partner ID (as a file): seconds from its start to
  ``/readyz`` 503 ``partner_refused``; then the file is fixed and SIGHUP sent: seconds to
  ``/readyz`` 200;
* two gateways sharing credentials without Redis on a one-live-token sandbox, under load
  (``GATEWAY_LOGIN_RETRY_INTERVAL=2s``): seconds to detect contention, logins per minute
  before and after, and the callers' answers by status.

Behaviour (seconds and counts), not speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.settings import load_settings

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _until(check: Any, within: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    return None


async def wrong_partner(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with Sandbox() as sb:
        cfg = sb.state.config
        folder = Path(tempfile.mkdtemp())
        partner = folder / "partner-id"
        partner.write_text("someone-else")
        admin = _port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REPAIRY_", "GATEWAY_"))}
        env.update({"REPAIRY_BASE_URL": sb.url, "REPAIRY_APP_KEY": cfg.app_key,
                    "REPAIRY_APP_SECRET": cfg.app_secret,
                    "REPAIRY_PARTNER_ID_FILE": str(partner),
                    "GATEWAY_LISTEN": f"127.0.0.1:{_port()}",
                    "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin}", "GATEWAY_LOG_LEVEL": "error"})
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

        async def readyz(status: int, code: str | None = None) -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    body = await resp.json()
                    return resp.status == status and (code is None or code in body["codes"])
            except aiohttp.ClientError:
                return False

        try:
            refused = await _until(lambda: readyz(503, "partner_refused"), 30)
            to_refused = None if refused is None else time.monotonic() - started
            partner.write_text(cfg.partner_id)
            proc.send_signal(signal.SIGHUP)
            to_ready = await _until(lambda: readyz(200), 30)
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    return {"start_to_partner_refused_s": None if to_refused is None else round(to_refused, 2),
            "sighup_to_ready_s": None if to_ready is None else round(to_ready, 2)}


async def contention(http: aiohttp.ClientSession, seconds: float) -> dict[str, Any]:
    async with Sandbox(SandboxConfig(single_token=True)) as sb:
        cfg = sb.state.config
        base = {"base_url": sb.url, "app_key": cfg.app_key, "app_secret": cfg.app_secret,
                "partner_id": cfg.partner_id, "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0", "log_level": "error", "check_path": "",
                "login_retry_interval": "2s", "token_wait_timeout": "1s"}
        gws = [GatewayServer(load_settings({}, overrides=base)) for _ in range(2)]
        for gw in gws:
            await gw.start()
        statuses: Counter[str] = Counter()  # before detection
        answers: Counter[str] = Counter()  # from half a second after it
        settled = asyncio.Event()
        stop = asyncio.Event()
        logins: list[float] = []
        started = time.monotonic()

        async def load(gw: GatewayServer) -> None:
            while not stop.is_set():
                async with http.get(gw.url + SERVICES) as resp:
                    await resp.read()
                    code = resp.headers.get("X-Repairy-Gateway-Error")
                    (answers if settled.is_set() else statuses)[
                        f"{resp.status}" + (f" {code}" if code else "")] += 1
                await asyncio.sleep(0.02)

        async def count_logins() -> None:
            seen = 0
            while not stop.is_set():
                async with http.get(f"{sb.url}/__sandbox/stats") as resp:
                    n = (await resp.json())["token_requests"]
                logins.extend([time.monotonic() - started] * (n - seen))
                seen = n
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(load(gw)) for gw in gws for _ in range(3)]
        tasks.append(asyncio.create_task(count_logins()))
        try:
            async def detected() -> bool:
                return all(gw.state.manager.contended() for gw in gws)

            found = await _until(detected, 60)
            await asyncio.sleep(0.5)  # answers already on their way
            settled.set()
            await asyncio.sleep(seconds - 0.5)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            for gw in gws:
                await gw.stop()
    at = found or 0.0
    before = [t for t in logins if t <= at]
    after = [t for t in logins if t > at + 0.5]
    span = max(seconds - 0.5, 0.1)
    return {"detected_after_s": None if found is None else round(found, 2),
            "logins_before_detection": len(before),
            "logins_per_minute_after_both_gateways": round(len(after) * 60 / span, 1),
            "bound_per_minute_both_gateways": 2 * 60 / 2.0,
            "answers_before_detection": dict(statuses),
            "answers_after_detection": dict(answers)}


async def main(contention_seconds: float) -> None:
    async with aiohttp.ClientSession() as http:
        print(json.dumps({"wrong_partner_id": await wrong_partner(http),
                          "contention": await contention(http, contention_seconds)},
                         indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contention-seconds", type=float, default=20.0)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the figures only (the gateways log in-process)
    asyncio.run(main(args.contention_seconds))
