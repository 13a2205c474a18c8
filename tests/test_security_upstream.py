"""The upstream side: TLS verified by default, a custom CA bundle, no clear-text tokens by
accident, and auth error bodies scrubbed before logging."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox
from gateway.settings import SettingsError, load_settings
from tests.conftest import LogCapture
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.sandbox_helpers import faults
from tests.tools import require_binary

BASE = {"REPAIRY_APP_KEY": "k", "REPAIRY_APP_SECRET": "s", "REPAIRY_PARTNER_ID": "p"}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    openssl = require_binary("openssl", "openssl")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=repairy-gateway test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.fixture
async def tls_sandbox(tls_files: dict[str, Path]) -> AsyncIterator[Sandbox]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files["cert"], tls_files["key"])
    async with Sandbox(ssl_context=ctx) as sb:
        yield sb


async def test_security_upstream_tls_is_verified_by_default(
        tls_sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A certificate from an unknown CA: no login, not ready, 503 to callers."""
    assert tls_sandbox.url.startswith("https://")
    async with GatewayServer(settings_for(tls_sandbox)) as gw:
        await wait_until(lambda: gw.state.manager.status().last_error == "connect_error")
        assert not gw.state.tokens.ready()
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 503
    assert tls_sandbox.state.control.counters["token_requests"] == 0


async def test_security_upstream_custom_ca_bundle(
        tls_sandbox: Sandbox, tls_files: dict[str, Path], http: aiohttp.ClientSession) -> None:
    """With GATEWAY_UPSTREAM_CA_FILE naming the CA, TLS verifies and requests pass."""
    settings = settings_for(tls_sandbox, upstream_ca_file=str(tls_files["ca"]))
    async with GatewayServer(settings) as gw:
        await wait_until(gw.state.tokens.ready)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://api.example.test", False),
    ("http://10.1.2.3:8080", False),
    ("http://127.0.0.1:8090", True),
    ("http://localhost:8090", True),
    ("http://[::1]:8090", True),
    ("https://api.example.test", True),
])
def test_security_cleartext_upstream_refused_unless_loopback_or_allowed(
        url: str, allowed: bool) -> None:
    """An http:// base URL off loopback fails start-up unless explicitly allowed."""
    env = {**BASE, "REPAIRY_BASE_URL": url}
    if allowed:
        load_settings(env)
        return
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.setting == "REPAIRY_BASE_URL"
    load_settings({**env, "GATEWAY_ALLOW_INSECURE_UPSTREAM": "true"})


def test_security_unreadable_ca_file_fails_startup() -> None:
    """A CA bundle path that cannot be read is a start-up error naming the setting."""
    with pytest.raises(SettingsError) as info:
        load_settings({**BASE, "REPAIRY_BASE_URL": "https://x.test",
                       "GATEWAY_UPSTREAM_CA_FILE": "/nonexistent/ca.pem"})
    assert info.value.setting == "GATEWAY_UPSTREAM_CA_FILE"


async def test_security_auth_error_bodies_are_scrubbed_before_logging(
        sandbox: Sandbox, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """An auth endpoint that echoes the secret in its errors: only a safe code is logged."""
    secret = sandbox.state.config.app_secret
    await faults(http, sandbox, {"faults": [
        {"status": 401, "path": "/auth/token",
         "body": f'{{"error": {{"code": "bad_secret", "message": "appSecret {secret} is wrong"'
                 f'}}}}'},
        {"status": 200, "path": "/auth/token",
         "body": f'{{"note": "we received appSecret={secret}"}}'},
        {"status": 500, "path": "/auth/token", "body": f"<html>{secret}</html>"},
    ]})
    async with GatewayServer(settings_for(sandbox, login_retry_interval="0.05s")) as gw:
        await wait_until(gw.state.tokens.ready, within=5)
    logged = "\n".join(log_capture.lines)
    assert "bad_secret" in logged  # the code made it, the message did not
    assert "malformed_response" in logged and "server_error" in logged
    # the autouse leak check asserts the secret itself appears nowhere
