"""The auth client at its edges, over real sockets: what a timeout proves about whether the
request was sent, ``Retry-After`` in both forms, and error codes that echo a credential."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from gateway.clock import SystemClock
from gateway.errors import AuthError
from gateway.retry_after import parse_retry_after
from gateway.token.auth_client import (
    error_code,
)
from gateway.wiring import auth_client, auth_session
from tests.gateway_helpers import settings_for

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: a connection attempt hangs in the handshake."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    yield port
    for c in fillers:
        c.close()
    srv.close()


@pytest.fixture
async def silent() -> AsyncIterator[int]:
    """A server that reads the request and never answers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def login_error(port: int) -> AuthError:
    s = settings_for(f"http://127.0.0.1:{port}", connect_timeout="0.3s", auth_timeout="0.6s")
    async with auth_session(s) as session:
        with pytest.raises(AuthError) as info:
            await auth_client(session, s, SystemClock()).login()
    return info.value


@pytest.mark.integration
async def test_auth_timeout_before_sending_is_not_ambiguous(blackhole: int) -> None:
    """No connection in time: nothing was sent, so a refresh token would still be good."""
    exc = await login_error(blackhole)
    assert (exc.reason, exc.ambiguous) == ("timeout", False)


@pytest.mark.integration
async def test_auth_timeout_after_sending_is_ambiguous(silent: int) -> None:
    """Sent but unanswered: the request may have been acted on."""
    exc = await login_error(silent)
    assert (exc.reason, exc.ambiguous) == ("timeout", True)


def test_auth_retry_after_seconds_and_http_date() -> None:
    """Retry-After as delay-seconds or an HTTP date; junk, NaN and infinities are ignored."""
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    wall = now.timestamp()
    assert parse_retry_after("5", wall) == 5.0
    assert parse_retry_after(" 2.5 ", wall) == 2.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True),
                             wall) == pytest.approx(90)
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), wall) == 0
    assert parse_retry_after("9" * 400, wall) == 1e9
    for junk in (None, "", "soon", "nan", "inf", "-inf", "Tue, 99 Foo 2026 99:00:00 GMT", "²",
                 "1" + "0" * 400 + ".5", "١٢"):
        assert parse_retry_after(junk, wall) is None, junk


@pytest.mark.parametrize("body", [
    b'{"error": "the-app-secret-value"}',
    b'{"error": {"code": "xthe-app-secret-valuex"}}',
    b'{"code": "the-app-secret"}',
])
def test_auth_error_code_never_carries_a_credential(body: bytes) -> None:
    """An error code equal to, containing or contained in a credential is dropped."""
    assert error_code(body, ["the-app-secret-value", "app-key-1"]) is None


def test_auth_error_code_keeps_an_ordinary_code() -> None:
    """A short code that is no credential is kept for the log line."""
    assert error_code(b'{"error": {"code": "invalid_credentials"}}',
                      ["the-app-secret-value"]) == "invalid_credentials"
