"""The soak's moving parts: a Redis that survives SIGKILL (its proxy that can lose every reply
for a while is ``tests.redis_proxy.ReplyDropper``), the
gateway replicas (supervisor and workers) it kills and restarts, and what it reads from them
(logs, RSS, worker pids). ``benchmarks/soak.py`` drives them; nothing here decides a fault."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.sandbox import Sandbox
from tests.fleet_helpers import GatewayProcess, RedisServer


class AofRedis(RedisServer):
    """redis-server with ``--appendonly yes --appendfsync always``: killed with SIGKILL and
    started again on the same port and directory, it comes back with every record."""

    def __init__(self) -> None:
        super().__init__(args=("--appendonly", "yes", "--appendfsync", "always"))

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@dataclass
class Replica:
    """One gateway replica: ``serve`` with GATEWAY_WORKERS=2, on fixed ports across restarts;
    its log file is appended to by every incarnation (supervisor and workers)."""

    name: str
    proc: GatewayProcess
    up: bool = False
    restarts: int = 0
    log_offset: int = 0
    worker_pids: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, sb: Sandbox, env: dict[str, str]) -> Replica:
        proc = GatewayProcess(sb, env)
        for key in ("REPAIRY_APP_KEY", "REPAIRY_APP_SECRET", "REPAIRY_PARTNER_ID"):
            if f"{key}_FILE" in env:
                proc.env.pop(key, None)
        return cls(name, proc)

    @property
    def pid(self) -> int | None:
        p = self.proc.proc
        return None if p is None or p.returncode is not None else p.pid

    async def start(self, http: aiohttp.ClientSession, within: float = 60) -> None:
        await self.proc.start()
        await self.proc.ready(http, within)
        self.up = True
        await self.refresh_workers(http)

    async def refresh_workers(self, http: aiohttp.ClientSession) -> list[int]:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, KeyError,
                                 ValueError):
            async with http.get(self.proc.admin + "/healthz",
                                timeout=aiohttp.ClientTimeout(total=2)) as resp:
                doc: dict[str, Any] = await resp.json()
            self.worker_pids = [w["pid"] for w in doc["workers"]
                                if w.get("pid") and w.get("alive")]
        return self.worker_pids

    async def kill_and_restart(self, http: aiohttp.ClientSession, pause: float) -> None:
        """SIGKILL the supervisor; once its workers have gone (they drain when their channel
        closes), start it again on the same ports."""
        workers = await self.refresh_workers(http)
        self.up = False
        self.proc.kill()
        assert self.proc.proc is not None
        await self.proc.proc.wait()
        deadline = time.monotonic() + 60
        # Not our children: their exit can only be polled.
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for pid in workers:  # a worker still draining after a minute: not ours to wait on
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(pause)
        self.restarts += 1
        await self.start(http)

    def new_log(self) -> str:
        """What the replica's processes logged since the last call."""
        with self.proc.log.open("rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        # Only whole lines: the rest is read next time.
        end = data.rfind(b"\n") + 1
        self.log_offset += end
        return data[:end].decode(errors="replace")
