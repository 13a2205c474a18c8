"""The admin listener: liveness, start-up, readiness, token status and Prometheus metrics.

``/healthz`` answers while the process and its event loop do. ``/startz`` is 200 once the
first token attempt has ended (a token, or a failure) and, with a token, the first probe of
``GATEWAY_CHECK_PATH`` has run: the start-up probe, which never waits for Repairy to agree.
``/readyz`` is 503 for three reasons only (no usable token, a refusal the probe confirmed:
``partner_refused`` or ``credentials_refused``, or draining), each with its code and what to
fix. ``/tokenz`` describes the managed token (times, generation, last renewal, a fingerprint)
and the probe's verdict, never the token itself. ``/metrics`` is the Prometheus exposition
(with workers, collected from them at scrape time).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.redact import fingerprint
from gateway.state import GATEWAY, GatewayState
from gateway.token.verdict import FIX


def _iso(unix: float | None) -> str | None:
    if unix is None:
        return None
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


async def healthz(request: web.Request) -> web.Response:
    workers = request.app[GATEWAY].workers
    if workers is None:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "ok", "workers": workers()})


async def startz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    st = gw.manager.status()
    fleet = gw.manager.fleet
    tried = (st.token is not None or st.last_outcome is not None or st.consecutive_failures > 0
             or (fleet is not None and fleet.key_mismatch))
    verdict = gw.verdict
    if not tried:
        return web.json_response({"started": False,
                                  "waiting_for": "the first token attempt"}, status=503)
    if st.token is not None and verdict is not None and not verdict.first_round_done:
        return web.json_response({"started": False, "waiting_for": "the first probe"},
                                 status=503)
    return web.json_response({"started": True})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    reasons, codes = [], []
    if gw.draining:
        codes.append("draining")
        reasons.append("draining: the gateway is shutting down")
    verdict = gw.verdict
    if verdict is not None and verdict.refusal is not None:
        codes.append(verdict.refusal)
        reasons.append(f"{verdict.refusal}: {verdict.detail}; fix {FIX[verdict.refusal]}, "
                       "then SIGHUP (or wait for the next probe)")
    status = gw.manager.status()
    fleet = gw.manager.fleet
    if fleet is not None and fleet.key_mismatch:
        codes.append("store_key_mismatch")
        reasons.append("store_key_mismatch: the fleet's token entry is sealed with another "
                       "GATEWAY_STORE_KEY; fix this replica's key (it does not log in)")
    elif not status.usable:
        codes.append("no_usable_token")
        if status.credentials_rejected:
            reasons.append("no usable token: Repairy rejected the credentials")
        elif status.blocked is not None:
            reasons.append(f"no usable token: Repairy refused the auth request "
                           f"({status.blocked}); check the auth settings")
        elif status.last_error:
            reasons.append(f"no usable token: last renewal failed ({status.last_error})")
        elif status.stale:
            reasons.append("no usable token: the upstream refused it; renewing")
        elif gw.manager.fleet is not None and not gw.manager.fleet.up:
            reasons.append(f"no usable token yet: the token store is unavailable "
                           f"({gw.manager.fleet.problem})")
        else:
            reasons.append("no usable token yet")
    if reasons:
        return web.json_response({"ready": False, "codes": codes, "reasons": reasons},
                                 status=503)
    if fleet is not None and not fleet.up:
        # Not a failure: the token held keeps serving (a Redis blip must not empty every
        # Service at once).
        return web.json_response({"ready": True, "notes": [
            f"token store unavailable ({fleet.problem}); serving with the token held, "
            f"GATEWAY_REDIS_DOWN_POLICY={fleet.down_policy}"]})
    return web.json_response({"ready": True})


async def tokenz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    st = gw.manager.status()
    now = gw.manager.clock.monotonic()
    body: dict[str, Any] = {
        "usable": st.usable,
        "stale": st.stale,
        "credentials_rejected": st.credentials_rejected,
        "blocked": st.blocked,
        "consecutive_failures": st.consecutive_failures,
        "next_attempt_in_seconds": None if st.next_attempt_at is None
        else round(max(0.0, st.next_attempt_at - now), 3),
        "persistent_401_routes": gw.route_401.marked(),
        "contention": {"active": st.contended,
                       "invalidations_in_window": st.contention_invalidations},
        "upstream": None if gw.verdict is None else _verdict(gw.verdict.status()),
        "store": None if gw.manager.fleet is None else {
            "replica": gw.manager.fleet.replica, "up": gw.manager.fleet.up,
            "problem": gw.manager.fleet.problem, "renewed_by": gw.manager.fleet.renewed_by,
            "key_mismatch": gw.manager.fleet.key_mismatch,
            "maxmemory_policy": gw.store_policy, "notes": list(gw.store_notes)},
        "last_renewal": {"at": _iso(st.last_renewal_wall), "outcome": st.last_outcome,
                         "error": st.last_error},
        "token": None,
    }
    tok = st.token
    if tok is not None:
        body["token"] = {
            "generation": tok.generation,
            "obtained_via": tok.via,
            "fingerprint": tok.fingerprint,
            "issued_at": _iso(tok.obtained_wall),
            "expires_at": _iso(tok.wall(tok.expires_at)),
            "expires_in_seconds": round(tok.expires_at - now, 3),
            "renewal_due_at": _iso(tok.wall(st.renewal_due_at)),
            "refresh_token": None if tok.refresh is None else {
                "fingerprint": fingerprint(tok.refresh),
                "expires_at": _iso(tok.wall(tok.refresh_expires_at))
                if tok.refresh_expires_at is not None else None,
            },
        }
    return web.json_response(body)


def _verdict(doc: dict[str, Any]) -> dict[str, Any]:
    doc["since"] = _iso(doc["since"])
    if doc["last_probe"] is not None:
        doc["last_probe"]["at"] = _iso(doc["last_probe"]["at"])
    return doc


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.collect is not None:
        await gw.collect()
    payload = gw.metrics.render()
    resp = web.Response(body=payload)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def build_admin_app(state: GatewayState) -> web.Application:
    app = web.Application()
    app[GATEWAY] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/startz", startz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/tokenz", tokenz)
    app.router.add_get("/metrics", metrics)
    return app
