"""The audit trail: one line, on the ``audit`` logger, per mutating request (POST, PUT, PATCH,
DELETE) that reached a decision: forwarded to Repairy (its status, or null when the outcome is
unknown), answered from a kept Idempotency-Key answer (``replayed``), or refused by the
gateway (its code).

A line is written when the upstream exchange ends (an Idempotency-Key request's leader writes
it even after its caller left), at most once per request. It carries the request id, who called
(client key name, or the peer's address), method and route template, the Idempotency-Key as a
SHA-256 prefix, Repairy's status, the duration, and the booking id when the request's path, a
``Location`` header or an answer the gateway read whole anyway (a kept one) says it. Never a
body, a header's value or a secret. :func:`gateway.logs.setup_audit` decides where lines go
(never batched)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Final

from gateway.proxy.outcome import Outcome

log = logging.getLogger("audit")
MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: A booking id in a Location header: /bookings/<id> (any prefix).
_LOCATION: Final = re.compile(r"/bookings/([A-Za-z0-9_-]{1,64})(?:[/?#]|$)")
_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Kept answers are at most GATEWAY_IDEMPOTENCY_MAX_BODY; look no further than this.
_MAX_BODY: Final = 1 << 20


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def booking_id(location: str | None, body: bytes | None, path: str = "") -> str | None:
    """The booking's id from the request's own path (``/bookings/<id>/...``), a
    ``Location`` header, or a JSON answer read whole (its ``data.id`` or ``id``); None when
    none says it."""
    for text in (path, location):
        found = _LOCATION.search(text) if text else None
        if found:
            return found.group(1)
    if body and len(body) <= _MAX_BODY:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(doc, dict):
            inner = doc.get("data", doc)
            value = inner.get("id") if isinstance(inner, dict) else None
            if isinstance(value, str) and _ID.match(value):
                return value
    return None


def audit(outcome: Outcome, *, status: int | None, code: str | None = None,
          location: str | None = None, body: bytes | None = None,
          replayed: bool = False) -> None:
    """The request's audit line (once; only for mutating methods)."""
    if outcome.audited or outcome.method not in MUTATING:
        return
    outcome.audited = True
    if log.disabled or not log.isEnabledFor(logging.INFO):
        return
    log.info("%s %s %s", outcome.method, outcome.route, status if code is None else code,
             extra={"fields": {
                 "event": "audit", "request_id": outcome.request_id,
                 "client": outcome.client if outcome.client != "anonymous" else outcome.peer,
                 "credential": outcome.lane.name,
                 "method": outcome.method, "route": outcome.route,
                 "idempotency_key_sha256": None if outcome.idempotency_key is None
                 else key_hash(outcome.idempotency_key),
                 "status": status, "code": code, "replayed": replayed,
                 "duration_ms": round((time.monotonic() - outcome.started) * 1000, 2),
                 "booking_id": booking_id(location, body, outcome.path)}})
