"""The proxy side: everything between a caller's request and the upstream's answer.

- :mod:`~gateway.proxy.inbound`: the listener's HTTP protocol, parse errors, header deadline,
  ``Expect``, and the request checks the parser leaves to the application.
- :mod:`~gateway.proxy.access`: who may call (client keys, CIDRs) and which routes.
- :mod:`~gateway.proxy.routes`: route templates and method labels for metrics.
- :mod:`~gateway.proxy.body`: reading the caller's body (idle timeout, size cap, replayable).
- :mod:`~gateway.proxy.headers`: which headers cross the gateway, both ways.
- :mod:`~gateway.proxy.upstream`: the pooled upstream client and its error translation.
- :mod:`~gateway.proxy.retry`: the retry policy (aiohttp-retry) and the retry budget.
- :mod:`~gateway.proxy.limits`: circuit breaker, concurrency and rate limits.
- :mod:`~gateway.proxy.cache`: the GET cache and its single flight.
- :mod:`~gateway.proxy.handler`: the request handler tying them together.

Nothing here renews tokens: the handler asks a :class:`~gateway.token.manager.TokenSource`.
"""
