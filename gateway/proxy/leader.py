"""The Idempotency-Key leader: one booking per key.

A request with an Idempotency-Key on a protected route claims the key (scoped per upstream,
partner and client) and leads: its exchange runs in a task of its own, shielded from the caller
leaving, within the leader's deadline, and its answer is kept for the repeats. A repeat waits
for the leader, or is answered from the key's record, or refused (another body, still in
flight, outcome unknown). The rules of records live in :mod:`~gateway.proxy.idempotency`; the
stores in :mod:`~gateway.proxy.idempotency_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import (
    BodyTooLarge,
    ClientClosedRequest,
    GatewayError,
    UpstreamBusy,
    UpstreamTimeout,
)
from gateway.proxy.audit import audit
from gateway.proxy.context import InFlight, Outbound, ProxyContext
from gateway.proxy.exchange import UpstreamExchange
from gateway.proxy.headers import REQUEST_ID, CachedResponse, downstream_response_headers
from gateway.proxy.idempotency import (
    LEASE_MARGIN,
    REPLAYED,
    IdempotencyInFlight,
    IdempotencyUnavailable,
    Record,
    fingerprint,
    kept_headers,
    leader_deadline,
    refusal,
    settle_status,
    storage_key,
)
from gateway.proxy.idempotency_store import CLAIM_ROUNDS, POLL_FLOOR
from gateway.proxy.outcome import Outcome
from gateway.proxy.respond import Responder

log = logging.getLogger("gateway.proxy")
#: What a leader hands its caller: the answer, its body (or the start of it), whether that is
#: all of it, and else the record to settle its key with after the rest is streamed.
_Led = tuple[aiohttp.ClientResponse, bytes, bool, Record | None]


class IdempotencyLeader:
    """Leads or answers the requests with an Idempotency-Key (one per process)."""

    def __init__(self, ctx: ProxyContext, exchange: UpstreamExchange, responder: Responder,
                 inflight: InFlight) -> None:
        self.ctx, self._exchange, self._responder = ctx, exchange, responder
        self._inflight = inflight
        config = ctx.config
        #: How long a leader may work on its key (it is cut off there), and the lease its
        #: claim carries: past it, repeats count a claim that was sending as "unknown".
        self._deadline = leader_deadline(config.token_wait_timeout,
                                         config.upstream.connect_timeout,
                                         config.upstream.total_timeout)
        self._lease = self._deadline + LEASE_MARGIN
        #: Leaders of Idempotency-Keys in flight (a task must be referenced to live).
        self._leaders: set[asyncio.Future[Any]] = set()

    async def stop(self, within: float) -> None:
        """After the drain: cancel the leaders still running (each settles its key as a
        shutdown cut it off, and logs how it ended) and wait up to ``within`` for them, so
        none ends unobserved when the event loop closes."""
        leaders = [task for task in self._leaders if not task.done()]
        for task in leaders:
            task.add_done_callback(_observed)
            task.cancel()
        if leaders:
            await asyncio.wait(leaders, timeout=within)

    async def handle(self, request: web.BaseRequest, rid: str, outcome: Outcome,
                     key_text: str, out: Outbound) -> web.StreamResponse:
        """Lead (claim the key, send, keep the answer) or answer a repeat from the key's
        record."""
        ctx, config = self.ctx, self.ctx.config
        store = ctx.idempotency
        assert store is not None
        data = out.body.data
        if data is not None and not isinstance(data, bytes):
            raise BodyTooLarge("a request with an Idempotency-Key may carry at most "
                               f"{config.proxy.replay_body_limit} bytes "
                               "(GATEWAY_REPLAY_BODY_LIMIT)", code="idempotency_body_too_large")
        fp = fingerprint(request.method, request.raw_path, data or b"")
        # Scoped per upstream and partner, the current one (it follows a rotation), not per
        # App Key: a retry across an App Key rotation must still find its answer.
        # Each profile's keys apart (the default's as before profiles existed).
        lane = outcome.lane
        outcome.partner = lane.tokens.partner_id
        scope = f"{lane.base_url}|{outcome.partner}{lane.scope}"
        key = storage_key(scope, outcome.client, key_text)
        counted = ctx.metrics.idempotency_requests
        for _ in range(CLAIM_ROUNDS):  # released while a repeat waited: claim it again
            # The lease and the leader's deadline start at one instant, before the claim.
            claim = Record.claim(fp, rid, ctx.clock.time() + self._lease)
            until = asyncio.get_running_loop().time() + self._deadline
            try:
                record = await store.claim(key, claim, config.idempotency.idempotency_ttl)
            except BaseException:  # it may have landed (the caller left meanwhile): free it
                self._keep(asyncio.ensure_future(self._release(key, claim.owner)))
                raise
            # Ours also when the claim landed but its reply was lost, and the claim re-sent.
            if record is None or record.owner == claim.owner:
                counted.labels("new").inc()
                outcome.idempotency = "new"
                return await self._lead(request, rid, outcome, out, key, claim, until)
            if record.fingerprint == fp and record.in_flight_at(ctx.clock.time()):
                record = await store.wait(key, config.idempotency.idempotency_wait)
                if record is None:
                    await ctx.clock.sleep(POLL_FLOOR)
                    continue
                if record.in_flight_at(ctx.clock.time()):
                    counted.labels("in_flight").inc()
                    outcome.idempotency = "in_flight"
                    raise IdempotencyInFlight(
                        "the first request with this Idempotency-Key is still in flight "
                        f"(first request {record.request_id}): retry later", retry_after=1.0)
            if record.fingerprint == fp and record.abandoned_at(ctx.clock.time()):
                await ctx.clock.sleep(POLL_FLOOR)  # its leader left before sending: take over
                continue
            refused = refusal(record, fp, ctx.clock.time())
            if refused is not None:
                counted.labels(refused.code).inc()
                outcome.idempotency = refused.code
                raise refused
            counted.labels("replayed").inc()
            return await self._replay(request, record, outcome)
        raise IdempotencyInFlight("the Idempotency-Key kept changing hands: retry later",
                                  retry_after=1.0)

    async def _replay(self, request: web.BaseRequest, record: Record,
                      outcome: Outcome) -> web.StreamResponse:
        out = CachedResponse.kept(record.status, record.reason, record.headers, record.body)
        out.headers[REPLAYED] = "true"
        out.headers[REQUEST_ID] = record.request_id
        outcome.idempotency, outcome.source = "replayed", "replay"
        audit(outcome, status=record.status, location=dict(record.headers).get("Location"),
              body=record.body, replayed=True)
        try:
            await out.prepare(request)
            await out.write_eof()
        except ConnectionError:
            raise ClientClosedRequest("the caller left before its answer was sent") from None
        outcome.bytes_out = len(record.body)
        return out

    async def _lead(self, request: web.BaseRequest, rid: str, outcome: Outcome,
                    out: Outbound, key: str, claim: Record,
                    until: float) -> web.StreamResponse:
        """Send the claimed request in a task of its own, shielded: if the caller leaves, the
        exchange still runs to its end (within the leader's deadline) and its answer is kept,
        so the caller's retry finds it."""
        outcome.audit_leader = True  # written when the exchange ends, caller or not
        task = asyncio.create_task(self._settle(out, key, claim, outcome, until))
        self._keep(task)
        try:
            resp, body, whole, later = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(self._orphaned, rid, key, claim))
            raise
        if whole:
            return await self._responder.whole(request, resp, body, rid, outcome)
        # Too large to keep: the caller gets the rest as it comes, within the leader's deadline,
        # and the key is settled by how that ended (an upstream body that broke leaves the
        # outcome unknown).
        try:
            return await self._responder.stream_back(request, resp, rid, outcome, body, until)
        finally:  # a caller who left or a shutdown leave the answer whole so far
            broken = outcome.error in ("stream_broken", "stream_deadline")
            self._keep(asyncio.ensure_future(self._record(
                key, claim, claim.settled("unknown") if broken and later is not None
                else later)))

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a leader's task (or its settling) until it ends; the drain waits for it."""
        self._inflight.begin()
        self._leaders.add(task)
        task.add_done_callback(self._lead_done)

    def _lead_done(self, task: asyncio.Future[Any]) -> None:
        self._leaders.discard(task)
        self._inflight.end()

    async def _settle(self, out: Outbound, key: str, claim: Record, outcome: Outcome,
                      until: float) -> _Led:
        """The leader's exchange, within its deadline, and the key's record from how it
        ended. Returns the answer, its body (or what was read of it), whether that is all of
        it (then the key is settled here), and else the record to settle the key with once
        the rest has been streamed to the caller (too large to keep; None: release it).

        The claim is marked *sending* before the first send. The key is released (a retry may
        send) only when no attempt can have made Repairy act: nothing left (no connection, a
        gateway limit, no token) or a "try again" answer. A status line of 2xx is a booking
        made: never released. An answer whose body then breaks, a timeout after sending, a
        5xx: "unknown"."""
        ctx, config = self.ctx, self.ctx.config
        store = ctx.idempotency
        assert store is not None
        kept: Record | None = None  # what the key will hold (None: release it)
        resp: aiohttp.ClientResponse | None = None
        sending = False
        cut_off = False  # the deadline (or a shutdown) ended it, perhaps mid-exchange
        later = False  # the caller streams the rest of the answer, then settles the key
        loop = asyncio.get_running_loop()
        try:
            try:  # a token (GATEWAY_TOKEN_WAIT_TIMEOUT), an upstream slot (the connect timeout)
                async with asyncio.timeout(config.token_wait_timeout
                                           + config.upstream.connect_timeout):
                    token = await self._exchange.claim(outcome)
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
                    resp = await self._exchange.send(out, token, _never, outcome)
                    state = settle_status(resp.status)
                    limit = config.idempotency.idempotency_max_body
                    body = b""
                    if resp.content_length is None or resp.content_length <= limit:
                        body = await self._responder.read_up_to(resp, limit, outcome)
                    audit(outcome, status=resp.status, location=resp.headers.get("Location"),
                          body=body if len(body) <= limit else None)
            except TimeoutError:
                cut_off = True
                if not sending:  # the store took the deadline: nothing was sent
                    raise IdempotencyUnavailable(
                        "the Idempotency-Key store was too slow for the request's deadline: "
                        "nothing was sent", retry_after=1.0) from None
                outcome.lane.metrics.upstream_error("timeout")
                raise UpstreamTimeout("the request's deadline passed") from None
            finally:
                self._exchange.release(outcome)
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
            audit(outcome, status=None if resp is None else resp.status,
                  code=getattr(exc, "code", "shutting_down" if cut_off else "internal_error"))
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
        store = self.ctx.idempotency
        assert store is not None
        with contextlib.suppress(GatewayError):
            await store.release(key, owner)

    async def _record(self, key: str, claim: Record, kept: Record | None) -> None:
        """Settle the key: keep the record, or release the claim (so a retry may send)."""
        ctx = self.ctx
        store = ctx.idempotency
        assert store is not None
        try:
            if kept is None:
                await store.release(key, claim.owner)
            else:
                await store.finish(key, kept, ctx.config.idempotency.idempotency_ttl)
        except GatewayError as exc:  # the store is gone: the caller still gets its answer
            log.warning("the answer to a request with an Idempotency-Key could not be kept: "
                        "repeats get outcome_unknown once its lease runs out if it was sent",
                        extra={"fields": {"event": "idempotency_settle_failed",
                                          "error": exc.code, "request_id": claim.request_id}})
        ctx.metrics.idempotency_settled.labels(
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


def _never() -> bool:
    return False


def _observed(task: asyncio.Future[Any]) -> None:
    """A leader cut off at shutdown: its end is settled and logged by its own callbacks;
    retrieved here so that the event loop has nothing to report."""
    if not task.cancelled():
        task.exception()
