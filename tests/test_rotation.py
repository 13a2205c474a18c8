"""Hot credential rotation from mounted secret files (poll and SIGHUP)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.settings import Settings
from tests.conftest import LogCapture
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

OLD = {"app-key": "sandbox-app-key", "app-secret": "old-app-secret", "partner-id": "partner-1"}
NEW = {"app-key": "sandbox-app-key", "app-secret": "new-app-secret", "partner-id": "partner-2"}


class SecretMount:
    """A directory laid out like a Kubernetes secret volume: files are symlinks into a
    ``..data`` symlink that is swapped atomically on update."""

    def __init__(self, root: Path, values: dict[str, str]) -> None:
        self.root = root
        self._n = 0
        self.update(values)
        for name in values:
            (root / name).symlink_to(Path("..data") / name)

    def update(self, values: dict[str, str]) -> None:
        self._n += 1
        version = self.root / f"..v{self._n}"
        version.mkdir()
        for name, value in values.items():
            (version / name).write_text(value + "\n")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")

    def env(self, sb: Sandbox) -> dict[str, str]:
        return {"REPAIRY_BASE_URL": sb.url,
                "REPAIRY_APP_KEY_FILE": str(self.root / "app-key"),
                "REPAIRY_APP_SECRET_FILE": str(self.root / "app-secret"),
                "REPAIRY_PARTNER_ID_FILE": str(self.root / "partner-id")}


async def accept(http: aiohttp.ClientSession, sb: Sandbox, values: dict[str, str]) -> None:
    async with http.post(f"{sb.url}/__sandbox/credentials", json={
            "app_key": values["app-key"], "app_secret": values["app-secret"],
            "partner_id": values["partner-id"]}) as resp:
        assert resp.status == 200


async def last_partner(http: aiohttp.ClientSession, sb: Sandbox) -> str:
    async with http.get(f"{sb.url}/__sandbox/requests?limit=1") as resp:
        (entry,) = (await resp.json())["requests"]
    return str(dict(entry["headers"])["X-Partner-ID"])


def generation(gw: GatewayServer) -> int:
    tok = gw.state.tokens.current
    return tok.generation if tok else 0


async def test_rotation_switches_only_after_new_login_works_without_failed_requests(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """New secret files: the gateway logs in with them in the background, then switches
    credentials, partner id and token together; requests never fail meanwhile."""
    mount = SecretMount(tmp_path, OLD)
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:

        def load() -> Settings:
            return settings_for(sb, env=mount.env(sb), secrets_poll_interval="0.1s")

        async with GatewayServer(load(), reload_settings=load) as gw:
            await wait_until(gw.state.tokens.ready)
            statuses: list[int] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    async with http.get(gw.url + SERVICES) as resp:
                        statuses.append(resp.status)

            load_task = asyncio.create_task(traffic())
            await accept(http, sb, NEW)  # Repairy issues new credentials...
            mount.update(NEW)  # ...and Kubernetes updates the mounted secret
            await wait_until(lambda: generation(gw) == 2, within=5)
            await asyncio.sleep(0.2)
            stop.set()
            await load_task
            assert set(statuses) == {200}
            assert await last_partner(http, sb) == "partner-2"
            assert gw.state.settings.partner.partner_id == "partner-2"
            assert metric_value(gw.metrics.registry,
                "repairy_gateway_credential_reloads_total", {"outcome": "success"}) == 1


async def test_rotation_failed_login_keeps_old_credentials_then_retries(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Files changed to credentials Repairy does not accept yet: the old token keeps
    serving; once Repairy accepts them, a retry switches over."""
    mount = SecretMount(tmp_path, OLD)
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:

        def load() -> Settings:
            return settings_for(sb, env=mount.env(sb), secrets_poll_interval="0.1s",
                                login_retry_interval="0.3s")

        async with GatewayServer(load(), reload_settings=load) as gw:
            await wait_until(gw.state.tokens.ready)
            mount.update(NEW)
            await wait_until(lambda: (metric_value(gw.metrics.registry,
                "repairy_gateway_credential_reloads_total", {"outcome": "failure"}) or 0) >= 1)
            assert generation(gw) == 1
            assert gw.state.tokens.ready()
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
            assert await last_partner(http, sb) == "partner-1"
            await accept(http, sb, NEW)
            await wait_until(lambda: generation(gw) == 2, within=5)
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
            assert await last_partner(http, sb) == "partner-2"


async def test_rotation_rejected_login_retries_only_every_interval_and_is_no_renewal(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """After a rejected rotation, polls do not retry before GATEWAY_LOGIN_RETRY_INTERVAL, and
    the failures count as credential reloads, never as renewals (no false critical alert)."""
    mount = SecretMount(tmp_path, OLD)
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:

        def load() -> Settings:
            return settings_for(sb, env=mount.env(sb), secrets_poll_interval="0.05s",
                                login_retry_interval="1s")

        async with GatewayServer(load(), reload_settings=load) as gw:
            await wait_until(gw.state.tokens.ready)
            mount.update(NEW)
            await asyncio.sleep(1.6)  # 32 polls, two retry intervals
            logins = sb.state.control.counters["token_requests"] - 1
            failures = metric_value(gw.metrics.registry,
                "repairy_gateway_credential_reloads_total", {"outcome": "failure"})
            rejected = metric_value(gw.metrics.registry,
                "repairy_gateway_token_renewals_total",
                {"kind": "login", "outcome": "failure", "reason": "invalid_credentials"})
            assert gw.state.tokens.ready()
    assert 1 <= logins <= 2
    assert failures == logins
    assert rejected is None


async def test_rotation_client_keys_file_applies_without_login_and_keeps_keys_on_bad_file(
        tmp_path: Path, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """A changed client keys file applies within a poll (a revoked key stops working); an
    empty or invalid file keeps the previous keys and logs an error."""
    keys = tmp_path / "client-keys"
    keys.write_text("orders=client-key-orders-0001\nbilling=client-key-billing-0001\n")
    async with Sandbox() as sb:
        env = {"GATEWAY_CLIENT_KEYS_FILE": str(keys)}
        async with GatewayServer(settings_for(sb, env=env, secrets_poll_interval="0.05s")) as gw:
            await wait_until(gw.state.tokens.ready)

            async def status(key: str) -> int:
                async with http.get(gw.url + SERVICES, headers={"X-Gateway-Key": key}) as resp:
                    return resp.status

            assert await status("client-key-billing-0001") == 200
            keys.write_text("orders=client-key-orders-0001\n")  # billing revoked
            await wait_until(lambda: len(gw.state.access.keys) == 1, within=2)
            assert await status("client-key-billing-0001") == 401
            assert await status("client-key-orders-0001") == 200
            for bad in ("", "orders=short\n", "no equals sign\n"):
                keys.write_text(bad)
                await asyncio.sleep(0.2)
                assert await status("client-key-orders-0001") == 200, bad
                assert await status("anything") == 401, bad
            keys.unlink()
            await asyncio.sleep(0.2)
            assert await status("client-key-orders-0001") == 200
        assert sb.state.control.counters["token_requests"] == 1
    errors = [line for line in log_capture.lines if "client_keys_reload_failed" in line]
    assert len(errors) >= 4


async def test_rotation_client_keys_apply_while_a_credential_login_is_under_way(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A slow login with rotated credentials does not hold up a client key revocation."""
    (tmp_path / "secrets").mkdir()
    mount = SecretMount(tmp_path / "secrets", OLD)
    keys = tmp_path / "client-keys"
    keys.write_text("orders=client-key-orders-0001\nbilling=client-key-billing-0001\n")
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:

        def load() -> Settings:
            return settings_for(sb, env={**mount.env(sb),
                                         "GATEWAY_CLIENT_KEYS_FILE": str(keys)},
                                secrets_poll_interval="0.05s", auth_timeout="5s")

        async with GatewayServer(load(), reload_settings=load) as gw:
            await wait_until(gw.state.tokens.ready)
            async with http.post(f"{sb.url}/__sandbox/faults",
                                 json={"latency": 3, "path": "/auth/token"}) as resp:
                assert resp.status == 200
            await accept(http, sb, NEW)
            mount.update(NEW)
            await wait_until(lambda: sb.state.control.counters["token_requests"] == 2)
            keys.write_text("orders=client-key-orders-0001\n")
            started = asyncio.get_running_loop().time()
            await wait_until(lambda: len(gw.state.access.keys) == 1, within=2)
            assert asyncio.get_running_loop().time() - started < 0.5
            assert generation(gw) == 1  # the rotation login is still under way
            await wait_until(lambda: generation(gw) == 2, within=5)
            assert len(gw.state.access.keys) == 1  # the rotation kept the new keys


async def test_rotation_client_keys_file_applies_on_sighup(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """With polling off, SIGHUP (the reloader's trigger) applies a changed client keys file."""
    keys = tmp_path / "client-keys"
    keys.write_text("orders=client-key-orders-0001\n")
    async with Sandbox() as sb:
        env = {"GATEWAY_CLIENT_KEYS_FILE": str(keys)}
        async with GatewayServer(settings_for(sb, env=env, secrets_poll_interval="0")) as gw:
            keys.write_text("billing=client-key-billing-0001\n")
            await asyncio.sleep(0.2)
            assert gw.state.access.keys[0].name == "orders"
            assert gw.reloader is not None
            gw.reloader.trigger()
            await wait_until(lambda: gw.state.access.keys[0].name == "billing", within=2)


async def test_rotation_on_sighup(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """serve with polling off: SIGHUP re-reads the files and switches over."""
    mount = SecretMount(tmp_path, OLD)
    async with Sandbox(SandboxConfig(app_secret=OLD["app-secret"],
                                     partner_id=OLD["partner-id"])) as sb:
        env: dict[str, Any] = {k: v for k, v in os.environ.items()
                               if not k.startswith(("REPAIRY_", "GATEWAY_"))}
        env.update(mount.env(sb), GATEWAY_LISTEN="127.0.0.1:0", GATEWAY_ADMIN_LISTEN=
                   "127.0.0.1:0", GATEWAY_SECRETS_POLL_INTERVAL="0")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", env=env,
            stderr=asyncio.subprocess.PIPE)
        try:
            counters = sb.state.control.counters
            await wait_until(lambda: counters["logins_succeeded"] == 1, within=15)
            await accept(http, sb, NEW)
            mount.update(NEW)
            await asyncio.sleep(0.3)
            assert counters["token_requests"] == 1  # polling is off: nothing yet
            proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: counters["logins_succeeded"] == 2, within=10)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        logs = (await proc.stderr.read()).decode()
        assert '"event": "credentials_rotated"' in logs
        assert "new-app-secret" not in logs and "old-app-secret" not in logs


async def test_rotation_sighup_rereads_the_config_file_and_names_what_needs_a_restart(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """serve with GATEWAY_CONFIG: SIGHUP re-reads the file; a changed setting that is not
    applied live is named in a warning (and the gateway keeps serving)."""
    from tests.fleet_helpers import GatewayProcess

    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nread_timeout = "60s"\n')
    async with Sandbox() as sb:
        gw = GatewayProcess(sb, {"GATEWAY_CONFIG": str(config),
                                 "GATEWAY_SECRETS_POLL_INTERVAL": "0"})
        await gw.start()
        try:
            await gw.ready(http)
            config.write_text('[gateway]\nread_timeout = "30s"\nlog_format = "auto"\n'
                              'client_keys = "ops=client-key-ops-00000001"\n')
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: "settings_need_restart" in gw.log.read_text())
            line = next(x for x in gw.log.read_text().splitlines()
                        if "settings_need_restart" in x)
            assert "GATEWAY_READ_TIMEOUT" in line and "GATEWAY_LOG_FORMAT" not in line
            assert "GATEWAY_CLIENT_KEYS" in line  # inline keys are not applied live
            assert "client-key-ops" not in gw.log.read_text()
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
        finally:
            assert await gw.stop() == 0
