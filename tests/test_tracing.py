"""OpenTelemetry spans, received by a real OTLP/HTTP endpoint (a small collector in the test):
the upstream call as a child of the caller's trace, renewals, nothing secret in them; and
nothing at all, not even an import, when no endpoint is set."""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.sandbox_helpers import faults

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Collector:
    """Receives OTLP/HTTP protobuf exports on /v1/traces and keeps the spans."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.raw.append(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attrs = {}
                    for a in span.attributes:
                        value = a.value
                        attrs[a.key] = (value.string_value or value.int_value
                                        or value.bool_value)
                    self.spans.append({"name": span.name, "trace_id": span.trace_id.hex(),
                                       "parent": span.parent_span_id.hex(),
                                       "status": span.status.code, "attrs": attrs,
                                       "service": service})
        return web.Response(status=200, content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    yield c
    await c.stop()


async def test_tracing_spans_for_upstream_calls_and_renewals(
        sandbox: Sandbox, collector: Collector, http: aiohttp.ClientSession) -> None:
    gw = GatewayServer(settings_for(sandbox, otel_endpoint=collector.url))
    await gw.start()
    try:
        await wait_until(gw.state.tokens.ready)
        async with http.get(gw.url + SERVICES, headers={"traceparent": CALLER}) as resp:
            assert resp.status == 200
        await faults(http, sandbox, {"status": 503, "path": "/bookings/*", "count": 1})
        async with http.get(gw.url + "/bookings/abc") as resp:
            assert resp.status == 503
        last = sandbox.state.control.requests[-1]
        assert "traceparent" not in dict(last["headers"])  # the gateway adds none
    finally:
        await gw.stop()  # sends what is pending
    names = [s["name"] for s in collector.spans]
    assert names.count("repairy.upstream") == 2 and "repairy.token.renewal" in names
    child = next(s for s in collector.spans if s["attrs"].get("http.route")
                 == "/workshops/{id}/services")
    assert child["trace_id"] == TRACE_ID and child["parent"] == "00f067aa0ba902b7"
    assert child["attrs"]["http.response.status_code"] == 200
    assert child["attrs"]["http.request.method"] == "GET"
    assert child["service"]["service.name"] == "repairy-gateway"
    failed = next(s for s in collector.spans if s["attrs"].get("http.response.status_code")
                  == 503)
    assert failed["trace_id"] != TRACE_ID and failed["status"] == 2  # error
    renewal = next(s for s in collector.spans if s["name"] == "repairy.token.renewal")
    assert renewal["attrs"]["repairy.renewal.kind"] == "login"
    assert renewal["attrs"]["repairy.renewal.outcome"] == "success"
    everything = b"".join(collector.raw)
    for secret in (b"sbx_at_", b"sbx_rt_", b"sandbox-app-secret", b"sandbox-app-key"):
        assert secret not in everything


def test_tracing_off_imports_nothing() -> None:
    """Without an endpoint the gateway does not even import OpenTelemetry, and the proxy's
    send is the untraced one."""
    code = (
        "import sys, asyncio\n"
        "from gateway.wiring import build_state\n"
        "from gateway.proxy.handler import Proxy\n"
        "from gateway.clock import SystemClock\n"
        "from gateway.metrics import Metrics\n"
        "from tests.gateway_helpers import settings_for\n"
        "async def main():\n"
        "    s = settings_for('http://127.0.0.1:1')\n"
        "    state = build_state(s, None, SystemClock(), Metrics())\n"
        "    proxy = Proxy(state)\n"
        "    assert proxy._exchange.send == proxy._exchange._send, proxy._exchange.send\n"
        "    await state.upstream.close()\n"
        "asyncio.run(main())\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.unit
def test_tracing_endpoint_setting_is_checked() -> None:
    from gateway.settings import SettingsError

    for bad in ("collector:4318", "http://user:pw@collector:4318"):
        with pytest.raises(SettingsError) as info:
            settings_for("http://127.0.0.1:1", otel_endpoint=bad)
        assert info.value.setting == "OTEL_EXPORTER_OTLP_ENDPOINT"
