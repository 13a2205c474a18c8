"""A real redis-server (Debian's, installed on demand) and gateway processes (``repairy-gateway
serve``) for the fleet tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.sandbox import Sandbox
from tests.tools import require_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """redis-server on a loopback port, no persistence; stop and start it again at will."""

    def __init__(self, password: str | None = None, args: tuple[str, ...] = ()) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.port = free_port()
        self.password = password
        self.args = args  # more redis-server options: --maxmemory 32mb ...
        self.dir = tempfile.mkdtemp(prefix="redis-")
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self.proc = None

    async def client(self) -> Any:
        import redis.asyncio as aioredis

        return aioredis.from_url(self.url, password=self.password, decode_responses=True)


def process_state(pid: int) -> str:
    """The state letter of a process (R, S, T stopped, Z zombie, ...), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


async def wait_for_state(pids: list[int], state: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not all(process_state(pid) == state for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {pids} not in state {state} in time")
        await asyncio.sleep(0.005)


class GatewayProcess:
    """``python -m gateway serve`` with the given environment, on fixed loopback ports."""

    def __init__(self, sb: Sandbox, env: dict[str, str]) -> None:
        self.port, self.admin_port = free_port(), free_port()
        cfg = sb.state.config
        base = {k: v for k, v in os.environ.items() if not k.startswith(("REPAIRY_", "GATEWAY_"))}
        self.env = {**base, "REPAIRY_BASE_URL": sb.url, "REPAIRY_APP_KEY": cfg.app_key,
                    "REPAIRY_APP_SECRET": cfg.app_secret, "REPAIRY_PARTNER_ID": cfg.partner_id,
                    "GATEWAY_LISTEN": f"127.0.0.1:{self.port}",
                    "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}", **env}
        self.log = Path(tempfile.mkstemp(prefix="gateway-", suffix=".log")[1])
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", env=self.env,
                stdout=asyncio.subprocess.DEVNULL, stderr=out)

    async def ready(self, http: aiohttp.ClientSession, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                async with http.get(self.admin + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"gateway not ready; log:\n{self.log.read_text()[-3000:]}")

    async def tokenz(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(self.admin + "/tokenz") as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def workers(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.get(self.admin + "/healthz") as resp:
            found: list[dict[str, Any]] = (await resp.json())["workers"]
            return found

    async def pinned(self, http: aiohttp.ClientSession, slot: int,
                     path: str = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"
                     ) -> aiohttp.ClientSession:
        """A session whose one keep-alive connection is held by worker ``slot``: the other
        workers are stopped (SIGSTOP, confirmed in /proc) while it connects and makes one
        request, so only that worker can accept it. The kernel's spreading is left out."""
        workers = await self.workers(http)
        others = [w["pid"] for w in workers if w["slot"] != slot]
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=1, keepalive_timeout=600))
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for_state(others, "T")
            async with session.get(self.url + path) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
        except BaseException:
            await session.close()
            raise
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)
        return session

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")
