"""A fake clock for the token lifecycle, and a scripted fake auth client that runs on it.

The clock's time moves only when a test says so. ``advance`` walks it forward through every
sleeper's deadline in order (as time passes); ``jump`` moves it at once (a suspended host),
waking every sleeper that is overdue only afterwards.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from gateway.errors import AuthError, AuthReason
from gateway.token.auth_client import Exchange, ProbeResult
from gateway.token.parse import Grant
from gateway.token.value import RenewalKind, Token

WALL_OFFSET = 1_800_000_000.0
#: More wake-ups than this in one step of time is a hot loop: fail rather than spin.
MAX_WAKES = 20_000


async def settle(rounds: int = 40) -> None:
    """Let every task that can run, run (nothing here waits on real time or I/O)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return WALL_OFFSET + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.now + max(0.0, seconds), next(self._seq), fut))
        await fut

    def next_deadline(self) -> float | None:
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def _wake_due(self) -> int:
        woken = 0
        while (deadline := self.next_deadline()) is not None and deadline <= self.now:
            _, _, fut = heapq.heappop(self._heap)
            fut.set_result(None)
            await settle()
            woken += 1
            if woken > MAX_WAKES:
                raise AssertionError(f"hot loop: {woken} wake-ups at t={self.now}")
        return woken

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, waking sleepers at their deadlines, in order."""
        target = self.now + seconds
        await settle()
        woken = 0
        while (deadline := self.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            woken += await self._wake_due()
            if woken > MAX_WAKES:
                raise AssertionError(f"hot loop: {woken} wake-ups before t={target}")
        self.now = target
        await settle()

    async def jump(self, seconds: float) -> None:
        """Move time at once (as after a suspend), then wake whoever is overdue."""
        self.now += seconds
        await self._wake_due()


@dataclass(frozen=True)
class Outcome:
    """One scripted auth answer: after ``duration`` seconds, a grant or an AuthError."""

    reason: AuthReason | Literal["crash"] | None = None  # None: success; crash: not AuthError
    duration: float = 0.0
    retry_after: float | None = None
    ambiguous: bool = False
    lifetime: float = 600.0


@dataclass
class Call:
    kind: RenewalKind
    start: float
    end: float | None = None
    refresh_sent: str | None = None
    outcome: Outcome = field(default_factory=Outcome)
    rotation: bool = False  # a credential rotation's login, not a renewal


class FakeAuth:
    """Answers from a script; when it runs out, ``default`` decides."""

    def __init__(self, clock: FakeClock, script: list[Outcome] | None = None,
                 default: Callable[[], Outcome] = Outcome) -> None:
        self.clock = clock
        self.script = list(script or [])
        self.default = default
        self.calls: list[Call] = []
        self.inflight = 0
        self.max_inflight = 0
        self._n = 0
        self.probes: list[tuple[float, int]] = []  # (when, generation) of each probe
        self.probe_answers: list[ProbeResult] = []
        self.probe_default = ProbeResult("ok", 404, "ok")
        self.probe_duration = 0.0

    async def login(self) -> Exchange:
        return await self._call("login", None)

    async def refresh(self, token: Token) -> Exchange:
        return await self._call("refresh", token.refresh)

    async def probe(self, token: Token) -> ProbeResult:
        """GATEWAY_CHECK_PATH: ``probe_answers`` in turn, then ``probe_default`` (each after
        ``probe_duration`` on the clock)."""
        self.probes.append((self.clock.now, token.generation))
        await self.clock.sleep(self.probe_duration)
        if self.probe_answers:
            return self.probe_answers.pop(0)
        return self.probe_default

    def for_rotation(self) -> RotationAuth:
        return RotationAuth(self)

    async def _call(self, kind: RenewalKind, refresh_sent: str | None,
                    rotation: bool = False) -> Exchange:
        outcome = self.script.pop(0) if self.script else self.default()
        call = Call(kind, self.clock.now, refresh_sent=refresh_sent, outcome=outcome,
                    rotation=rotation)
        self.calls.append(call)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        sent_mono, sent_wall = self.clock.monotonic(), self.clock.time()
        try:
            await self.clock.sleep(outcome.duration)
        finally:
            self.inflight -= 1
            call.end = self.clock.now
        if outcome.reason == "crash":
            raise ValueError("an answer nobody foresaw")
        if outcome.reason is not None:
            raise AuthError(outcome.reason, f"{kind} failed ({outcome.reason})",
                            retry_after=outcome.retry_after, ambiguous=outcome.ambiguous)
        self._n += 1
        grant = Grant(f"fake-access-{self._n}", f"fake-refresh-{self._n}", outcome.lifetime,
                      outcome.lifetime * 10)
        return Exchange(grant, sent_mono, sent_wall, "p")


class RotationAuth:
    """The same fake endpoint, as the new credentials of a rotation (calls tagged)."""

    def __init__(self, auth: FakeAuth) -> None:
        self._auth = auth

    async def login(self) -> Exchange:
        return await self._auth._call("login", None, rotation=True)

    async def refresh(self, token: Token) -> Exchange:
        return await self._auth._call("refresh", token.refresh, rotation=True)

    async def probe(self, token: Token) -> ProbeResult:
        return await self._auth.probe(token)
