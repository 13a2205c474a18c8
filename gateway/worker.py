"""A worker process (``GATEWAY_WORKERS`` > 1): the proxy listener only; the token comes from
the supervisor.

The supervisor (:mod:`gateway.supervisor`) owns the token manager, the admin listener and
credential reloading. A worker inherits the bound proxy socket and one end of a socket pair,
its channel to the supervisor (:mod:`gateway.coordination.channel`: the messages and their
invariants). Over it the worker asks for tokens (``get``), reports upstream 401s
(``invalidate``, ``route_explained``), its metrics (every second, at exit, and at once when a
scrape asks: ``metrics_pull``), its upstream answers and the 401/403 among them each second
(``traffic``, for the probe's verdict), and calls the supervisor's Idempotency-Key store
(``idem``) when there is no Redis.

A worker exits when the supervisor goes away (end of the channel), and drains on SIGTERM.
Run as ``python -m gateway.worker LISTEN_FD CONTROL_FD`` by the supervisor only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.clock import Clock, SystemClock
from gateway.coordination.channel import Calls, Channel, Message
from gateway.errors import (
    CredentialContention,
    CredentialsRejected,
    StoreKeyMismatch,
    TokenUnavailable,
)
from gateway.logs import flush as flush_logs
from gateway.logs import setup_audit, setup_logging
from gateway.metrics import Metrics
from gateway.proxy.access import AccessPolicy, ClientKey
from gateway.proxy.idempotency_remote import RemoteStore
from gateway.proxy.lanes import Lanes
from gateway.settings import Settings, load_settings
from gateway.state import GatewayState
from gateway.tasks import cancel_and_wait, log_task_failure
from gateway.token.config import DEFAULT_PROFILE, CredentialProfile
from gateway.token.renewal import token_from_dict
from gateway.token.value import Token, is_usable
from gateway.tracing import tracing_for

log = logging.getLogger("gateway.worker")
METRICS_EVERY = 1.0
#: How long an Idempotency-Key call may wait for the supervisor, beyond its own wait.
STORE_CALL_TIMEOUT = 5.0


class RemoteTokens:
    """A worker's view of the supervisor's token manager of one credential profile (a
    ``TokenSource``): its messages name the profile."""

    def __init__(self, channel: Channel, settings: Settings, clock: Clock,
                 profile: CredentialProfile | None = None) -> None:
        self._channel = channel
        self._profile = profile or settings.profiles[0]
        self._name = self._profile.name
        self._token = self._profile.side.token
        self._clock = clock
        self._current: Token | None = None
        self._waiting: dict[int, asyncio.Future[Token]] = {}  # newer_than -> answer
        self._contended_until = 0.0  # as the supervisor last said (its tokens carry it)

    @property
    def current(self) -> Token | None:
        return self._current

    @property
    def partner_id(self) -> str:
        """The partner of the supervisor's latest token (it follows a rotation there)."""
        tok = self._current
        return self._profile.partner.partner_id if tok is None else tok.partner_id

    def ready(self) -> bool:
        return is_usable(self._current, self._clock.monotonic(), self._token.token_expiry_margin)

    def usable(self) -> Token | None:
        tok = self._current
        if tok is not None and is_usable(tok, self._clock.monotonic(),
                                         self._token.token_expiry_margin):
            return tok
        return None

    async def get(self, newer_than: int = 0) -> Token:
        tok = self._current
        if tok is not None and tok.generation > newer_than and is_usable(
                tok, self._clock.monotonic(), self._token.token_expiry_margin):
            return tok
        future = self._waiting.get(newer_than)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[newer_than] = future
            self._channel.send("get", {"profile": self._name, "newer_than": newer_than})
        try:
            return await asyncio.wait_for(asyncio.shield(future),
                                          self._token.token_wait_timeout + 1)
        except TimeoutError:
            self._waiting.pop(newer_than, None)
            raise TokenUnavailable("timed out waiting for an access token",
                                   retry_after=1.0) from None

    def contended(self) -> bool:
        return self._clock.monotonic() < self._contended_until

    async def still_current(self, generation: int) -> bool:
        tok = self._current
        return tok is not None and tok.generation == generation

    def invalidate(self, generation: int, reason: str) -> bool:
        tok = self._current
        if tok is None or tok.generation != generation:
            return False
        self._channel.send("invalidate", {"profile": self._name, "generation": generation,
                                          "reason": reason})
        return True

    def route_explained(self, generation: int) -> None:
        self._channel.send("route_explained", {"profile": self._name, "generation": generation})

    def on_token(self, tok: Token, newer_than: int | None, contended_for: float = 0.0) -> None:
        self._contended_until = self._clock.monotonic() + min(max(contended_for, 0.0), 86400.0)
        if self._current is None or tok.generation >= self._current.generation:
            self._current = tok
        for key in [k for k in self._waiting if tok.generation > k]:
            future = self._waiting.pop(key)
            if not future.done():
                future.set_result(tok)

    def on_error(self, newer_than: int, doc: Any) -> None:
        future = self._waiting.pop(newer_than, None)
        if future is None or future.done():
            return
        code = str(doc.get("code") or "token_unavailable")
        cls = {"credentials_rejected": CredentialsRejected,
               "credential_contention": CredentialContention,
               "store_key_mismatch": StoreKeyMismatch}.get(code, TokenUnavailable)
        future.set_exception(cls(str(doc.get("message", "no usable access token")),
                                 retry_after=float(doc.get("retry_after") or 1.0)))
        future.exception()  # consumed here too: nobody may be waiting any more


def _control(message: Message, tokens: Mapping[str, RemoteTokens], state: GatewayState,
             calls: Calls, channel: Channel) -> None:
    """One message from the supervisor (one that raises is counted and skipped)."""
    doc = message.fields
    if message.kind == "token":  # only the waiters of the profile it names
        tokens[str(doc.get("profile") or DEFAULT_PROFILE)].on_token(
            token_from_dict(doc["token"]), doc.get("newer_than"),
            float(doc.get("contended_for") or 0.0))
    elif message.kind == "error":
        tokens[str(doc.get("profile") or DEFAULT_PROFILE)].on_error(int(doc["newer_than"]), doc)
    elif message.kind == "idem_reply":
        calls.settle(message)
    elif message.kind == "metrics_pull":  # a scrape waits: this second's counts, now
        channel.send("metrics", {"text": state.metrics.render().decode(),
                                       "id": int(doc["id"])})
    elif message.kind == "client_keys":
        s = state.settings
        keys = tuple(ClientKey(str(name), bytes.fromhex(digest)) for name, digest in doc["keys"])
        state.access = AccessPolicy(keys, s.inbound.allowed_cidrs, s.inbound.allowed_routes,
                                    s.inbound.client_key_header)


async def _push_metrics(channel: Channel, metrics: Metrics, lanes: Lanes) -> None:
    while not channel.closed:
        channel.send("metrics", {"text": metrics.render().decode()})
        for lane in lanes:
            calls, refused = lane.tally.take()
            if calls:
                channel.send("traffic", {"profile": lane.name, "calls": calls,
                                         "refused": refused})
        await asyncio.sleep(METRICS_EVERY)


async def run(listen_fd: int, control_fd: int) -> int:
    from gateway.wiring import (
        build_idempotency,
        build_proxy_server,
        build_state,
        close_lanes,
        close_stores,
    )

    settings = load_settings()
    setup_logging(settings.log.log_level, settings.log.log_format)
    setup_audit(settings.log.audit_log)
    listener = socket.socket(fileno=listen_fd)
    metrics = Metrics()
    channel = await Channel.open(
        socket.socket(fileno=control_fd), peer="supervisor",
        on_fault=lambda fault: metrics.channel_faults.labels(fault).inc())
    clock = SystemClock()
    tokens = {p.name: RemoteTokens(channel, settings, clock, p) for p in settings.profiles}
    calls = Calls(channel, "idem")
    remote = RemoteStore(calls, lambda key, owner: channel.send(
        "idem", {"id": 0, "op": "release", "key": key, "owner": owner}),
        timeout=STORE_CALL_TIMEOUT)
    idempotency = build_idempotency(settings, clock, metrics, remote)
    state = build_state(settings, tokens, clock, metrics, idempotency,
                        tracing_for(settings.tracing.otel_endpoint, __version__))
    ended = asyncio.Event()
    channel.on_close(ended.set)  # the supervisor is gone (or the channel broke): stop
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, ended.set)
    loop.add_signal_handler(signal.SIGINT, ended.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor reloads
    runner = web.ServerRunner(build_proxy_server(state),
                              shutdown_timeout=settings.server.shutdown_grace)
    await runner.setup()
    await web.SockSite(runner, listener).start()
    background = [asyncio.create_task(channel.serve(
                      lambda message: _control(message, tokens, state, calls, channel))),
                  asyncio.create_task(_push_metrics(channel, metrics, state.lanes))]
    for task, what in zip(background, ("worker channel", "worker metrics push"), strict=True):
        task.add_done_callback(functools.partial(log_task_failure, log=log, what=what))
    for name in tokens:  # each profile's current token, at once
        channel.send("get", {"profile": name, "newer_than": 0})
    await ended.wait()
    state.draining = True
    await runner.cleanup()  # stop accepting, let requests in flight finish
    with contextlib.suppress(Exception):  # a failure was logged when it happened
        await cancel_and_wait(background[1])
    channel.send("metrics", {"text": metrics.render().decode()})
    await channel.flush(1.0)
    with contextlib.suppress(Exception):
        await cancel_and_wait(background[0])
    await close_lanes(state.lanes)
    await close_stores(state)
    flush_logs()
    return 0


def main() -> None:
    from gateway import event_loop

    listen_fd, control_fd = int(sys.argv[1]), int(sys.argv[2])
    sys.exit(event_loop.run(run(listen_fd, control_fd), load_settings().server.event_loop))


if __name__ == "__main__":
    main()
