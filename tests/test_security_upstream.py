"""The upstream side: TLS verified by default, a custom CA bundle, no clear-text tokens by
accident, and auth error bodies scrubbed before logging."""

from __future__ import annotations

import asyncio
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
from tests.egress_proxy import EgressProxy
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.sandbox_helpers import faults
from tests.tools import require_binary

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

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


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.fixture
async def egress() -> AsyncIterator[EgressProxy]:
    proxy = EgressProxy(user="gw", password="egress-proxy-secret")
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_security_egress_proxy_tunnels_https_logins_and_requests(
        tls_sandbox: Sandbox, tls_files: dict[str, Path], egress: EgressProxy,
        http: aiohttp.ClientSession) -> None:
    """GATEWAY_EGRESS_PROXY: the login and the proxied calls to an https upstream go through
    the proxy in CONNECT tunnels (authenticated), and to nowhere else."""
    settings = settings_for(tls_sandbox, upstream_ca_file=str(tls_files["ca"]),
                            egress_proxy=egress.url.replace("http://", "http://gw@"),
                            egress_proxy_password="egress-proxy-secret")
    async with GatewayServer(settings) as gw:
        await wait_until(gw.state.tokens.ready)
        for _ in range(3):
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
    upstream = tls_sandbox.url.removeprefix("https://")
    assert egress.targets and set(egress.targets) == {f"CONNECT {upstream}"}
    assert egress.refused == 0
    assert tls_sandbox.state.control.counters["token_requests"] == 1


async def test_security_egress_proxy_carries_plain_http_and_refuses_other_hosts(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """An http upstream through the proxy (absolute-form requests): only the configured
    upstream is ever asked for, a caller's absolute target is still refused, and a wrong
    proxy password keeps the gateway unready without leaking it."""
    proxy = EgressProxy()
    await proxy.start()
    try:
        async with GatewayServer(settings_for(sandbox, egress_proxy=proxy.url)) as gw:
            await wait_until(gw.state.tokens.ready)
            async with http.get(gw.url + SERVICES) as resp:
                assert resp.status == 200
            reader, writer = await asyncio.open_connection(
                *gw.url.removeprefix("http://").rsplit(":", 1))
            writer.write(b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n"
                         b"Connection: close\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            writer.close()
        prefix = f"{sandbox.url}/"
        assert proxy.targets and all(t.split(" ", 1)[1].startswith(prefix)
                                     for t in proxy.targets), proxy.targets
        assert any("/auth/token" in t for t in proxy.targets)
    finally:
        await proxy.stop()
    locked = EgressProxy(user="gw", password="right")
    await locked.start()
    try:
        settings = settings_for(sandbox, egress_proxy=locked.url.replace("http://", "http://gw@"),
                                egress_proxy_password="egress-proxy-secret")
        async with GatewayServer(settings) as gw:
            await wait_until(lambda: locked.refused > 0)
            assert not gw.state.tokens.ready()
    finally:
        await locked.stop()


@pytest.mark.unit
@pytest.mark.parametrize(("value", "why"), [
    ("https://proxy.corp:3128", "http://"), ("http://u:pw@proxy.corp:3128", "password"),
    ("http://proxy.corp:3128/path", "just scheme"), ("proxy.corp:3128", "http://")])
def test_security_egress_proxy_setting_is_checked(value: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings_for("http://127.0.0.1:1", egress_proxy=value)
    assert info.value.setting == "GATEWAY_EGRESS_PROXY" and why in str(info.value)
    with pytest.raises(SettingsError) as info:
        settings_for("http://127.0.0.1:1", egress_proxy="http://proxy.corp:3128",
                     egress_proxy_password="x")
    assert info.value.setting == "GATEWAY_EGRESS_PROXY_PASSWORD"


async def test_security_egress_proxy_refusing_the_tunnel_is_unreachable_not_sent(
        tls_sandbox: Sandbox, tls_files: dict[str, Path], egress: EgressProxy,
        http: aiohttp.ClientSession) -> None:
    """A proxy that refuses the CONNECT (it cannot reach Repairy, or forbids it): nothing
    reached Repairy, so it is 502 upstream_unreachable, counted as a connect failure, and an
    Idempotency-Key is released (the retry books once the proxy lets it through)."""
    from tests.test_proxy_failures import sample
    from tests.test_sandbox_api import booking_body

    settings = settings_for(tls_sandbox, upstream_ca_file=str(tls_files["ca"]),
                            egress_proxy=egress.url.replace("http://", "http://gw@"),
                            egress_proxy_password="egress-proxy-secret", retry_attempts="1")
    async with GatewayServer(settings) as gw:
        await wait_until(gw.state.tokens.ready)
        egress.refuse_connect = 503
        async with http.post(gw.url + "/bookings", json=booking_body(),
                             headers={"Idempotency-Key": "via-proxy"}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_unreachable"
        assert sample(gw, "upstream_errors_total", kind="connect") == 1
        assert sample(gw, "idempotency_settled_total", state="released") == 1
        egress.refuse_connect = None
        async with http.post(gw.url + "/bookings", json=booking_body(),
                             headers={"Idempotency-Key": "via-proxy"}) as resp:
            assert resp.status == 201
    assert len(tls_sandbox.state.data.bookings) == 1
