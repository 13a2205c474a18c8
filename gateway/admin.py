"""The admin listener: liveness and readiness (metrics arrive with observability).

``/healthz`` answers while the process and its event loop do. ``/readyz`` is 200 only while a
usable token is held and the gateway is not draining; otherwise 503 with the reasons.
"""

from __future__ import annotations

from aiohttp import web

from gateway.state import GATEWAY


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    reasons = []
    if gw.draining:
        reasons.append("draining: the gateway is shutting down")
    status = gw.tokens.status()
    if not status.usable:
        if status.credentials_rejected:
            reasons.append("no usable token: Repairy rejected the credentials")
        elif status.last_error:
            reasons.append(f"no usable token: last renewal failed ({status.last_error})")
        else:
            reasons.append("no usable token yet")
    if reasons:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)
    return web.json_response({"ready": True})


def build_admin_app(gateway_app: web.Application) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway_app[GATEWAY]
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
