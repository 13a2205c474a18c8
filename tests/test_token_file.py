"""The optional token file: private, atomic, reused across restarts only when it fits."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import aiohttp

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox
from tests.conftest import LogCapture
from tests.gateway_helpers import SERVICES, settings_for, wait_until

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def test_token_file_is_private_and_reused_after_restart(
        sandbox: Sandbox, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The token file is mode 0600 with no temp files left; a restart reuses the token
    (no new login), ready at once, and requests pass."""
    path = tmp_path / "token.json"
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        await wait_until(gw.state.tokens.ready)
        first = gw.state.tokens.current
    assert first is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token.json"]
    assert json.loads(path.read_text())["partner_id"] == sandbox.state.config.partner_id
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        assert gw.state.tokens.ready()  # before any network call
        tok = gw.state.tokens.current
        assert tok is not None
        assert tok.fingerprint == first.fingerprint and tok.generation == first.generation
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200
    assert sandbox.state.control.counters["token_requests"] == 1


async def test_token_file_rewritten_atomically_on_renewal(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """A renewal replaces the file by rename (new inode), still 0600."""
    path = tmp_path / "token.json"
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        await wait_until(gw.state.tokens.ready)
        inode = path.stat().st_ino
        first = await gw.state.tokens.get()
        gw.state.tokens.invalidate(first.generation, "test")
        await gw.state.tokens.get(newer_than=first.generation)
        assert path.stat().st_ino != inode
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["generation"] == 2


async def test_token_file_of_other_credentials_or_corrupt_is_ignored(
        sandbox: Sandbox, tmp_path: Path, log_capture: LogCapture) -> None:
    """A file for another partner, or a corrupt one, is not reused: the gateway logs in."""
    path = tmp_path / "token.json"
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        await wait_until(gw.state.tokens.ready)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "partner_id": "someone-else"}))
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        await wait_until(gw.state.tokens.ready)
    assert sandbox.state.control.counters["token_requests"] == 2
    path.write_text("{not json")
    async with GatewayServer(settings_for(sandbox, token_file=str(path))) as gw:
        await wait_until(gw.state.tokens.ready)
    assert sandbox.state.control.counters["token_requests"] == 3
    assert any('"token_file_ignored"' in line for line in log_capture.lines)
