"""The sandbox HTTP server: routes, the auth gate, fault injection and the control API.

``create_app`` builds the aiohttp application; :class:`Sandbox` runs it in-process on a port
(``async with Sandbox() as sb: sb.url``); ``run_sandbox`` is what the CLI subcommand calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.redact import fingerprint
from gateway.sandbox.control import ControlError, ControlState, Fault, Kind, redacted_headers
from gateway.sandbox.data import ApiError, SandboxData
from gateway.sandbox.tokens import Credential, Issued, TokenRejected, TokenStore

DEFAULT_APP_KEY = "sandbox-app-key"
DEFAULT_APP_SECRET = "sandbox-app-secret"
DEFAULT_PARTNER_ID = "sandbox-partner"
ACCESS_TTL = 48 * 3600.0
REFRESH_TTL = 14 * 86400.0
CONTROL_PREFIX = "/__sandbox/"
_DIAGNOSTIC_PREFIXES = ("/__sandbox/echo", "/__sandbox/bytes/")
_MAX_DOWNLOAD = 1 << 30
_PATTERN = bytes(range(256)) * 256  # 64 KiB of a known pattern for /__sandbox/bytes


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves. Lifetimes are seconds (fractions allowed for tests)."""

    app_key: str = DEFAULT_APP_KEY
    app_secret: str = field(default=DEFAULT_APP_SECRET, repr=False)
    partner_id: str = DEFAULT_PARTNER_ID
    access_ttl: float = ACCESS_TTL
    refresh_ttl: float = REFRESH_TTL
    rotate_refresh: bool = True
    single_token: bool = False
    request_log_size: int = 1000


@dataclass
class SandboxState:
    config: SandboxConfig
    tokens: TokenStore
    data: SandboxData
    control: ControlState


STATE = web.AppKey("sandbox_state", SandboxState)
PARTNER = web.RequestKey("partner_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"success": True, "data": data}, status=status)


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": False, "error": {"code": code, "message": message,
                                                          **extra}}, status=status)


def _kind(path: str) -> Kind:
    if path == "/auth/token":
        return "token"
    if path == "/auth/refresh":
        return "refresh"
    return "api"


def _is_control(path: str) -> bool:
    return path.startswith(CONTROL_PREFIX) and not path.startswith(_DIAGNOSTIC_PREFIXES)


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


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
    resp = await _faulted_or_handled(request, handler, state, kind)
    state.control.count_status(resp.status)
    return resp


async def _faulted_or_handled(request: web.Request, handler: Handler, state: SandboxState,
                              kind: Kind) -> web.StreamResponse:
    fault = state.control.take_fault(request.path, kind)
    if fault is not None:
        if fault.latency:
            await asyncio.sleep(fault.latency)
        if fault.drop:
            return await _drop_connection(request, fault.length)
        if fault.status is not None:
            if fault.body is not None:
                resp = web.Response(status=fault.status, text=fault.body,
                                    content_type="application/json")
            else:
                resp = _error(fault.status, "injected_fault", "fault injected by the sandbox")
            if fault.retry_after is not None:
                resp.headers["Retry-After"] = f"{fault.retry_after:g}"
            return resp
    if kind == "api":
        try:
            record = state.tokens.check(_bearer(request))
        except TokenRejected as exc:
            state.control.counters["rejected_requests"] += 1
            return _error(401, exc.code, exc.message)
        partner = request.headers.get("X-Partner-ID")
        if not partner:
            state.control.counters["rejected_requests"] += 1
            return _error(403, "partner_id_missing", "X-Partner-ID header is required")
        if partner != record.credential.partner_id:
            state.control.counters["rejected_requests"] += 1
            return _error(403, "partner_id_mismatch", "X-Partner-ID does not match the token")
        request[PARTNER] = partner
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPNotFound:
        return _error(404, "not_found", f"no route {request.method} {request.path}")
    except web.HTTPMethodNotAllowed:
        return _error(405, "method_not_allowed", f"{request.method} not allowed here")


async def _json_body(request: web.Request) -> Any:
    """Read a JSON body (or a form, for the auth calls); malformed → 400."""
    raw = await request.read()
    if request.content_type == "application/x-www-form-urlencoded":
        return dict((await request.post()).items())
    if not raw:
        raise ApiError(400, "invalid_body", "a JSON body is required")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from exc


def _auth_payload(issued: Issued) -> dict[str, Any]:
    return {"accessToken": issued.access_token, "refreshToken": issued.refresh_token,
            "tokenType": "Bearer", "expiresIn": issued.access_ttl,
            "refreshExpiresIn": issued.refresh_ttl}


# -- auth ------------------------------------------------------------------------------------
async def auth_token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    try:
        issued = state.tokens.login(body.get("appKey"), body.get("appSecret"))
    except TokenRejected as exc:
        state.control.counters["rejected_requests"] += 1
        status = 400 if exc.code == "invalid_request" else 401
        return _error(status, exc.code, exc.message)
    state.control.counters["logins_succeeded"] += 1
    return _ok(_auth_payload(issued))


async def auth_refresh(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    try:
        issued = state.tokens.refresh(_bearer(request), body.get("refreshToken"))
    except TokenRejected as exc:
        state.control.counters["rejected_requests"] += 1
        status = 400 if exc.code == "invalid_request" else 401
        return _error(status, exc.code, exc.message)
    state.control.counters["refreshes_succeeded"] += 1
    return _ok(_auth_payload(issued))


# -- resources -------------------------------------------------------------------------------
async def workshop_services(request: web.Request) -> web.StreamResponse:
    return _ok(request.app[STATE].data.services(request.match_info["id"]))


async def workshop_availabilities(request: web.Request) -> web.StreamResponse:
    q = request.query
    return _ok(request.app[STATE].data.availabilities(
        request.match_info["id"], q.get("from"), q.get("to")))


async def create_booking(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    return _ok(request.app[STATE].data.create_booking(request[PARTNER], body), status=201)


async def get_booking(request: web.Request) -> web.StreamResponse:
    return _ok(request.app[STATE].data.booking(request[PARTNER], request.match_info["id"]))


async def update_booking(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    return _ok(request.app[STATE].data.update_booking(
        request[PARTNER], request.match_info["id"], body))


async def change_booking_status(request: web.Request) -> web.StreamResponse:
    return _ok(request.app[STATE].data.change_status(
        request[PARTNER], request.match_info["id"], request.match_info["status"]))


async def create_quote(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    return _ok(request.app[STATE].data.create_quote(request[PARTNER], body), status=201)


async def send_reminder(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    return _ok(request.app[STATE].data.send_reminder(request[PARTNER], body), status=201)


async def get_reminder(request: web.Request) -> web.StreamResponse:
    return _ok(request.app[STATE].data.reminder(request[PARTNER], request.match_info["id"]))


# -- diagnostics (authenticated like the API; for proxy tests) --------------------------------
async def echo(request: web.Request) -> web.StreamResponse:
    """Stream the request body in, answer with its size, SHA-256 and what was received."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    headers = dict(redacted_headers(request.headers))
    return _ok({"method": request.method, "path": request.raw_path.partition("?")[0],
                "query": request.query_string, "size": size, "sha256": digest.hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
                "headers": headers})


async def download(request: web.Request) -> web.StreamResponse:
    """Stream ``n`` bytes of a fixed pattern (``?chunked=1`` to omit Content-Length)."""
    try:
        size = int(request.match_info["n"])
    except ValueError:
        raise ApiError(400, "invalid_size", "size must be an integer") from None
    if not 0 <= size <= _MAX_DOWNLOAD:
        raise ApiError(400, "invalid_size", f"size must be 0..{_MAX_DOWNLOAD}")
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") not in ("1", "true"):
        resp.content_length = size
    await resp.prepare(request)
    left = size if request.method != "HEAD" else 0
    while left:
        chunk = _PATTERN[: min(left, len(_PATTERN))]
        await resp.write(chunk)
        left -= len(chunk)
    await resp.write_eof()
    return resp


def pattern_bytes(size: int) -> bytes:
    """What ``/__sandbox/bytes/{size}`` sends, for tests to compare against."""
    whole, part = divmod(size, len(_PATTERN))
    return _PATTERN * whole + _PATTERN[:part]


# -- control API ------------------------------------------------------------------------------
async def control_stats(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    stats = state.control.stats()
    stats["live_access_tokens"] = state.tokens.live_access_tokens
    stats["active_faults"] = len(state.control.faults)
    return web.json_response(stats)


async def control_add_faults(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid_json", "the body is not valid JSON")
    revoked = None
    specs: list[object]
    if isinstance(body, dict) and "faults" in body:
        specs = body["faults"] if isinstance(body["faults"], list) else [body["faults"]]
    elif isinstance(body, dict) and set(body) == {"revoke_tokens"}:
        specs = []
    else:
        specs = [body]
    if isinstance(body, dict) and body.get("revoke_tokens") is True:
        revoked = state.tokens.revoke_all()
    try:
        faults = [Fault.from_json(s) for s in specs]
    except ControlError as exc:
        return _error(400, "invalid_fault", str(exc))
    state.control.faults.extend(faults)
    return web.json_response({"active": [f.to_json() for f in state.control.faults],
                              "revoked_tokens": revoked})


async def control_list_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response({"active": [f.to_json() for f in request.app[STATE].control.faults]})


async def control_clear_faults(request: web.Request) -> web.StreamResponse:
    request.app[STATE].control.faults.clear()
    return web.json_response({"active": []})


async def control_reset(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.control.reset()
    state.data.reset()
    return web.json_response({"reset": True})


async def control_requests(request: web.Request) -> web.StreamResponse:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return _error(400, "invalid_limit", "limit must be an integer")
    items = list(request.app[STATE].control.requests)
    return web.json_response({"requests": items[-limit:] if limit > 0 else []})


async def control_credentials(request: web.Request) -> web.StreamResponse:
    """Replace the accepted credentials (as when Repairy support issues new ones).

    Tokens already issued stay valid until they expire or are revoked.
    """
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid_json", "the body is not valid JSON")
    fields = ("app_key", "app_secret", "partner_id")
    if not isinstance(body, dict) or not all(isinstance(body.get(f), str) and body[f]
                                             for f in fields):
        return _error(400, "invalid_credentials_spec",
                      "app_key, app_secret and partner_id are required strings")
    state.tokens.credentials = [Credential(body["app_key"], body["app_secret"],
                                           body["partner_id"])]
    return web.json_response({"app_key": body["app_key"], "partner_id": body["partner_id"]})


async def control_config(request: web.Request) -> web.StreamResponse:
    """What a client needs to talk to this sandbox (its own made-up credentials included)."""
    cfg = request.app[STATE].config
    return web.json_response({
        "app_key": cfg.app_key, "app_secret_fingerprint": fingerprint(cfg.app_secret),
        "partner_id": cfg.partner_id, "access_ttl": cfg.access_ttl,
        "refresh_ttl": cfg.refresh_ttl, "rotate_refresh": cfg.rotate_refresh,
        "single_token": cfg.single_token,
        "workshops": list(request.app[STATE].data.workshops)})


def create_app(config: SandboxConfig | None = None,
               clock: Callable[[], float] = time.monotonic) -> web.Application:
    """Build the sandbox application (not yet listening)."""
    config = config or SandboxConfig()
    cred = Credential(config.app_key, config.app_secret, config.partner_id)
    app = web.Application(middlewares=[_gate], client_max_size=64 * 1024 * 1024)
    app[STATE] = SandboxState(
        config=config,
        tokens=TokenStore([cred], access_ttl=config.access_ttl, refresh_ttl=config.refresh_ttl,
                          rotate_refresh=config.rotate_refresh,
                          single_token=config.single_token, clock=clock),
        data=SandboxData(),
        control=ControlState(config.request_log_size),
    )
    r = app.router
    r.add_post("/auth/token", auth_token)
    r.add_post("/auth/refresh", auth_refresh)
    r.add_get("/workshops/{id}/services", workshop_services)
    r.add_get("/workshops/{id}/availabilities", workshop_availabilities)
    r.add_post("/bookings", create_booking)
    r.add_get("/bookings/{id}", get_booking)
    r.add_put("/bookings/{id}", update_booking)
    r.add_post("/bookings/{id}/{status}", change_booking_status)
    r.add_post("/quotes", create_quote)
    r.add_post("/reminders/services", send_reminder)
    r.add_get("/reminders/services/{id}", get_reminder)
    r.add_route("*", "/__sandbox/echo", echo)
    r.add_route("*", "/__sandbox/echo/{tail:.*}", echo)
    r.add_get("/__sandbox/bytes/{n}", download)
    r.add_get("/__sandbox/stats", control_stats)
    r.add_get("/__sandbox/faults", control_list_faults)
    r.add_post("/__sandbox/faults", control_add_faults)
    r.add_delete("/__sandbox/faults", control_clear_faults)
    r.add_post("/__sandbox/reset", control_reset)
    r.add_get("/__sandbox/requests", control_requests)
    r.add_get("/__sandbox/config", control_config)
    r.add_post("/__sandbox/credentials", control_credentials)
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
