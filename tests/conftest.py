"""Shared fixtures: a real sandbox on a free loopback port, a client session, a gateway, and
a log capture that fails any test whose logs carry a token or a secret."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.errors import GATEWAY_ERROR_HEADER
from gateway.logs import JsonFormatter, TextFormatter
from gateway.sandbox import Sandbox, SandboxConfig
from tests.fleet_helpers import RedisServer
from tests.gateway_helpers import settings_for, wait_until


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A real redis-server on a free loopback port (installed from Debian if missing)."""
    server = RedisServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig()) as sb:
        yield sb


#: Bodies of gateway-made responses seen by the ``http`` fixture in the current test.
GATEWAY_BODIES: list[str] = []


async def _collect_gateway_bodies(req: aiohttp.ClientRequest,
                                  handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    resp = await handler(req)
    if GATEWAY_ERROR_HEADER in resp.headers:
        GATEWAY_BODIES.append((await resp.read()).decode(errors="replace"))
    return resp


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session; gateway-made response bodies are kept for the leak check."""
    async with aiohttp.ClientSession(middlewares=(_collect_gateway_bodies,)) as session:
        yield session


@pytest.fixture
async def gateway(sandbox: Sandbox) -> AsyncIterator[GatewayServer]:
    """The gateway in-process, pointed at the default sandbox, ready (holding a token)."""
    async with GatewayServer(settings_for(sandbox)) as gw:
        await wait_until(gw.state.tokens.ready)
        yield gw


#: Substrings that must never reach a log line: sandbox tokens carry these prefixes, and these
#: are the App Keys/Secrets the tests use.
LEAK_MARKERS = ("sbx_at_", "sbx_rt_", "sandbox-app-secret", "sandbox-app-key",
                "rotated-secret", "old-app-secret", "new-app-secret", "client-key-",
                "egress-proxy-secret",
                # the egress proxy's Basic credentials as they would travel (gw:egress-proxy-secret)
                "Z3c6ZWdyZXNzLXByb3h5LXNlY3JldA")


class LogCapture(logging.Handler):
    """Every record, formatted both as JSON and as text (what operators would see)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._json, self._text = JsonFormatter(), TextFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self._json.format(record))
        self.lines.append(self._text.format(record))


@pytest.fixture(autouse=True)
def log_capture() -> Iterator[LogCapture]:
    """Capture all logging at DEBUG (and the audit trail) during a test; afterwards, no log
    or audit line and no gateway-made response body may carry a token or a secret."""
    cap = LogCapture()
    GATEWAY_BODIES.clear()
    root = logging.getLogger()
    audit = logging.getLogger("audit")  # its own logger, not passed on to the root's
    old_level, old_audit, old_propagate = root.level, audit.level, audit.propagate
    root.addHandler(cap)
    audit.addHandler(cap)
    audit.propagate = False  # as serve sets it up: once, not twice
    root.setLevel(logging.DEBUG)
    audit.setLevel(logging.INFO)
    try:
        yield cap
    finally:
        root.removeHandler(cap)
        audit.removeHandler(cap)
        root.setLevel(old_level)
        audit.setLevel(old_audit)
        audit.propagate = old_propagate
    leaked = sorted({m for line in cap.lines for m in LEAK_MARKERS if m in line})
    assert not leaked, f"log lines carry secret material: {leaked}"
    leaked = sorted({m for body in GATEWAY_BODIES for m in LEAK_MARKERS if m in body})
    assert not leaked, f"gateway responses carry secret material: {leaked}"


# -- what each test is: unit, integration or system (pyproject.toml registers them) ----------
CATEGORIES = ("unit", "integration", "system")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test says what it is, once: its module's ``CATEGORY``, or a mark on the test
    function that overrides it (a mark, so that ``pytest -m unit`` selects on it). A mark on a
    class or a ``pytestmark`` would add a second category: refused."""
    wrong = []
    for item in items:
        own = [m.name for m in item.own_markers if m.name in CATEGORIES]
        module = getattr(getattr(item, "module", None), "CATEGORY", None)
        if not own and module in CATEGORIES:
            item.add_marker(module)
        marks = {m.name for m in item.iter_markers() if m.name in CATEGORIES}
        if len(marks) != 1:
            wrong.append(f"{item.nodeid} ({', '.join(sorted(marks)) or 'none'})")
    if wrong:
        raise pytest.UsageError("every test is exactly one of unit, integration, system "
                                "(its module's CATEGORY, or a mark of its own): "
                                + "; ".join(wrong[:10]))


class _NotInAUnitTest(AssertionError):
    pass


def _refuse(what: str) -> object:
    def refused(*_args: object, **_kwargs: object) -> object:
        raise _NotInAUnitTest(f"a unit test must not {what}: mark it integration")
    return refused


@pytest.fixture(autouse=True)
def unit_stays_in_process(request: pytest.FixtureRequest,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``unit`` test opens no socket to anything and starts no process: enforced, so the
    mark cannot drift from what the test does (the event loop's own socketpair is allowed)."""
    if request.node.get_closest_marker("unit") is None:
        return
    import _posixsubprocess
    import os
    import socket
    import subprocess

    for name in ("bind", "connect", "connect_ex", "sendto", "sendmsg"):
        monkeypatch.setattr(socket.socket, name, _refuse(f"{name} a socket"))
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                 "getnameinfo"):
        monkeypatch.setattr(socket, name, _refuse("resolve a name"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
    monkeypatch.setattr(_posixsubprocess, "fork_exec", _refuse("start a process"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        monkeypatch.setattr(os, name, _refuse("start a process"))
