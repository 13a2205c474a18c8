"""The sandbox HTTP server: the route table, the gate every request passes (count, record,
inject faults, check auth), and running it.

``create_app`` builds the aiohttp application; :class:`Sandbox` runs it in-process on a port
(``async with Sandbox() as sb: sb.url``); ``serve_forever`` is what the CLI subcommand calls.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from aiohttp import ClientPayloadError, web

from gateway.proxy.headers import PlainResponse
from gateway.sandbox import control_api, handlers
from gateway.sandbox.control import ControlState, Fault, Kind
from gateway.sandbox.data import ApiError, SandboxData
from gateway.sandbox.openapi import OPENAPI_PATH
from gateway.sandbox.state import (
    PARTNER,
    STATE,
    Handler,
    SandboxConfig,
    SandboxState,
    bearer,
    error,
)
from gateway.sandbox.tokens import TokenRejected, TokenStore

CONTROL_PREFIX = "/__sandbox/"
_DIAGNOSTIC_PREFIXES = ("/__sandbox/echo", "/__sandbox/bytes/")


def _kind(path: str) -> Kind:
    if path == "/auth/token":
        return "token"
    if path == "/auth/refresh":
        return "refresh"
    return "api"


def _is_control(path: str) -> bool:
    """The sandbox's own endpoints (and its OpenAPI document): no token, not counted."""
    return path == OPENAPI_PATH or (path.startswith(CONTROL_PREFIX)
                                    and not path.startswith(_DIAGNOSTIC_PREFIXES))


async def _drop_connection(request: web.Request, length: int) -> web.StreamResponse:
    """Start a response claiming ``length`` bytes, send part of it, then cut the connection."""
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    resp.content_length = length
    await resp.prepare(request)
    await resp.write(b'{"success": true, "data": [')
    if request.transport is not None:
        request.transport.abort()
    return resp


@web.middleware
async def _gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count, record, inject faults, then check auth for everything but the auth calls."""
    if _is_control(request.path):
        return await handler(request)
    state = request.app[STATE]
    kind = _kind(request.path)
    state.control.count_received(kind)
    state.control.record(request.method, request.raw_path, request.headers)
    try:
        resp = await _faulted_or_handled(request, handler, state, kind)
    except (ConnectionError, ClientPayloadError):
        # The client went away: an upload cut short, or an answer it stopped reading.
        state.control.counters["client_disconnects"] += 1
        raise asyncio.CancelledError from None
    state.control.count_status(resp.status)
    return resp


async def _send_chunked(request: web.Request, resp: web.StreamResponse, size: int,
                        delay: float) -> web.StreamResponse:
    """Send a finished answer again with chunked transfer, ``size`` bytes a piece."""
    if not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
        return resp
    body = resp.body
    out = web.StreamResponse(status=resp.status, headers={
        k: v for k, v in resp.headers.items() if k.lower() != "content-length"})
    out.enable_chunked_encoding()
    await out.prepare(request)
    for start in range(0, len(body), size):
        await out.write(body[start:start + size])
        await asyncio.sleep(delay)
    await out.write_eof()
    return out


def _retry_after(fault: Fault) -> str:
    assert fault.retry_after is not None
    if fault.retry_after_date:
        when = datetime.now(UTC) + timedelta(seconds=fault.retry_after)
        return format_datetime(when, usegmt=True)
    return f"{fault.retry_after:g}"


async def _faulted_or_handled(request: web.Request, handler: Handler, state: SandboxState,
                              kind: Kind) -> web.StreamResponse:
    fault = state.control.take_fault(request.path, kind, state.clock(),
                                     request.headers.get("X-Partner-ID"))
    resp = await _apply_fault(request, handler, state, kind, fault)
    if fault is not None and fault.headers and not resp.prepared:
        resp.headers.update(fault.headers)
    if fault is not None and fault.chunk is not None:
        return await _send_chunked(request, resp, fault.chunk, fault.chunk_delay)
    return resp


async def _apply_fault(request: web.Request, handler: Handler, state: SandboxState,
                       kind: Kind, fault: Fault | None) -> web.StreamResponse:
    acted = None
    if fault is not None and fault.after:  # Repairy acts first; the fault hits its answer
        acted = await _handle(request, handler, state, kind)
    if fault is not None:
        if fault.hold:
            await state.control.hold(fault.hold)
        if fault.latency:
            await asyncio.sleep(fault.latency)
        if fault.drop:
            return await _drop_connection(request, fault.length)
        if fault.reset:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to do: the connection is gone
        if fault.bare:
            return PlainResponse(status=fault.status or 200,
                                 body=(fault.body or "").encode())
        if fault.status is not None:
            if fault.body is not None:
                resp = web.Response(status=fault.status, text=fault.body,
                                    content_type="application/json")
            else:
                resp = error(fault.status, "injected_fault", "fault injected by the sandbox")
            if fault.retry_after is not None:
                resp.headers["Retry-After"] = _retry_after(fault)
            return resp
    if acted is not None:
        return acted
    return await _handle(request, handler, state, kind)


async def _handle(request: web.Request, handler: Handler, state: SandboxState,
                  kind: Kind) -> web.StreamResponse:
    """The real answer: auth checked for the API, then the handler."""
    if kind == "api":
        try:
            record = state.tokens.check(bearer(request))
        except TokenRejected as exc:
            state.control.counters["rejected_requests"] += 1
            return error(401, exc.code, exc.message)
        partner = request.headers.get("X-Partner-ID")
        if not partner:
            state.control.counters["rejected_requests"] += 1
            return error(403, "partner_id_missing", "X-Partner-ID header is required")
        owner = record.credential.partner_id
        state.control.count_partner(partner, "calls")
        if partner != owner:  # one partner's token sent as another: never from a gateway
            state.control.counters["rejected_requests"] += 1
            state.control.count_partner(partner, "wrong_partner_calls")
            return error(403, "partner_id_mismatch", "X-Partner-ID does not match the token")
        request[PARTNER] = partner
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPNotFound:
        return error(404, "not_found", f"no route {request.method} {request.path}")
    except web.HTTPMethodNotAllowed:
        return error(405, "method_not_allowed", f"{request.method} not allowed here")


def create_app(config: SandboxConfig | None = None,
               clock: Callable[[], float] = time.monotonic) -> web.Application:
    """Build the sandbox application (not yet listening)."""
    config = config or SandboxConfig()
    app = web.Application(middlewares=[_gate], client_max_size=64 * 1024 * 1024)
    app[STATE] = SandboxState(
        config=config,
        tokens=TokenStore(config.partners(), access_ttl=config.access_ttl,
                          refresh_ttl=config.refresh_ttl,
                          rotate_refresh=config.rotate_refresh,
                          single_token=config.single_token, clock=clock),
        data=SandboxData(),
        control=ControlState(config.request_log_size),
        clock=clock,
    )
    r = app.router
    r.add_post("/auth/token", handlers.auth_token)
    r.add_post("/auth/refresh", handlers.auth_refresh)
    r.add_get("/workshops/{id}/services", handlers.workshop_services)
    r.add_get("/workshops/{id}/availabilities", handlers.workshop_availabilities)
    r.add_post("/bookings", handlers.create_booking)
    r.add_get("/bookings/{id}", handlers.get_booking)
    r.add_put("/bookings/{id}", handlers.update_booking)
    r.add_post("/bookings/{id}/{status}", handlers.change_booking_status)
    r.add_post("/quotes", handlers.create_quote)
    r.add_post("/reminders/services", handlers.send_reminder)
    r.add_get("/reminders/services/{id}", handlers.get_reminder)
    r.add_get(OPENAPI_PATH, handlers.openapi_document)
    r.add_route("*", "/__sandbox/echo", handlers.echo)
    r.add_route("*", "/__sandbox/echo/{tail:.*}", handlers.echo)
    r.add_get("/__sandbox/bytes/{n}", handlers.download)
    r.add_get("/__sandbox/stats", control_api.control_stats)
    r.add_get("/__sandbox/faults", control_api.control_list_faults)
    r.add_post("/__sandbox/faults", control_api.control_add_faults)
    r.add_delete("/__sandbox/faults", control_api.control_clear_faults)
    r.add_post("/__sandbox/reset", control_api.control_reset)
    r.add_get("/__sandbox/requests", control_api.control_requests)
    r.add_get("/__sandbox/config", control_api.control_config)
    r.add_post("/__sandbox/credentials", control_api.control_credentials)
    r.add_post("/__sandbox/gates/{name}", control_api.control_open_gate)
    return app


class Sandbox:
    """The sandbox running in-process: ``async with Sandbox(cfg) as sb: ... sb.url``."""

    def __init__(self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, clock: Callable[[], float] = time.monotonic,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = create_app(config, clock)
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def state(self) -> SandboxState:
        return self.app[STATE]

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        sockets = self._runner.addresses
        host, port = sockets[0][0], sockets[0][1]
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{shown}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_forever(config: SandboxConfig, host: str, port: int,
                        announce: Callable[[str], None]) -> None:
    """Run a sandbox until cancelled (the CLI wraps this with signal handling)."""
    async with Sandbox(config, host=host, port=port) as sb:
        announce(sb.url)
        await asyncio.Event().wait()
