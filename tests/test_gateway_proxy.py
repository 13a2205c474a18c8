"""The proxy path: headers, targets, bodies, gateway-made errors — over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from gateway.app import GatewayServer
from gateway.errors import GATEWAY_ERROR_HEADER
from gateway.redact import fingerprint
from gateway.sandbox import Sandbox, pattern_bytes
from tests.gateway_helpers import SERVICES, settings_for, wait_until
from tests.metrics_helpers import value as metric_value
from tests.sandbox_helpers import faults, stats

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def last_request(http: aiohttp.ClientSession, sb: Sandbox) -> dict[str, Any]:
    async with http.get(f"{sb.url}/__sandbox/requests?limit=1") as resp:
        (entry,) = (await resp.json())["requests"]
    return dict(entry)


async def test_proxy_strips_caller_credentials_and_injects_ours(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Caller Authorization/X-Partner-ID/Proxy-Authorization never reach Repairy; ours do."""
    async with http.get(gateway.url + SERVICES, headers={
            "Authorization": "Bearer caller-token", "X-Partner-ID": "someone-else",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==", "X-Custom": "kept"}) as resp:
        assert resp.status == 200
    entry = await last_request(http, sandbox)
    headers = entry["headers"]
    assert isinstance(headers, list)
    names = [h[0].lower() for h in headers]
    assert names.count("authorization") == 1 and names.count("x-partner-id") == 1
    got = {h[0].lower(): h[1] for h in headers}
    token = gateway.state.tokens.current
    assert token is not None
    assert got["authorization"] == f"Bearer fp:{fingerprint(token.access)}"
    assert got["x-partner-id"] == sandbox.state.config.partner_id
    assert "proxy-authorization" not in got
    assert got["x-custom"] == "kept"
    assert got["host"] == sandbox.url.removeprefix("http://")


async def test_proxy_preserves_query_and_encoded_path_bytes(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Percent-encoding, odd query strings and repeated keys arrive byte for byte."""
    raw = "/__sandbox/echo/a%2Fb%20c/%C3%A9?x=1&x=2&y=%2F%3D&empty=&flag"
    async with http.get(yarl.URL(gateway.url + raw, encoded=True)) as resp:
        assert resp.status == 200
    entry = await last_request(http, sandbox)
    assert entry["path"] == "/__sandbox/echo/a%2Fb%20c/%C3%A9"
    assert entry["query"] == "x=1&x=2&y=%2F%3D&empty=&flag"


async def test_proxy_passes_upstream_status_headers_and_body_unchanged(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """An upstream 404 comes back as is: same JSON, no gateway error header."""
    async with http.get(gateway.url + "/bookings/000000000000000000000000") as resp:
        assert resp.status == 404
        assert GATEWAY_ERROR_HEADER not in resp.headers
        assert (await resp.json())["error"]["code"] == "booking_not_found"


async def test_proxy_request_id_passed_on_or_generated(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A caller's X-Request-ID reaches Repairy and comes back; without one, one is made."""
    async with http.get(gateway.url + SERVICES, headers={"X-Request-ID": "abc-123"}) as resp:
        assert resp.headers["X-Request-ID"] == "abc-123"
    assert dict((await last_request(http, sandbox))["headers"])["X-Request-ID"] == "abc-123"
    async with http.get(gateway.url + SERVICES) as resp:
        made = resp.headers["X-Request-ID"]
    assert len(made) == 32
    assert dict((await last_request(http, sandbox))["headers"])["X-Request-ID"] == made


async def test_proxy_drops_hop_by_hop_headers(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Headers named in Connection, and hop-by-hop ones, are not forwarded."""
    async with http.get(gateway.url + SERVICES, headers={
            "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "TE": "trailers",
            "Upgrade": "h2c", "Keep-Alive": "timeout=5"}) as resp:
        assert resp.status == 200
    got = {h[0].lower() for h in (await last_request(http, sandbox))["headers"]}
    assert not got & {"x-secret-hop", "te", "upgrade", "keep-alive"}


@pytest.mark.parametrize("path", ["/auth/token", "/auth/refresh", "/AUTH/token", "/auth",
                                  "/auth%2Ftoken", "/x/../auth/token"])
async def test_proxy_refuses_auth_routes(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        path: str) -> None:
    """/auth/* is the gateway's own business: 4xx JSON, nothing forwarded."""
    before = await stats(http, sandbox)
    async with http.post(yarl.URL(gateway.url + path, encoded=True), json={}) as resp:
        assert resp.status in (400, 403)
        body = await resp.json()
        assert resp.headers[GATEWAY_ERROR_HEADER] == body["error"]["code"]
        assert body["error"]["code"] in ("auth_route_forbidden", "invalid_path")
    after = await stats(http, sandbox)
    assert after["token_requests"] == before["token_requests"]
    assert after["api_requests"] == before["api_requests"]


async def test_proxy_upstream_unreachable_is_502(http: aiohttp.ClientSession) -> None:
    """A closed upstream port gives 502 upstream_unreachable (and 503 while no token)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with GatewayServer(settings_for(f"http://127.0.0.1:{port}")) as gw, \
            http.get(gw.url + SERVICES) as resp:
        assert resp.status == 503
        body = await resp.json()
        assert body["error"]["code"] == "token_unavailable"
        assert "Retry-After" in resp.headers


async def test_proxy_upstream_errors_after_login(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """With a token held: slow upstream → 504, dropped connection → 502; each JSON-coded."""
    async with GatewayServer(settings_for(sandbox, read_timeout="0.3s")) as gw:
        await wait_until(gw.state.tokens.ready)
        await faults(http, sandbox, {"latency": 1.0, "path": "/workshops/*"})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["code"] == "upstream_timeout"
        await faults(http, sandbox, {"status": 502, "path": "/workshops/*"})
        async with http.get(gw.url + SERVICES) as resp:
            assert resp.status == 502  # the upstream's own 502 passes through as is
            assert GATEWAY_ERROR_HEADER not in resp.headers


async def test_proxy_body_over_limit_is_413_and_not_forwarded(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A declared body over max_body_size → 413 before anything is sent upstream."""
    async with GatewayServer(settings_for(sandbox, max_body_size="100KiB",
                                          replay_body_limit="10KiB")) as gw:
        await wait_until(gw.state.tokens.ready)
        before = await stats(http, sandbox)
        async with http.post(gw.url + "/__sandbox/echo", data=b"x" * 200_000) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"
        assert (await stats(http, sandbox))["api_requests"] == before["api_requests"]


async def _body_chunks(total: int, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    block = b"\xab" * chunk
    sent = 0
    while sent < total:
        piece = block[: min(chunk, total - sent)]
        sent += len(piece)
        yield piece


async def test_proxy_streams_50mb_upload_and_download_with_bounded_memory(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """50 MB each way pass through intact while Python's peak heap grows by under 16 MB."""
    size = 50 * 1024 * 1024
    up_sha = hashlib.sha256(b"\xab" * size).hexdigest()
    down_sha = hashlib.sha256(pattern_bytes(size)).hexdigest()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        async with http.put(gateway.url + "/__sandbox/echo", data=_body_chunks(size)) as resp:
            assert resp.status == 200
            echoed = (await resp.json())["data"]
        assert echoed["size"] == size
        assert echoed["sha256"] == up_sha
        digest, got = hashlib.sha256(), 0
        async with http.get(gateway.url + f"/__sandbox/bytes/{size}") as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(1 << 16):
                digest.update(chunk)
                got += len(chunk)
        assert got == size
        assert digest.hexdigest() == down_sha
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 16 * 1024 * 1024, f"peak grew by {(peak - base) >> 20} MiB"


async def test_proxy_chunked_request_and_response_pass_through(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """A chunked upload (unknown length) and a chunked download arrive whole."""
    async with http.post(gateway.url + "/__sandbox/echo",
                         data=_body_chunks(3 * 1024 * 1024, 100_000)) as resp:
        assert (await resp.json())["data"]["size"] == 3 * 1024 * 1024
    async with http.get(gateway.url + "/__sandbox/bytes/500000?chunked=1") as resp:
        assert resp.headers.get("Content-Length") is None
        assert await resp.read() == pattern_bytes(500_000)


async def test_proxy_head_and_no_body_methods(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """HEAD returns headers only; DELETE/OPTIONS/PATCH are forwarded like any method."""
    async with http.head(gateway.url + "/__sandbox/bytes/1234") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1234"
    for method in ("DELETE", "OPTIONS", "PATCH"):
        async with http.request(method, gateway.url + "/__sandbox/echo") as resp:
            assert resp.status == 200
            assert (await resp.json())["data"]["method"] == method


async def test_proxy_listens_on_unix_socket(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """GATEWAY_LISTEN=unix:/path serves the proxy on a unix socket."""
    sock = tmp_path / "gw.sock"
    async with GatewayServer(settings_for(sandbox, listen=f"unix:{sock}")) as gw:
        assert gw.url == f"unix:{sock}"
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as h, \
                h.get("http://gateway" + SERVICES) as resp:
            assert resp.status == 200
    assert not sock.exists()


async def test_proxy_admin_health_and_readiness(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """/healthz is 200; /readyz is 200 with a token, 503 with reasons while draining."""
    async with http.get(gateway.admin_url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(gateway.admin_url + "/readyz") as resp:
        assert resp.status == 200
    gateway.state.draining = True
    async with http.get(gateway.admin_url + "/readyz") as resp:
        assert resp.status == 503
        assert "draining" in (await resp.json())["reasons"][0]
    gateway.state.draining = False
    async with http.get(gateway.url + "/healthz") as resp:
        # The proxy port only proxies: /healthz there is Repairy's (unknown) path.
        assert resp.status == 404
        assert GATEWAY_ERROR_HEADER not in resp.headers


async def test_proxy_keeps_upstream_connections_alive(
        gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """Sequential requests reuse pooled upstream connections."""
    for _ in range(20):
        async with http.get(gateway.url + SERVICES) as resp:
            assert resp.status == 200
    connector = gateway.state.upstream.session.connector
    assert connector is not None
    # One connection was enough for twenty sequential requests.
    assert sum(len(v) for v in connector._conns.values()) == 1
    await asyncio.sleep(0)


async def _raw_exchange(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_proxy_requests_leave_no_reference_cycles(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A request's objects are freed when it ends, not at the garbage collector's next pass:
    with the collector off, none of the request path's objects outlive their requests
    (forwarded, with a body, refused, an upstream 404 and 503, a 401 replay). A request that
    fails upstream (a reset, a timeout, a body broken mid-stream) still leaves one through its
    exception's traceback: not covered."""
    import gc

    from gateway.proxy.outcome import Outcome
    from gateway.proxy.retry import Attempts

    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            async with http.get(gateway.url + SERVICES) as resp:
                assert resp.status == 200
            async with http.post(gateway.url + "/__sandbox/echo/x", data=b"{}") as resp:
                assert resp.status == 200
            async with http.get(gateway.url + "/auth/token") as resp:
                assert resp.status == 403
            async with http.get(gateway.url + "/bookings/000000000000000000000000") as resp:
                assert resp.status == 404
        await faults(http, sandbox, {"status": 401, "path": "/workshops/*", "count": 1})
        async with http.get(gateway.url + SERVICES) as resp:
            assert resp.status == 200
        await faults(http, sandbox, {"status": 503, "path": "/workshops/*", "count": 1})
        async with http.get(gateway.url + SERVICES) as resp:
            assert resp.status == 503  # the upstream's, passed back
        await asyncio.sleep(0.05)  # the handlers' tasks finish after their answers
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass finds unreachable is kept, to look at
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage
                  if isinstance(o, Outcome | Attempts | aiohttp.web.BaseRequest)]
        assert cyclic == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_proxy_request_path_never_asks_asyncio_for_its_loop(
        gateway: GatewayServer, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``asyncio.get_running_loop()`` makes a ``getpid`` system call each time: the request
    path (header deadlines, the access line's batch) is handed its loop instead."""
    import sys

    real = asyncio.get_running_loop
    callers: list[str] = []

    def counting() -> asyncio.AbstractEventLoop:
        callers.append(sys._getframe(1).f_code.co_filename)
        return real()

    async with http.get(gateway.url + SERVICES) as resp:  # the connection is made
        assert resp.status == 200
    monkeypatch.setattr(asyncio, "get_running_loop", counting)
    for _ in range(10):
        async with http.get(gateway.url + SERVICES) as resp:
            assert resp.status == 200
    monkeypatch.setattr(asyncio, "get_running_loop", real)
    assert [c for c in callers if "/gateway/" in c] == []


async def test_proxy_adds_none_of_the_client_librarys_own_headers(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A caller that sends no User-Agent, Accept, Accept-Encoding or Content-Type (a raw
    socket: aiohttp's client would add its own) gets none added upstream, with or without a
    body; one that sends them has them forwarded as sent."""
    auto = {"user-agent", "accept", "accept-encoding", "content-type"}
    for request in (b"GET " + SERVICES.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                    b"Connection: close\r\n\r\n",
                    b"POST /__sandbox/echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\n{}"):
        answer = await _raw_exchange(gateway.url, request)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        got = {h[0].lower() for h in (await last_request(http, sandbox))["headers"]}
        assert not got & auto, got & auto
    sent = {"User-Agent": "booking-app/1.0", "Accept": "application/json",
            "Accept-Encoding": "identity", "Content-Type": "application/json"}
    async with http.post(gateway.url + "/__sandbox/echo/y", data=b"{}", headers=sent) as resp:
        assert resp.status == 200
    got_values = {h[0].lower(): h[1] for h in (await last_request(http, sandbox))["headers"]}
    assert {k.lower(): v for k, v in sent.items()}.items() <= got_values.items()


@pytest.mark.parametrize("target", [b"http://evil.example/workshops", b"//evil.example/x",
                                    b"https://evil.example:443/"])
async def test_proxy_never_contacts_another_host(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        target: bytes) -> None:
    """Absolute-form and scheme-relative targets are refused with 400; nothing goes out."""
    before = await stats(http, sandbox)
    answer = await _raw_exchange(gateway.url, b"GET " + target + b" HTTP/1.1\r\n"
                                 b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"invalid_target"' in answer
    assert (await stats(http, sandbox))["api_requests"] == before["api_requests"]


async def test_proxy_caller_host_header_is_replaced(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A caller Host naming another host still goes to the configured upstream, Host fixed."""
    answer = await _raw_exchange(gateway.url, b"GET " + SERVICES.encode() + b" HTTP/1.1\r\n"
                                 b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    got = dict((await last_request(http, sandbox))["headers"])
    assert got["Host"] == sandbox.url.removeprefix("http://")


async def test_proxy_small_body_broken_upstream_is_a_clean_502(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """A small upstream answer whose body breaks becomes a JSON 502, not a truncated 200."""
    # small: the gateway reads it whole before answering
    await faults(http, sandbox, {"drop": True, "path": "/bookings/*", "length": 1000})
    async with http.get(gateway.url + "/bookings/abc") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_invalid_response"
    assert metric_value(gateway.metrics.registry,
        "repairy_gateway_upstream_errors_total", {"kind": "protocol"}) == 1


async def test_proxy_passes_trace_context_untouched(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """W3C trace context reaches Repairy exactly as the caller sent it."""
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    async with http.get(gateway.url + SERVICES, headers={"traceparent": parent,
                                                         "tracestate": state}) as resp:
        assert resp.status == 200
    headers = {name.lower(): value for name, value in
               (await last_request(http, sandbox))["headers"]}
    assert headers["traceparent"] == parent
    assert headers["tracestate"] == state
