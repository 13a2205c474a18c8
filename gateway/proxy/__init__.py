"""The proxy side: everything between a caller's request and the upstream's answer.

The modules, from the values up to the request's walk:

- :mod:`~gateway.proxy.config`: the proxy's settings, declared once.
- :mod:`~gateway.proxy.inbound`: the listener's HTTP protocol, parse errors, header deadline,
  ``Expect``, and the request checks the parser leaves to the application.
- :mod:`~gateway.proxy.access`: who may call (client keys, CIDRs) and which routes.
- :mod:`~gateway.proxy.routes`: route templates and method labels for metrics.
- :mod:`~gateway.proxy.body`: reading the caller's body (idle timeout, size cap, replayable).
- :mod:`~gateway.proxy.headers`: which headers cross the gateway, both ways; error responses.
- :mod:`~gateway.proxy.upstream`: the pooled upstream client and its error translation.
- :mod:`~gateway.proxy.retry`: the retry policy (aiohttp-retry) and the retry budget.
- :mod:`~gateway.proxy.limits`: circuit breaker, concurrency and rate limits.
- :mod:`~gateway.proxy.guards`: a process's upstream with its guards.
- :mod:`~gateway.proxy.cache`, :mod:`~gateway.proxy.cache_shared`: the GET cache, its single
  flight and its shared tier.
- :mod:`~gateway.proxy.idempotency`, :mod:`~gateway.proxy.idempotency_store`: Idempotency-Key
  records and where they are kept.
- :mod:`~gateway.proxy.context`: what the rooms below share (config, collaborators, drain).
- :mod:`~gateway.proxy.outcome`: what happened to a request, and its access line.
- :mod:`~gateway.proxy.admission`: the checks before the body.
- :mod:`~gateway.proxy.exchange`: token, slot, breaker ticket, retries, the single 401 replay.
- :mod:`~gateway.proxy.respond`: writing the answer back.
- :mod:`~gateway.proxy.cache_path`: the cache lookups of a request.
- :mod:`~gateway.proxy.leader`: the Idempotency-Key leader.
- :mod:`~gateway.proxy.handler`: the request's walk through them.

Nothing here renews tokens: the exchange asks a :class:`~gateway.token.manager.TokenSource`.
"""
