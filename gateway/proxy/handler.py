"""The proxy handler: admit the request, take the body, inject credentials, forward, stream back.

Per request, in order: the inbound checks (:mod:`~gateway.proxy.inbound`), who is calling and
which route (:mod:`~gateway.proxy.access`), ``Expect`` and a declared size, the rate limits,
the circuit breaker (:mod:`~gateway.proxy.limits`); then ``100 Continue`` if asked for, the
body (:mod:`~gateway.proxy.body`), a token, an upstream slot, the exchange with its retries
(:mod:`~gateway.proxy.retry`) and at most one replay after an upstream 401 with a renewed
token; the answer is streamed back unchanged. Each request yields one log line and its metrics.

Blame is kept honest: a caller who leaves is 499 ``client_closed_request`` (its upstream
exchange is cancelled, never sent if not yet sent); the caller's own faults get 400/408/413;
the upstream's faults 502/504 and the upstream metrics; the gateway's own limits 429/503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    BodyTooLarge,
    ClientClosedRequest,
    CredentialsRotated,
    ExpectationFailed,
    GatewayError,
    ShuttingDown,
    UpstreamBusy,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    error_response,
)
from gateway.logs import access_sink, json_line
from gateway.metrics import Metrics
from gateway.proxy.access import ANONYMOUS
from gateway.proxy.body import (
    CHUNK,
    NO_BODY,
    BodyReader,
    TakenBody,
    check_declared_size,
    take_body,
)
from gateway.proxy.cache import (
    X_CACHE,
    CachedAnswer,
    CacheRule,
    cache_key,
    directives,
    matching,
)
from gateway.proxy.headers import (
    REQUEST_ID,
    CachedResponse,
    PassThroughResponse,
    WholePassThroughResponse,
    downstream_response_headers,
    request_id_of,
    upstream_request_headers,
    with_credentials,
)
from gateway.proxy.idempotency import (
    IDEMPOTENCY_KEY,
    LEASE_MARGIN,
    REPLAYED,
    IdempotencyInFlight,
    IdempotencyUnavailable,
    Record,
    fingerprint,
    kept_headers,
    leader_deadline,
    parse_key,
    protected,
    refusal,
    settle_status,
    storage_key,
)
from gateway.proxy.idempotency_store import CLAIM_ROUNDS, POLL_FLOOR
from gateway.proxy.inbound import GatewayRequestHandler, check_request, send_continue
from gateway.proxy.limits import Outcome
from gateway.proxy.retry import Attempts
from gateway.proxy.routes import method_label, route_template
from gateway.proxy.upstream import Body
from gateway.state import GatewayState
from gateway.token.value import Token
from gateway.urls import read_up_to, target_url

log = logging.getLogger("gateway.proxy")
_CACHEABLE: Final = frozenset({"GET", "HEAD"})
_UNSAFE: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Breaker outcomes of the upstream errors: only connection failures and timeouts count.
_BREAKER_FAILURE_KINDS: Final = frozenset({"connect", "timeout"})


@dataclass
class _Outcome:
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

    def answered(self, resp: aiohttp.ClientResponse, seconds: float) -> None:
        """An upstream attempt got its status line."""
        self.upstream_status = resp.status
        if resp.status >= 500 and self.attempts is not None and settle_status(
                resp.status) == "unknown":
            self.attempts.maybe_acted = True
        if self.metrics is not None:
            self.metrics.upstream_response(method_label(self.method), self.route, resp.status,
                                           seconds)


#: What a leader hands its caller: the answer, its body (or the start of it), whether that is
#: all of it, and else the record to settle its key with after the rest is streamed.
_Led = tuple[aiohttp.ClientResponse, bytes, bool, Record | None]


@dataclass(frozen=True)
class _Exchange:
    """What is sent upstream: the target, the headers (credentials added at each send), the
    body, and its reader (for blame)."""

    url: URL
    headers: CIMultiDict[str]
    body: TakenBody
    reader: BodyReader


class Proxy:
    """The request handler of the proxy listener."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        s = state.settings
        self._auth_paths = (s.auth.auth_token_path, s.auth.auth_refresh_path)
        self._internal = frozenset({s.inbound.client_key_header.lower(), *s.upstream.strip_headers})
        self._upstream = str(s.partner.base_url)
        #: How long a leader may work on its key (it is cut off there), and the lease its
        #: claim carries: past it, repeats count a claim that was sending as "unknown".
        self._leader_deadline = leader_deadline(
            s.token.token_wait_timeout, s.upstream.connect_timeout, s.upstream.total_timeout)
        self._lease = self._leader_deadline + LEASE_MARGIN
        #: Leaders of Idempotency-Keys in flight (a task must be referenced to live).
        self._leaders: set[asyncio.Future[Any]] = set()
        #: The upstream send, traced or not: chosen once, so no request pays for tracing off.
        self._send_upstream = self._send if state.tracing is None else self._traced_send
        #: Requests in progress (the server's shutdown waits for them, to one deadline).
        self.active = 0
        self._drained: asyncio.Event | None = None
        self.stopping = False

    async def drain(self, within: float) -> None:
        """Wait up to ``within`` seconds for the requests in progress to finish."""
        if self.active == 0 or within <= 0:
            return
        self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._drained.wait()

    async def stop_leaders(self, within: float) -> None:
        """After the drain: cancel the Idempotency-Key leaders still running (each settles
        its key as a shutdown cut it off, and logs how it ended) and wait up to ``within`` for
        them, so none ends unobserved when the event loop closes."""
        leaders = [task for task in self._leaders if not task.done()]
        for task in leaders:
            task.add_done_callback(_observed)
            task.cancel()
        if leaders:
            await asyncio.wait(leaders, timeout=within)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        gw = self.state
        protocol = request.protocol
        if isinstance(protocol, GatewayRequestHandler):
            protocol.begin_request()
        self.active += 1
        rid = request_id_of(request.headers)
        started = time.monotonic()
        outcome = _Outcome(metrics=gw.metrics, method=request.method)
        gw.metrics.inflight_count += 1
        try:
            response = await self._forward(request, rid, outcome)
            if outcome.status is None:  # not a caller who left mid-answer
                outcome.status = response.status
                gw.metrics.response(outcome.source, response.status, "none")
            return response
        except ClientClosedRequest:
            self._gone(outcome)
            raise asyncio.CancelledError from None  # nothing to send; aiohttp closes quietly
        except GatewayError as exc:
            outcome.error = exc.code
            outcome.status = exc.status
            gw.metrics.response("gateway", exc.status, exc.code)
            response = error_response(exc, rid)
            outcome.bytes_out = len(response.body) if isinstance(response.body, bytes) else 0
            if exc.status in (400, 408, 413, 417):
                response.force_close()  # the rest of the body is not worth reading
            return response
        except asyncio.CancelledError:
            if self.stopping:  # the server's shutdown deadline cancelled it
                exc2: GatewayError = ShuttingDown("cut off by the shutdown deadline")
                outcome.error, outcome.status = exc2.code, exc2.status
                gw.metrics.response("gateway", exc2.status, exc2.code)
                log.warning("request cut off by the shutdown deadline", extra={"fields": {
                    "event": "shutdown_cancelled", "request_id": rid}})
            else:
                self._gone(outcome)
            raise
        finally:
            gw.metrics.inflight_count -= 1
            self._finished()
            if isinstance(protocol, GatewayRequestHandler):
                protocol.end_request()
            _log_request(request, rid, outcome, started)

    def _gone(self, outcome: _Outcome) -> None:
        outcome.error = "client_closed_request"
        outcome.status = 499
        self.state.metrics.response("gateway", 499, "client_closed_request")

    def _admit(self, request: web.BaseRequest, outcome: _Outcome) -> bool:
        """The checks that need no body, in order (raising the caller's error); True if the
        caller expects ``100 Continue``. Counts the caller in its limits: :meth:`_forward`
        hands that back."""
        gw, s = self.state, self.state.settings
        decoded = check_request(request, self._auth_paths)
        access = gw.access
        outcome.client = access.client(
            request.remote if access.cidrs else None,  # the peer address costs a syscall
            request.headers.get(s.inbound.client_key_header) if access.keys else None)
        gw.metrics.client_request(outcome.client)
        access.check_route(request.method, decoded)
        outcome.route = route_template(decoded)
        outcome.path = decoded
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None and expect.strip().lower() != "100-continue":
            raise ExpectationFailed("only 'Expect: 100-continue' is supported")
        check_declared_size(request, s.proxy.max_body_size)
        gw.upstream.breaker.check()  # open: 503 at once, before any body is read
        if gw.limits.active:
            gw.limits.admit(outcome.client)
            outcome.counted = True
        return expect is not None

    async def _forward(self, request: web.BaseRequest, rid: str,
                       outcome: _Outcome) -> web.StreamResponse:
        """Admit, take the body, send upstream (retries inside), replay after a 401, stream
        the answer back. One coroutine for all of it: every layer would be passed on each
        suspension, and this is the path every request takes."""
        gw, s = self.state, self.state.settings
        try:
            if self._admit(request, outcome) and request.version == aiohttp.HttpVersion11 and (
                    request.body_exists):
                send_continue(request)
            headers = upstream_request_headers(
                request.headers, rid, self._internal,
                forwarded_for=(request.remote or "unix") if s.upstream.forwarded_headers else None)
            if gw.cache.enabled and request.method in _CACHEABLE:
                cached = await self._cached(request, rid, outcome, headers)
                if cached is not None:
                    return cached
            idempotency_key = None
            if gw.idempotency is not None and request.method in _UNSAFE:
                header = request.headers.get(IDEMPOTENCY_KEY)
                routes = s.idempotency.idempotency_routes
                if header is not None and protected(routes, request.method, outcome.path):
                    idempotency_key = parse_key(header)
            caller_gone = functools.partial(_caller_gone, request)
            reader = outcome.reader = BodyReader(request.content, s.inbound.client_body_timeout,
                                                 s.proxy.max_body_size, caller_gone)
            body = NO_BODY if not request.body_exists else await take_body(
                request, reader, s.proxy.replay_body_limit)
            url = target_url(s.partner.base_url, request.raw_path)
            if not body.replayable and request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
            if idempotency_key is not None:
                return await self._idempotent(request, rid, outcome, idempotency_key,
                                              _Exchange(url, headers, body, reader))
            token = gw.tokens.usable() or await gw.tokens.get()
            upstream = gw.upstream
            if not upstream.slots.try_acquire():
                await self._wait_slot(outcome)
            try:
                resp = await self._send_upstream(_Exchange(url, headers, body, reader),
                                                 token, caller_gone, outcome)
                return await self._answer(request, resp, rid, outcome)
            finally:
                upstream.slots.release()
        finally:
            if outcome.counted:
                gw.limits.done(outcome.client)
            if outcome.cache_leader:
                gw.cache.landed(outcome.cache_key)

    async def _wait_slot(self, outcome: _Outcome) -> None:
        try:
            await self.state.upstream.slots.acquire()
        except UpstreamBusy:
            self.state.metrics.limited.labels("upstream_slots", outcome.client).inc()
            raise

    async def _send(self, exchange: _Exchange, token: Token, caller_gone: Callable[[], bool],
                    outcome: _Outcome) -> aiohttp.ClientResponse:
        """The exchange with its retries, and at most one replay after an upstream 401 (the
        caller holds an upstream slot)."""
        gw, s = self.state, self.state.settings
        upstream = gw.upstream
        body = exchange.body
        outcome.attempts = attempts = Attempts(
            method=outcome.method, replayable=body.replayable,
            deadline=(gw.clock.monotonic() + s.upstream.total_timeout) if s.upstream.total_timeout
            else None, caller_gone=caller_gone, on_attempt=outcome.answered,
            body_error=exchange.reader.failed, on_failure=self._upstream_failed)
        upstream.retry.budget.request()
        # Under a breaker ticket until the upstream answered (its status line) or
        # failed: only connection failures and timeouts count against it.
        ticket = upstream.breaker.admit()
        result: Outcome = "neutral"
        outcome.generation, outcome.sent_partner = token.generation, token.partner_id
        try:
            resp = await upstream.retry.send(
                exchange.url, with_credentials(exchange.headers, token.access, token.partner_id),
                body.data, attempts)
            result = "success"
        except UpstreamError as exc:
            result = "failure" if exc.kind in _BREAKER_FAILURE_KINDS else "neutral"
            raise
        finally:
            upstream.breaker.record(ticket, result)
        if resp.status == 401:
            return await self._after_401(exchange.url, exchange.headers, body.data,
                                         body.replayable, token, resp, attempts, outcome)
        gw.route_401.answered(outcome.route, token.generation)
        return resp

    async def _traced_send(self, exchange: _Exchange, token: Token,
                           caller_gone: Callable[[], bool],
                           outcome: _Outcome) -> aiohttp.ClientResponse:
        """:meth:`_send` in an OpenTelemetry span (GATEWAY tracing on)."""
        tracing = self.state.tracing
        assert tracing is not None
        with tracing.upstream(outcome.method, outcome.route, exchange.url.raw_path,
                              exchange.headers) as span:
            resp = await self._send(exchange, token, caller_gone, outcome)
            attempts = outcome.attempts
            tracing.answered(span, resp.status, len(attempts.retried) if attempts else 0,
                             outcome.replayed)
            return resp

    # -- Idempotency-Key -----------------------------------------------------------------------
    async def _idempotent(self, request: web.BaseRequest, rid: str, outcome: _Outcome,
                          key_text: str, exchange: _Exchange) -> web.StreamResponse:
        """A request with an Idempotency-Key on a protected route: lead (claim the key, send,
        keep the answer) or answer a repeat from the key's record."""
        gw, s = self.state, self.state.settings
        store = gw.idempotency
        assert store is not None
        data = exchange.body.data
        if data is not None and not isinstance(data, bytes):
            raise BodyTooLarge("a request with an Idempotency-Key may carry at most "
                               f"{s.proxy.replay_body_limit} bytes (GATEWAY_REPLAY_BODY_LIMIT)",
                               code="idempotency_body_too_large")
        fp = fingerprint(request.method, request.raw_path, data or b"")
        # Scoped per upstream and partner, the current one (it follows a rotation), not per
        # App Key: a retry across an App Key rotation must still find its answer.
        outcome.partner = self.state.tokens.partner_id
        scope = f"{self._upstream}|{outcome.partner}"
        key = storage_key(scope, outcome.client, key_text)
        counted = gw.metrics.idempotency_requests
        for _ in range(CLAIM_ROUNDS):  # released while a repeat waited: claim it again
            # The lease and the leader's deadline start at one instant, before the claim.
            claim = Record.claim(fp, rid, gw.clock.time() + self._lease)
            until = asyncio.get_running_loop().time() + self._leader_deadline
            try:
                record = await store.claim(key, claim, s.idempotency.idempotency_ttl)
            except BaseException:  # it may have landed (the caller left meanwhile): free it
                self._keep(asyncio.ensure_future(self._release(key, claim.owner)))
                raise
            # Ours also when the claim landed but its reply was lost, and the claim re-sent.
            if record is None or record.owner == claim.owner:
                counted.labels("new").inc()
                outcome.idempotency = "new"
                return await self._lead(request, rid, outcome, exchange, key, claim, until)
            if record.fingerprint == fp and record.in_flight_at(gw.clock.time()):
                record = await store.wait(key, s.idempotency.idempotency_wait)
                if record is None:
                    await gw.clock.sleep(POLL_FLOOR)
                    continue
                if record.in_flight_at(gw.clock.time()):
                    counted.labels("in_flight").inc()
                    outcome.idempotency = "in_flight"
                    raise IdempotencyInFlight(
                        "the first request with this Idempotency-Key is still in flight "
                        f"(first request {record.request_id}): retry later", retry_after=1.0)
            if record.fingerprint == fp and record.abandoned_at(gw.clock.time()):
                await gw.clock.sleep(POLL_FLOOR)  # its leader left before sending: take over
                continue
            refused = refusal(record, fp, gw.clock.time())
            if refused is not None:
                counted.labels(refused.code).inc()
                outcome.idempotency = refused.code
                raise refused
            counted.labels("replayed").inc()
            return await self._replay(request, record, outcome)
        raise IdempotencyInFlight("the Idempotency-Key kept changing hands: retry later",
                                  retry_after=1.0)

    async def _replay(self, request: web.BaseRequest, record: Record,
                      outcome: _Outcome) -> web.StreamResponse:
        out = CachedResponse.kept(record.status, record.reason, record.headers, record.body)
        out.headers[REPLAYED] = "true"
        out.headers[REQUEST_ID] = record.request_id
        outcome.idempotency, outcome.source = "replayed", "replay"
        try:
            await out.prepare(request)
            await out.write_eof()
        except ConnectionError:
            raise ClientClosedRequest("the caller left before its answer was sent") from None
        outcome.bytes_out = len(record.body)
        return out

    async def _lead(self, request: web.BaseRequest, rid: str, outcome: _Outcome,
                    exchange: _Exchange, key: str, claim: Record,
                    until: float) -> web.StreamResponse:
        """Send the claimed request in a task of its own, shielded: if the caller leaves, the
        exchange still runs to its end (within the leader's deadline) and its answer is kept,
        so the caller's retry finds it."""
        task = asyncio.create_task(self._settle(exchange, key, claim, outcome, until))
        self._keep(task)
        try:
            resp, body, whole, later = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(self._orphaned, rid, key, claim))
            raise
        if whole:
            return await self._whole(request, resp, body, rid, outcome)
        # Too large to keep: the caller gets the rest as it comes, within the leader's deadline,
        # and the key is settled by how that ended (an upstream body that broke leaves the
        # outcome unknown).
        try:
            return await self._stream_back(request, resp, rid, outcome, body, until)
        finally:  # a caller who left or a shutdown leave the answer whole so far
            broken = outcome.error in ("stream_broken", "stream_deadline")
            self._keep(asyncio.ensure_future(self._record(
                key, claim, claim.settled("unknown") if broken and later is not None
                else later)))

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a leader's task (or its settling) until it ends; the drain waits for it."""
        self.active += 1
        self._leaders.add(task)
        task.add_done_callback(self._lead_done)

    def _lead_done(self, task: asyncio.Future[Any]) -> None:
        self._leaders.discard(task)
        self._finished()

    def _finished(self) -> None:
        """A request or a shielded leader ended: the drain may be over."""
        self.active -= 1
        if self.active == 0 and self._drained is not None:
            self._drained.set()

    async def _settle(self, exchange: _Exchange, key: str, claim: Record,
                      outcome: _Outcome, until: float) -> _Led:
        """The leader's exchange, within its deadline, and the key's record from how it
        ended. Returns the answer, its body (or what was read of it), whether that is all of
        it (then the key is settled here), and else the record to settle the key with once
        the rest has been streamed to the caller (too large to keep; None: release it).

        The claim is marked *sending* before the first send. The key is released (a retry may
        send) only when no attempt can have made Repairy act: nothing left (no connection, a
        gateway limit, no token) or a "try again" answer. A status line of 2xx is a booking
        made: never released. An answer whose body then breaks, a timeout after sending, a
        5xx: "unknown"."""
        gw, s = self.state, self.state.settings
        store = gw.idempotency
        assert store is not None
        kept: Record | None = None  # what the key will hold (None: release it)
        resp: aiohttp.ClientResponse | None = None
        sending = False
        cut_off = False  # the deadline (or a shutdown) ended it, perhaps mid-exchange
        later = False  # the caller streams the rest of the answer, then settles the key
        upstream = gw.upstream
        loop = asyncio.get_running_loop()
        try:
            try:  # a token (GATEWAY_TOKEN_WAIT_TIMEOUT), an upstream slot (the connect timeout)
                async with asyncio.timeout(s.token.token_wait_timeout + s.upstream.connect_timeout):
                    token = gw.tokens.usable() or await gw.tokens.get()
                    _same_partner(outcome, token)
                    if not upstream.slots.try_acquire():
                        await self._wait_slot(outcome)
            except TimeoutError:
                raise UpstreamBusy("no token and upstream slot within the request's "
                                   "deadline") from None
            try:  # the exchange, from the first send (GATEWAY_TOTAL_TIMEOUT's own deadline)
                async with asyncio.timeout_at(until):
                    # Checked by hand too: a Redis client may swallow the timeout's cancel.
                    if loop.time() < until:
                        await store.sending(key, claim)
                    if loop.time() >= until:
                        raise TimeoutError  # nothing sent yet: the claim is released
                    sending = True
                    resp = await self._send_upstream(exchange, token, _never, outcome)
                    state = settle_status(resp.status)
                    limit = s.idempotency.idempotency_max_body
                    body = b""
                    if resp.content_length is None or resp.content_length <= limit:
                        body = await self._read_up_to(resp, limit)
            except TimeoutError:
                cut_off = True
                if not sending:  # the store took the deadline: nothing was sent
                    raise IdempotencyUnavailable(
                        "the Idempotency-Key store was too slow for the request's deadline: "
                        "nothing was sent", retry_after=1.0) from None
                gw.metrics.upstream_error("timeout")
                raise UpstreamTimeout("the request's deadline passed") from None
            finally:
                upstream.slots.release()
            if len(body) > limit or (resp.content_length or 0) > limit:
                later = True
                return resp, body, False, (None if state is None else claim.settled(
                    "not_kept" if state == "done" else state, resp.status))
            if state is not None:
                kept = claim.settled(state, resp.status, resp.reason or "",
                                     kept_headers(downstream_response_headers(resp.headers)),
                                     body if state == "done" else b"")
            return resp, body, True, None
        except BaseException as exc:
            attempts = outcome.attempts
            cut_off = cut_off or isinstance(exc, asyncio.CancelledError)
            if sending and (resp is not None or (attempts is not None and (
                    attempts.maybe_acted or (cut_off and attempts.number > 0)))):
                kept = claim.settled("unknown")  # it may have acted; nobody knows how
            raise
        finally:
            if not later:
                if resp is not None:
                    resp.release()
                await self._record(key, claim, kept)

    async def _release(self, key: str, owner: str) -> None:
        """Free a claim that may have landed but will not be led (nothing was sent)."""
        store = self.state.idempotency
        assert store is not None
        with contextlib.suppress(GatewayError):
            await store.release(key, owner)

    async def _record(self, key: str, claim: Record, kept: Record | None) -> None:
        """Settle the key: keep the record, or release the claim (so a retry may send)."""
        gw = self.state
        store = gw.idempotency
        assert store is not None
        try:
            if kept is None:
                await store.release(key, claim.owner)
            else:
                await store.finish(key, kept, gw.settings.idempotency.idempotency_ttl)
        except GatewayError as exc:  # the store is gone: the caller still gets its answer
            log.warning("the answer to a request with an Idempotency-Key could not be kept: "
                        "repeats get outcome_unknown once its lease runs out if it was sent",
                        extra={"fields": {"event": "idempotency_settle_failed",
                                          "error": exc.code, "request_id": claim.request_id}})
        gw.metrics.idempotency_settled.labels(
            "released" if kept is None else kept.state).inc()

    def _orphaned(self, rid: str, key: str, claim: Record, task: asyncio.Task[_Led]) -> None:
        """The leader of an Idempotency-Key finished after its caller left: release what it
        holds, settle a too-large answer's key (nobody streams it now), say how it ended."""
        if task.cancelled():
            return
        error = task.exception()
        status = None
        if error is None:
            resp, _, whole, later = task.result()
            status = resp.status
            if not whole:
                self._keep(asyncio.ensure_future(self._record(key, claim, later)))
            resp.release()
        log.info("request with an Idempotency-Key completed after its caller left",
                 extra={"fields": {"event": "idempotent_completed", "request_id": rid,
                                   "upstream_status": status,
                                   "error": getattr(error, "code", type(error).__name__)
                                   if error else None}})

    async def _cached(self, request: web.BaseRequest, rid: str, outcome: _Outcome,
                      sent: CIMultiDict[str]) -> web.StreamResponse | None:
        """A cached route: the answer from the cache (a hit, or what a concurrent miss
        stored), or None to go upstream (this caller then leads the single flight).
        ``sent``: the headers it goes upstream with (``Vary`` is judged on them)."""
        cache, metrics = self.state.cache, self.state.metrics
        rule = cache.rule_for(outcome.path)
        if rule is None:
            return None
        outcome.partner = self.state.tokens.partner_id
        outcome.cache_key = cache_key(outcome.partner, request.raw_path)
        asked = directives(request.headers)
        if "no-store" in asked:  # RFC 9111 §5.2.1.5: neither answered from nor stored
            metrics.cache_requests.labels("bypass").inc()
            outcome.cache = "MISS"
            return None
        outcome.cache_rule, outcome.cache_sent = rule, sent
        if "no-cache" in asked or ("Cache-Control" not in request.headers and "no-cache" in
                                   request.headers.get("Pragma", "").lower()):
            metrics.cache_requests.labels("bypass").inc()
            outcome.cache = "MISS"
            return None
        entry = cache.lookup(outcome.cache_key, sent)
        if entry is None and request.method == "GET":
            flight = cache.leader(outcome.cache_key)
            if flight is None:
                outcome.cache_leader = True
                if cache.shared is not None:  # another replica may have fetched it
                    entry = matching(await cache.shared.get(outcome.cache_key), sent)
                    if entry is not None:
                        cache.adopt(outcome.cache_key, entry)
                        return await self._from_cache(request, entry, "HIT", rid, outcome,
                                                      "shared_hit")
            else:  # a miss for this key is on its way upstream: wait for what it stores
                await asyncio.shield(flight)
                entry = cache.lookup(outcome.cache_key, sent)
                if entry is not None:
                    return await self._from_cache(request, entry, "COALESCED", rid, outcome)
        if entry is not None:
            return await self._from_cache(request, entry, "HIT", rid, outcome)
        metrics.cache_requests.labels("miss").inc()
        outcome.cache = "MISS"
        return None

    async def _from_cache(self, request: web.BaseRequest, entry: CachedAnswer, how: str,
                          rid: str, outcome: _Outcome,
                          result: str | None = None) -> web.StreamResponse:
        self.state.metrics.cache_requests.labels(result or how.lower()).inc()
        out = CachedResponse.of(entry, self.state.cache.age(entry), how)
        out.headers[REQUEST_ID] = rid
        outcome.cache = how
        outcome.upstream_status = None
        try:
            await out.prepare(request)
            await out.write_eof()
        except ConnectionError:
            raise ClientClosedRequest("the caller left before its answer was sent") from None
        outcome.bytes_out = 0 if request.method == "HEAD" else len(entry.body)
        outcome.source = "cache"
        return out

    async def _after_401(self, url: URL, headers: CIMultiDict[str], data: Body,
                         replayable: bool, token: Token, resp: aiohttp.ClientResponse,
                         attempts: Attempts, outcome: _Outcome) -> aiohttp.ClientResponse:
        """An upstream 401: renew and replay once (kept bodies), unless the route is marked
        persistent 401 (then, and for streamed bodies, the 401 is passed back)."""
        gw = self.state
        try:
            passed_back = not await self._judge_401(outcome.route, token.generation)
        except BaseException:
            resp.release()
            raise
        if passed_back:
            return resp
        gw.tokens.invalidate(token.generation, "upstream_401")
        if not replayable:
            return resp
        resp.release()
        token = await gw.tokens.get(newer_than=token.generation)
        _same_partner(outcome, token)  # a 401 acted on nothing: the key is released
        outcome.replayed = True
        gw.metrics.replayed.labels("upstream_401").inc()
        resp = await self._exchange(url, headers, data, token, attempts, outcome)
        if resp.status != 401:
            gw.route_401.answered(outcome.route, token.generation)
        else:  # no second replay: pass it back, and judge the route
            await self._judge_401(outcome.route, token.generation)
        return resp

    async def _judge_401(self, route: str, generation: int) -> bool:
        """A 401 on ``route`` with ``generation``: True to invalidate the token (and replay),
        False to pass it back (the route is marked persistent 401). A verdict on the route
        counts only while that token is still the newest, here and in the fleet."""
        r401 = self.state.route_401
        if r401.would_mark(route, generation) and not await self.state.tokens.still_current(
                generation):
            r401.forget(route)
        return r401.unauthorized(route, generation)

    async def _exchange(self, url: URL, headers: CIMultiDict[str], body: Body, token: Token,
                        attempts: Attempts, outcome: _Outcome) -> aiohttp.ClientResponse:
        """The upstream exchange with ``token`` (the replay), retries included."""
        outcome.generation, outcome.sent_partner = token.generation, token.partner_id
        return await self.state.upstream.retry.send(
            url, with_credentials(headers, token.access, token.partner_id), body, attempts)

    def _upstream_failed(self, error: GatewayError) -> None:
        if isinstance(error, UpstreamError):
            self.state.metrics.upstream_error(error.kind)

    async def _answer(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                      rid: str, outcome: _Outcome) -> web.StreamResponse:
        """The upstream's answer for the caller. A small one (the common case) is read whole
        first, so a broken upstream body is still a clean 502, and sent as one write (head
        and body together). Anything else is streamed."""
        length = resp.content_length
        whole_limit = CHUNK if outcome.cache_rule is None else max(
            CHUNK, self.state.cache.max_entry)
        if length is None or length > whole_limit or request.method == "HEAD" or (
                "chunked" in resp.headers.get("Transfer-Encoding", "").lower()):
            return await self._stream_back(request, resp, rid, outcome)
        try:
            body = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._broken_body(exc) from exc
        finally:
            resp.release()
        return await self._whole(request, resp, body, rid, outcome)

    async def _read_up_to(self, resp: aiohttp.ClientResponse, limit: int) -> bytes:
        """The answer's body, or its first ``limit`` + 1 bytes if it is longer."""
        try:
            return await read_up_to(resp, limit)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._broken_body(exc) from exc

    def _broken_body(self, exc: BaseException) -> UpstreamError:
        """The error (counted) for an upstream answer whose body stalled or broke."""
        if isinstance(exc, TimeoutError):
            self.state.metrics.upstream_error("timeout")
            return UpstreamTimeout("the upstream's answer stalled")
        self.state.metrics.upstream_error("protocol")
        return UpstreamInvalidResponse("the upstream response body broke")

    async def _whole(self, request: web.BaseRequest, resp: aiohttp.ClientResponse, body: bytes,
                     rid: str, outcome: _Outcome) -> web.StreamResponse:
        """An answer read whole, sent as one write."""
        out = WholePassThroughResponse.of(resp.status, resp.reason, resp.headers, body)
        rule = outcome.cache_rule
        # Kept only under the key of the partner whose token fetched it (a rotation between).
        if rule is not None and outcome.sent_partner == outcome.partner and self.state.cache.store(
                outcome.cache_key, rule, resp.status, resp.reason or "", out.headers, body,
                outcome.cache_sent or CIMultiDict()):
            self.state.metrics.cache_stored.inc()
        if outcome.cache is not None:
            out.headers[X_CACHE] = outcome.cache
        if REQUEST_ID not in out.headers:
            out.headers[REQUEST_ID] = rid
        try:  # sent here, before the log line is made: that is the caller's latency
            await out.prepare(request)
            await out.write_eof()
        except ConnectionError:
            raise ClientClosedRequest("the caller left before its answer was sent") from None
        outcome.bytes_out = len(body)
        return out

    async def _stream_back(self, request: web.BaseRequest, resp: aiohttp.ClientResponse,
                           rid: str, outcome: _Outcome, prefix: bytes = b"",
                           until: float | None = None) -> web.StreamResponse:
        """Stream the answer chunk by chunk, as it comes (``prefix``: what was read of it
        already; ``until``: the loop time at which it is cut off, for a leader)."""
        try:
            out = PassThroughResponse(status=resp.status, reason=resp.reason)
            downstream_response_headers(resp.headers, out.headers)
            if REQUEST_ID not in out.headers:
                out.headers[REQUEST_ID] = rid
            length = resp.content_length
            if length is not None and "chunked" not in resp.headers.get(
                    "Transfer-Encoding", "").lower():
                out.content_length = length
            try:
                await out.prepare(request)
            except ConnectionError:
                raise ClientClosedRequest("the caller left before its answer was sent") from None
            deadline = (contextlib.nullcontext() if until is None
                        else asyncio.timeout_at(until))
            try:
                async with deadline:
                    chunks = _prefixed(prefix, resp) if prefix else resp.content.iter_any()
                    async for chunk in chunks:
                        try:
                            await out.write(chunk)
                        except ConnectionError:  # aiohttp's ClientConnectionResetError too
                            raise ClientClosedRequest(
                                "the caller left while its answer was sent") from None
                        outcome.bytes_out += len(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are gone already: cut the caller's connection so it sees a broken
                # body rather than a short one that looks complete.
                if isinstance(deadline, asyncio.Timeout) and deadline.expired():
                    outcome.error = "stream_deadline"
                    log.warning("answer cut off at the request's deadline", extra={"fields": {
                        "event": "stream_deadline", "request_id": rid}})
                    if request.transport is not None:
                        request.transport.abort()
                    return out
                if isinstance(exc, aiohttp.ClientPayloadError | TimeoutError):
                    self.state.metrics.upstream_error(
                        "timeout" if isinstance(exc, TimeoutError) else "protocol")
                outcome.error = "stream_broken"
                log.warning("response body broke mid-stream", extra={"fields": {
                    "event": "stream_broken", "request_id": rid,
                    "error": type(exc).__name__}})
                if request.transport is not None:
                    request.transport.abort()
                return out
            try:
                await out.write_eof()
            except ConnectionError:
                raise ClientClosedRequest("the caller left while its answer was sent") from None
            return out
        finally:
            resp.release()


async def _prefixed(prefix: bytes, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    yield prefix
    async for chunk in resp.content.iter_any():
        yield chunk


def _never() -> bool:
    return False


def _caller_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _log_request(request: web.BaseRequest, rid: str, outcome: _Outcome,
                 started: float) -> None:
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


def _same_partner(outcome: _Outcome, token: Token) -> None:
    """An Idempotency-Key scoped to one partner is never sent with another's token (the
    credentials rotated while the request waited): nothing is sent, the key is released."""
    if outcome.partner and outcome.idempotency and token.partner_id != outcome.partner:
        raise CredentialsRotated("the Partner ID changed while this request waited: nothing "
                                 "was sent; retry", retry_after=1.0)


def _observed(task: asyncio.Future[Any]) -> None:
    """A leader cut off at shutdown: its end is settled and logged by its own callbacks;
    retrieved here so that the event loop has nothing to report."""
    if not task.cancelled():
        task.exception()
