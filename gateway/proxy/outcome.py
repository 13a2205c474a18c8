"""What happened to one request (:class:`Outcome`), and its one access line
(:func:`log_request`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.logs import access_sink, json_line
from gateway.metrics import Metrics
from gateway.proxy.access import ANONYMOUS
from gateway.proxy.body import BodyReader
from gateway.proxy.cache import CacheRule
from gateway.proxy.idempotency import settle_status
from gateway.proxy.retry import Attempts
from gateway.proxy.routes import method_label

log = logging.getLogger("gateway.proxy")


@dataclass
class Outcome:
    """What happened to one request, for its log line and metrics."""

    route: str = "other"
    client: str = ANONYMOUS
    status: int | None = None
    upstream_status: int | None = None
    generation: int | None = None
    replayed: bool = False
    error: str | None = None
    bytes_out: int = 0
    reader: BodyReader | None = None
    attempts: Attempts | None = None
    counted: bool = False  # in the per-client limits (to hand back)
    path: str = ""
    cache: str | None = None  # HIT, MISS, COALESCED on cached routes
    cache_rule: CacheRule | None = None
    cache_key: str = ""
    cache_sent: CIMultiDict[str] | None = None  # the headers sent upstream (for Vary)
    #: The partner of the cache key or Idempotency-Key scope (empty: neither), and of the
    #: token last sent: a rotation between the two must not file one partner's answer under
    #: the other's.
    partner: str = ""
    sent_partner: str = ""
    cache_leader: bool = False  # leads the single flight for cache_key (to land)
    source: str = "upstream"
    metrics: Metrics | None = None
    method: str = "GET"
    idempotency: str | None = None  # new, replayed, or the refusal's code
    # -- for the audit trail (:mod:`gateway.proxy.audit`) --
    request_id: str = ""
    peer: str = ""
    started: float = 0.0
    idempotency_key: str | None = None
    audited: bool = False
    audit_leader: bool = False  # an Idempotency-Key leader writes it, caller or not

    def answered(self, resp: aiohttp.ClientResponse, seconds: float) -> None:
        """An upstream attempt got its status line."""
        self.upstream_status = resp.status
        if resp.status >= 500 and self.attempts is not None and settle_status(
                resp.status) == "unknown":
            self.attempts.maybe_acted = True
        if self.metrics is not None:
            self.metrics.upstream_response(method_label(self.method), self.route, resp.status,
                                           seconds)


def log_request(request: web.BaseRequest, rid: str, outcome: Outcome, started: float) -> None:
    """The request's one access line: preformatted into the log batch when our JSON handler
    is the only one (the same bytes ``logging`` would write), through ``logging`` otherwise."""
    attempts = outcome.attempts
    fields = {
        "event": "request", "request_id": rid, "client": outcome.client,
        "method": request.method[:16], "route": outcome.route, "status": outcome.status,
        "upstream_status": outcome.upstream_status, "error": outcome.error,
        "duration_ms": round((time.monotonic() - started) * 1000, 2),
        "bytes_in": outcome.reader.bytes_in if outcome.reader else 0,
        "bytes_out": outcome.bytes_out,
        "token_generation": outcome.generation, "replayed": outcome.replayed,
        "retried": bool(attempts and attempts.retried),
        "retries": ",".join(attempts.retried) if attempts and attempts.retried else None,
        "cache": outcome.cache, "idempotency": outcome.idempotency}
    sink = access_sink(log)
    if sink is not None:
        msg = f"{request.method} {outcome.route} {outcome.status}"
        sink.write(json_line(time.time(), "info", log.name, msg, fields))
    else:
        log.info("%s %s %s", request.method, outcome.route, outcome.status,
                 extra={"fields": fields})
