"""Hostile and malformed requests over raw sockets: each is refused with a 4xx JSON error,
nothing reaches Repairy, nothing leaks, the refusal is counted, and the gateway keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.app import GatewayServer
from gateway.errors import GatewayError
from gateway.proxy.inbound import check_target, check_target_fully
from gateway.sandbox import Sandbox
from tests.conftest import LEAK_MARKERS
from tests.gateway_helpers import SERVICES, settings_for, wait_until

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

S = SERVICES.encode()
H = b"Host: gw\r\n"


def _req(line: bytes, headers: bytes = H, body: bytes = b"") -> bytes:
    return line + b"\r\n" + headers + b"\r\n" + body


#: (name, raw request, expected status). Every one must be refused and never forwarded.
CORPUS: list[tuple[str, bytes, int]] = [
    # request smuggling: conflicting framing
    ("cl-and-te", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: 5\r\n"
                       b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("duplicate-cl-differing", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: 5\r\n"
                                    b"Content-Length: 6\r\n", b"hello!"), 400),
    ("duplicate-cl-same", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: 5\r\n"
                               b"Content-Length: 5\r\n", b"hello"), 400),
    ("cl-list", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: 5, 5\r\n", b"hello"),
     400),
    ("te-gzip-chunked", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: gzip, "
                             b"chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-xchunked", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: xchunked\r\n",
                         b"0\r\n\r\n"), 400),
    ("te-twice", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: chunked\r\n"
                      b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-on-http10", _req(b"POST /bookings HTTP/1.0", H + b"Transfer-Encoding: chunked\r\n",
                          b"0\r\n\r\n"), 400),
    ("te-identity", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: identity\r\n",
                         b""), 400),
    ("cl-negative", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: -1\r\n"), 400),
    ("cl-plus", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: +5\r\n", b"hello"), 400),
    ("cl-not-a-number", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: five\r\n"), 400),
    ("cl-huge-number", _req(b"POST /bookings HTTP/1.1",
                            H + b"Content-Length: 99999999999999999999999\r\n"), 400),
    ("chunk-size-not-hex", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: chunked"
                                b"\r\n", b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-nul", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: chunked\r\n",
                           b"5;\x00\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-overflow", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: chunked"
                                 b"\r\n", b"fffffffffffffffffffff\r\nx\r\n"), 400),
    # header syntax
    ("obs-fold", _req(b"GET " + S + b" HTTP/1.1", H + b"X-A: a\r\n b\r\n"), 400),
    ("cr-in-value", _req(b"GET " + S + b" HTTP/1.1", H + b"X-A: a\rb\r\n"), 400),
    ("nul-in-value", _req(b"GET " + S + b" HTTP/1.1", H + b"X-A: a\x00b\r\n"), 400),
    ("lf-only-lines", b"GET " + S + b" HTTP/1.1\nHost: gw\n\n", 400),
    ("space-in-name", _req(b"GET " + S + b" HTTP/1.1", H + b"X A: b\r\n"), 400),
    ("space-before-colon", _req(b"GET " + S + b" HTTP/1.1", H + b"X-A : b\r\n"), 400),
    ("no-colon", _req(b"GET " + S + b" HTTP/1.1", H + b"JustAName\r\n"), 400),
    ("non-ascii-name", _req(b"GET " + S + b" HTTP/1.1", H + b"X-\xc3\xa9: b\r\n"), 400),
    ("two-hosts", _req(b"GET " + S + b" HTTP/1.1", H + b"Host: evil.example\r\n"), 400),
    ("no-host-http11", _req(b"GET " + S + b" HTTP/1.1", b""), 400),
    # sizes and floods
    ("request-line-too-long", _req(b"GET /workshops/" + b"a" * 10_000 + b" HTTP/1.1"), 414),
    ("query-too-long", _req(b"GET " + S + b"?q=" + b"a" * 10_000 + b" HTTP/1.1"), 414),
    ("header-too-long", _req(b"GET " + S + b" HTTP/1.1", H + b"X-A: " + b"a" * 10_000 + b"\r\n"),
     431),
    ("header-flood", _req(b"GET " + S + b" HTTP/1.1",
                          H + b"".join(b"X-%d: a\r\n" % i for i in range(200))), 431),
    ("cookie-flood", _req(b"GET " + S + b" HTTP/1.1",
                          H + b"".join(b"Cookie: c%d=v\r\n" % i for i in range(150))), 431),
    ("declared-body-too-large", _req(b"POST /bookings HTTP/1.1",
                                     H + b"Content-Length: 5000000\r\n"), 413),
    # methods and versions
    ("bad-method-chars", _req(b"G@T " + S + b" HTTP/1.1"), 400),
    ("lowercase-method", _req(b"get " + S + b" HTTP/1.1"), 400),
    ("connect", _req(b"CONNECT evil.example:443 HTTP/1.1", b"Host: evil.example:443\r\n"), 405),
    ("trace", _req(b"TRACE " + S + b" HTTP/1.1"), 405),
    ("purge", _req(b"PURGE " + S + b" HTTP/1.1"), 405),
    ("http09", b"GET " + S + b"\r\n\r\n", 400),
    ("http2-text", _req(b"GET " + S + b" HTTP/2.0"), 400),
    ("http12", _req(b"GET " + S + b" HTTP/1.2"), 400),
    ("bad-protocol-name", _req(b"GET " + S + b" HTTX/1.1"), 400),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    # targets that would leave the upstream or its path prefix, or reach /auth
    ("absolute-form", _req(b"GET http://evil.example/workshops HTTP/1.1"), 400),
    ("absolute-https", _req(b"GET https://evil.example:443/ HTTP/1.1"), 400),
    ("absolute-userinfo", _req(b"GET http://user:pw@evil.example/ HTTP/1.1"), 400),
    ("scheme-relative", _req(b"GET //evil.example/x HTTP/1.1"), 400),
    ("asterisk", _req(b"OPTIONS * HTTP/1.1"), 400),
    ("dotdot", _req(b"GET /workshops/../auth/token HTTP/1.1"), 400),
    ("encoded-dotdot", _req(b"GET /workshops/%2e%2e/%2e%2e/other HTTP/1.1"), 400),
    ("encoded-slash-dotdot", _req(b"GET /..%2f..%2fauth/token HTTP/1.1"), 400),
    ("backslash", _req(b"GET /x\\..\\auth/token HTTP/1.1"), 400),
    ("auth-token", _req(b"POST /auth/token HTTP/1.1", H + b"Content-Length: 2\r\n", b"{}"), 403),
    ("auth-refresh-upper", _req(b"POST /AUTH/refresh HTTP/1.1"), 403),
    ("auth-encoded-slash", _req(b"POST /auth%2ftoken HTTP/1.1"), 403),
    ("fragment", _req(b"GET /workshops/x/services#frag HTTP/1.1"), 400),
    ("encoded-crlf", _req(b"GET /workshops%0d%0aX-Injected:%201/services HTTP/1.1"), 400),
    ("encoded-nul", _req(b"GET /workshops/a%00b/services HTTP/1.1"), 400),
    ("tab-in-target", _req(b"GET /a\tb HTTP/1.1"), 400),
    # encodings
    ("bad-percent", _req(b"GET /workshops/%zz/services HTTP/1.1"), 400),
    ("truncated-percent", _req(b"GET /workshops/%f HTTP/1.1"), 400),
    ("invalid-utf8-path", _req(b"GET /workshops/%ff%fe/services HTTP/1.1"), 400),
    ("invalid-utf8-query", _req(b"GET " + S + b"?q=%ff HTTP/1.1"), 400),
    ("bad-percent-query", _req(b"GET " + S + b"?q=%zz HTTP/1.1"), 400),
    ("raw-high-byte", _req(b"GET /workshops/\xff/services HTTP/1.1"), 400),
    # bodies that lie about their length (the gateway waits, then gives up)
    ("body-shorter-than-cl", _req(b"POST /bookings HTTP/1.1", H + b"Content-Length: 100\r\n",
                                  b'{"a":'), 408),
    ("chunked-never-ends", _req(b"POST /bookings HTTP/1.1", H + b"Transfer-Encoding: chunked"
                                b"\r\n", b"5\r\nhello\r\n"), 408),
]


@pytest.mark.unit
def test_security_corpus_has_at_least_fifty_cases() -> None:
    """The bad-input corpus is large enough to mean something."""
    assert len(CORPUS) >= 50
    assert len({name for name, _, _ in CORPUS}) == len(CORPUS)


async def exchange(url: str, raw: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, return everything the gateway answers before closing (or ``wait``)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        data = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and _complete(data):
                break
        return data
    finally:
        writer.close()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def status_of(answer: bytes) -> int:
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1


@pytest.fixture
async def strict_gateway(sandbox: Sandbox) -> AsyncIterator[GatewayServer]:
    settings = settings_for(sandbox, client_body_timeout="0.3s", header_timeout="1s",
                            max_body_size="1MiB", replay_body_limit="64KiB")
    async with GatewayServer(settings) as gw:
        await wait_until(gw.state.tokens.ready)
        yield gw


def gateway_rejections(gw: GatewayServer) -> float:
    total = 0.0
    for metric in gw.metrics.registry.collect():
        if metric.name == "repairy_gateway_responses":
            total += sum(s.value for s in metric.samples
                         if s.name.endswith("_total") and s.labels["source"] == "gateway")
    return total


async def test_security_bad_input_corpus_is_refused_and_never_forwarded(
        strict_gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Each hostile request: a 4xx JSON error with a code, nothing forwarded, nothing
    leaked, one rejection counted; a good request right after still works."""
    counters = sandbox.state.control.counters
    for name, raw, expected in CORPUS:
        before = (counters["api_requests"], counters["token_requests"],
                  gateway_rejections(strict_gateway))
        answer = await exchange(strict_gateway.url, raw)
        assert status_of(answer) == expected, (name, answer[:200])
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"X-Repairy-Gateway-Error: " in head, name
        assert json.loads(body)["error"]["code"], name
        assert not any(m.encode() in answer for m in LEAK_MARKERS), name
        after = (counters["api_requests"], counters["token_requests"],
                 gateway_rejections(strict_gateway))
        assert after[:2] == before[:2], f"{name} reached the upstream"
        assert after[2] == before[2] + 1, f"{name} was not counted"
        async with http.get(strict_gateway.url + SERVICES) as resp:
            assert resp.status == 200, f"gateway unhealthy after {name}"
        counters["api_requests"] -= 1  # the health probe above


async def test_security_slowloris_headers_are_cut_off_while_others_are_served(
        strict_gateway: GatewayServer, http: aiohttp.ClientSession) -> None:
    """A client trickling its headers is answered 408 and closed after header_timeout;
    meanwhile normal requests are served."""
    host, port = strict_gateway.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    received = bytearray()

    async def collect() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(4096):
                received.extend(chunk)

    collector = asyncio.create_task(collect())
    started = time.monotonic()
    writer.write(b"GET " + S + b" HTTP/1.1\r\nHost: gw\r\n")
    for i in range(40):
        if collector.done():
            break
        with contextlib.suppress(ConnectionError):
            writer.write(b"X-Slow-%d: 1\r\n" % i)
        async with http.get(strict_gateway.url + SERVICES) as resp:
            assert resp.status == 200  # others are served meanwhile
        await asyncio.sleep(0.1)
    await asyncio.wait_for(collector, 5)
    closed_after = time.monotonic() - started
    writer.close()
    assert bytes(received).startswith(b"HTTP/1.1 408 ")
    assert b'"request_timeout"' in received
    assert 0.9 < closed_after < 3.0


async def test_security_idle_keepalive_connections_are_closed(sandbox: Sandbox) -> None:
    """An idle client connection is closed after client_keepalive_timeout."""
    async with GatewayServer(settings_for(sandbox, client_keepalive_timeout="0.3s")) as gw:
        await wait_until(gw.state.tokens.ready)
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET " + S + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first.startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        await asyncio.wait_for(reader.read(), 5)  # body, then EOF when the server closes
        assert reader.at_eof()
        assert time.monotonic() - started < 3
        writer.close()


_TARGET_CHARS = st.sampled_from([*"/abcXYZ019._-~%?#=&+;:@!$'()*,\\ é", "%2e", "%2F", "..",
                                 "/auth"])


@pytest.mark.unit
@given(parts=st.lists(_TARGET_CHARS, min_size=1, max_size=12))
@settings(max_examples=500)
def test_security_plain_target_shortcut_agrees_with_the_full_check(parts: list[str]) -> None:
    """Whatever the target, the fast path for plain targets decides exactly as the full
    check: the same decoded path, or the same refusal."""
    raw = "/" + "".join(parts)
    auth = ("/auth/token", "/auth/refresh")

    def outcome(check: Callable[[str, tuple[str, ...]], str]) -> object:
        try:
            return check(raw, auth)
        except GatewayError as exc:
            return (type(exc), exc.code)

    assert outcome(check_target) == outcome(check_target_fully)
