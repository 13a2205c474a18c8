"""A real Prometheus server for the tests: scraping given admin listeners every second and
evaluating the shipped rules every second."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.tools import require_binary

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "alerts.yml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def prometheus(targets: list[str], tmp_path: Path) -> AsyncIterator[str]:
    """Prometheus scraping ``targets`` (``host:port``) with ``alerts.yml`` loaded; yields its
    URL."""
    binary = require_binary("prometheus", "prometheus")
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    listed = ", ".join(f"'{t}'" for t in targets)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: repairy-gateway\n"
        f"    static_configs:\n      - targets: [{listed}]\n")
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


async def query(http: aiohttp.ClientSession, prom: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result ([] while Prometheus is not up yet)."""
    try:
        async with http.get(f"{prom}/api/v1/query", params={"query": expr}) as resp:
            if resp.status != 200:
                return []
            body = await resp.json()
    except aiohttp.ClientConnectionError:
        return []
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def firing(http: aiohttp.ClientSession, prom: str, alert: str) -> list[dict[str, Any]]:
    """The alerts named ``alert`` that are firing now."""
    try:
        async with http.get(f"{prom}/api/v1/alerts") as resp:
            if resp.status != 200:
                return []
            body = await resp.json()
    except aiohttp.ClientConnectionError:
        return []
    return [a for a in body["data"]["alerts"]
            if a["labels"]["alertname"] == alert and a["state"] == "firing"]
