"""The upstream of a process and what guards it: :class:`Upstream` holds the pooled session,
the retry policy (with its budget), the circuit breaker and the connection slots."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from gateway.proxy.limits import CircuitBreaker, UpstreamSlots
from gateway.proxy.retry import RetryPolicy


@dataclass
class Upstream:
    """The upstream side of a process: the session and what guards it."""

    session: aiohttp.ClientSession
    retry: RetryPolicy
    breaker: CircuitBreaker
    slots: UpstreamSlots

    async def close(self) -> None:
        await self.session.close()
