"""What every room of the request path shares: its config and collaborators
(:class:`ProxyContext`), the requests and leaders still running (:class:`InFlight`), and what is
sent upstream (:class:`Outbound`)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import NamedTuple

from multidict import CIMultiDict
from yarl import URL

from gateway.clock import Clock
from gateway.metrics import Metrics
from gateway.proxy.access import AccessPolicy
from gateway.proxy.body import BodyReader, TakenBody
from gateway.proxy.cache import GetCache
from gateway.proxy.config import RequestPathConfig
from gateway.proxy.guards import Upstream
from gateway.proxy.idempotency_store import IdempotencyStore
from gateway.proxy.lanes import Lanes
from gateway.proxy.limits import ClientLimits
from gateway.token.route_401 import Persistent401
from gateway.token.source import TokenSource
from gateway.tracing import Tracing


@dataclass(kw_only=True)
class ProxyContext:
    """The request path's config and collaborators (one per process). Read a field at each
    use: a client key rotation replaces ``access``."""

    config: RequestPathConfig
    #: One lane per credential profile; a request uses the one admission chose.
    lanes: Lanes
    metrics: Metrics
    access: AccessPolicy
    limits: ClientLimits
    clock: Clock
    cache: GetCache
    #: Idempotency-Key records (None: no protected routes).
    idempotency: IdempotencyStore | None = None
    #: OpenTelemetry spans (None: off, the default).
    tracing: Tracing | None = None
    draining: bool = False

    # The default profile's lane (the only one of a gateway without profiles).
    @property
    def tokens(self) -> TokenSource:
        return self.lanes.default.tokens

    @property
    def upstream(self) -> Upstream:
        return self.lanes.default.upstream

    @property
    def route_401(self) -> Persistent401:
        return self.lanes.default.route_401


class InFlight:
    """Requests in progress and Idempotency-Key leaders still running: the shutdown's drain
    waits for them, to one deadline."""

    def __init__(self) -> None:
        self.active = 0
        self._drained: asyncio.Event | None = None

    def begin(self) -> None:
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        if self.active == 0 and self._drained is not None:
            self._drained.set()

    async def drain(self, within: float) -> None:
        """Wait up to ``within`` seconds for what is in progress to finish."""
        if self.active == 0 or within <= 0:
            return
        self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._drained.wait()


class Outbound(NamedTuple):
    """What is sent upstream: the target, the headers (credentials added at each send), the
    body, and its reader (for blame). A tuple: one is made per request."""

    url: URL
    headers: CIMultiDict[str]
    body: TakenBody
    reader: BodyReader
