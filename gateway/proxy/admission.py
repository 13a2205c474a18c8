"""Admission: the checks a request passes before its body is read, in order: the inbound
checks, who is calling and which route, which credential profile (its lane), ``Expect`` and a
declared size, the lane's circuit breaker and the rate limits."""

from __future__ import annotations

from aiohttp import hdrs, web

from gateway.errors import ExpectationFailed
from gateway.logs import CREDENTIAL
from gateway.proxy.body import check_declared_size
from gateway.proxy.context import ProxyContext
from gateway.proxy.inbound import check_request
from gateway.proxy.outcome import Outcome
from gateway.proxy.routes import route_template


def admit(ctx: ProxyContext, request: web.BaseRequest, outcome: Outcome) -> bool:
    """Run the checks that need no body (raising the caller's error); True if the caller
    expects ``100 Continue``. Counts the caller in its limits (``outcome.counted``): the
    caller hands that back when the request ends."""
    config = ctx.config
    decoded = check_request(request, config.auth_paths)
    access = ctx.access
    outcome.client = access.client(
        request.remote if access.cidrs else None,  # the peer address costs a syscall
        request.headers.get(config.inbound.client_key_header) if access.keys else None)
    ctx.metrics.client_request(outcome.client)
    access.check_route(request.method, decoded)
    outcome.route = route_template(decoded)
    outcome.path = decoded
    requested = request.headers.get(ctx.lanes.header) or None  # empty: none
    if requested is not None or access.keys:  # else the default lane, set already
        outcome.lane = ctx.lanes.choose(requested, outcome.client, bool(access.keys))
    lane = outcome.lane
    if not ctx.lanes.single:  # this request's log lines (and tasks it starts) name it
        CREDENTIAL.set(lane.name)
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and expect.strip().lower() != "100-continue":
        raise ExpectationFailed("only 'Expect: 100-continue' is supported")
    check_declared_size(request, config.proxy.max_body_size)
    lane.upstream.breaker.check()  # open: 503 at once, before any body is read
    if ctx.limits.active:
        ctx.limits.admit(outcome.client, lane.rate)
        outcome.counted = True
    return expect is not None
