"""Inbound access control: listener refusal, client keys, CIDR allow-list, route allow-list,
and which caller headers may reach Repairy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.errors import GATEWAY_ERROR_HEADER
from gateway.sandbox import Sandbox
from gateway.settings import SettingsError
from tests.conftest import LogCapture
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

KEYS = "billing=client-key-billing-0001,crm=client-key-crm-000002"


async def last_headers(http: aiohttp.ClientSession, sb: Sandbox) -> dict[str, str]:
    async with http.get(f"{sb.url}/__sandbox/requests?limit=1") as resp:
        (entry,) = (await resp.json())["requests"]
    return {k.lower(): v for k, v in entry["headers"]}


def test_security_non_loopback_listener_needs_access_control(sandbox: Sandbox) -> None:
    """Binding beyond loopback without client keys or CIDRs refuses to start, naming
    GATEWAY_LISTEN; with either it starts."""
    with pytest.raises(SettingsError) as info:
        settings_for(sandbox, listen="0.0.0.0:0")
    assert info.value.setting == "GATEWAY_LISTEN"
    settings_for(sandbox, listen="0.0.0.0:0", client_keys=KEYS)
    settings_for(sandbox, listen="0.0.0.0:0", allowed_cidrs="10.0.0.0/8")
    settings_for(sandbox, listen="[::1]:0")  # loopback v6 needs nothing


@pytest.mark.parametrize(("value", "problem"), [
    ("billing", "name=key"), ("billing=short", "shorter"),
    ("a=client-key-aaaaaaaa,a=client-key-bbbbbbbb", "twice"),
    ("a=client-key-aaaaaaaa,b=client-key-aaaaaaaa", "reuses"),
])
def test_security_client_key_list_is_validated(sandbox: Sandbox, value: str,
                                               problem: str) -> None:
    """Malformed, short, duplicate or shared client keys fail start-up without echoing keys."""
    with pytest.raises(SettingsError, match=problem) as info:
        settings_for(sandbox, client_keys=value)
    assert info.value.setting == "GATEWAY_CLIENT_KEYS"
    assert "client-key-aaaaaaaa" not in str(info.value)


async def test_security_client_keys_admit_named_clients_only(
        sandbox: Sandbox, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """Without or with a wrong key → 401; a good key passes, is never forwarded, and the
    client's name (not its key) shows in logs and metrics. Also over 0.0.0.0."""
    async with GatewayServer(settings_for(sandbox, listen="0.0.0.0:0",
                                          client_keys=KEYS)) as gw:
        await wait_until(gw.state.tokens.ready)
        url = gw.url.replace("0.0.0.0", "127.0.0.1") + SERVICES
        for headers in ({}, {"X-Gateway-Key": "client-key-wrong-00001"}):
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers[GATEWAY_ERROR_HEADER] == "client_unauthenticated"
        async with http.get(url, headers={"X-Gateway-Key": "client-key-crm-000002"}) as resp:
            assert resp.status == 200
        assert "x-gateway-key" not in await last_headers(http, sandbox)
        assert metric_value(gw.metrics.registry,
            "repairy_gateway_client_requests_total", {"client": "crm"}) == 1
        assert sandbox.state.control.counters["api_requests"] == 1
    assert any('"client": "crm"' in line for line in log_capture.lines)


async def test_security_cidr_allow_list(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A caller outside the allowed CIDRs gets 403 client_forbidden; inside passes."""
    async with GatewayServer(settings_for(sandbox, allowed_cidrs="10.0.0.0/8")) as gw:
        await wait_until(gw.state.tokens.ready)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "client_forbidden"
    async with GatewayServer(settings_for(sandbox, allowed_cidrs="10.0.0.0/8, 127.0.0.0/8")
                             ) as gw:
        await wait_until(gw.state.tokens.ready)
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 200


async def test_security_unix_socket_with_client_keys(sandbox: Sandbox, tmp_path: Path) -> None:
    """On a unix socket, CIDRs do not apply (local by definition) but keys still do."""
    sock = tmp_path / "gw.sock"
    settings = settings_for(sandbox, listen=f"unix:{sock}", client_keys=KEYS,
                            allowed_cidrs="10.0.0.0/8")
    async with GatewayServer(settings) as gw:
        await wait_until(gw.state.tokens.ready)
        async with aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(sock))) as h:
            async with h.get("http://gw" + SERVICES) as resp:
                assert resp.status == 401
            async with h.get("http://gw" + SERVICES,
                             headers={"X-Gateway-Key": "client-key-billing-0001"}) as resp:
                assert resp.status == 200


async def test_security_route_allow_list(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Only listed method+path patterns pass (403 route_not_allowed); /auth stays refused."""
    async with GatewayServer(settings_for(
            sandbox, allowed_routes="GET /workshops/*/services, POST /bookings, /auth/*")) as gw:
        await wait_until(gw.state.tokens.ready)
        cases: list[tuple[str, str, int, Any]] = [
            ("GET", SERVICES, 200, None),
            ("POST", "/bookings", 422, None),
            ("GET", "/bookings/abc", 403, "route_not_allowed"),
            ("DELETE", SERVICES, 403, "route_not_allowed"),
            ("POST", "/auth/token", 403, "auth_route_forbidden"),
        ]
        for method, path, status, code in cases:
            async with http.request(method, gw.url + path, json={}) as resp:
                assert resp.status == status, (method, path)
                if code:
                    assert (await resp.json())["error"]["code"] == code


async def test_security_internal_and_forwarding_headers_never_reach_upstream(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Configured internal headers and caller X-Forwarded-* are dropped; X-Forwarded-For is
    only ours, and only when configured."""
    spoof = {"X-Internal-User": "alice", "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6",
             "X-Real-IP": "6.6.6.6", "X-Kept": "yes"}
    async with GatewayServer(settings_for(sandbox, strip_headers="X-Internal-User")) as gw:
        await wait_until(gw.state.tokens.ready)
        async with http.get(gw.url + SERVICES, headers=spoof):
            pass
        got = await last_headers(http, sandbox)
        assert not {"x-internal-user", "x-forwarded-for", "forwarded", "x-real-ip"} & set(got)
        assert got["x-kept"] == "yes"
    async with GatewayServer(settings_for(sandbox, forwarded_headers=True)) as gw:
        await wait_until(gw.state.tokens.ready)
        async with http.get(gw.url + SERVICES, headers=spoof):
            pass
        got = await last_headers(http, sandbox)
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["x-forwarded-proto"] == "http"


async def test_security_metrics_and_health_are_not_on_the_proxy_port(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """/metrics and /tokenz exist on the admin port only; on the proxy port they are
    Repairy paths (forwarded, and unknown there)."""
    for path in ("/metrics", "/tokenz", "/readyz"):
        async with http.get(gateway.admin_url + path) as resp:
            assert resp.status in (200, 503)
        async with http.get(gateway.url + path) as resp:
            assert resp.status == 404
            assert GATEWAY_ERROR_HEADER not in resp.headers
