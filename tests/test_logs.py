"""Structured logs: one JSON line per request and per token event; text format; no leaks."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import aiohttp

from gateway.app import GatewayServer
from gateway.logs import setup_logging
from gateway.sandbox import Sandbox
from tests.conftest import LEAK_MARKERS, LogCapture
from tests.sandbox_helpers import faults


def events(cap: LogCapture, event: str) -> list[dict[str, Any]]:
    out = []
    for line in cap.lines:
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("event") == event:
                out.append(doc)
    return out


async def test_logs_one_json_line_per_proxied_request(
        gateway: GatewayServer, sandbox: Sandbox, http: aiohttp.ClientSession,
        log_capture: LogCapture) -> None:
    """A proxied request logs request id, method, route template, statuses, duration, bytes,
    token generation and replay/retry flags."""
    await faults(http, sandbox, {"status": 401, "path": "/bookings"})
    body = b'{"workshopId": "nope"}'
    async with http.post(gateway.url + "/bookings", data=body,
                         headers={"X-Request-ID": "req-77",
                                  "Content-Type": "application/json"}) as resp:
        answer = await resp.read()
    (line,) = events(log_capture, "request")
    assert line["request_id"] == "req-77"
    assert line["method"] == "POST"
    assert line["route"] == "/bookings"
    assert (line["status"], line["upstream_status"]) == (422, 422)
    assert line["bytes_in"] == len(body) and line["bytes_out"] == len(answer)
    assert line["token_generation"] == 2 and line["replayed"] is True
    assert line["retried"] is False
    assert line["duration_ms"] > 0
    assert line["level"] == "info" and line["ts"].endswith("Z")


async def test_logs_token_events_carry_fingerprint_not_token(
        gateway: GatewayServer, log_capture: LogCapture) -> None:
    """Token renewals are logged with kind, outcome, generation and a fingerprint."""
    (renewal,) = [e for e in events(log_capture, "token_renewal") if e["outcome"] == "success"]
    tok = gateway.state.tokens.current
    assert tok is not None
    assert renewal["kind"] == "login"
    assert renewal["generation"] == 1
    assert renewal["token_fp"] == tok.fingerprint
    assert tok.access not in json.dumps(renewal)


async def test_logs_gateway_errors_are_logged_with_their_code(
        gateway: GatewayServer, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """A gateway-made refusal is logged with its stable error code."""
    async with http.get(gateway.url + "/auth/token") as resp:
        assert resp.status == 403
    (line,) = events(log_capture, "request")
    assert line["error"] == "auth_route_forbidden" and line["status"] == 403


def test_logs_text_format_for_terminals() -> None:
    """log_format=text gives one human line with key=value fields."""
    stream = io.StringIO()
    handler = setup_logging("info", "text", stream=stream)
    try:
        logging.getLogger("gateway.test").info("hello", extra={"fields": {"a": 1, "b": "x"}})
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.endswith("gateway.test: hello a=1 b=x")
    assert not line.startswith("{")


def test_logs_level_setting_filters() -> None:
    """log_level=warning drops info lines."""
    stream = io.StringIO()
    handler = setup_logging("warning", "json", stream=stream)
    try:
        logging.getLogger("gateway.test").info("quiet")
        logging.getLogger("gateway.test").warning("loud")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().strip().splitlines()
    assert [json.loads(x)["msg"] for x in lines] == ["loud"]


def test_logs_leak_check_catches_a_leak() -> None:
    """The autouse leak check would see a token: its markers match a sandbox token."""
    cap = LogCapture()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token sbx_at_abc", None, None)
    cap.emit(record)
    assert any(m in line for line in cap.lines for m in LEAK_MARKERS)
