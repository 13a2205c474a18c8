"""Structured logs: one JSON line per request and per token event; text format; no leaks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.app import GatewayServer
from gateway.logs import (
    ATOMIC_WRITE,
    BatchWriter,
    JsonFormatter,
    _chunks,
    access_sink,
    fast_iso_ms,
    flush,
    iso_ms,
    json_line,
    setup_logging,
)
from gateway.proxy.outcome import AccessLine, access_line
from gateway.sandbox import Sandbox
from tests.conftest import LEAK_MARKERS, LogCapture
from tests.sandbox_helpers import faults

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py


def events(cap: LogCapture, event: str) -> list[dict[str, Any]]:
    out = []
    for line in cap.lines:
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("event") == event:
                out.append(doc)
    return out


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


def test_logs_access_line_is_byte_for_byte_what_logging_writes() -> None:
    """The preformatted access line equals JsonFormatter's output for the same record."""
    fields = {"event": "request", "request_id": "r-1", "client": "anonymous", "method": "GET",
              "route": "/bookings/{id}", "status": 200, "upstream_status": 200, "error": None,
              "duration_ms": 1.23, "bytes_in": 0, "bytes_out": 17, "token_generation": 3,
              "replayed": False, "retried": False, "retries": None, "odd": "é\"\n"}
    for created in (1_800_000_000.0, 1_800_000_000.9995, 1_800_000_059.001, 0.5):
        record = logging.LogRecord("gateway.proxy", logging.INFO, __file__, 1, "%s %s %s",
                                   ("GET", "/bookings/{id}", 200), None)
        record.created = created
        record.fields = fields
        expected = JsonFormatter().format(record) + "\n"
        assert json_line(created, "info", "gateway.proxy", "GET /bookings/{id} 200",
                         fields) == expected


_opt_ints = st.none() | st.integers(min_value=-(2**70), max_value=2**70)
_opt_texts = st.none() | st.text()


@settings(max_examples=300, deadline=None)
@given(created=st.floats(min_value=0, max_value=4e9, allow_nan=False), msg=st.text(),
       line=st.builds(AccessLine, st.text(), st.text(), st.text(), st.text(), st.text(),
                      _opt_ints,
                      _opt_ints, _opt_texts, st.floats(), st.integers(min_value=0),
                      st.integers(min_value=0), _opt_ints, st.booleans(), st.booleans(),
                      _opt_texts, _opt_texts, _opt_texts),
       others=st.lists(st.tuples(st.floats(min_value=0, max_value=4e9, allow_nan=False),
                                 st.text(), st.floats(), st.integers(min_value=0),
                                 st.integers(min_value=0)), max_size=4))
def test_logs_fast_access_line_is_json_line_for_any_values(
        created: float, msg: str, line: AccessLine,
        others: list[tuple[float, str, float, int, int]]) -> None:
    """The hand-built access line is byte for byte the generic JSON line for the same fields,
    whatever they hold: any text (quotes, control characters, non-ASCII, lone surrogates),
    big or missing numbers, NaN and infinities; also for the next requests that share its
    repeating fields (their parts come from the cache)."""
    assert access_line(created, msg, line) == json_line(created, "info", "gateway.proxy", msg,
                                                        line.fields())
    for when, rid, duration, bytes_in, bytes_out in others:
        again = line._replace(request_id=rid, duration_ms=duration, bytes_in=bytes_in,
                              bytes_out=bytes_out)
        assert access_line(when, msg, again) == json_line(when, "info", "gateway.proxy", msg,
                                                          again.fields())


async def test_logs_are_batched_and_flushed_within_100ms_and_in_order() -> None:
    """Inside the loop, lines wait for the batch (at most ~100 ms); a warning goes out at once,
    after what was batched before it; flush() writes the rest."""
    stream = io.StringIO()
    root = logging.getLogger()
    others = [h for h in root.handlers if not getattr(h, "_repairy_gateway", False)]
    for h in others:  # the test's own capture handlers: production has only ours
        root.removeHandler(h)
    handler = setup_logging("info", "json", stream=stream)
    try:
        proxy_log = logging.getLogger("gateway.proxy")
        sink = access_sink(proxy_log)
        assert sink is not None  # our JSON handler is the only one: the fast path
        sink.write(json_line(time.time(), "info", "gateway.proxy", "GET / 200", {"n": 1}))
        logging.getLogger("gateway.test").info("second")
        assert stream.getvalue() == ""  # batched
        await asyncio.sleep(0.15)
        assert [json.loads(x)["msg"] for x in stream.getvalue().splitlines()] == [
            "GET / 200", "second"]
        logging.getLogger("gateway.test").info("third")
        logging.getLogger("gateway.test").warning("fourth")
        assert [json.loads(x)["msg"] for x in stream.getvalue().splitlines()][2:] == [
            "third", "fourth"]
        logging.getLogger("gateway.test").info("fifth")
        flush()
        assert json.loads(stream.getvalue().splitlines()[-1])["msg"] == "fifth"
    finally:
        root.removeHandler(handler)
        for h in others:
            root.addHandler(h)


def test_logs_access_lines_go_through_logging_when_another_handler_listens(
        log_capture: LogCapture) -> None:
    """With any other handler on the root (a test's capture, an operator's), the access line
    goes through logging so that handler sees it."""
    stream = io.StringIO()
    handler = setup_logging("info", "json", stream=stream)
    try:
        assert access_sink(logging.getLogger("gateway.proxy")) is None
    finally:
        logging.getLogger().removeHandler(handler)


@given(created=st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False))
@settings(max_examples=2000)
def test_logs_fast_timestamp_is_the_formatters_for_any_time(created: float) -> None:
    """The cached timestamp rounds like datetime (to the microsecond, then cut to ms)."""
    assert fast_iso_ms(created) == iso_ms(created)


@given(start=st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False),
       steps=st.lists(st.floats(min_value=-0.002, max_value=0.002), max_size=40))
@settings(max_examples=500)
def test_logs_fast_timestamp_in_runs_of_nearby_times(start: float, steps: list[float]) -> None:
    """Times close together (several in one millisecond, back and forth across second
    boundaries) each get their own text, not a neighbour's cached one."""
    created = start
    for step in steps:
        created = max(0.0, created + step)
        assert fast_iso_ms(created) == iso_ms(created)


def test_logs_fast_timestamp_edge_cases() -> None:
    for created in (1_800_000_858.7939997, 1_800_000_000.9999995, 1_800_000_000.0005,
                    1_800_000_000.0004999, 1_799_999_999.9999999, 0.0):
        assert fast_iso_ms(created) == iso_ms(created)


def test_logs_batches_are_written_in_pipe_atomic_pieces_at_line_ends() -> None:
    """A batch shared with other processes' output is cut into writes of at most 4 KiB, each
    ending at a line end (so lines from workers never interleave)."""
    lines = [json.dumps({"n": i, "pad": "x" * (i % 300)}) + "\n" for i in range(500)]
    lines.append("y" * 10_000 + "\n")  # a line longer than a piece goes alone
    pieces = _chunks(lines)
    assert "".join(pieces) == "".join(lines)
    for piece in pieces:
        assert piece.endswith("\n")
        assert len(piece.encode()) <= ATOMIC_WRITE or piece.count("\n") == 1


def test_logs_do_not_wait_for_the_timer_of_a_closed_loop() -> None:
    """A line batched inside a loop that then closed, before its timer fired: the next line
    (outside any loop, or in another thread) writes both at once."""
    stream = io.StringIO()
    writer = BatchWriter(stream)

    async def inside() -> None:
        writer.write("first\n")

    asyncio.run(inside())
    assert stream.getvalue() == ""  # batched; its loop is gone
    writer.write("second\n")
    assert stream.getvalue() == "first\nsecond\n"
    thread = threading.Thread(target=writer.write, args=("third\n",))
    thread.start()
    thread.join()
    assert stream.getvalue().endswith("third\n")


def test_logs_access_fast_path_respects_the_logger_tree() -> None:
    """A handler, a filter or propagate=False anywhere from gateway.proxy up sends the access
    line through logging."""
    stream = io.StringIO()
    root = logging.getLogger()
    others = [h for h in root.handlers if not getattr(h, "_repairy_gateway", False)]
    for h in others:
        root.removeHandler(h)
    handler = setup_logging("info", "json", stream=stream)
    proxy_log, parent = logging.getLogger("gateway.proxy"), logging.getLogger("gateway")
    extra = logging.NullHandler()
    try:
        assert access_sink(proxy_log) is not None
        parent.addHandler(extra)
        assert access_sink(proxy_log) is None
        parent.removeHandler(extra)
        proxy_log.propagate = False
        assert access_sink(proxy_log) is None
        proxy_log.propagate = True
        parent.addFilter(lambda record: True)
        assert access_sink(proxy_log) is None
    finally:
        parent.removeHandler(extra)
        parent.filters.clear()
        proxy_log.propagate = True
        root.removeHandler(handler)
        for h in others:
            root.addHandler(h)
