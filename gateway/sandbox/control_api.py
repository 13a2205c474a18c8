"""The sandbox control API under ``/__sandbox/`` (no auth): stats, faults, gates for held
requests, reset, the request log, the accepted credentials and the sandbox's own
configuration."""

from __future__ import annotations

from aiohttp import web

from gateway.redact import fingerprint
from gateway.sandbox.control import GATE_NAME, ControlError, Fault
from gateway.sandbox.state import STATE, error
from gateway.sandbox.tokens import Credential


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
        return error(400, "invalid_json", "the body is not valid JSON")
    revoked = None
    specs: list[object]
    if isinstance(body, dict) and "faults" in body:
        specs = body["faults"] if isinstance(body["faults"], list) else [body["faults"]]
    elif isinstance(body, dict) and set(body) == {"revoke_tokens"}:
        specs = []
    else:
        specs = [body]
    revoke = body.get("revoke_tokens") if isinstance(body, dict) else None
    if revoke is True:
        revoked = state.tokens.revoke_all()
    elif isinstance(revoke, str) and revoke:  # one partner's tokens only
        revoked = state.tokens.revoke_partner(revoke)
    try:
        faults = [Fault.from_json(s, state.clock()) for s in specs]
    except ControlError as exc:
        return error(400, "invalid_fault", str(exc))
    state.control.faults.extend(faults)
    return web.json_response({"active": [f.to_json() for f in state.control.faults],
                              "revoked_tokens": revoked})


async def control_list_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response({"active": [f.to_json() for f in request.app[STATE].control.faults]})


async def control_clear_faults(request: web.Request) -> web.StreamResponse:
    request.app[STATE].control.faults.clear()
    return web.json_response({"active": []})


async def control_open_gate(request: web.Request) -> web.StreamResponse:
    """Open a gate: the requests a ``hold`` fault keeps there go on, and later ones pass."""
    name = request.match_info["name"]
    if not GATE_NAME.fullmatch(name):
        return error(400, "invalid_gate", "a gate name is 1 to 64 of A-Z a-z 0-9 _ . -")
    released = request.app[STATE].control.open_gate(name)
    return web.json_response({"gate": name, "released": released})


async def control_reset(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.control.reset()
    state.data.reset()
    return web.json_response({"reset": True})


async def control_requests(request: web.Request) -> web.StreamResponse:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return error(400, "invalid_limit", "limit must be an integer")
    items = list(request.app[STATE].control.requests)
    return web.json_response({"requests": items[-limit:] if limit > 0 else []})


async def control_credentials(request: web.Request) -> web.StreamResponse:
    """Replace the accepted credentials (as when Repairy support issues new ones): one
    object replaces them all with one partner's; ``{"credentials": [...]}`` with several;
    ``{"replace": {...}}`` replaces only the partner of that ``partner_id``.

    Tokens already issued stay valid until they expire or are revoked.
    """
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return error(400, "invalid_json", "the body is not valid JSON")
    fields = ("app_key", "app_secret", "partner_id")
    one = isinstance(body, dict) and "replace" in body
    specs = (body.get("credentials") if isinstance(body, dict) and "credentials" in body
             else [body.get("replace") if one else body])
    if not isinstance(specs, list) or not specs or not all(
            isinstance(spec, dict) and all(isinstance(spec.get(f), str) and spec[f]
                                           for f in fields) for spec in specs):
        return error(400, "invalid_credentials_spec",
                     "app_key, app_secret and partner_id are required strings")
    creds = [Credential(spec["app_key"], spec["app_secret"], spec["partner_id"])
             for spec in specs]
    if one:
        kept = [c for c in state.tokens.credentials if c.partner_id != creds[0].partner_id]
        creds = [*kept, *creds]
    state.tokens.credentials = creds
    first = creds[-1] if one else creds[0]
    return web.json_response({"app_key": first.app_key, "partner_id": first.partner_id,
                              "partners": [c.partner_id for c in creds]})


async def control_config(request: web.Request) -> web.StreamResponse:
    """What a client needs to talk to this sandbox (its own made-up credentials included)."""
    cfg = request.app[STATE].config
    return web.json_response({
        "app_key": cfg.app_key, "app_secret_fingerprint": fingerprint(cfg.app_secret),
        "partner_id": cfg.partner_id, "access_ttl": cfg.access_ttl,
        "refresh_ttl": cfg.refresh_ttl, "rotate_refresh": cfg.rotate_refresh,
        "single_token": cfg.single_token,
        "partners": [{"app_key": c.app_key, "partner_id": c.partner_id,
                      "app_secret_fingerprint": fingerprint(c.app_secret)}
                     for c in request.app[STATE].tokens.credentials],
        "workshops": list(request.app[STATE].data.workshops)})
