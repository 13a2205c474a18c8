"""The admin listener: liveness, start-up, readiness, token status and Prometheus metrics.

``/healthz`` answers while the process and its event loop do. ``/startz`` is 200 once the
first token attempt has ended (a token, or a failure) and, with a token, the first probe of
``GATEWAY_CHECK_PATH`` has run: the start-up probe, which never waits for Repairy to agree.
``/readyz`` is 503 for three reasons only (no usable token, a refusal the probe confirmed:
``partner_refused`` or ``credentials_refused``, or draining), each with its code and what to
fix; with several credential profiles, only a *required* profile's trouble makes it 503, and
``profiles`` names each one's state. ``/tokenz`` describes the managed token (times,
generation, last renewal, a fingerprint) and the probe's verdict, never the token itself.
``/metrics`` is the Prometheus exposition (with workers, collected from them at scrape time).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.redact import fingerprint
from gateway.state import GATEWAY, GatewayState, ProfileState
from gateway.token.config import DEFAULT_PROFILE
from gateway.token.route_401 import Persistent401
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


def _started(held: ProfileState) -> str | None:
    """What one profile's start-up still waits for (None: nothing)."""
    st = held.manager.status()
    fleet = held.manager.fleet
    tried = (st.token is not None or st.last_outcome is not None or st.consecutive_failures > 0
             or (fleet is not None and fleet.key_mismatch))
    if not tried:
        return "the first token attempt"
    if st.token is not None and held.verdict is not None and not held.verdict.first_round_done:
        return "the first probe"
    return None


async def startz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    for name, held in gw.profiles.items():
        waiting = _started(held)
        if waiting is not None:
            return web.json_response({"started": False, "waiting_for": waiting + (
                "" if name == DEFAULT_PROFILE else f" of profile {name}")}, status=503)
    return web.json_response({"started": True})


def _not_ready(held: ProfileState) -> tuple[list[str], list[str]]:
    """Why one profile cannot serve: (codes, reasons); empty when it can."""
    reasons: list[str] = []
    codes: list[str] = []
    verdict = held.verdict
    if verdict is not None and verdict.refusal is not None:
        codes.append(verdict.refusal)
        reasons.append(f"{verdict.refusal}: {verdict.detail}; fix "
                       f"{held.profile.own_variables(FIX[verdict.refusal])}, "
                       "then SIGHUP (or wait for the next probe)")
    status = held.manager.status()
    fleet = held.manager.fleet
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
        elif fleet is not None and not fleet.up:
            reasons.append(f"no usable token yet: the token store is unavailable "
                           f"({fleet.problem})")
        else:
            reasons.append("no usable token yet")
    return codes, reasons


async def readyz(request: web.Request) -> web.Response:
    """503 while draining, or while a *required* profile cannot serve (its codes and
    reasons, named by profile beyond ``default``); an optional profile's trouble is only
    described, under ``profiles`` (present with several profiles)."""
    gw = request.app[GATEWAY]
    reasons, codes, notes = [], [], []
    if gw.draining:
        codes.append("draining")
        reasons.append("draining: the gateway is shutting down")
    states: dict[str, Any] = {}
    for name, held in gw.profiles.items():
        own_codes, own_reasons = _not_ready(held)
        prefix = "" if name == DEFAULT_PROFILE else f"profile {name}: "
        states[name] = {"ready": not own_codes, "required": held.profile.required,
                        "codes": own_codes, "reasons": own_reasons}
        if held.profile.required:
            codes += [c for c in own_codes if c not in codes]
            reasons += [prefix + r for r in own_reasons]
        elif own_codes:
            notes.append(f"optional profile {name} cannot serve ({', '.join(own_codes)}); "
                         "its callers get 503, the others are served")
        fleet = held.manager.fleet
        if not own_codes and fleet is not None and not fleet.up and not any(
                "token store unavailable" in n for n in notes):
            # Not a failure: the token held keeps serving (a Redis blip must not empty every
            # Service at once).
            notes.append(f"token store unavailable ({fleet.problem}); serving with the token "
                         f"held, GATEWAY_REDIS_DOWN_POLICY={fleet.down_policy}")
    body: dict[str, Any] = ({"ready": False, "codes": codes, "reasons": reasons} if reasons
                            else {"ready": True})
    if notes and not reasons:
        body["notes"] = notes
    if len(states) > 1:
        body["profiles"] = states
    return web.json_response(body, status=503 if reasons else 200)


def _token_body(gw: GatewayState, held: ProfileState, route_401: Persistent401) -> dict[str, Any]:
    st = held.manager.status()
    manager = held.manager
    now = manager.clock.monotonic()
    body: dict[str, Any] = {
        "usable": st.usable,
        "stale": st.stale,
        "credentials_rejected": st.credentials_rejected,
        "blocked": st.blocked,
        "consecutive_failures": st.consecutive_failures,
        "next_attempt_in_seconds": None if st.next_attempt_at is None
        else round(max(0.0, st.next_attempt_at - now), 3),
        "persistent_401_routes": route_401.marked(),
        "contention": {"active": st.contended,
                       "invalidations_in_window": st.contention_invalidations},
        "upstream": None if held.verdict is None else _verdict(held.verdict.status()),
        "store": None if manager.fleet is None else {
            "replica": manager.fleet.replica, "up": manager.fleet.up,
            "problem": manager.fleet.problem, "renewed_by": manager.fleet.renewed_by,
            "key_mismatch": manager.fleet.key_mismatch,
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
    return body


async def tokenz(request: web.Request) -> web.Response:
    """The default profile's token, as before profiles; with several, ``profiles`` describes
    each (its partner and base URL too)."""
    gw = request.app[GATEWAY]
    bodies = {}
    current = {p.name: p for p in gw.settings.profiles}  # as rotated since the start
    for name, held in gw.profiles.items():
        bodies[name] = _token_body(gw, held, gw.lanes.by_name[name].route_401)
        partner = current[name].partner
        bodies[name]["credential"] = {"name": name, "required": held.profile.required,
                                      "partner_id": partner.partner_id,
                                      "upstream": str(partner.base_url),
                                      "app_key_fp": partner.app_key.fingerprint}
    body = dict(bodies[DEFAULT_PROFILE])
    if len(bodies) > 1:
        body["profiles"] = bodies
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
