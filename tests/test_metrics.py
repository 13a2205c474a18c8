"""Prometheus metrics from an injected registry, asserted with get_sample_value."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import socket
import time

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.app import GatewayServer
from gateway.metrics import Metrics
from gateway.metrics_merge import merge_expositions
from gateway.proxy.routes import method_label, route_template
from gateway.sandbox import Sandbox, SandboxConfig
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value
from tests.sandbox_helpers import faults

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    value = metric_value(gw.metrics.registry, name, labels)
    return 0.0 if value is None else value


def renewals(gw: GatewayServer, kind: str, outcome: str, reason: str) -> float:
    return sample(gw, "repairy_gateway_token_renewals_total", kind=kind, outcome=outcome,
                  reason=reason)


@pytest.mark.unit
@pytest.mark.parametrize(("path", "template"), [
    ("/workshops/5f1a/services", "/workshops/{id}/services"),
    ("/workshops/5f1a/availabilities", "/workshops/{id}/availabilities"),
    ("/bookings", "/bookings"),
    ("/bookings/", "/bookings"),
    ("/bookings/abc123", "/bookings/{id}"),
    ("/bookings/abc123/confirmed", "/bookings/{id}/{status}"),
    ("/reminders/services/r1", "/reminders/services/{id}"),
    ("/quotes", "/quotes"),
    ("/bookings//confirmed", "other"),
    ("/__sandbox/echo", "other"),
    ("/a/b/c/d/e", "other"),
])
def test_metrics_route_template_is_bounded(path: str, template: str) -> None:
    """Known routes become templates; anything else is 'other' — never a raw id."""
    assert route_template(path) == template


@pytest.mark.unit
def test_metrics_method_label_is_bounded() -> None:
    """Non-standard methods collapse to OTHER."""
    assert method_label("GET") == "GET"
    assert method_label("BREW") == "OTHER"


async def test_metrics_login_sets_renewal_counters_and_expiry_gauges(
        gateway: GatewayServer) -> None:
    """After start-up: one successful login counted and timed; expiry gauges in Unix time."""
    assert renewals(gateway, "login", "success", "ok") == 1
    assert sample(gateway, "repairy_gateway_token_renewal_duration_seconds_count",
                  kind="login") == 1
    now = time.time()
    expiry = sample(gateway, "repairy_gateway_token_expiry_timestamp_seconds")
    assert expiry == pytest.approx(now + 48 * 3600, abs=5)
    refresh = sample(gateway, "repairy_gateway_refresh_token_expiry_timestamp_seconds")
    assert refresh == pytest.approx(now + 14 * 86400, abs=5)
    assert sample(gateway, "repairy_gateway_ready") == 1
    assert sample(gateway, "repairy_gateway_token_generation") == 1
    assert metric_value(gateway.metrics.registry,
        "repairy_gateway_build_info",
        {"version": __version__, "python_version": platform.python_version()}) == 1


async def test_metrics_upstream_requests_by_method_route_status(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """Proxied requests count under their route template, with a latency histogram."""
    for _ in range(3):
        async with http.get(gateway.url + SERVICES) as resp:
            await resp.read()
    async with http.get(gateway.url + "/bookings/000000000000000000000000") as resp:
        await resp.read()
    assert sample(gateway, "repairy_gateway_upstream_requests_total", method="GET",
                  route="/workshops/{id}/services", status="200") == 3
    assert sample(gateway, "repairy_gateway_upstream_requests_total", method="GET",
                  route="/bookings/{id}", status="404") == 1
    assert sample(gateway, "repairy_gateway_upstream_request_duration_seconds_count",
                  method="GET", route="/workshops/{id}/services") == 3
    assert sample(gateway, "repairy_gateway_responses_total", source="upstream",
                  status="200", code="none") == 3


async def test_metrics_upstream_error_kinds(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """5xx, 429, 401, timeout and protocol failures each count under their kind."""
    async with GatewayServer(settings_for(sandbox, read_timeout="0.3s")) as gw:
        await wait_until(gw.state.tokens.ready)
        await faults(http, sandbox, {"faults": [
            {"status": 503, "path": "/workshops/*"},
            {"status": 429, "path": "/workshops/*", "retry_after": 1},
            {"status": 401, "path": "/workshops/*", "count": 2},
            {"latency": 1.0, "path": "/workshops/*"},
            {"drop": True, "path": "/workshops/*"},
        ]})
        for _ in range(5):
            async with http.get(gw.url + SERVICES) as resp:
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await resp.read()
        await wait_until(lambda: sample(gw, "repairy_gateway_upstream_errors_total",
                                        kind="protocol") == 1)
        for kind, n in (("status_5xx", 1), ("status_429", 1), ("status_401", 2),
                        ("timeout", 1), ("protocol", 1)):
            assert sample(gw, "repairy_gateway_upstream_errors_total", kind=kind) == n, kind
        # The replay's 401 does not invalidate the brand-new token: it marks the route.
        assert sample(gw, "repairy_gateway_token_invalidations_total",
                      reason="upstream_401") == 1
        assert sample(gw, "repairy_gateway_persistent_401_total",
                      route="/workshops/{id}/services") == 1
        assert sample(gw, "repairy_gateway_requests_replayed_total", reason="upstream_401") == 1
        assert sample(gw, "repairy_gateway_responses_total", source="gateway", status="504",
                      code="upstream_timeout") == 1


async def test_metrics_renewal_failure_reasons(http: aiohttp.ClientSession) -> None:
    """Failed logins are counted by reason: server_error, rate_limited, malformed_response,
    timeout, invalid_credentials; a rejected refresh as refresh_rejected."""
    async with Sandbox(SandboxConfig(access_ttl=1.0)) as sb:
        await faults(http, sb, {"faults": [
            {"status": 500, "path": "/auth/token"},
            {"status": 429, "path": "/auth/token", "retry_after": 0},
            {"status": 200, "path": "/auth/token"},
            {"latency": 0.5, "path": "/auth/token"},
            {"status": 401, "path": "/auth/token"},
        ]})
        async with GatewayServer(settings_for(sb, auth_timeout="0.2s",
                                              renew_at_fraction=0.5)) as gw:
            await wait_until(gw.state.tokens.ready, within=6)
            for reason in ("server_error", "rate_limited", "malformed_response", "timeout",
                           "invalid_credentials"):
                assert renewals(gw, "login", "failure", reason) == 1, reason
            await faults(http, sb, {"status": 401, "path": "/auth/refresh"})
            await wait_until(lambda: renewals(gw, "refresh", "failure", "refresh_rejected") == 1)
            await wait_until(lambda: renewals(gw, "login", "success", "ok") == 2)


async def test_metrics_connect_error_reason_and_not_ready(http: aiohttp.ClientSession) -> None:
    """An unreachable upstream: login failures with reason connect_error; ready stays 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with GatewayServer(settings_for(f"http://127.0.0.1:{port}")) as gw:
        await wait_until(lambda: renewals(gw, "login", "failure", "connect_error") >= 1)
        assert sample(gw, "repairy_gateway_ready") == 0
        assert sample(gw, "repairy_gateway_token_expiry_timestamp_seconds") == 0


async def test_metrics_inflight_gauge_counts_requests_in_progress(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """While two slow requests run, inflight is 2; afterwards 0."""
    await faults(http, sandbox, {"latency": 0.5, "path": "/workshops/*", "count": 2})

    async def one() -> None:
        async with http.get(gateway.url + SERVICES) as resp:
            await resp.read()

    tasks = [asyncio.create_task(one()) for _ in range(2)]
    await wait_until(lambda: sample(gateway, "repairy_gateway_inflight_requests") == 2)
    await asyncio.gather(*tasks)
    assert sample(gateway, "repairy_gateway_inflight_requests") == 0


async def test_metrics_endpoint_serves_exposition_without_secrets(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """/metrics on the admin port is Prometheus text; no token or secret appears in it."""
    async with http.get(gateway.url + "/auth/token") as resp:
        assert resp.status == 403
    async with http.get(gateway.admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert "repairy_gateway_token_expiry_timestamp_seconds" in text
    assert 'repairy_gateway_responses_total{code="auth_route_forbidden",source="gateway",' \
           'status="403"} 1.0' in text
    tok = gateway.state.tokens.current
    assert tok is not None and tok.access not in text
    for secret in ("sbx_at_", "sbx_rt_", sandbox.state.config.app_secret,
                   sandbox.state.config.app_key):
        assert secret not in text


async def test_metrics_tokenz_describes_token_without_revealing_it(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """/tokenz: generation, times, last renewal, fingerprints — never a token."""
    async with http.get(gateway.admin_url + "/tokenz") as resp:
        assert resp.status == 200
        raw = await resp.text()
        body = await resp.json()
    tok = gateway.state.tokens.current
    assert tok is not None
    assert body["usable"] is True
    assert body["token"]["generation"] == 1
    assert body["token"]["fingerprint"] == tok.fingerprint
    assert body["token"]["obtained_via"] == "login"
    assert body["token"]["expires_at"].endswith("Z")
    assert 48 * 3600 - 10 < body["token"]["expires_in_seconds"] <= 48 * 3600
    assert body["token"]["refresh_token"]["expires_at"].endswith("Z")
    assert body["last_renewal"]["outcome"] == "login:ok"
    assert tok.access not in raw and "sbx_" not in raw


@pytest.mark.unit
def test_metrics_merge_shows_the_most_open_breaker_and_sums_slots() -> None:
    """With workers, the breaker gauge is the largest of the processes' (any open one shows),
    upstream slots in use add up, and the supervisor's own token gauges win."""
    supervisor, one, two = Metrics(), Metrics(), Metrics()
    supervisor.token_generation.labels("default").set(7)
    one.breaker_state.labels("default").set(2)
    two.breaker_state.labels("default").set(0)
    one.upstream_slots_in_use.labels("default").set(3)
    two.upstream_slots_in_use.labels("default").set(4)
    two.token_generation.labels("default").set(1)
    merged = merge_expositions([generate_latest(m.registry).decode()
                                for m in (supervisor, one, two)]).decode()
    values = {s.name: s.value for fam in text_string_to_metric_families(merged)
              for s in fam.samples}
    assert values["repairy_gateway_circuit_breaker_state"] == 2
    assert values["repairy_gateway_upstream_slots_in_use"] == 7
    assert values["repairy_gateway_token_generation"] == 7


@pytest.mark.unit
def test_metrics_store_up_is_absent_without_a_store() -> None:
    """No shared store: no store_up series at all (a 0 would read as "store down")."""
    metrics = Metrics()
    assert b"repairy_gateway_store_up" not in metrics.render()
    metrics.credential("default").store_is_up(True)
    assert b'repairy_gateway_store_up{credential="default"} 1.0' in metrics.render()
    metrics.credential("default").store_is_up(False)
    assert b'repairy_gateway_store_up{credential="default"} 0.0' in metrics.render()


@pytest.mark.unit
def test_metrics_every_exported_family_is_in_the_docs() -> None:
    """docs/metrics.md's table names every repairy_gateway_* family the gateway exports
    (counters by their _total name), so the docs cannot drift from the code."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    metrics = Metrics()
    metrics.credential("default").store_is_up(True)  # registered only with a store
    families = {fam.name: fam.type for fam in text_string_to_metric_families(
        metrics.render().decode())}
    missing = [name + ("_total" if kind == "counter" else "")
               for name, kind in families.items() if name.startswith("repairy_gateway_")
               and f"`{name}{'_total' if kind == 'counter' else ''}`" not in readme]
    assert not missing, f"not in docs/metrics.md's table: {missing}"
