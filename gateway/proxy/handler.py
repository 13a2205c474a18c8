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
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    ClientClosedRequest,
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
from gateway.proxy.body import CHUNK, NO_BODY, BodyReader, check_declared_size, take_body
from gateway.proxy.cache import X_CACHE, CachedAnswer, CacheRule
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
from gateway.proxy.inbound import GatewayRequestHandler, check_request, send_continue
from gateway.proxy.limits import Outcome
from gateway.proxy.retry import Attempts
from gateway.proxy.routes import method_label, route_template
from gateway.proxy.upstream import Body
from gateway.state import GatewayState
from gateway.token.value import Token
from gateway.urls import target_url

log = logging.getLogger("gateway.proxy")
_CACHEABLE: Final = frozenset({"GET", "HEAD"})
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
    cache_leader: bool = False  # leads the single flight for cache_key (to land)
    source: str = "upstream"
    metrics: Metrics | None = None
    method: str = "GET"

    def answered(self, resp: aiohttp.ClientResponse, seconds: float) -> None:
        """An upstream attempt got its status line."""
        self.upstream_status = resp.status
        if self.metrics is not None:
            self.metrics.upstream_response(method_label(self.method), self.route, resp.status,
                                           seconds)


class Proxy:
    """The request handler of the proxy listener."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        s = state.settings
        self._auth_paths = (s.auth_token_path, s.auth_refresh_path)
        self._internal = frozenset({s.client_key_header.lower(), *s.strip_headers})
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
            self.active -= 1
            if self.active == 0 and self._drained is not None:
                self._drained.set()
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
            request.headers.get(s.client_key_header) if access.keys else None)
        gw.metrics.client_request(outcome.client)
        access.check_route(request.method, decoded)
        outcome.route = route_template(decoded)
        outcome.path = decoded
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None and expect.strip().lower() != "100-continue":
            raise ExpectationFailed("only 'Expect: 100-continue' is supported")
        check_declared_size(request, s.max_body_size)
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
            if gw.cache.enabled and request.method in _CACHEABLE:
                cached = await self._cached(request, rid, outcome)
                if cached is not None:
                    return cached
            caller_gone = functools.partial(_caller_gone, request)
            reader = outcome.reader = BodyReader(request.content, s.client_body_timeout,
                                                 s.max_body_size, caller_gone)
            body = NO_BODY if not request.body_exists else await take_body(
                request, reader, s.replay_body_limit)
            url = target_url(s.base_url, request.raw_path)
            headers = upstream_request_headers(
                request.headers, rid, self._internal,
                forwarded_for=(request.remote or "unix") if s.forwarded_headers else None)
            if not body.replayable and request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
            token = gw.tokens.usable() or await gw.tokens.get()
            upstream = gw.upstream
            if not upstream.slots.try_acquire():
                try:
                    await upstream.slots.acquire()
                except UpstreamBusy:
                    gw.metrics.limited.labels("upstream_slots", outcome.client).inc()
                    raise
            try:
                outcome.attempts = attempts = Attempts(
                    method=request.method, replayable=body.replayable,
                    deadline=(gw.clock.monotonic() + s.total_timeout) if s.total_timeout
                    else None, caller_gone=caller_gone, on_attempt=outcome.answered,
                    body_error=reader.failed, on_failure=self._upstream_failed)
                upstream.retry.budget.request()
                # Under a breaker ticket until the upstream answered (its status line) or
                # failed: only connection failures and timeouts count against it.
                ticket = upstream.breaker.admit()
                result: Outcome = "neutral"
                outcome.generation = token.generation
                try:
                    resp = await upstream.retry.send(
                        url, with_credentials(headers, token.access, token.partner_id),
                        body.data, attempts)
                    result = "success"
                except UpstreamError as exc:
                    result = "failure" if exc.kind in _BREAKER_FAILURE_KINDS else "neutral"
                    raise
                finally:
                    upstream.breaker.record(ticket, result)
                if resp.status == 401:
                    resp = await self._after_401(url, headers, body.data, body.replayable,
                                                 token, resp, attempts, outcome)
                else:
                    gw.route_401.answered(outcome.route, token.generation)
                return await self._answer(request, resp, rid, outcome)
            finally:
                upstream.slots.release()
        finally:
            if outcome.counted:
                gw.limits.done(outcome.client)
            if outcome.cache_leader:
                gw.cache.landed(outcome.cache_key)

    async def _cached(self, request: web.BaseRequest, rid: str,
                      outcome: _Outcome) -> web.StreamResponse | None:
        """A cached route: the answer from the cache (a hit, or what a concurrent miss
        stored), or None to go upstream (this caller then leads the single flight)."""
        cache, metrics = self.state.cache, self.state.metrics
        rule = cache.rule_for(outcome.path)
        if rule is None:
            return None
        outcome.cache_rule, outcome.cache_key = rule, f"GET {request.raw_path}"
        if "no-cache" in request.headers.get("Cache-Control", "").lower():
            metrics.cache_requests.labels("bypass").inc()
            outcome.cache = "MISS"
            return None
        entry = cache.lookup(outcome.cache_key, request.headers)
        if entry is None and request.method == "GET":
            flight = cache.leader(outcome.cache_key)
            if flight is None:
                outcome.cache_leader = True
            else:  # a miss for this key is on its way upstream: wait for what it stores
                await asyncio.shield(flight)
                entry = cache.lookup(outcome.cache_key, request.headers)
                if entry is not None:
                    return await self._from_cache(request, entry, "COALESCED", rid, outcome)
        if entry is not None:
            return await self._from_cache(request, entry, "HIT", rid, outcome)
        metrics.cache_requests.labels("miss").inc()
        outcome.cache = "MISS"
        return None

    async def _from_cache(self, request: web.BaseRequest, entry: CachedAnswer, how: str,
                          rid: str, outcome: _Outcome) -> web.StreamResponse:
        self.state.metrics.cache_requests.labels(how.lower()).inc()
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
        outcome.generation = token.generation
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
        except TimeoutError as exc:
            self.state.metrics.upstream_error("timeout")
            raise UpstreamTimeout("the upstream's answer stalled") from exc
        except aiohttp.ClientError as exc:
            self.state.metrics.upstream_error("protocol")
            raise UpstreamInvalidResponse("the upstream response body broke") from exc
        finally:
            resp.release()
        out = WholePassThroughResponse.of(resp.status, resp.reason, resp.headers, body)
        if outcome.cache_rule is not None:
            if self.state.cache.store(outcome.cache_key, outcome.cache_rule, resp.status,
                                      resp.reason or "", out.headers, body, request.headers):
                self.state.metrics.cache_stored.inc()
            out.headers[X_CACHE] = "MISS"
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
                           rid: str, outcome: _Outcome) -> web.StreamResponse:
        """Stream the answer chunk by chunk, as it comes."""
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
            try:
                async for chunk in resp.content.iter_any():
                    try:
                        await out.write(chunk)
                    except ConnectionError:  # aiohttp's ClientConnectionResetError included
                        raise ClientClosedRequest(
                            "the caller left while its answer was sent") from None
                    outcome.bytes_out += len(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are gone already: cut the caller's connection so it sees a broken
                # body rather than a short one that looks complete.
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
        "cache": outcome.cache}
    sink = access_sink(log)
    if sink is not None:
        msg = f"{request.method} {outcome.route} {outcome.status}"
        sink.write(json_line(time.time(), "info", log.name, msg, fields))
    else:
        log.info("%s %s %s", request.method, outcome.route, outcome.status,
                 extra={"fields": fields})
