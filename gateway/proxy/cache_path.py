"""The GET cache on the request path: answer a cached route from the cache (a hit, a shared hit
from another replica, or what a concurrent miss stored), or let the caller lead the single
flight upstream. The rules of what is kept live in :mod:`~gateway.proxy.cache`."""

from __future__ import annotations

import asyncio

from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import ClientClosedRequest
from gateway.proxy.cache import CachedAnswer, cache_key, directives, matching
from gateway.proxy.context import ProxyContext
from gateway.proxy.headers import REQUEST_ID, CachedResponse
from gateway.proxy.outcome import Outcome


class CachePath:
    """The cache lookups of the request path (one per process)."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx

    async def lookup(self, request: web.BaseRequest, rid: str, outcome: Outcome,
                     sent: CIMultiDict[str]) -> web.StreamResponse | None:
        """A cached route: the answer from the cache, or None to go upstream (this caller
        then leads the single flight). ``sent``: the headers it goes upstream with (``Vary``
        is judged on them)."""
        cache, metrics = self.ctx.cache, self.ctx.metrics
        rule = cache.rule_for(outcome.path)
        if rule is None:
            return None
        lane = outcome.lane  # each profile's keys apart (the default's as before profiles)
        outcome.partner = lane.tokens.partner_id
        outcome.cache_key = cache_key(outcome.partner + lane.scope, request.raw_path)
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
                        return await self._send(request, entry, "HIT", rid, outcome,
                                                "shared_hit")
            else:  # a miss for this key is on its way upstream: wait for what it stores
                await asyncio.shield(flight)
                entry = cache.lookup(outcome.cache_key, sent)
                if entry is not None:
                    return await self._send(request, entry, "COALESCED", rid, outcome)
        if entry is not None:
            return await self._send(request, entry, "HIT", rid, outcome)
        metrics.cache_requests.labels("miss").inc()
        outcome.cache = "MISS"
        return None

    async def _send(self, request: web.BaseRequest, entry: CachedAnswer, how: str, rid: str,
                    outcome: Outcome, result: str | None = None) -> web.StreamResponse:
        self.ctx.metrics.cache_requests.labels(result or how.lower()).inc()
        out = CachedResponse.of(entry, self.ctx.cache.age(entry), how)
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
