"""Protecting the upstream and the gateway: circuit breaker, upstream slots, rate limits.

All of it is per process (a worker, or the one gateway process): with ``GATEWAY_WORKERS`` or
several replicas, each keeps its own breaker, slots and buckets. Time comes from the injected
:class:`~gateway.clock.Clock`; every count lives in a fixed number of buckets, every rate is
clamped, so no input can grow memory or overflow arithmetic.

- :class:`CircuitBreaker`: counts only connection failures and timeouts of proxied calls
  (after retries); after a run of them it opens for a cool-down and answers 503 at once, then
  lets a few probes through (half-open); a probe that gets any answer closes it again. A
  request holds its ticket only from its first upstream send to the upstream's status line
  (or failure), so a slow upload, download or token wait never holds a probe.
- :class:`UpstreamSlots`: at most N upstream exchanges at once (the pool size when no lower
  limit is set, so aiohttp's connector never queues); a caller waits up to the connect timeout
  for a slot, then gets 503 ``upstream_busy``.
- :class:`TokenBucket` / :class:`ClientLimits`: requests per second with a burst (429
  ``rate_limited``), overall and per client, and per-client concurrency (429 ``client_busy``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from gateway.clock import Clock
from gateway.errors import CircuitOpen, ClientBusy, RateLimited, UpstreamBusy

BUCKETS: Final = 10


class WindowCounter:
    """Events over the last ``window`` seconds, in :data:`BUCKETS` buckets (the count covers
    at least the last 90 % of the window and at most all of it)."""

    def __init__(self, window: float, clock: Clock) -> None:
        self._width = max(window, 1e-3) / BUCKETS
        self._clock = clock
        self._slots = [0] * BUCKETS
        self._epochs = [-1] * BUCKETS

    def _index(self) -> int:
        return int(max(0.0, self._clock.monotonic()) / self._width)

    def add(self, n: int = 1) -> None:
        epoch = self._index()
        i = epoch % BUCKETS
        if self._epochs[i] != epoch:
            self._epochs[i] = epoch
            self._slots[i] = 0
        self._slots[i] += n

    def total(self) -> int:
        epoch = self._index()
        return sum(count for count, e in zip(self._slots, self._epochs, strict=True)
                   if epoch - BUCKETS < e <= epoch)

    def clear(self) -> None:
        self._slots = [0] * BUCKETS
        self._epochs = [-1] * BUCKETS


class BreakerState(enum.IntEnum):
    """The gauge's values: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


Outcome = Literal["success", "failure", "neutral"]


@dataclass(frozen=True)
class BreakerConfig:
    failures: int  # consecutive failures that open it (0: the breaker is off)
    ratio: float  # ... or this share of failures
    min_requests: int  # ... among at least this many requests
    window: float  # ... within this many seconds
    cooldown: float  # open this long before probing
    probes: int  # requests let through at once while half-open


@dataclass(frozen=True)
class Ticket:
    """A request the breaker let through; hand it back with its outcome."""

    probe: bool
    epoch: int  # the closed period it was admitted in


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, clock: Clock,
                 on_change: Callable[[BreakerState, str], None] | None = None) -> None:
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._requests = WindowCounter(config.window, clock)
        self._failures = WindowCounter(config.window, clock)
        self._open_until = 0.0
        self._probes = 0
        self._epoch = 0  # bumped on every transition: late outcomes of old periods are ignored
        self.enabled = config.failures > 0
        #: What a request admitted while closed holds (one per closed period, not one a
        #: request: the common case makes nothing).
        self._closed_ticket = Ticket(False, 0)

    @property
    def observed_state(self) -> BreakerState:
        """The state as a scrape should see it: an open breaker whose cool-down has passed is
        half-open (it moves there on the next request)."""
        if self.state is BreakerState.OPEN and self._clock.monotonic() >= self._open_until:
            return BreakerState.HALF_OPEN
        return self.state

    def check(self) -> None:
        """Raise :class:`CircuitOpen` (503 with Retry-After) if a request would be refused
        now; changes nothing. The admission checks call it, so a refusal comes at once."""
        if self.state is BreakerState.CLOSED or not self.enabled:
            return
        now = self._clock.monotonic()
        if self.state is BreakerState.OPEN and now < self._open_until:
            raise CircuitOpen("the upstream is failing: not asked until the circuit "
                              "breaker's cool-down ends", retry_after=self._open_until - now)
        if self.state is BreakerState.HALF_OPEN and self._probes >= self.config.probes:
            raise CircuitOpen("the upstream is being probed after failures: try again shortly",
                              retry_after=1.0)

    def admit(self) -> Ticket:
        """Let a request through to the upstream now, or raise :class:`CircuitOpen`. Hand the
        ticket back with :meth:`record` as soon as the upstream answered or failed."""
        if self.state is BreakerState.CLOSED:  # disabled, it never leaves CLOSED
            return self._closed_ticket
        self.check()
        if self.state is BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN, "cool-down over: probing")
        self._probes += 1
        return Ticket(True, self._epoch)

    def record(self, ticket: Ticket, outcome: Outcome) -> None:
        """The result of an admitted request, after its retries."""
        if not self.enabled:
            return
        if ticket.probe:
            if ticket.epoch != self._epoch:
                return
            self._probes = max(0, self._probes - 1)
            if outcome == "success":
                self._move(BreakerState.CLOSED, "a probe got an answer")
            elif outcome == "failure":
                self._open("a probe failed")
            return
        if outcome == "neutral" or ticket.epoch != self._epoch or (
                self.state is not BreakerState.CLOSED):
            return
        self._requests.add()
        if outcome == "success":
            self._consecutive = 0
            return
        self._consecutive = min(self._consecutive + 1, 1 << 30)
        self._failures.add()
        c = self.config
        if self._consecutive >= c.failures:
            self._open(f"{self._consecutive} connection failures or timeouts in a row")
            return
        total = self._requests.total()
        if total >= c.min_requests and self._failures.total() >= c.ratio * total:
            self._open(f"{self._failures.total()} of {total} requests failed to connect or "
                       "timed out")

    def _open(self, why: str) -> None:
        self._open_until = self._clock.monotonic() + self.config.cooldown
        self._move(BreakerState.OPEN, why)

    def _move(self, state: BreakerState, why: str) -> None:
        self.state = state
        self._epoch += 1
        self._closed_ticket = Ticket(False, self._epoch)
        self._probes = 0
        if state is BreakerState.CLOSED:
            self._consecutive = 0
            self._requests.clear()
            self._failures.clear()
        if self._on_change is not None:
            self._on_change(state, why)


class UpstreamSlots:
    """At most ``limit`` upstream exchanges at once; wait up to ``wait`` seconds for one.

    A free slot is taken without a coroutine (:meth:`try_acquire`, the common case); waiters
    are served first come, first served, a released slot handed straight to the next."""

    def __init__(self, limit: int, wait: float, *, reason: str) -> None:
        self.limit = limit
        self._wait = wait
        self._reason = reason
        self._free = limit
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.in_use = 0

    def try_acquire(self) -> bool:
        """Take a slot if one is free now (nobody waiting before us)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self.in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise UpstreamBusy(f"all {self.limit} upstream slots ({self._reason}) stayed "
                                   f"busy for {self._wait:g}s", retry_after=1.0) from None
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it: still in use
                return
        self._free += 1
        self.in_use -= 1

class TokenBucket:
    """``rate`` tokens a second up to ``burst``; :meth:`take` spends one or says how long to
    wait for it."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock.monotonic()

    def take(self) -> float | None:
        """None when a token was spent, else the seconds until one is available."""
        now = self._clock.monotonic()
        elapsed = min(max(0.0, now - self._last), self.burst / self.rate)
        self._last = max(self._last, now)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate


def default_burst(rate: float, burst: int) -> float:
    """A burst of 0 means one second's worth of requests (at least one)."""
    return float(burst) if burst else max(1.0, math.ceil(rate))


class ClientLimits:
    """Overall and per-client admission: rate limits and per-client concurrency."""

    def __init__(self, clock: Clock, *, rate: float, burst: int, client_rate: float,
                 client_burst: int, client_concurrency: int,
                 on_reject: Callable[[str, str], None]) -> None:
        self._clock = clock
        self._rate, self._burst = rate, default_burst(rate, burst)
        self._client_rate = client_rate
        self._client_burst = default_burst(client_rate, client_burst)
        self._client_concurrency = client_concurrency
        self._buckets: dict[str, TokenBucket] = {}
        self._inflight: dict[str, int] = {}
        self._on_reject = on_reject
        #: Any limit at all (else admission skips this object).
        self.active = bool(rate or client_rate or client_concurrency)


    def bucket(self) -> TokenBucket | None:
        """A fresh overall bucket (GATEWAY_RATE_LIMIT): one per credential profile."""
        return TokenBucket(self._rate, self._burst, self._clock) if self._rate else None

    def admit(self, client: str, overall: TokenBucket | None) -> None:
        """Raise 429 if ``client`` is over its limits, or the profile's ``overall`` bucket is
        empty; else count it in flight (call :meth:`done` after)."""
        if self._client_concurrency and self._inflight.get(client, 0) >= (
                self._client_concurrency):
            self._on_reject("client_concurrency", client)
            raise ClientBusy(f"client {client!r} already has {self._client_concurrency} "
                             "requests in flight", retry_after=1.0)
        if self._client_rate:
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = TokenBucket(
                    self._client_rate, self._client_burst, self._clock)
            wait = bucket.take()
            if wait is not None:
                self._on_reject("client_rate", client)
                raise RateLimited(f"client {client!r} is over its rate limit of "
                                  f"{self._client_rate:g} requests/s", retry_after=wait)
        if overall is not None:
            wait = overall.take()
            if wait is not None:
                self._on_reject("rate", client)
                raise RateLimited(f"over the gateway's rate limit of {overall.rate:g} "
                                  "requests/s", retry_after=wait)
        if self._client_concurrency:
            self._inflight[client] = self._inflight.get(client, 0) + 1

    def done(self, client: str) -> None:
        if self._client_concurrency:
            left = self._inflight.get(client, 0) - 1
            if left > 0:
                self._inflight[client] = left
            else:
                self._inflight.pop(client, None)
