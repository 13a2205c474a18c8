"""The proxy handler: a request's walk through the rooms of the request path.

Per request, in order: admission (:mod:`~gateway.proxy.admission`: the inbound checks, who is
calling and which route, ``Expect`` and a declared size, the circuit breaker, the rate limits);
``100 Continue`` if asked for; the GET cache (:mod:`~gateway.proxy.cache_path`); the body
(:mod:`~gateway.proxy.body`); then either the Idempotency-Key leader
(:mod:`~gateway.proxy.leader`) or the upstream exchange (:mod:`~gateway.proxy.exchange`: a
token, a slot, the retries, at most one replay after a 401); the answer is written back
(:mod:`~gateway.proxy.respond`). Each request yields one access line and its metrics
(:mod:`~gateway.proxy.outcome`).

Blame is kept honest: a caller who leaves is 499 ``client_closed_request`` (its upstream
exchange is cancelled, never sent if not yet sent); the caller's own faults get 400/408/413;
the upstream's faults 502/504 and the upstream metrics; the gateway's own limits 429/503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Final

import aiohttp
from aiohttp import web

from gateway.errors import ClientClosedRequest, GatewayError, ShuttingDown
from gateway.proxy.admission import admit
from gateway.proxy.audit import MUTATING, audit
from gateway.proxy.body import NO_BODY, BodyReader, take_body
from gateway.proxy.cache_path import CachePath
from gateway.proxy.context import InFlight, Outbound, ProxyContext
from gateway.proxy.exchange import UpstreamExchange
from gateway.proxy.headers import error_response, request_id_of, upstream_request_headers
from gateway.proxy.idempotency import IDEMPOTENCY_KEY, parse_key, protected
from gateway.proxy.inbound import GatewayRequestHandler, send_continue
from gateway.proxy.leader import IdempotencyLeader
from gateway.proxy.outcome import Outcome, log_request
from gateway.proxy.respond import Responder
from gateway.proxy.routes import method_label
from gateway.urls import target_url

log = logging.getLogger("gateway.proxy")
_CACHEABLE: Final = frozenset({"GET", "HEAD"})
_UNSAFE: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Proxy:
    """The request handler of the proxy listener."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        config = ctx.config
        self._internal = frozenset({config.inbound.client_key_header.lower(),
                                    config.inbound.credential_header.lower(),
                                    *config.upstream.strip_headers})
        self._inflight = InFlight()
        self._exchange = UpstreamExchange(ctx)
        self._responder = Responder(ctx)
        self._cache = CachePath(ctx)
        self._leader = IdempotencyLeader(ctx, self._exchange, self._responder, self._inflight)
        self.stopping = False

    async def drain(self, within: float) -> None:
        """Wait up to ``within`` seconds for the requests in progress to finish."""
        await self._inflight.drain(within)

    async def stop_leaders(self, within: float) -> None:
        """After the drain: cancel the Idempotency-Key leaders still running and wait up to
        ``within`` for them (:meth:`IdempotencyLeader.stop`)."""
        await self._leader.stop(within)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        ctx = self.ctx
        protocol = request.protocol
        ours = protocol if isinstance(protocol, GatewayRequestHandler) else None
        if ours is not None:
            ours.begin_request()
        self._inflight.begin()
        rid = request_id_of(request.headers)
        started = time.monotonic()
        method = request.method
        outcome = Outcome(lane=ctx.lanes.default, method=method, request_id=rid, started=started,
                          peer=(request.remote or "unix") if method in MUTATING else "")
        ctx.metrics.inflight_count += 1
        try:
            response = await self._forward(request, rid, outcome)
            if outcome.status is None:  # not a caller who left mid-answer
                outcome.status = response.status
                ctx.metrics.response(outcome.source, response.status, "none")
            return response
        except ClientClosedRequest:
            self._gone(outcome)
            raise asyncio.CancelledError from None  # nothing to send; aiohttp closes quietly
        except GatewayError as exc:
            outcome.error = exc.code
            outcome.status = exc.status
            ctx.metrics.response("gateway", exc.status, exc.code)
            response = error_response(exc, rid)
            outcome.bytes_out = len(response.body) if isinstance(response.body, bytes) else 0
            if exc.status in (400, 408, 413, 417):
                response.force_close()  # the rest of the body is not worth reading
            return response
        except asyncio.CancelledError:
            if self.stopping:  # the server's shutdown deadline cancelled it
                exc2: GatewayError = ShuttingDown("cut off by the shutdown deadline")
                outcome.error, outcome.status = exc2.code, exc2.status
                ctx.metrics.response("gateway", exc2.status, exc2.code)
                log.warning("request cut off by the shutdown deadline", extra={"fields": {
                    "event": "shutdown_cancelled", "request_id": rid}})
            else:
                self._gone(outcome)
            raise
        finally:
            ctx.metrics.inflight_count -= 1
            self._inflight.end()
            if ours is not None:
                ours.end_request()
            if not outcome.audited and not outcome.audit_leader:  # a refusal, or no answer
                audit(outcome, status=None if outcome.error else outcome.upstream_status,
                      code=outcome.error)
            status = outcome.status
            if status is not None:
                ctx.metrics.request_done(method_label(request.method), outcome.route, status,
                                         time.monotonic() - started)
                if outcome.error is None and outcome.source == "upstream" and (
                        outcome.upstream_status is not None):  # an upstream answer passed back
                    outcome.lane.tally.answered(status)
            log_request(request, rid, outcome, started,
                        ours.event_loop if ours is not None else None)

    def _gone(self, outcome: Outcome) -> None:
        outcome.error = "client_closed_request"
        outcome.status = 499
        self.ctx.metrics.response("gateway", 499, "client_closed_request")

    async def _forward(self, request: web.BaseRequest, rid: str,
                       outcome: Outcome) -> web.StreamResponse:
        """Admit, take the body, send upstream (or lead the Idempotency-Key), write the
        answer back. One coroutine for the walk: every layer would be passed on each
        suspension, and this is the path every request takes."""
        ctx, config = self.ctx, self.ctx.config
        try:
            if admit(ctx, request, outcome) and request.version == aiohttp.HttpVersion11 and (
                    request.body_exists):
                send_continue(request)
            headers = upstream_request_headers(
                request.headers, rid, self._internal, forwarded_for=(
                    request.remote or "unix") if config.upstream.forwarded_headers else None)
            if ctx.cache.enabled and request.method in _CACHEABLE:
                cached = await self._cache.lookup(request, rid, outcome, headers)
                if cached is not None:
                    return cached
            idempotency_key = None
            if ctx.idempotency is not None and request.method in _UNSAFE:
                header = request.headers.get(IDEMPOTENCY_KEY)
                routes = config.idempotency.idempotency_routes
                if header is not None and protected(routes, request.method, outcome.path):
                    idempotency_key = outcome.idempotency_key = parse_key(header)
            caller_gone = functools.partial(_caller_gone, request)
            reader = outcome.reader = BodyReader(
                request.content, config.inbound.client_body_timeout,
                config.proxy.max_body_size, caller_gone)
            body = NO_BODY if not request.body_exists else await take_body(
                request, reader, config.proxy.replay_body_limit)
            url = target_url(outcome.lane.base_url, request.raw_path)
            if not body.replayable and request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
            out = Outbound(url, headers, body, reader)
            if idempotency_key is not None:
                return await self._leader.handle(request, rid, outcome, idempotency_key, out)
            token = await self._exchange.claim(outcome)
            try:
                resp = await self._exchange.send(out, token, caller_gone, outcome)
                audit(outcome, status=resp.status, location=resp.headers.get("Location"))
                return await self._responder.answer(request, resp, rid, outcome)
            finally:
                self._exchange.release(outcome)
        finally:
            if outcome.counted:
                ctx.limits.done(outcome.client)
            if outcome.cache_leader:
                ctx.cache.landed(outcome.cache_key)


def _caller_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
