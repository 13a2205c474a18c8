"""The command line as real processes: serve, check, demo, bad settings, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.env_names import unknown_variables
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.sandbox.state import numbered_partner
from tests.gateway_helpers import SERVICES, wait_until
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REPAIRY_", "GATEWAY_"))}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sandbox_env(sb: Sandbox, **extra: str) -> dict[str, str]:
    cfg = sb.state.config
    return clean_env(REPAIRY_BASE_URL=sb.url, REPAIRY_APP_KEY=cfg.app_key,
                     REPAIRY_APP_SECRET=cfg.app_secret, REPAIRY_PARTNER_ID=cfg.partner_id,
                     **extra)


async def run(*args: str, env: dict[str, str], within: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(("env", "named"), [
    ({}, "REPAIRY_BASE_URL"),
    ({"REPAIRY_BASE_URL": "https://x.test", "REPAIRY_APP_KEY": "k",
      "REPAIRY_APP_SECRET": "s", "REPAIRY_PARTNER_ID": "p", "GATEWAY_LISTEN": "nowhere"},
     "GATEWAY_LISTEN"),
    ({"REPAIRY_BASE_URL": "https://x.test", "REPAIRY_APP_KEY": "k",
      "REPAIRY_APP_SECRET": "top-secret-value", "REPAIRY_PARTNER_ID": "p",
      "GATEWAY_SHUTDOWN_GRACE": "-1"}, "GATEWAY_SHUTDOWN_GRACE"),
])
async def test_cli_bad_settings_exit_2_naming_the_setting(env: dict[str, str],
                                                           named: str) -> None:
    """serve with a bad setting: exit status 2, one stderr line naming it, no traceback."""
    code, _, err = await run("serve", env=clean_env(**env))
    assert code == 2
    assert named in err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert all(line.startswith("repairy-gateway: invalid setting ") for line in lines)
    assert len(lines) == (4 if not env else 1)
    assert "top-secret-value" not in err


async def test_cli_reports_every_bad_setting_at_once_and_warns_of_unknown_ones() -> None:
    """All the missing and invalid settings in one run (exit 2), each named, with what was
    expected rather than Python's own message; a mistyped variable is a warning naming the
    closest real one."""
    code, _, err = await run("serve", env=clean_env(
        REPAIRY_BASE_URL="https://x.test", GATEWAY_POOL_SIZE="lots",
        GATEWAY_RETRY_ON_STATUS="abc"))
    assert code == 2
    named = [line.split()[3].rstrip(":") for line in err.strip().splitlines()]
    assert named == ["REPAIRY_APP_KEY", "REPAIRY_APP_SECRET", "REPAIRY_PARTNER_ID",
                     "GATEWAY_POOL_SIZE", "GATEWAY_RETRY_ON_STATUS"]
    assert "invalid literal" not in err and "'lots' is not a whole number" in err
    assert unknown_variables({"GATEWAY_RETRY_ATTEMPT": "3", "GATEWAY_LISTEN": "x",
                              "REPAIRY_APP_SECRET_FILE": "/f", "GATEWAY_ZZZ": "1",
                              "OTHER": "1"}) == [("GATEWAY_RETRY_ATTEMPT",
                                                  "GATEWAY_RETRY_ATTEMPTS"),
                                                 ("GATEWAY_ZZZ", None)]


async def test_cli_check_logs_in_and_prints_expiry_not_token(sandbox: Sandbox) -> None:
    """check: exit 0, the expiry and a fingerprint are printed, the token is not."""
    code, out, err = await run("check", env=sandbox_env(sandbox))
    assert code == 0, err
    assert "ok: logged in" in out
    assert "expires" in out and "fp:" in out
    assert "sbx_at_" not in out + err and "sbx_rt_" not in out + err
    assert sandbox.state.control.counters["token_requests"] == 1
    assert sandbox.state.control.counters["api_requests"] == 1  # the probe (a 404 passes)


async def test_cli_check_refuses_a_mistyped_variable_naming_the_real_one(
        sandbox: Sandbox) -> None:
    """In check, an unknown GATEWAY_* variable is an error (exit 2, nothing called), named
    with the closest real one; Kubernetes service-link variables are not."""
    links = {"GATEWAY_SERVICE_HOST": "10.0.0.1", "GATEWAY_SERVICE_PORT_HTTP": "8080",
             "GATEWAY_PORT": "tcp://10.0.0.1:8080", "GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.1"}
    code, _, err = await run("check", env=sandbox_env(sandbox) | links | {
        "GATEWAY_RETRY_ATTEMPT": "3"})
    assert code == 2, err
    assert "GATEWAY_RETRY_ATTEMPT: not a setting" in err
    assert "did you mean GATEWAY_RETRY_ATTEMPTS" in err
    assert "SERVICE" not in err and "GATEWAY_PORT" not in err
    assert sandbox.state.control.counters["token_requests"] == 0
    code, _, err = await run("check", env=sandbox_env(sandbox) | links)
    assert code == 0, err


async def test_cli_check_catches_a_wrong_partner_id_with_one_api_call(
        sandbox: Sandbox) -> None:
    """The login works with any Partner ID; check's one authenticated GET does not: exit 1
    naming REPAIRY_PARTNER_ID. With GATEWAY_CHECK_PATH=off, no call is made."""
    code, out, _ = await run("check", env=sandbox_env(sandbox)
                             | {"REPAIRY_PARTNER_ID": "someone-else"})
    assert code == 1
    assert "Repairy refused Partner ID 'someone-else'" in out
    assert "REPAIRY_PARTNER_ID" in out
    before = sandbox.state.control.counters["api_requests"]
    code, out, _ = await run("check", env=sandbox_env(sandbox)
                             | {"REPAIRY_PARTNER_ID": "someone-else", "GATEWAY_CHECK_PATH": "off"})
    assert code == 0, out
    assert sandbox.state.control.counters["api_requests"] == before


async def test_cli_check_fails_on_rejected_credentials(sandbox: Sandbox) -> None:
    """check with a wrong secret exits 1 and says why, without echoing the secret."""
    code, out, err = await run("check", env=sandbox_env(sandbox)
                               | {"REPAIRY_APP_SECRET": "wrong-secret-xyz"})
    assert code == 1
    assert "invalid_credentials" in out and "check REPAIRY_APP_KEY and REPAIRY_APP_SECRET" in out
    assert "wrong-secret-xyz" not in out + err


async def test_cli_check_probes_every_profile_and_names_the_one_that_failed() -> None:
    """check with three profiles, one refused: each is logged in and probed, the refused one
    is named with its own variables, exit 1; its secret is never printed."""
    partners = (numbered_partner(2), numbered_partner(3))
    async with Sandbox(SandboxConfig(more_partners=partners)) as sb:
        env = sandbox_env(sb, GATEWAY_PROFILES="eu,au")
        for name, cred in zip(("EU", "AU"), partners, strict=True):
            env |= {f"REPAIRY_PROFILE_{name}_APP_KEY": cred.app_key,
                    f"REPAIRY_PROFILE_{name}_APP_SECRET": cred.app_secret,
                    f"REPAIRY_PROFILE_{name}_PARTNER_ID": cred.partner_id}
        code, out, err = await run("check", env=env)
        assert code == 0, out + err
        assert "ok [profile eu]: logged in" in out and "3 of 3 profiles ok" in out
        code, out, err = await run("check", env=env | {
            "REPAIRY_PROFILE_AU_APP_SECRET": "wrong-secret-xyz"})
        partners_seen = sb.state.control.stats()["partners"]
    assert code == 1
    assert "check failed [profile au]: login to" in out and "invalid_credentials" in out
    assert "REPAIRY_PROFILE_AU_APP_KEY and REPAIRY_PROFILE_AU_APP_SECRET" in out
    assert "2 of 3 profiles ok; failed: au" in out
    assert "wrong-secret-xyz" not in out + err
    assert partners_seen["sandbox-partner-2"]["calls"] == 2  # each check probed eu once


async def test_cli_demo_once_serves_a_sample_request() -> None:
    """demo --once starts sandbox and gateway, proxies a sample call (200), exits 0."""
    code, out, err = await run("demo", "--once", "--listen", "127.0.0.1:0",
                               "--admin-listen", "127.0.0.1:0", env=clean_env())
    assert code == 0, out + err
    assert "curl -s http://127.0.0.1:" in out
    assert "-> 200" in out
    # The demo shows a second credential profile: the sandbox's partner 2, by its header.
    assert "X-Repairy-Credential: partner2" in out
    assert "sample as partner2: GET /__sandbox/echo -> 200" in out
    assert "(sent as partner sandbox-partner-2)" in out
    # GATEWAY_LOG_FORMAT=auto (the default): not a terminal here, so JSON lines.
    logged = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(doc.get("event") == "listening" or "msg" in doc for doc in logged)


async def test_cli_help_and_version() -> None:
    """--help names every subcommand; --version prints the version."""
    code, out, _ = await run("--help", env=clean_env())
    assert code == 0
    for cmd in ("serve", "sandbox", "demo", "check", "config"):
        assert cmd in out
    for cmd in ("serve", "demo", "check", "config"):  # each names its setting groups
        code, out, _ = await run(cmd, "--help", env=clean_env())
        assert code == 0
        assert "Setting groups: partner, upstream," in out and "docs/settings.md" in out
    code, out, _ = await run("sandbox", "--help", env=clean_env())
    assert code == 0 and "reads no settings" in out and "docs/settings.md" in out
    code, out, _ = await run("--version", env=clean_env())
    assert code == 0 and out.startswith("repairy-gateway ")


@pytest.fixture
async def served(sandbox: Sandbox) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve",
        env=sandbox_env(sandbox, GATEWAY_LISTEN=f"127.0.0.1:{port}",
                        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin}",
                        GATEWAY_SHUTDOWN_GRACE="10s"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_sigterm_lets_in_flight_requests_finish(
        served: tuple[asyncio.subprocess.Process, str, str], sandbox: Sandbox,
        http: aiohttp.ClientSession) -> None:
    """SIGTERM during five slow requests: all five complete with 200, then exit 0."""
    proc, url, admin = served

    async def ready() -> bool:
        try:
            async with http.get(admin + "/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_until(ready, within=15)
    await faults(http, sandbox, {"latency": 1.0, "path": "/workshops/*", "count": 5})

    async def slow() -> int:
        async with http.get(url + SERVICES) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(slow()) for _ in range(5)]
    await wait_until(lambda: sum(1 for r in sandbox.state.control.requests
                                 if r["path"].startswith("/workshops")) == 5)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.gather(*tasks) == [200] * 5
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert proc.stderr is not None
    logs = (await proc.stderr.read()).decode()
    assert '"event": "draining"' in logs
    assert "sbx_at_" not in logs and sandbox.state.config.app_secret not in logs
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(url + SERVICES):
            pass
    assert (await stats(http, sandbox))["statuses"]["200"] == 6  # login + five requests


async def test_cli_demo_busy_port_names_its_option() -> None:
    """The demo's listeners come from --listen/--admin-listen: a busy port names those."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPAIRY_", "GATEWAY_"))}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await run("demo", "--once", "--listen", f"127.0.0.1:{port}",
                                 "--admin-listen", "127.0.0.1:0", env=env)
    assert code == 2, err
    assert f"--listen: cannot listen on 127.0.0.1:{port}" in err
    assert "GATEWAY_LISTEN" not in err and "Traceback" not in err


async def test_cli_busy_port_is_a_start_up_error_naming_the_setting(sandbox: Sandbox) -> None:
    """A port in use: exit 2 naming GATEWAY_LISTEN (or GATEWAY_ADMIN_LISTEN), before any
    login is tried, without a traceback or an unclosed session."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = {"GATEWAY_LISTEN": "127.0.0.1:0", "GATEWAY_ADMIN_LISTEN": "127.0.0.1:0"}
        for setting in ("GATEWAY_LISTEN", "GATEWAY_ADMIN_LISTEN"):
            code, _, err = await run("serve", env=sandbox_env(sandbox) | free | {
                setting: f"127.0.0.1:{port}"})
            assert code == 2, err
            assert f"invalid setting {setting}: cannot listen on 127.0.0.1:{port}" in err
            assert "Traceback" not in err and "Unclosed" not in err
            assert "login" not in err
    assert sandbox.state.control.counters["token_requests"] == 0


async def test_cli_serve_a_wrong_partner_id_is_not_ready_then_a_fix_and_sighup_ready(
        sandbox: Sandbox, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """serve with a wrong Partner ID: /readyz is 503 partner_refused within 15 s of start,
    /startz 200 (no restart loop), one error line naming REPAIRY_PARTNER_ID, the process
    keeps running; after the fix and a SIGHUP, /readyz is 200 within one probe interval."""
    from tests.fleet_helpers import GatewayProcess

    partner = tmp_path / "partner-id"
    partner.write_text("someone-else")
    gw = GatewayProcess(sandbox, {"REPAIRY_PARTNER_ID_FILE": str(partner)})
    gw.env.pop("REPAIRY_PARTNER_ID")
    started = time.monotonic()
    await gw.start()
    try:
        async def refused() -> bool:
            try:
                async with http.get(gw.admin + "/readyz") as resp:
                    body = await resp.json()
                    return resp.status == 503 and body["codes"] == ["partner_refused"]
            except aiohttp.ClientError:
                return False

        await wait_until(refused, within=15)
        assert time.monotonic() - started < 15
        async with http.get(gw.admin + "/readyz") as resp:
            (reason,) = (await resp.json())["reasons"]
        assert "REPAIRY_PARTNER_ID" in reason and "403" in reason
        async with http.get(gw.admin + "/startz") as resp:
            assert resp.status == 200
        tokenz = await gw.tokenz(http)
        assert tokenz["usable"] and tokenz["upstream"]["refusal"] == "partner_refused"
        assert tokenz["upstream"]["fix"] == "REPAIRY_PARTNER_ID"
        lines = [json.loads(x) for x in gw.log.read_text().splitlines()
                 if '"upstream_refused"' in x]
        assert len(lines) == 1 and lines[0]["level"] == "error"
        assert "REPAIRY_PARTNER_ID" in lines[0]["msg"]
        assert gw.proc is not None and gw.proc.returncode is None

        partner.write_text(sandbox.state.config.partner_id)
        fixed = time.monotonic()
        gw.proc.send_signal(signal.SIGHUP)
        await gw.ready(http, within=10)
        assert time.monotonic() - fixed < 5 + 2  # one probe interval (the floor), and a login
        await wait_until(lambda: '"upstream_accepted"' in gw.log.read_text())  # logs batch
    finally:
        assert await gw.stop() == 0


async def test_cli_a_lease_below_its_floor_is_refused_at_start_up() -> None:
    """GATEWAY_REDIS_LEASE_TTL=1ms made every store call time out: exit 2, naming it."""
    code, _, err = await run("serve", env=clean_env(
        REPAIRY_BASE_URL="https://x.test", REPAIRY_APP_KEY="k", REPAIRY_APP_SECRET="s",
        REPAIRY_PARTNER_ID="p", GATEWAY_REDIS_URL="redis://127.0.0.1:9",
        GATEWAY_REDIS_LEASE_TTL="1ms"))
    assert code == 2
    assert err.strip() == ("repairy-gateway: invalid setting GATEWAY_REDIS_LEASE_TTL: must be "
                           "at least 1s")


async def test_cli_serve_only_warns_of_a_mistyped_variable(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """serve keeps running with an unknown GATEWAY_* variable: one JSON warning naming the
    closest real one (output is not a terminal, so GATEWAY_LOG_FORMAT=auto is JSON); the
    Kubernetes service links beside it are not mentioned."""
    from tests.fleet_helpers import GatewayProcess

    gw = GatewayProcess(sandbox, {"GATEWAY_RETRY_ATTEMPT": "3",
                                  "GATEWAY_SERVICE_HOST": "10.0.0.1",
                                  "GATEWAY_PORT": "tcp://10.0.0.1:8080"})
    await gw.start()
    try:
        await gw.ready(http)
        await wait_until(lambda: "unknown_setting" in gw.log.read_text())
        lines = [json.loads(x) for x in gw.log.read_text().splitlines() if "unknown_setting" in x]
        assert [doc["variable"] for doc in lines] == ["GATEWAY_RETRY_ATTEMPT"]
        assert lines[0]["level"] == "warning"
        assert lines[0]["did_you_mean"] == "GATEWAY_RETRY_ATTEMPTS"
    finally:
        assert await gw.stop() == 0
