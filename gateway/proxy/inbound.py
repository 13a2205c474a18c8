"""The proxy listener's HTTP protocol: strict limits, JSON errors, slow clients cut off.

aiohttp's parser already refuses most malformed requests (conflicting or duplicate
``Content-Length``/``Transfer-Encoding``, obsolete line folding, CR/LF/NUL in values, bad header
names, oversized lines, too many headers). This module makes those refusals look like every
other gateway error (JSON, stable code, ``X-Repairy-Gateway-Error``), counts them, logs them
without echoing the offending bytes, and closes connections whose headers trickle in slower
than ``header_timeout`` (slowloris), a new connection that sends nothing included.
:func:`check_request` adds the checks the parser leaves to the application: HTTP version,
transfer coding, methods, and the request target; :func:`send_continue` answers ``Expect:
100-continue`` once the handler has admitted the request.

:class:`ProxyServer` cancels a request's handler when its caller disconnects (so its upstream
exchange is cancelled too), and drains on shutdown to one deadline: in-flight requests get
the grace, then what is left is cancelled at once (aiohttp alone waits the timeout twice).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol
from urllib.parse import unquote_to_bytes

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong

from gateway.errors import (
    GATEWAY_ERROR_HEADER,
    BadRequest,
    GatewayError,
    HeaderTooLarge,
    MethodNotAllowed,
    RouteForbidden,
    TargetTooLong,
)
from gateway.proxy.headers import error_response
from gateway.proxy.routes import comparable_path

log = logging.getLogger("gateway.inbound")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
#: The end of the grace kept for cancelled handlers to log and close (twice: aiohttp's two
#: phases of a connection's shutdown).
_CUT_OFF: Final = 0.25
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class Drainable(Protocol):
    """The handler's view the server needs to drain: its requests in progress."""

    stopping: bool

    async def drain(self, within: float) -> None: ...

    async def stop_leaders(self, within: float) -> None: ...

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse: ...


def send_continue(request: web.BaseRequest) -> None:
    """``100 Continue``, straight to the transport: an interim answer is not the response
    (aiohttp's writer does not count it, so an error can still be sent after it)."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(_CONTINUE)
OnReject = Callable[[int, str], None]
ALLOWED_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                    "OPTIONS"})
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f#\\]")
_TARGET_PREFIX = re.compile(rb"^(/|\*|[A-Za-z][A-Za-z0-9+.-]*://)")
#: A plain target (the common case): segments of unreserved characters that do not start with
#: a dot, an optional query without '%' or '#'. It is its own decoded form, and holds nothing
#: the full check refuses but an /auth path.
_PLAIN_TARGET = re.compile(r"((?:/[A-Za-z0-9_~\-][A-Za-z0-9_~.\-]*)+/?|/)"
                           r"(?:\?[A-Za-z0-9_~.\-=&+,;:@!$'()*/?]*)?")


def check_request(request: web.BaseRequest, auth_paths: tuple[str, ...]) -> str:
    """Refuse what the parser lets through; return the decoded path for routing."""
    if request.version not in ((1, 0), (1, 1)):
        raise BadRequest("only HTTP/1.0 and HTTP/1.1 are accepted",
                         code="unsupported_http_version")
    codings = request.headers.getall("Transfer-Encoding", [])
    if codings and (request.version != (1, 1) or len(codings) != 1
                    or codings[0].strip().lower() != "chunked"):
        raise BadRequest("Transfer-Encoding must be exactly 'chunked' on HTTP/1.1",
                         code="invalid_transfer_encoding")
    if request.method not in ALLOWED_METHODS:
        raise MethodNotAllowed(f"method {request.method[:16]!r} is not proxied")
    return check_target(request.raw_path, auth_paths)


@functools.lru_cache(maxsize=8)
def _forbidden_paths(auth_paths: tuple[str, ...]) -> frozenset[str]:
    return frozenset({"/auth", *(comparable_path(p) for p in auth_paths)})


def _refuse_auth(decoded: str, auth_paths: tuple[str, ...]) -> None:
    lowered = comparable_path(decoded)
    if lowered in _forbidden_paths(auth_paths) or lowered.startswith("/auth/"):
        raise RouteForbidden("authentication belongs to the gateway; /auth/* is not proxied")


def check_target(raw: str, auth_paths: tuple[str, ...]) -> str:
    """Refuse targets that are not plain origin-form paths, escape the base URL's path prefix,
    carry invalid encoding, or reach ``/auth``. Returns the decoded path."""
    plain = _PLAIN_TARGET.fullmatch(raw)
    if plain is not None:  # the common case: nothing to decode, nothing to refuse but /auth
        decoded = plain.group(1)
        _refuse_auth(decoded, auth_paths)
        return decoded
    return check_target_fully(raw, auth_paths)


def check_target_fully(raw: str, auth_paths: tuple[str, ...]) -> str:
    """:func:`check_target` without the plain-target shortcut (its reference)."""
    if not raw.startswith("/") or raw.startswith("//"):
        raise BadRequest("the request target must be a path starting with a single /",
                         code="invalid_target")
    path, _, query = raw.partition("?")
    if _BAD_PERCENT.search(raw):
        raise BadRequest("the request target has invalid percent-encoding",
                         code="invalid_encoding")
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
        unquote_to_bytes(query.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request target is not valid UTF-8",
                         code="invalid_encoding") from None
    if _CONTROL.search(decoded) or _CONTROL.search(path):
        raise BadRequest("the request path may not hold control characters, '#' or '\\'",
                         code="invalid_path")
    if any(seg in (".", "..") for seg in decoded.split("/")):
        raise BadRequest("the request path may not contain dot segments", code="invalid_path")
    _refuse_auth(decoded, auth_paths)
    return decoded


def _parse_error(exc: BaseException | None, status: int) -> GatewayError:
    """Translate a parser exception; its text (which quotes the request) is never used."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        # The parser quotes the overlong part: a request target (414) or a header (431).
        if isinstance(line, bytes | bytearray) and _TARGET_PREFIX.match(line):
            return TargetTooLong("the request line is too long")
        return HeaderTooLarge("a request header is too long")
    if exc is not None and "Too many headers" in str(exc):
        return HeaderTooLarge("too many request headers")
    if isinstance(exc, BadHttpMethod):
        return BadRequest("the request method is invalid", code="invalid_method")
    if status >= 500:
        return GatewayError("the gateway failed to handle the request")
    return BadRequest("the request is not valid HTTP/1.1", code="malformed_request")


class HeaderDeadlines:
    """Connections waiting for request headers, each with its deadline, swept by one timer
    per server (not a timer per request): a connection past its deadline is closed, with a
    408 if it had sent part of a request. The sweep runs every quarter of the timeout (at most
    every second), so a deadline is enforced within that much."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._every = min(1.0, timeout / 4)
        self._waiting: dict[GatewayRequestHandler, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def wait(self, conn: GatewayRequestHandler, loop: asyncio.AbstractEventLoop) -> None:
        """``conn`` (on ``loop``: asking asyncio costs a ``getpid`` system call) waits for
        request headers."""
        if conn in self._waiting:
            return
        self._waiting[conn] = loop.time() + self.timeout
        if self._timer is None:  # an empty context: a request's log fields must not follow
            self._timer = loop.call_later(self._every, self._sweep,
                                          context=contextvars.Context())

    def done(self, conn: GatewayRequestHandler) -> None:
        self._waiting.pop(conn, None)

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = [conn for conn, deadline in self._waiting.items() if deadline <= now]
        for conn in late:
            del self._waiting[conn]
            conn._headers_too_slow()
        if self._waiting:
            self._timer = loop.call_later(self._every, self._sweep,
                                          context=contextvars.Context())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()


class GatewayRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, plus a header deadline and JSON parse errors."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop,
                 deadlines: HeaderDeadlines, on_reject: OnReject, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self.event_loop = loop
        self._deadlines = deadlines
        self._on_reject = on_reject
        self._in_request = False
        self._silent = True  # no byte received yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A connection that never sends a byte gets the header timeout too, not the
        # (longer) keep-alive timeout.
        self._deadlines.wait(self, self.event_loop)

    def data_received(self, data: bytes) -> None:
        if data:
            self._silent = False
            if not self._in_request:
                self._deadlines.wait(self, self.event_loop)
        super().data_received(data)

    def begin_request(self) -> None:
        """The handler has the request: its headers arrived in time."""
        self._deadlines.done(self)
        self._in_request = True

    def end_request(self) -> None:
        self._in_request = False

    def _headers_too_slow(self) -> None:
        transport = self.transport
        if self._in_request or transport is None or transport.is_closing():
            return
        if self._silent:  # nothing to answer: just close
            transport.close()
            log.debug("client sent nothing within the header timeout: connection closed",
                      extra={"fields": {"event": "idle_connection_closed"}})
            return
        body = json.dumps({"error": {"code": "request_timeout",
                                     "message": "request headers took too long"}}).encode()
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                        + f"{GATEWAY_ERROR_HEADER}: request_timeout\r\n".encode()
                        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body)
        transport.close()
        self._on_reject(408, "request_timeout")
        log.info("client too slow sending headers: connection closed", extra={"fields": {
            "event": "rejected", "status": 408, "error": "request_timeout"}})

    def connection_lost(self, exc: BaseException | None) -> None:
        self._deadlines.done(self)
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        error = _parse_error(exc, status)
        if error.status >= 500:
            log.error("unhandled error", exc_info=exc, extra={"fields": {"event": "error"}})
        else:
            log.info("rejected malformed request", extra={"fields": {
                "event": "rejected", "status": error.status, "error": error.code,
                "detail": type(exc).__name__ if exc else None}})
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        resp = error_response(error)
        resp.force_close()
        self._on_reject(error.status, error.code)
        return resp


class ProxyServer(web.Server):
    """A low-level aiohttp server whose connections use :class:`GatewayRequestHandler`."""

    def __init__(self, handler: Drainable, *, header_timeout: float, on_reject: OnReject,
                 **kwargs: Any) -> None:
        super().__init__(handler, handler_cancellation=True, **kwargs)
        self._proxy = handler
        self._protocol_kwargs = kwargs
        self._deadlines = HeaderDeadlines(header_timeout)
        self._on_reject = on_reject

    def __call__(self) -> web.RequestHandler:
        return GatewayRequestHandler(self, loop=asyncio.get_running_loop(),
                                     deadlines=self._deadlines,
                                     on_reject=self._on_reject, **self._protocol_kwargs)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Drain to one deadline: requests in flight get ``timeout`` less a short cut-off;
        then the rest are cancelled (logged as cut off) and their connections closed, all
        within ``timeout``."""
        grace = timeout or 0.0
        cut_off = min(_CUT_OFF, grace / 4)  # the last bit of the grace: cancel and close
        await self._proxy.drain(grace - 2 * cut_off)
        self._proxy.stopping = True
        await super().shutdown(cut_off)
        await self._proxy.stop_leaders(max(cut_off, 1.0))
        self._deadlines.close()
