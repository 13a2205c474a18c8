"""Benchmark: what the gateway costs per request, and its memory while streaming 50 MB.

Runs the sandbox and the gateway as separate processes on loopback (as in production: one
process each), then drives load from this process:

    .venv/bin/python -m benchmarks.proxy_overhead [--seconds 5] [--concurrency 32]
                                                  [--log-level info]

It prints requests/s and latency percentiles for the sandbox called directly (with a token)
and through the gateway, the difference, and the gateway's resident memory before and after a
50 MB upload and download through it (peak from /proc/<pid>/status VmHWM). On a 2-core machine
the load generator, the gateway and the sandbox share the cores: compare the two rows, not
the absolute numbers with other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

SERVICES = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"
APP_KEY, APP_SECRET, PARTNER = "sandbox-app-key", "sandbox-app-secret", "sandbox-partner"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def _load(http: aiohttp.ClientSession, url: str, headers: dict[str, str], seconds: float,
                concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with http.get(url, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {"requests": len(latencies), "failures": failures,
            "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(pct(0.50), 2), "p90_ms": round(pct(0.90), 2),
            "p99_ms": round(pct(0.99), 2),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 2)}


async def _chunks(total: int, size: int = 1 << 20) -> AsyncIterator[bytes]:
    block = b"\x5a" * size
    sent = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        sent += len(piece)
        yield piece


async def main(seconds: float, concurrency: int, log_level: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPAIRY_", "GATEWAY_"))}
    sandbox = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "sandbox", "--port", "0",
        stdout=asyncio.subprocess.PIPE, env=env)
    assert sandbox.stdout is not None
    sandbox_url = (await sandbox.stdout.readline()).decode().split()[-1]
    port, admin = _free_port(), _free_port()
    gw_env = {**env, "REPAIRY_BASE_URL": sandbox_url, "REPAIRY_APP_KEY": APP_KEY,
              "REPAIRY_APP_SECRET": APP_SECRET, "REPAIRY_PARTNER_ID": PARTNER,
              "GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
              "GATEWAY_LOG_LEVEL": log_level}
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", env=gw_env,
        stderr=asyncio.subprocess.DEVNULL)
    gw_url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {"seconds": seconds, "concurrency": concurrency,
                               "log_level": log_level}
    try:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            async with http.post(f"{sandbox_url}/auth/token",
                                 json={"appKey": APP_KEY, "appSecret": APP_SECRET}) as resp:
                token = (await resp.json())["data"]["accessToken"]
            direct_headers = {"Authorization": f"Bearer {token}", "X-Partner-ID": PARTNER}
            await _load(http, sandbox_url + SERVICES, direct_headers, 1, concurrency)  # warm-up
            results["direct"] = await _load(http, sandbox_url + SERVICES, direct_headers,
                                            seconds, concurrency)
            await _load(http, gw_url + SERVICES, {}, 1, concurrency)  # warm-up
            results["gateway"] = await _load(http, gw_url + SERVICES, {}, seconds, concurrency)
            results["added_p50_ms"] = round(results["gateway"]["p50_ms"]
                                            - results["direct"]["p50_ms"], 2)
            results["gateway_rss_before_stream_kib"] = _rss_kib(gateway.pid)
            size = 50 * 1024 * 1024
            async with http.put(gw_url + "/__sandbox/echo", data=_chunks(size)) as resp:
                echoed = (await resp.json())["data"]
            assert echoed["size"] == size
            digest = hashlib.sha256()
            async with http.get(f"{gw_url}/__sandbox/bytes/{size}") as resp:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    digest.update(chunk)
            results["gateway_rss_after_stream_kib"] = _rss_kib(gateway.pid)
    finally:
        for proc in (gateway, sandbox):
            proc.terminate()
            await proc.wait()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log-level", default="info",
                        help="gateway log level (info logs one line per request)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.seconds, args.concurrency, args.log_level)),
                     indent=2))
