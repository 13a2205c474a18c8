"""The proxy path under failure, over real sockets against the sandbox: callers who leave,
the caller's own faults, ``Expect``, shutdown to one deadline, no hidden re-sends, headers
passed back unchanged, idle connections."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox
from gateway.settings import Settings
from tests.conftest import LogCapture
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    value = metric_value(gw.metrics.registry, f"repairy_gateway_{name}", labels)
    return value or 0.0


def host_port(gw: GatewayServer) -> tuple[str, int]:
    host, _, port = gw.url.removeprefix("http://").rpartition(":")
    return host, int(port)


async def raw(gw: GatewayServer, data: bytes) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*host_port(gw))
    writer.write(data)
    await writer.drain()
    return reader, writer


def request_bytes(method: str, path: str, headers: dict[str, str] | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_lines(cap: LogCapture) -> list[str]:
    return [line for line in cap.lines if line.startswith("{")
            and json.loads(line)["level"] in ("error", "critical")]


def request_lines(cap: LogCapture) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in cap.lines if line.startswith("{")]
    return [d for d in docs if d.get("event") == "request"]


async def started(settings: Settings) -> GatewayServer:
    gw = GatewayServer(settings)
    await gw.start()
    await wait_until(gw.state.tokens.ready)
    return gw


@pytest.fixture
async def small_pool(sandbox: Sandbox) -> AsyncIterator[GatewayServer]:
    gw = await started(settings_for(sandbox, pool_size="2", connect_timeout="5s"))
    yield gw
    await gw.stop()


# -- callers who leave --------------------------------------------------------------------
async def test_caller_leaving_cancels_upstream_and_queued_requests_are_never_sent(
        small_pool: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        log_capture: LogCapture) -> None:
    """Two callers wait on a slow upstream, three more for a pooled connection; all five
    leave. The three queued ones never reach Repairy, the pool is free at once, and each is
    a 499 client_closed_request line and metric with no error-level log line."""
    gw = small_pool
    await faults(http, sandbox, {"latency": 3.0, "path": "/workshops/*", "duration": 30})
    before = (await stats(http, sandbox))["api_requests"]
    conns = [await raw(gw, request_bytes("GET", SERVICES)) for _ in range(5)]
    await wait_until(lambda: sample(gw, "inflight_requests") == 5)
    await asyncio.sleep(0.2)
    for _, writer in conns:
        writer.close()
    await wait_until(lambda: sample(gw, "inflight_requests") == 0, within=1.0)
    assert gw.state.upstream.slots.in_use == 0
    await asyncio.sleep(3.5)  # longer than the upstream's latency: anything queued would go
    assert (await stats(http, sandbox))["api_requests"] - before == 2
    assert sample(gw, "responses_total", source="gateway", status="499",
                  code="client_closed_request") == 5
    assert sample(gw, "upstream_errors_total", kind="connect") == 0
    lines = [d for d in request_lines(log_capture) if d["status"] == 499]
    assert len(lines) == 5
    assert {d["route"] for d in lines} == {"/workshops/{id}/services"}
    assert {d["error"] for d in lines} == {"client_closed_request"}
    assert error_lines(log_capture) == []
    await http.delete(f"{sandbox.url}/__sandbox/faults")
    t0 = time.monotonic()
    async with http.get(gw.url + SERVICES) as resp:
        assert resp.status == 200
    assert time.monotonic() - t0 < 1.0


async def test_aborted_upload_never_reaches_upstream_as_complete(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        log_capture: LogCapture) -> None:
    """A streamed (chunked, larger than the replay limit) upload cut by its caller: the
    upstream never sees the final chunk (no 200 from echo), it is a 499, and no upstream
    error is counted."""
    before = await stats(http, sandbox)
    head = request_bytes("POST", "/__sandbox/echo", {"Transfer-Encoding": "chunked"})
    piece = b"x" * 32768
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    _, writer = await raw(gateway, head + chunk * 4)  # 128 KiB > 64 KiB: streamed
    await wait_until(lambda: sample(gateway, "upstream_slots_in_use") == 1)
    await asyncio.sleep(0.1)
    writer.transport.abort()
    await wait_until(lambda: sample(gateway, "inflight_requests") == 0, within=1.0)
    await asyncio.sleep(0.3)
    after = await stats(http, sandbox)
    assert after["statuses"].get("200", 0) == before["statuses"].get("200", 0)
    assert after["client_disconnects"] == before.get("client_disconnects", 0) + 1
    assert sample(gateway, "responses_total", source="gateway", status="499",
                  code="client_closed_request") == 1
    assert sample(gateway, "upstream_errors_total", kind="connect") == 0
    assert sample(gateway, "upstream_errors_total", kind="protocol") == 0
    assert error_lines(log_capture) == []


async def test_caller_leaving_mid_small_body_sends_nothing(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A small (kept) body cut short by its caller: nothing is sent upstream at all."""
    before = (await stats(http, sandbox))["api_requests"]
    _, writer = await raw(gateway, request_bytes("POST", "/__sandbox/echo",
                                                 {"Content-Length": "1000"}, b"x" * 100))
    await wait_until(lambda: sample(gateway, "inflight_requests") == 1)
    writer.transport.abort()
    await wait_until(lambda: sample(gateway, "responses_total", source="gateway",
                                    status="499", code="client_closed_request") == 1)
    assert (await stats(http, sandbox))["api_requests"] == before


async def test_caller_leaving_mid_answer_is_a_499_not_a_broken_upstream(
        gateway: GatewayServer, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """Callers who hang up while a large answer streams back: 499s, no stream_broken, no
    upstream error, no error-level line."""
    for _ in range(5):
        reader, writer = await raw(gateway, request_bytes("GET", "/__sandbox/bytes/8000000"))
        got = 0
        while got < 200_000:
            got += len(await reader.read(65536))
        writer.transport.abort()
    await wait_until(lambda: sample(gateway, "inflight_requests") == 0, within=3.0)
    assert sample(gateway, "responses_total", source="gateway", status="499",
                  code="client_closed_request") == 5
    assert sample(gateway, "responses_total", source="upstream", status="200",
                  code="none") == 0
    assert sample(gateway, "upstream_errors_total", kind="protocol") == 0
    assert not [d for d in request_lines(log_capture) if d["error"] == "stream_broken"]
    assert error_lines(log_capture) == []


# -- the caller's own faults -----------------------------------------------------------------
async def _slow_chunks(pieces: int, size: int, pause: float,
                       stall: float = 0.0) -> AsyncIterator[bytes]:
    for i in range(pieces):
        if stall and i == pieces // 2:
            await asyncio.sleep(stall)
        yield b"y" * size
        await asyncio.sleep(pause)


async def test_streamed_upload_over_the_limit_is_413_not_502(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A chunked upload that grows past GATEWAY_MAX_BODY_SIZE while streaming → 413
    body_too_large; the upstream is not blamed."""
    gw = await started(settings_for(sandbox, max_body_size="200KiB",
                                    replay_body_limit="16KiB"))
    try:
        async with http.post(gw.url + "/__sandbox/echo",
                             data=_slow_chunks(20, 32768, 0.0)) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"
        assert sample(gw, "upstream_errors_total", kind="connect") == 0
        assert sample(gw, "responses_total", source="gateway", status="413",
                      code="body_too_large") == 1
    finally:
        await gw.stop()


async def test_stalled_streamed_upload_is_408_not_502(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A chunked upload that stalls past GATEWAY_CLIENT_BODY_TIMEOUT mid-stream → 408."""
    gw = await started(settings_for(sandbox, client_body_timeout="0.3s",
                                    replay_body_limit="16KiB"))
    try:
        try:
            async with http.post(gw.url + "/__sandbox/echo",
                                 data=_slow_chunks(6, 32768, 0.0, stall=1.0)) as resp:
                assert resp.status == 408
                assert (await resp.json())["error"]["code"] == "request_timeout"
        except aiohttp.ClientOSError:  # the gateway closed while this client still sent
            pass
        assert sample(gw, "responses_total", source="gateway", status="408",
                      code="request_timeout") == 1
        assert sample(gw, "upstream_errors_total", kind="connect") == 0
        assert sample(gw, "upstream_errors_total", kind="protocol") == 0
    finally:
        await gw.stop()


# -- Expect ----------------------------------------------------------------------------------
async def test_expect_100_continue_is_answered_before_the_body(
        gateway: GatewayServer) -> None:
    """The gateway sends 100 Continue after its checks, then takes the body and answers."""
    reader, writer = await raw(gateway, request_bytes(
        "POST", "/__sandbox/echo", {"Content-Length": "5", "Expect": "100-continue"}))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_expect_100_continue_with_oversized_length_is_413_without_100(
        sandbox: Sandbox) -> None:
    gw = await started(settings_for(sandbox, max_body_size="1KiB", replay_body_limit="1KiB"))
    try:
        reader, writer = await raw(gw, request_bytes(
            "POST", "/__sandbox/echo", {"Content-Length": "5000", "Expect": "100-continue"}))
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert first.startswith(b"HTTP/1.1 413")
        writer.close()
    finally:
        await gw.stop()


async def test_expect_other_than_100_continue_is_417(gateway: GatewayServer) -> None:
    reader, writer = await raw(gateway, request_bytes(
        "POST", "/__sandbox/echo", {"Content-Length": "5", "Expect": "something-else"}))
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert first.startswith(b"HTTP/1.1 417")
    assert b"expectation_failed" in first
    writer.close()


async def test_an_error_after_100_continue_is_still_sent(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """An interim 100 does not count as a started response: a later error is a full answer."""
    gw = await started(settings_for(sandbox, client_body_timeout="0.3s"))
    try:
        reader, writer = await raw(gw, request_bytes(
            "POST", "/__sandbox/echo", {"Content-Length": "50", "Expect": "100-continue"}))
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)).startswith(
            b"HTTP/1.1 100")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)  # body never sent
        assert final.startswith(b"HTTP/1.1 408")
        writer.close()
    finally:
        await gw.stop()


# -- shutdown --------------------------------------------------------------------------------
async def test_shutdown_ends_within_one_grace_even_with_hung_requests(
        sandbox: Sandbox, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """With requests hung on the upstream, stop() returns within the grace (plus a small
    cut-off), not twice the grace; the cut-off requests are logged as such."""
    gw = await started(settings_for(sandbox, shutdown_grace="1s"))
    await faults(http, sandbox, {"latency": 10, "path": "/workshops/*", "duration": 30})
    conns = [await raw(gw, request_bytes("GET", SERVICES)) for _ in range(3)]
    await wait_until(lambda: sample(gw, "inflight_requests") == 3)
    t0 = time.monotonic()
    await gw.stop()
    took = time.monotonic() - t0
    assert took < 1.3, took  # aiohttp alone: 2 x the grace
    assert any(d.get("event") == "shutdown_cancelled" for d in
               (json.loads(x) for x in log_capture.lines if x.startswith("{")))
    for _, writer in conns:
        writer.close()


# -- no hidden re-sends ----------------------------------------------------------------------
async def test_aiohttp_silent_resend_is_switched_off(gateway: GatewayServer) -> None:
    """The private switch still exists and is off (an aiohttp upgrade that renames it fails
    here, and in create_session)."""
    session = gateway.state.upstream.session
    assert session._retry_connection is False


async def test_dropped_keepalive_connection_is_one_counted_retry(
        sandbox: Sandbox, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """A reused connection the upstream drops before answering: with retries off the GET is
    a 502 and Repairy saw it once (no silent re-send); with the default (2 attempts) it is
    re-sent once, counted, and logged as retried."""
    gw = await started(settings_for(sandbox, retry_attempts="1"))
    try:
        assert await dropped_reused(gw, sandbox, http, "GET", SERVICES) == (502, 1)
        assert sample(gw, "retries_total", reason="connection_reset") == 0
    finally:
        await gw.stop()
    gw = await started(settings_for(sandbox))
    try:
        assert await dropped_reused(gw, sandbox, http, "GET", SERVICES) == (200, 2)
        assert sample(gw, "retries_total", reason="connection_reset") == 1
        assert request_lines(log_capture)[-1]["retried"] is True
        # A POST on such a connection is not re-sent: nothing proves it was not received.
        assert await dropped_reused(gw, sandbox, http, "POST", "/__sandbox/echo") == (502, 1)
    finally:
        await gw.stop()


async def dropped_reused(gw: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
                         method: str, path: str) -> tuple[int, int]:
    """Open a keep-alive connection with one request, have the upstream drop it without an
    answer on the next: that one's status, and how many requests the upstream saw for it."""
    async with http.request(method, gw.url + path, data=b"x" if method == "POST" else None
                            ) as resp:
        assert resp.status == 200
    before = (await stats(http, sandbox))["api_requests"]
    await faults(http, sandbox, {"reset": True, "scope": "api"})
    async with http.request(method, gw.url + path,
                            data=b"x" if method == "POST" else None) as resp:
        status = resp.status
    return status, (await stats(http, sandbox))["api_requests"] - before


async def test_reset_on_a_fresh_connection_is_not_retried(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Only a *reused* connection's drop is the keep-alive race; on a new one it is a 502."""
    gw = await started(settings_for(sandbox, keepalive_timeout="0"))
    try:
        before = (await stats(http, sandbox))["api_requests"]
        await faults(http, sandbox, {"reset": True, "scope": "api"})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 502
        assert (await stats(http, sandbox))["api_requests"] - before == 1
    finally:
        await gw.stop()


# -- headers passed back unchanged -----------------------------------------------------------
async def test_response_without_content_type_gets_none_added_nor_server(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    await faults(http, sandbox, {"bare": True, "body": "plain", "scope": "api"})
    async with http.get(gateway.url + SERVICES) as resp:
        assert resp.status == 200
        assert await resp.read() == b"plain"
        assert "Content-Type" not in resp.headers
        assert "Server" not in resp.headers
        assert "Date" in resp.headers


async def test_upstream_server_header_passes_back_and_errors_carry_no_server(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + SERVICES) as resp:
        assert resp.headers.get("Server", "").startswith("Python")  # the sandbox's own
    async with http.get(gateway.url + "/auth/token") as resp:
        assert resp.status == 403
        assert "Server" not in resp.headers


# -- idle connections ------------------------------------------------------------------------
async def test_connection_that_sends_nothing_is_closed_at_the_header_timeout(
        sandbox: Sandbox) -> None:
    gw = await started(settings_for(sandbox, header_timeout="0.3s"))
    try:
        reader, writer = await asyncio.open_connection(*host_port(gw))
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(100), 3) == b""
        assert time.monotonic() - t0 < 1.0
        writer.close()
    finally:
        await gw.stop()
