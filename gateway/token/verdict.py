"""Repairy's verdict on our configuration: does it take our token and our Partner ID?

A login alone cannot tell a wrong Partner ID: Repairy answers it with 403 on every call. The
:class:`UpstreamVerdict` finds out with a probe (``GATEWAY_CHECK_PATH``, one cheap GET) and
*confirms* a refusal before it gates readiness:

* a 403 on the probe confirms ``partner_refused`` at once;
* a 401 confirms ``credentials_refused`` only if it survives one renewal and a second probe
  (a 401 alone may be a token someone else's login revoked), and never while the manager
  sees credential contention (someone else's login may revoke the new token too);
* no answer, a 5xx, a 429 or any other status confirms nothing and changes nothing (another
  4xx means ``GATEWAY_CHECK_PATH`` itself is wrong: said once, not retried).

While ``credentials_refused`` holds, a round renews again only when an operator asked for it
(a SIGHUP or a rotation) or :data:`CAP` after its last renewal, so that a fix on Repairy's
side shows without a flood of logins. A request that arrives during a round is kept for
after it.

When it probes: once the first token is in (start-up), then only when asked (a SIGHUP or a
credential rotation: :meth:`UpstreamVerdict.request_probe`) or when live traffic looks
refused: at least ``min_refusals`` upstream 401/403 passed back to callers, and at least
``refused_ratio`` of the last minute's upstream answers, re-probe at most once a minute. While
a refusal is confirmed (or a probe said nothing), it probes again with back-off (:data:`FLOOR`
doubling to :data:`CAP`); a passing probe clears it.

Loop bounds: two probe rounds never start closer than :data:`FLOOR`; a round is at most two
probes and one renewal; traffic starts at most one round per :data:`REPROBE_EVERY`. The
verdict never takes a token away: it only gates readiness. Time comes from the injected clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from gateway.clock import Clock
from gateway.errors import CredentialsRejected, TokenUnavailable
from gateway.tasks import sleep_or_set
from gateway.token.auth_client import ProbeResult
from gateway.token.renewal import backoff
from gateway.token.traffic import Tally, TrafficWindow
from gateway.token.value import Token

log = logging.getLogger("gateway.token")
#: Least time between the starts of two probe rounds, and the first back-off (seconds).
FLOOR: Final = 5.0
#: Longest back-off between probes while refused or unanswered (seconds).
CAP: Final = 300.0
#: Live traffic starts at most one probe round this often (seconds).
REPROBE_EVERY: Final = 60.0
#: How often the loop looks at the traffic while there is some, and for a first token.
TICK: Final = 1.0
#: How often it looks while no traffic came for a minute (what came meanwhile is counted then).
IDLE_TICK: Final = 5.0
#: Probe back-off failures are counted up to here (the back-off saturates long before).
_FAILURE_CAP: Final = 10_000

Refusal = Literal["partner_refused", "credentials_refused"]
#: The setting to fix, by refusal.
FIX: Final[dict[str, str]] = {"partner_refused": "REPAIRY_PARTNER_ID",
                              "credentials_refused": "REPAIRY_APP_KEY / REPAIRY_APP_SECRET"}


class ProbeTarget(Protocol):
    """What the verdict needs of the token side (the token manager)."""

    def usable(self) -> Token | None: ...

    async def get(self, newer_than: int = 0) -> Token: ...

    def invalidate(self, generation: int, reason: str) -> bool: ...

    async def probe(self, token: Token) -> ProbeResult: ...

    def contended(self) -> bool: ...

    def holds(self, token: Token) -> bool: ...

    def renewal_refused(self) -> bool: ...

    def route_explained(self, generation: int) -> None: ...


class VerdictEvents(Protocol):
    """Observers (metrics); cheap, never raise."""

    def probed(self, outcome: str) -> None: ...

    def refusal(self, reason: str | None) -> None: ...


class _NoEvents:
    def probed(self, outcome: str) -> None:
        pass

    def refusal(self, reason: str | None) -> None:
        pass


@dataclass(frozen=True)
class VerdictPolicy:
    """When live traffic asks for a re-probe (settings); the rest are this module's bounds."""

    min_refusals: int = 20
    refused_ratio: float = 0.5


class UpstreamVerdict:
    def __init__(self, target: ProbeTarget, clock: Clock, policy: VerdictPolicy, *,
                 enabled: bool = True, events: VerdictEvents | None = None,
                 rng: random.Random | None = None, tally: Tally | None = None) -> None:
        self._target = target
        self._clock = clock
        self._policy = policy
        self.enabled = enabled
        self._events: VerdictEvents = events or _NoEvents()
        self._rng = rng or random.Random()
        self.tally = tally if tally is not None else Tally()
        self._window = TrafficWindow()
        self._wake = asyncio.Event()
        #: The confirmed refusal (None: none), what the probe said, since when (Unix time).
        self.refusal: Refusal | None = None
        self.detail: str | None = None
        self.since: float | None = None
        #: The first round ran (or there is nothing to probe): for the start-up probe.
        self.first_round_done = not enabled
        self.last_result: ProbeResult | None = None
        self.last_probe_wall: float | None = None
        self.rounds = 0
        self._due: float | None = clock.monotonic() if enabled else None
        self._last_round: float | None = None
        self._last_traffic_round: float | None = None
        self._failures = 0
        self._next_tick = self._last_tick = clock.monotonic()
        self._in_round = False
        self._asked: float | None = None  # a request that came during a round: when
        self._operator = False  # a SIGHUP or rotation asked: the next round may renew
        self._renewed_at: float | None = None  # this verdict's last renewal
        self._misconfigured: set[int] = set()  # statuses of GATEWAY_CHECK_PATH said once

    # -- asking --------------------------------------------------------------------------------
    def request_probe(self, why: str) -> None:
        """Probe soon (a SIGHUP, a rotation): at once, or :data:`FLOOR` after the last round."""
        if not self.enabled:
            return
        now = self._clock.monotonic()
        when = now if self._last_round is None else max(now, self._last_round + FLOOR)
        if why in ("sighup", "rotation"):
            self._operator = True
        if self._in_round:  # kept for after this round, whatever it concludes
            self._asked = when if self._asked is None else min(self._asked, when)
        elif self._due is None or when < self._due:
            self._due = when
            log.info("probe requested (%s)", why, extra={"fields": {
                "event": "probe_requested", "why": why}})
        self._wake.set()

    def ready(self) -> bool:
        return self.refusal is None

    def status(self) -> dict[str, Any]:
        """For /tokenz (no secret: a path, a status, a setting)."""
        now = self._clock.monotonic()
        r = self.last_result
        return {
            "enabled": self.enabled, "refusal": self.refusal, "detail": self.detail,
            "since": self.since, "fix": None if self.refusal is None else FIX[self.refusal],
            "last_probe": None if r is None else {
                "at": self.last_probe_wall, "outcome": r.outcome, "status": r.status,
                "detail": r.detail},
            "next_probe_in_seconds": None if self._due is None
            else round(max(0.0, self._due - now), 3),
            "traffic_last_minute": {"calls": self._window.calls,
                                    "refused": self._window.refused}}

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            try:
                now = self._clock.monotonic()
                if now >= self._next_tick:
                    self._tick(now)
                due = self._due
                wait = self._next_tick - now
                if due is not None and now >= due:
                    token = self._target.usable()
                    if token is not None:
                        await self._round(token)
                        continue
                    wait = min(wait, TICK)  # no token yet: look again in a second
                elif due is not None:
                    wait = min(wait, due - now)
                self._wake.clear()
                await sleep_or_set(self._clock, self._wake, max(0.0, wait))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the verdict for good, nor spin
                log.exception("probe loop crashed; continuing")
                await self._clock.sleep(FLOOR)

    def _tick(self, now: float) -> None:
        """Once a second: the traffic's last second into the window; a re-probe if the
        last minute looks refused (at most one per :data:`REPROBE_EVERY`)."""
        calls, refused = self.tally.take()
        self._window.push(calls, refused, int(now - self._last_tick))
        self._last_tick = now
        self._next_tick = now + (IDLE_TICK if self._window.empty else TICK)
        if self.refusal is not None or self._due is not None or self._in_round:
            return  # a round is due anyway (or the back-off decides while refused)
        if self._target.renewal_refused():  # callers get 503s now: Repairy's verdict?
            last = self._last_traffic_round
            if last is None or now - last >= REPROBE_EVERY:
                self._last_traffic_round = now
                self.request_probe("renewal_refused")
            return
        if not self._window.looks_refused(self._policy.min_refusals, self._policy.refused_ratio):
            return
        last = self._last_traffic_round
        if last is not None and now - last < REPROBE_EVERY:
            return
        self._last_traffic_round = now
        log.warning("callers get many 401/403 (%d of %d upstream answers in a minute): "
                    "probing", self._window.refused, self._window.calls, extra={"fields": {
                        "event": "probe_requested", "why": "traffic",
                        "refused": self._window.refused, "calls": self._window.calls}})
        self.request_probe("traffic")

    async def _round(self, token: Token) -> None:
        """One probe round: a probe, and after a 401 one renewal and a second probe."""
        now = self._clock.monotonic()
        self._last_round = now
        self._due = None
        self.rounds += 1
        self._in_round = True
        operator, self._operator = self._operator, False
        try:
            result = await self._probe(token)
            if result.outcome == "token_refused" and (
                    self.refusal != "credentials_refused" or operator or (
                        self._renewed_at is None or now - self._renewed_at >= CAP)):
                result = await self._after_renewal(token)
            self._conclude(result)
        finally:
            self._in_round = False
            self.first_round_done = True
            asked, self._asked = self._asked, None
            if asked is not None:
                self._due = asked if self._due is None else min(self._due, asked)

    async def _after_renewal(self, token: Token) -> ProbeResult:
        """A 401 on the probe: renew once, and probe again with the new token."""
        self._renewed_at = self._clock.monotonic()
        self._target.invalidate(token.generation, "probe_401")
        try:
            newer = await self._target.get(token.generation)
        except CredentialsRejected:  # the 401 survives: no renewal can replace that token
            return ProbeResult("token_refused", 401, "Repairy refused the token on "
                               "GATEWAY_CHECK_PATH (401), and refuses a new login: check "
                               "REPAIRY_APP_KEY / REPAIRY_APP_SECRET")
        except TokenUnavailable as exc:
            return ProbeResult("inconclusive", None, f"a 401 on the probe, and no newer "
                                                     f"token to probe again with ({exc.code})")
        result = await self._probe(newer)
        if result.outcome != "token_refused":
            return result
        if self._target.contended() or not self._target.holds(newer):
            # Someone else's login may have revoked the new token too.
            return ProbeResult("inconclusive", 401, "a 401 on the probe after a renewal, but "
                               "the new token was refused elsewhere too (contention?)")
        self._target.route_explained(token.generation)  # the credentials, not a revocation
        return result

    async def _probe(self, token: Token) -> ProbeResult:
        try:
            result = await self._target.probe(token)
        except Exception as exc:  # a bug: it says nothing about Repairy (backed off as such)
            log.exception("the probe crashed", extra={"fields": {"event": "probe_crashed"}})
            result = ProbeResult("inconclusive", None,
                                 f"the probe crashed ({type(exc).__name__})")
        self.last_result = result
        self.last_probe_wall = self._clock.time()
        self._events.probed(result.outcome)
        return result

    def _conclude(self, result: ProbeResult) -> None:
        outcome = result.outcome
        if outcome == "ok":
            self._failures = 0
            if self.refusal is not None:
                log.info("Repairy takes the configuration again: ready", extra={"fields": {
                    "event": "upstream_accepted", "was": self.refusal}})
                self._set(None, None)
            return
        if outcome == "inconclusive":
            status = result.status
            if status is not None and status < 500 and status not in (401, 408, 425, 429):
                if status not in self._misconfigured and len(self._misconfigured) < 20:
                    self._misconfigured.add(status)
                    log.error("GATEWAY_CHECK_PATH answered %d: the probe proves nothing; set "
                              "a path that answers 2xx or 404 (or off)", status, extra={
                                  "fields": {"event": "probe_misconfigured",
                                             "status": status}})
                if self.refusal is None:
                    return  # no retrying a wrong path; traffic or an operator may ask again
            log.warning("probe inconclusive: %s", result.detail, extra={"fields": {
                "event": "probe_inconclusive", "status": result.status}})
        else:
            refusal: Refusal = ("partner_refused" if outcome == "partner_refused"
                                else "credentials_refused")
            if self.refusal != refusal:
                log.error("Repairy refuses the configuration (%s): %s; not ready until a "
                          "probe passes (fix %s, then SIGHUP)", refusal, result.detail,
                          FIX[refusal], extra={"fields": {
                              "event": "upstream_refused", "reason": refusal,
                              "status": result.status, "fix": FIX[refusal]}})
            self._set(refusal, result.detail)
        self._failures = min(self._failures + 1, _FAILURE_CAP)
        delay = max(FLOOR, backoff(self._failures, FLOOR, CAP, self._rng.random()))
        self._due = self._clock.monotonic() + delay

    def _set(self, refusal: Refusal | None, detail: str | None) -> None:
        if refusal != self.refusal:
            self.since = None if refusal is None else self._clock.time()
            self._events.refusal(refusal)
        self.refusal, self.detail = refusal, detail
