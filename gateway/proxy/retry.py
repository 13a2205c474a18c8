"""The retry policy of proxied requests: what may be sent again, when, and how often overall.

aiohttp-retry runs the retries (its ``RetryClient`` loop, with options set here explicitly:
methods, no blanket status list, one exception class); the first attempt goes out directly,
through the same sender and the same decisions, so a request with nothing to retry pays none of
its set-up. What it cannot express is wrapped around it, not re-written:

- :class:`_AttemptSender` stands in for the ``ClientSession`` it calls: before each attempt it
  checks that the caller is still there and the request's deadline has time left; after a
  failure it decides whether the failure may be retried at all (connection refused: any
  method, nothing was sent; a *reused* keep-alive connection that failed before the status
  line, as :data:`~gateway.proxy.upstream.NEW_CONNECTIONS` tells: idempotent methods
  only; a timeout or a cut body: never) and raises
  :class:`RetryableFailure` only then.
- Statuses are judged in ``evaluate_response_callback`` (aiohttp-retry's own status list would
  retry without asking): only those in ``GATEWAY_RETRY_ON_STATUS``, for idempotent methods,
  when ``Retry-After`` is no longer than ``GATEWAY_RETRY_AFTER_MAX`` (longer ones are passed
  back, not waited on), the wait fits the deadline, and the :class:`RetryBudget` allows it.
  A response that will be retried is released first.
- Every retry is counted (``retries_total{reason}``) and marked on the request's log line.

Only bodies the gateway kept whole (up to ``GATEWAY_REPLAY_BODY_LIMIT``) can be sent again; a
streamed body is sent once. A 401 replay with a new token is not a retry: the handler does it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, cast

import aiohttp
from aiohttp_retry import RetryClient, RetryOptionsBase
from multidict import CIMultiDict
from yarl import URL

from gateway.clock import Clock
from gateway.errors import ClientClosedRequest, DeadlineExceeded, GatewayError
from gateway.proxy.limits import WindowCounter
from gateway.proxy.upstream import NEW_CONNECTIONS, Body, translate
from gateway.retry_after import parse_retry_after

#: Methods whose repeat has the same effect as one send (RFC 9110 §9.2.2), minus TRACE.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_MAX_EXPONENT: Final = 30


def backoff(attempt: int, floor: float, cap: float, rand: float) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...): a random point between ``floor``
    and ``floor`` x 2^attempt (full jitter above the floor, so retries of requests that failed
    together spread out), that ceiling capped at ``cap``; always within [floor, cap]."""
    exponent = min(max(attempt, 1), _MAX_EXPONENT)
    ceiling = min(cap, floor * (2.0 ** exponent))
    r = rand if 0.0 <= rand <= 1.0 else 0.5  # NaN or out of range: the middle
    return min(cap, max(floor, floor + r * (ceiling - floor)))


class RetryBudget:
    """Retries may be at most ``ratio`` of the requests of the last ``window`` seconds, above a
    floor of ``min_per_second`` retries a second that is always allowed (Finagle's and Envoy's
    retry budgets). Per process."""

    def __init__(self, ratio: float, min_per_second: float, window: float, clock: Clock) -> None:
        self.ratio = ratio
        self.floor = min_per_second * window
        self._requests = WindowCounter(window, clock)
        self._retries = WindowCounter(window, clock)

    def request(self) -> None:
        """A request arrived (its first attempt)."""
        self._requests.add()

    def try_spend(self) -> bool:
        """Spend one retry if the budget has one."""
        if self._retries.total() + 1 > self.ratio * self._requests.total() + self.floor:
            return False
        self._retries.add()
        return True


@dataclass(frozen=True)
class RetryConfig:
    attempts: int  # sends in all, the first included
    statuses: frozenset[int]
    backoff_min: float
    backoff_max: float
    retry_after_max: float
    #: A retry is sent only if at least this much of the deadline is left after its wait
    #: (GATEWAY_CONNECT_TIMEOUT): a last attempt with no time to answer would turn the
    #: upstream's answer into a 504.
    min_attempt_time: float


class RetryableFailure(Exception):
    """A failed attempt the policy allows to retry (aiohttp-retry's retry exception)."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class Attempts:
    """One request's retry state, shared by the attempts and the callbacks."""

    method: str
    replayable: bool
    deadline: float | None  # monotonic, None: no overall limit
    caller_gone: Callable[[], bool]
    on_attempt: Callable[[aiohttp.ClientResponse, float], None]
    #: The caller's body reader's failure, if any (then a failed send is the caller's fault).
    body_error: Callable[[], GatewayError | None]
    on_failure: Callable[[GatewayError], None]  # an upstream fault (counted per attempt)
    number: int = 0
    connections: int = 0  # NEW_CONNECTIONS when the current attempt started
    retried: list[str] = field(default_factory=list)  # the reasons, in order
    next_wait: float = 0.0
    #: An attempt may have made the upstream act (sent, then failed or a 5xx other than
    #: 503): an Idempotency-Key's outcome is then unknown.
    maybe_acted: bool = False


class RetryPolicy:
    """Sends a request upstream through aiohttp-retry with the gateway's rules."""

    def __init__(self, session: aiohttp.ClientSession, config: RetryConfig, budget: RetryBudget,
                 clock: Clock, *, timeout: Callable[[float | None], aiohttp.ClientTimeout],
                 on_retry: Callable[[str], None], on_budget_exhausted: Callable[[], None],
                 rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self.budget = budget
        self._clock = clock
        self._timeout = timeout
        self._on_retry = on_retry
        self._on_budget_exhausted = on_budget_exhausted
        self._rand = rand
        self._session = session
        self._client = RetryClient(client_session=cast(aiohttp.ClientSession,
                                                       _AttemptSender(self)),
                                   logger=_QUIET)

    async def send(self, url: URL, headers: CIMultiDict[str], body: Body,
                   attempts: Attempts) -> aiohttp.ClientResponse:
        """The upstream's response (headers read), or a :class:`GatewayError`.

        The first attempt is sent right here (the common case: nothing to retry, and no
        coroutine layers to pass on every suspension); when the policy allows a retry,
        aiohttp-retry runs the rest, through :meth:`attempt`."""
        kwargs: dict[str, Any] = {"data": body, "allow_redirects": False}
        self._before(attempts)  # the first attempt has the whole deadline: no timeout kwarg
        started = self._clock.monotonic()
        try:
            resp = await self._session.request(attempts.method, url, headers=headers, **kwargs)
        except GatewayError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            with contextlib.suppress(RetryableFailure):  # allowed, counted, its wait set
                self._failed(exc, attempts)
        else:
            attempts.on_attempt(resp, self._clock.monotonic() - started)
            if resp.status not in self.config.statuses or await self.final(resp, attempts):
                return resp
        options = _Options(self, attempts, self.config.attempts - attempts.number)
        try:
            return await self._client.request(
                attempts.method, url, headers=headers, retry_options=options,
                trace_request_ctx={"attempts": attempts}, **kwargs)
        except RetryableFailure as exc:  # out of attempts: the last failure stands
            raise exc.error from exc.__cause__

    # -- decisions -----------------------------------------------------------------------------
    def failure_reason(self, exc: BaseException, reused: bool,
                       attempts: Attempts) -> str | None:
        """Why a failed attempt may be retried, or None. Timeouts never are; a reused
        keep-alive connection that failed before the status line is, for idempotent methods;
        a refused connection (nothing sent) is, for any method."""
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return None
        if isinstance(exc, aiohttp.ClientConnectorError):
            return "connection_refused" if isinstance(exc.os_error,
                                                      ConnectionRefusedError) else None
        if reused and attempts.method in IDEMPOTENT and isinstance(
                exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
                | aiohttp.ClientConnectionResetError):
            return "connection_reset"
        return None

    def allow(self, attempts: Attempts, reason: str, wait: float) -> bool:
        """The last checks before a retry: attempts left, the deadline, the caller, the
        budget. True means it will happen: it is counted here."""
        if not attempts.replayable or attempts.number >= self.config.attempts:
            return False
        if attempts.deadline is not None and (
                self._clock.monotonic() + wait + self.config.min_attempt_time
                > attempts.deadline):
            return False
        if attempts.caller_gone():
            return False
        if not self.budget.try_spend():
            self._on_budget_exhausted()
            return False
        attempts.next_wait = wait
        attempts.retried.append(reason)
        self._on_retry(reason)
        return True

    def wait(self, attempts: Attempts) -> float:
        return backoff(attempts.number, self.config.backoff_min, self.config.backoff_max,
                       self._rand())

    def _before(self, attempts: Attempts) -> float | None:
        """Count the attempt; refuse it if the caller left or the deadline passed. Returns
        what is left of the deadline."""
        attempts.number += 1
        if attempts.caller_gone():
            raise ClientClosedRequest("the caller left before the request was sent")
        remaining = None
        if attempts.deadline is not None:
            remaining = attempts.deadline - self._clock.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request's deadline (GATEWAY_TOTAL_TIMEOUT) passed "
                                       "before it could be sent")
        attempts.connections = NEW_CONNECTIONS.get()  # unchanged after it: a reused connection
        return remaining

    def _failed(self, exc: BaseException, attempts: Attempts) -> NoReturn:
        """Blame a failed attempt and raise: the caller's own fault, the caller gone,
        :class:`RetryableFailure` (allowed and counted), or the upstream's error."""
        own = attempts.body_error()
        if own is not None:
            raise own from exc
        if attempts.caller_gone():
            raise ClientClosedRequest("the caller left during the exchange") from exc
        error = translate(exc)
        if error.sent:
            attempts.maybe_acted = True
        attempts.on_failure(error)
        reused = NEW_CONNECTIONS.get() == attempts.connections
        reason = self.failure_reason(exc, reused, attempts)
        if reason is not None and self.allow(attempts, reason, self.wait(attempts)):
            raise RetryableFailure(error) from exc
        raise error from exc

    async def attempt(self, url: URL, headers: CIMultiDict[str], attempts: Attempts,
                      kwargs: dict[str, Any]) -> aiohttp.ClientResponse:
        """One retry, for aiohttp-retry (the first attempt is :meth:`send`'s), after the wait
        :meth:`allow` set, on the injected clock (aiohttp-retry's own sleep is 0)."""
        await self._clock.sleep(attempts.next_wait)
        remaining = self._before(attempts)
        started = self._clock.monotonic()
        try:
            resp = await self._session.request(attempts.method, url, headers=headers,
                                               timeout=self._timeout(remaining), **kwargs)
        except GatewayError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(exc, attempts)
        attempts.on_attempt(resp, self._clock.monotonic() - started)
        return resp

    async def final(self, resp: aiohttp.ClientResponse, attempts: Attempts) -> bool:
        """aiohttp-retry's response callback: True to keep ``resp``, False to retry (after
        releasing it)."""
        if resp.status not in self.config.statuses or attempts.method not in IDEMPOTENT:
            return True
        delay = parse_retry_after(resp.headers.get("Retry-After"), self._clock.time())
        if delay is not None and delay > self.config.retry_after_max:
            return True  # longer than we wait: the caller decides
        wait = max(self.wait(attempts), delay or 0.0)
        if not self.allow(attempts, f"status_{resp.status}", wait):
            return True
        resp.release()
        return False


class _AttemptSender:
    """What aiohttp-retry sees as its session: one attempt per ``request`` call."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    async def request(self, method: str, url: URL, *, headers: CIMultiDict[str],
                      trace_request_ctx: dict[str, Any],
                      **kwargs: Any) -> aiohttp.ClientResponse:
        attempts: Attempts = trace_request_ctx["attempts"]
        return await self._policy.attempt(url, headers, attempts, kwargs)

    async def close(self) -> None:  # RetryClient.close(): the real session is closed apart
        return None


class _Options(RetryOptionsBase):
    """aiohttp-retry's options for one request, set explicitly."""

    def __init__(self, policy: RetryPolicy, attempts: Attempts, left: int) -> None:
        super().__init__(
            attempts=left,
            statuses=(),  # judged in final(): budget, Retry-After and deadline may veto
            exceptions=(RetryableFailure,),
            methods=IDEMPOTENT,  # for statuses; failures are judged in failure_reason()
            retry_all_server_errors=False,
            evaluate_response_callback=lambda resp: policy.final(resp, attempts))
        self._attempts = attempts

    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        return 0.0  # the wait is slept in RetryPolicy.attempt(), on the gateway's clock


class _Quiet:
    """aiohttp-retry logs each attempt at debug; the gateway logs requests itself."""

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        return None

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        return None

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        return None


_QUIET: Final = _Quiet()

