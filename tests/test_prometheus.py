"""Real Prometheus tools: promtool on a live scrape and on the alert rules, and a real
Prometheus server scraping the admin listener."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.app import GatewayServer
from tests.gateway_helpers import SERVICES, wait_until
from tests.metrics_helpers import value as metric_value
from tests.prometheus_helpers import RULES, prometheus, query
from tests.tools import require_binary

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool", "prometheus")


def test_prometheus_alert_rules_pass_promtool_check(promtool: str) -> None:
    """promtool check rules accepts the shipped alert rules."""
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "32 rules found" in result.stdout


def test_prometheus_alert_rules_unit_tests_pass(promtool: str) -> None:
    """promtool test rules: each alert fires when it should and stays quiet otherwise."""
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_prometheus_live_scrape_passes_promtool_check_metrics(
        promtool: str, gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """After traffic of every kind, the /metrics text passes promtool check metrics."""
    for path in (SERVICES, "/bookings/000000000000000000000000", "/auth/token"):
        async with http.get(gateway.url + path) as resp:
            await resp.read()
    async with http.get(gateway.admin_url + "/metrics") as resp:
        text = await resp.read()
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate(text)
    assert proc.returncode == 0, out.decode()
    assert b"repairy_gateway_upstream_requests_total" in text


@pytest.fixture
async def prometheus_server(gateway: GatewayServer, tmp_path: Path) -> AsyncIterator[str]:
    async with prometheus([gateway.admin_url.removeprefix("http://")], tmp_path) as url:
        yield url


async def test_prometheus_server_scrapes_token_expiry_and_upstream_counter(
        prometheus_server: str, gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """A real Prometheus scrapes the admin listener; the expiry gauge and request counter
    read back through its HTTP API match the gateway's own values."""
    for _ in range(3):
        async with http.get(gateway.url + SERVICES) as resp:
            await resp.read()
    counter = 'repairy_gateway_upstream_requests_total{route="/workshops/{id}/services"}'

    async def scraped() -> bool:
        return bool(await query(http, prometheus_server, counter))

    await wait_until(scraped, within=30, interval=0.25)
    (expiry,) = await query(http, prometheus_server,
                             "repairy_gateway_token_expiry_timestamp_seconds")
    value = expiry["value"]
    assert isinstance(value, list)
    local = metric_value(gateway.metrics.registry,
        "repairy_gateway_token_expiry_timestamp_seconds")
    assert float(value[1]) == pytest.approx(local, abs=0.01)
    (requests,) = await query(http, prometheus_server, counter)
    value = requests["value"]
    assert isinstance(value, list)
    assert float(value[1]) == 3
    (ready,) = await query(http, prometheus_server, "repairy_gateway_ready")
    assert isinstance(ready["value"], list) and ready["value"][1] == "1"


DASHBOARD = ROOT / "config" / "grafana" / "repairy-gateway.json"
#: Grafana's variables, as Grafana would substitute them ("All" selected).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*",
                     "$credential": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) for every panel target."""
    import json

    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


@pytest.mark.unit
def test_prometheus_dashboard_is_well_formed() -> None:
    """The Grafana dashboard: a stable uid, unique panel ids, every panel on the grid and
    querying through the datasource variable, the job/instance variables defined."""
    import json

    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "repairy-gateway" and board["title"] == "repairy-gateway"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job", "instance", "credential"}
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert "$__rate_interval" in target["expr"] or "rate(" not in target["expr"]
    assert len(dashboard_queries()) >= 15


async def test_prometheus_dashboard_queries_run_on_a_live_scrape(
        prometheus_server: str, gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """Every dashboard query parses and runs against a real Prometheus scraping the gateway;
    the core panels have data; every metric a query names exists in a live scrape."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):
        async with http.get(gateway.url + SERVICES) as resp:
            await resp.read()
    counter = 'repairy_gateway_upstream_requests_total{route="/workshops/{id}/services"}'

    async def scraped_twice() -> bool:  # rate() needs two samples
        found = await query(http, prometheus_server, f"count_over_time({counter}[1m])")
        return bool(found) and float(found[0]["value"][1]) >= 2

    await wait_until(scraped_twice, within=30, interval=0.25)
    async with http.get(gateway.admin_url + "/metrics") as resp:
        families = {f.name: f.type for f in text_string_to_metric_families(await resp.text())}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",)}

    def exported(name: str) -> bool:
        """``name`` exactly as a scrape has it (a counter only with _total, ...)."""
        return any(name == base + suffix for base, kind in families.items()
                   for suffix in suffixes.get(kind, ("",)))
    empty = []
    for title, expr in dashboard_queries():
        async with http.get(f"{prometheus_server}/api/v1/query",
                            params={"query": expr}) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["status"] == "success", (title, expr, body)
        if not body["data"]["result"]:
            empty.append(title)
        for name in re.findall(r"repairy_gateway_[a-z0-9_]+", expr):
            assert exported(name), f"{title}: {name} is not exported"
    for core in ("Access token expires in", "Ready", "Upstream requests per second by route",
                 "Upstream latency p95 by route", "In flight", "Answers to callers by source"):
        assert core not in empty, f"{core} has no data"
