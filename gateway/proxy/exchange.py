"""The upstream exchange of one request: a token, an upstream slot, the breaker ticket, the
retries within the retry budget (:mod:`~gateway.proxy.retry`), and at most one replay after an
upstream 401 with a renewed token (unless the route is marked persistent 401)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import (
    CredentialContention,
    CredentialsRotated,
    UpstreamBusy,
    UpstreamError,
)
from gateway.proxy.context import Outbound, ProxyContext
from gateway.proxy.headers import with_credentials
from gateway.proxy.lanes import Lane
from gateway.proxy.limits import Outcome as BreakerOutcome
from gateway.proxy.outcome import Outcome
from gateway.proxy.retry import Attempts
from gateway.proxy.upstream import Body
from gateway.token.value import Token

#: Breaker outcomes of the upstream errors: only connection failures and timeouts count.
_BREAKER_FAILURE_KINDS: Final = frozenset({"connect", "timeout"})


class UpstreamExchange:
    """Sends requests upstream for the request path (one per process)."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        #: The upstream send, traced or not: chosen once, so no request pays for tracing off.
        self.send = self._send if ctx.tracing is None else self._traced_send

    async def claim(self, outcome: Outcome) -> Token:
        """A token (within GATEWAY_TOKEN_WAIT_TIMEOUT) and an upstream slot (within the
        connect timeout), for the same partner as the request's key scope. The caller hands
        the slot back with :meth:`release`."""
        tokens = outcome.lane.tokens
        token = tokens.usable() or await tokens.get()
        same_partner(outcome, token)
        if not outcome.lane.upstream.slots.try_acquire():
            await self._wait_slot(outcome)
        return token

    def release(self, outcome: Outcome) -> None:
        outcome.lane.upstream.slots.release()

    async def _wait_slot(self, outcome: Outcome) -> None:
        try:
            await outcome.lane.upstream.slots.acquire()
        except UpstreamBusy:
            self.ctx.metrics.limited.labels("upstream_slots", outcome.client).inc()
            raise

    async def _send(self, out: Outbound, token: Token, caller_gone: Callable[[], bool],
                    outcome: Outcome) -> aiohttp.ClientResponse:
        """The exchange with its retries, and at most one replay after an upstream 401 (the
        caller holds an upstream slot)."""
        ctx, lane = self.ctx, outcome.lane
        upstream, total = lane.upstream, ctx.config.upstream.total_timeout
        body = out.body
        outcome.attempts = attempts = Attempts(
            method=outcome.method, replayable=body.replayable,
            deadline=(ctx.clock.monotonic() + total) if total else None,
            caller_gone=caller_gone, on_attempt=outcome.answered,
            body_error=out.reader.failed, on_failure=lane.upstream_failed)
        try:
            upstream.retry.budget.request()
            # Under a breaker ticket until the upstream answered (its status line) or
            # failed: only connection failures and timeouts count against it.
            ticket = upstream.breaker.admit()
            result: BreakerOutcome = "neutral"
            outcome.generation, outcome.sent_partner = token.generation, token.partner_id
            sent_at = ctx.clock.monotonic()
            try:
                resp = await upstream.retry.send(
                    out.url, with_credentials(out.headers, token.access, token.partner_id),
                    body.data, attempts)
                result = "success"
            except UpstreamError as exc:
                result = "failure" if exc.kind in _BREAKER_FAILURE_KINDS else "neutral"
                raise
            finally:
                upstream.breaker.record(ticket, result)
            if resp.status == 401:
                return await self._after_401(out.url, out.headers, body.data, body.replayable,
                                             token, resp, attempts, outcome)
            lane.route_401.answered(outcome.route, token.generation, sent_at, resp.status)
            return resp
        finally:
            # The attempts are over: drop the callback that closes the cycle outcome ->
            # attempts -> outcome.answered, so a request's objects go when it ends rather
            # than at the garbage collector's next pass (which would then scan them all).
            attempts.on_attempt = _after_the_exchange

    async def _traced_send(self, out: Outbound, token: Token, caller_gone: Callable[[], bool],
                           outcome: Outcome) -> aiohttp.ClientResponse:
        """:meth:`_send` in an OpenTelemetry span (tracing on)."""
        tracing = self.ctx.tracing
        assert tracing is not None
        with tracing.upstream(outcome.method, outcome.route, out.url.raw_path,
                              out.headers) as span:
            resp = await self._send(out, token, caller_gone, outcome)
            attempts = outcome.attempts
            tracing.answered(span, resp.status, len(attempts.retried) if attempts else 0,
                             outcome.replayed)
            return resp

    async def _after_401(self, url: URL, headers: CIMultiDict[str], data: Body,
                         replayable: bool, token: Token, resp: aiohttp.ClientResponse,
                         attempts: Attempts, outcome: Outcome) -> aiohttp.ClientResponse:
        """An upstream 401: renew and replay once (kept bodies), unless the route is marked
        persistent 401 (then, and for streamed bodies, the 401 is passed back). While someone
        else logs in with our credentials, a caller whose token died (and whose replay's
        token died too, or who cannot be replayed) gets 503 credential_contention."""
        ctx, lane = self.ctx, outcome.lane
        tokens = lane.tokens
        try:
            verdict = await self._judge_401(lane, outcome.route, token.generation)
        except BaseException:
            resp.release()
            raise
        if verdict is None:  # contention: that token may have died; nothing was acted on
            resp.release()
            tokens.invalidate(token.generation, "upstream_401")
            raise _contention()
        if not verdict:
            return resp
        # A streamed body is not replayed, so its route gets no verdict: its invalidation
        # renews all the same, but never counts toward contention.
        tokens.invalidate(token.generation,
                          "upstream_401" if replayable else "upstream_401_streamed")
        if not replayable:
            if tokens.contended():
                resp.release()
                raise _contention()
            return resp
        resp.release()
        token = await tokens.get(newer_than=token.generation)
        same_partner(outcome, token)  # a 401 acted on nothing: the key is released
        outcome.replayed = True
        lane.metrics.replayed("upstream_401")
        outcome.generation, outcome.sent_partner = token.generation, token.partner_id
        sent_at = ctx.clock.monotonic()
        resp = await lane.upstream.retry.send(
            url, with_credentials(headers, token.access, token.partner_id), data, attempts)
        if resp.status != 401:
            lane.route_401.answered(outcome.route, token.generation, sent_at, resp.status)
            return resp
        # No second replay: judge the route, and pass the 401 back (under contention the
        # route is only suspected, and the caller is told of the contention instead).
        try:
            verdict = await self._judge_401(lane, outcome.route, token.generation)
        except BaseException:
            resp.release()
            raise
        if verdict is not False and tokens.contended():
            resp.release()
            tokens.invalidate(token.generation, "upstream_401")
            raise _contention()
        return resp

    async def _judge_401(self, lane: Lane, route: str, generation: int) -> bool | None:
        """A 401 on ``route`` with ``generation``: True to invalidate the token (and replay),
        False to pass it back (the route is marked persistent 401), None when the route is
        only suspected (contention: someone else's login may have revoked that token). A
        verdict on the route counts only while that token is still the newest, here and in
        the fleet."""
        r401 = lane.route_401
        if r401.would_mark(route, generation):
            if not await lane.tokens.still_current(generation):
                r401.forget(route)  # replaced meanwhile (a fleet peer): it says nothing
            elif lane.tokens.contended():
                r401.suspect(route, generation)
                return None
        return r401.unauthorized(route, generation)


def _after_the_exchange(resp: aiohttp.ClientResponse, seconds: float) -> None:
    """An ended exchange's ``on_attempt``: no attempt comes after it."""


def _contention() -> CredentialContention:
    return CredentialContention("someone else logs in with the gateway's credentials and "
                                "revoked the token this call used; nothing was acted on",
                                retry_after=1.0)


def same_partner(outcome: Outcome, token: Token) -> None:
    """An Idempotency-Key scoped to one partner is never sent with another's token (the
    credentials rotated while the request waited): nothing is sent, the key is released."""
    if outcome.partner and outcome.idempotency and token.partner_id != outcome.partner:
        raise CredentialsRotated("the Partner ID changed while this request waited: nothing "
                                 "was sent; retry", retry_after=1.0)
