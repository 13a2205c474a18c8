"""Repairy's verdict on the configuration (gateway/token/verdict.py), on a fake clock: what
confirms a refusal, what never does, the back-off, live traffic's re-probe, and the loop's
bounds under any history (hypothesis)."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import CredentialsRejected, TokenUnavailable
from gateway.token.auth_client import ProbeResult
from gateway.token.traffic import Tally, TrafficWindow
from gateway.token.value import Token
from gateway.token.verdict import (
    CAP,
    FLOOR,
    REPROBE_EVERY,
    UpstreamVerdict,
    VerdictPolicy,
)
from tests.fake_clock import WALL_OFFSET, FakeClock, settle

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

OK = ProbeResult("ok", 404, "ok")
PARTNER = ProbeResult("partner_refused", 403, "Repairy refused Partner ID 'p' (403)")
TOKEN = ProbeResult("token_refused", 401, "Repairy refused the token (401)")
SILENT = ProbeResult("inconclusive", None, "no answer")


@dataclass
class FakeTarget:
    """The token side as the verdict sees it: a token, renewals, and scripted probes."""

    clock: FakeClock
    answers: list[ProbeResult] = field(default_factory=list)
    default: ProbeResult = OK
    has_token: bool = True
    renew_fails: bool = False
    renew_rejected: bool = False
    contention: bool = False
    lost: bool = False  # the newest token was refused elsewhere too
    refused_renewal: bool = False  # stale, and Repairy refuses the login that would replace it
    probe_delay: float = 0.05
    generation: int = 1
    probes: list[tuple[float, int]] = field(default_factory=list)
    invalidated: list[int] = field(default_factory=list)
    renewals: list[float] = field(default_factory=list)
    explained: list[int] = field(default_factory=list)

    def _token(self) -> Token:
        now = self.clock.now
        return Token(access=f"a{self.generation}", refresh=None, generation=self.generation,
                     via="login", obtained_at=now, expires_at=now + 3600,
                     refresh_expires_at=None, obtained_wall=WALL_OFFSET + now, partner_id="p")

    def usable(self) -> Token | None:
        return self._token() if self.has_token else None

    async def get(self, newer_than: int = 0) -> Token:
        await self.clock.sleep(0.1)
        if self.renew_fails:  # Repairy's login is down (a rejected one is a verdict)
            raise TokenUnavailable("no", retry_after=1.0)
        if self.renew_rejected:
            raise CredentialsRejected("no", retry_after=1.0)
        self.generation = max(self.generation, newer_than) + 1
        self.renewals.append(self.clock.now)
        return self._token()

    def invalidate(self, generation: int, reason: str) -> bool:
        self.invalidated.append(generation)
        return True

    def contended(self) -> bool:
        return self.contention

    def holds(self, token: Token) -> bool:
        return token.generation == self.generation and not self.lost

    def renewal_refused(self) -> bool:
        return self.refused_renewal

    def route_explained(self, generation: int) -> None:
        self.explained.append(generation)

    async def probe(self, token: Token) -> ProbeResult:
        self.probes.append((self.clock.now, token.generation))
        await self.clock.sleep(self.probe_delay)
        return self.answers.pop(0) if self.answers else self.default


class Events:
    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.refusals: list[str | None] = []

    def probed(self, outcome: str) -> None:
        self.outcomes.append(outcome)

    def refusal(self, reason: str | None) -> None:
        self.refusals.append(reason)


def _verdict(target: FakeTarget, events: Events | None = None, **policy: float
             ) -> UpstreamVerdict:
    return UpstreamVerdict(target, target.clock, VerdictPolicy(**policy),  # type: ignore[arg-type]
                           events=events, rng=random.Random(7))


async def _running(verdict: UpstreamVerdict) -> asyncio.Task[None]:
    task = asyncio.create_task(verdict.run())
    await settle()
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_403_confirms_partner_refused_at_once_and_backs_off_until_a_probe_passes() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        events = Events()
        target = FakeTarget(clock, answers=[PARTNER] * 8)
        verdict = _verdict(target, events)
        task = await _running(verdict)
        await clock.advance(1)
        assert verdict.refusal == "partner_refused" and not verdict.ready()
        assert verdict.first_round_done and events.refusals == ["partner_refused"]
        assert target.invalidated == []  # a 403 costs no renewal
        await clock.advance(3000)
        starts = [at for at, _ in target.probes]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(FLOOR <= g <= CAP + 1 for g in gaps), gaps
        assert gaps[-1] > gaps[0] * 4  # doubling (jittered) up to the cap
        assert verdict.ready() and verdict.refusal is None  # the 9th probe passed
        assert events.refusals == ["partner_refused", None]
        probes = len(target.probes)
        await clock.advance(3600)
        assert len(target.probes) == probes  # passing: no probe until asked
        await _stop(task)

    asyncio.run(scenario())


def test_a_401_is_confirmed_only_if_it_survives_a_renewal_and_a_second_probe() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock, answers=[TOKEN, OK])
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(1)
        assert target.invalidated == [1] and len(target.renewals) == 1
        assert [g for _, g in target.probes] == [1, 2]  # the second probe: the new token
        assert verdict.ready()  # someone revoked that one token: not a refusal
        target.answers = [TOKEN, TOKEN]
        verdict.request_probe("sighup")
        await clock.advance(FLOOR + 1)
        assert verdict.refusal == "credentials_refused"
        assert "401" in (verdict.detail or "")
        assert target.explained == [2]  # the credentials, not a revocation: no contention
        renewals = len(target.renewals)
        target.default = TOKEN
        await clock.advance(FLOOR * 4)
        assert verdict.refusal == "credentials_refused"
        assert len(target.renewals) == renewals  # confirmed: a re-probe renews nothing
        await _stop(task)

    asyncio.run(scenario())


def test_no_answer_a_5xx_or_a_failed_renewal_never_flip_readiness() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock, default=SILENT)
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(600)
        assert verdict.ready() and verdict.first_round_done
        assert len(target.probes) >= 4  # retried with back-off
        target.default = ProbeResult("inconclusive", 503, "503")
        target.answers = [TOKEN]
        target.renew_fails = True  # 401, then no newer token to confirm it with
        verdict.request_probe("sighup")
        await clock.advance(CAP + 1)
        assert verdict.ready()
        # Refused, then silence: the refusal stands until a probe passes.
        target.renew_fails = False
        target.answers, target.default = [PARTNER], SILENT
        verdict.request_probe("sighup")
        await clock.advance(CAP * 2)
        assert verdict.refusal == "partner_refused"
        await _stop(task)

    asyncio.run(scenario())


def test_probing_waits_for_a_first_token_and_runs_at_once_after_a_request() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock, has_token=False)
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(30)
        assert target.probes == [] and not verdict.first_round_done
        target.has_token = True
        await clock.advance(1.5)
        assert len(target.probes) == 1 and verdict.first_round_done
        verdict.request_probe("sighup")  # within the floor of the last round: waits for it
        await clock.advance(FLOOR - 2)
        assert len(target.probes) == 1
        await clock.advance(1.5)
        assert len(target.probes) == 2
        await clock.advance(100)
        verdict.request_probe("rotation")  # long after: at once
        await settle()
        assert len(target.probes) == 3
        await _stop(task)

    asyncio.run(scenario())


def test_a_disabled_verdict_probes_nothing_and_counts_as_started() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock)
        verdict = UpstreamVerdict(target, clock, VerdictPolicy(), enabled=False)
        assert verdict.first_round_done and verdict.ready()
        await verdict.run()  # returns at once
        verdict.request_probe("sighup")
        await clock.advance(60)
        assert target.probes == []

    asyncio.run(scenario())


def _traffic(verdict: UpstreamVerdict, calls: int, refused: int) -> None:
    for i in range(calls):
        verdict.tally.answered(403 if i < refused else 200)


def test_live_traffic_re_probes_at_most_once_a_minute_and_only_past_both_numbers() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock)
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(2)
        assert len(target.probes) == 1  # the start-up round
        for _ in range(30):
            _traffic(verdict, 1, 0)
            await clock.advance(1)
        _traffic(verdict, 19, 19)  # 19 refusals in the minute: under the count
        await clock.advance(2)
        assert len(target.probes) == 1
        _traffic(verdict, 60, 0)  # 20 refusals, but 20 of 80 (25%): under the share
        _traffic(verdict, 1, 1)
        await clock.advance(2)
        assert len(target.probes) == 1
        _traffic(verdict, 100, 100)  # now both: one probe
        await clock.advance(2)
        assert len(target.probes) == 2
        for _ in range(200):  # refused answers keep coming: one probe per minute at most
            _traffic(verdict, 10, 10)
            await clock.advance(1)
        starts = [at for at, _ in target.probes[1:]]
        assert len(starts) in (4, 5)
        assert all(b - a >= REPROBE_EVERY for a, b in itertools.pairwise(starts))
        assert verdict.ready()  # the probes passed: one resource may be forbidden to us
        await _stop(task)

    asyncio.run(scenario())


def test_the_traffic_window_forgets_after_a_minute_and_the_tally_clamps() -> None:
    window = TrafficWindow(60)
    window.push(100, 100)
    assert window.looks_refused(20, 0.5)
    for _ in range(59):
        window.push(0, 0)
    assert window.looks_refused(20, 0.5)
    window.push(0, 0)
    assert (window.calls, window.refused) == (0, 0)
    tally = Tally()
    tally.add(-5, 9)
    tally.add(3, 9)
    assert tally.take() == (3, 3) and tally.take() == (0, 0)


# -- bounds under any history (hypothesis) -----------------------------------------------------
ANSWER = st.sampled_from([OK, PARTNER, TOKEN, SILENT])
EVENT = st.one_of(
    st.tuples(st.just("wait"), st.floats(0.1, 400)),
    st.tuples(st.just("refused_traffic"), st.integers(0, 500)),
    st.tuples(st.just("ok_traffic"), st.integers(0, 500)),
    st.tuples(st.just("token"), st.booleans()),
    st.tuples(st.just("renewal_fails"), st.booleans()),
    st.tuples(st.just("sighup"), st.just(0)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.lists(ANSWER, max_size=40), default=ANSWER,
       events=st.lists(EVENT, max_size=30))
def test_probe_rounds_have_a_floor_and_a_bound_per_hour_on_any_history(
        answers: list[ProbeResult], default: ProbeResult,
        events: list[tuple[str, float | int | bool]]) -> None:
    """Any answers, traffic, token loss, failed renewals and SIGHUPs: two rounds never start
    closer than FLOOR; a round is at most two probes and one renewal; without operator
    requests, an hour holds at most 1 + 60 (traffic) + 20 (back-off) rounds."""

    async def scenario() -> tuple[list[float], list[tuple[float, int]], list[float], bool]:
        clock = FakeClock()
        target = FakeTarget(clock, answers=list(answers), default=default)
        verdict = _verdict(target)
        rounds: list[float] = []
        real_round = verdict._round

        async def counted(token: Token) -> None:
            rounds.append(clock.now)
            await real_round(token)

        verdict._round = counted  # type: ignore[method-assign]
        task = await _running(verdict)
        asked = False
        for kind, value in events:
            if kind == "wait":
                await clock.advance(float(value))
            elif kind == "refused_traffic":
                _traffic(verdict, int(value), int(value))
                await clock.advance(1)
            elif kind == "ok_traffic":
                _traffic(verdict, int(value), 0)
                await clock.advance(1)
            elif kind == "token":
                target.has_token = bool(value)
            elif kind == "renewal_fails":
                target.renew_fails = bool(value)
            else:
                asked = True
                verdict.request_probe("sighup")
        await clock.advance(3600)
        await _stop(task)
        return rounds, target.probes, target.renewals, asked

    rounds, probes, renewals, asked = asyncio.run(scenario())
    assert all(b - a >= FLOOR - 1e-9 for a, b in itertools.pairwise(rounds))
    assert len(probes) <= 2 * len(rounds) and len(renewals) <= len(rounds)
    if not asked:
        for i, start in enumerate(rounds):
            within = [t for t in rounds[i:] if t < start + 3600]
            assert len(within) <= 1 + 60 + 20, len(within)


def test_credentials_refused_clears_once_repairy_takes_new_tokens_again() -> None:
    """Repairy refused every token up to generation 3, then takes new ones: a SIGHUP renews
    at once (an operator asked); without one, a back-off round renews after CAP."""

    async def scenario(sighup: bool) -> tuple[str | None, float]:
        clock = FakeClock()
        refused_up_to = [3]

        class Target(FakeTarget):
            async def probe(self, token: Token) -> ProbeResult:
                self.probes.append((self.clock.now, token.generation))
                await self.clock.sleep(0.05)
                return TOKEN if token.generation <= refused_up_to[0] else OK

        target = Target(clock)
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(1)
        assert verdict.refusal == "credentials_refused"  # generations 1 and 2
        refused_up_to[0] = 2  # fixed on Repairy's side: generation 3 onwards is taken
        renewals = len(target.renewals)
        await clock.advance(60)
        assert verdict.refusal == "credentials_refused"  # re-probes renew nothing yet
        assert len(target.renewals) == renewals
        if sighup:
            verdict.request_probe("sighup")
            await clock.advance(1)
        else:
            await clock.advance(CAP * 2)
        await _stop(task)
        return verdict.refusal, clock.now

    assert asyncio.run(scenario(sighup=True))[0] is None
    assert asyncio.run(scenario(sighup=False))[0] is None


def test_a_request_during_a_round_is_kept_for_after_it() -> None:
    """A SIGHUP that arrives while a (slow) round is in flight is not lost under that
    round's back-off: the next probe comes within the floor."""

    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock, answers=[PARTNER, PARTNER, PARTNER, PARTNER])
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(1)
        await clock.advance(CAP)  # back-off grown: the next round is minutes away
        target.answers, target.default = [PARTNER], OK
        target.probe_delay = 3.0
        verdict._due = clock.now  # a back-off round starts now ...
        verdict._wake.set()
        await clock.advance(1)
        assert verdict._in_round
        verdict.request_probe("sighup")  # ... and the fix lands during it
        await clock.advance(FLOOR + 3)
        assert verdict.refusal is None
        await _stop(task)

    asyncio.run(scenario())


def test_a_401_during_contention_confirms_nothing() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock, answers=[TOKEN, TOKEN], contention=True)
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(1)
        assert verdict.ready() and verdict.refusal is None
        assert len(target.renewals) == 1  # the one renewal; then nothing is confirmed
        await _stop(task)

    asyncio.run(scenario())


def test_a_wrong_check_path_is_said_once_and_not_retried(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock, default=ProbeResult("inconclusive", 400, "400"))
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(3600)
        assert len(target.probes) == 1 and verdict.ready()
        verdict.request_probe("sighup")
        await clock.advance(10)
        assert len(target.probes) == 2
        await _stop(task)

    asyncio.run(scenario())
    said = [r for r in caplog.records if "GATEWAY_CHECK_PATH answered 400" in r.getMessage()]
    assert len(said) == 1


def test_the_window_forgets_everything_after_a_gap_longer_than_itself() -> None:
    window = TrafficWindow(60)
    window.push(100, 100)
    window.push(0, 0, seconds=120)
    assert (window.calls, window.refused) == (0, 0)
    window.push(5, 5, seconds=30)
    assert (window.calls, window.refused) == (5, 5)


def test_a_401_on_a_new_token_that_died_elsewhere_too_confirms_nothing() -> None:
    """Between the renewal and the second probe, someone's login revoked the new token
    (live traffic saw it refused too): inconclusive, never credentials_refused."""

    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock, answers=[TOKEN, TOKEN], lost=True)
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(1)
        assert verdict.ready() and target.explained == []
        await _stop(task)

    asyncio.run(scenario())


def test_a_401_whose_renewal_repairy_refuses_confirms_credentials_refused() -> None:
    """The probe's 401 survives the renewal when that renewal is refused (the App Secret
    was revoked): credentials_refused. Callers getting 503 credentials_rejected (no
    upstream answer for the traffic window) ask for that round."""

    async def scenario() -> None:
        clock = FakeClock()
        target = FakeTarget(clock)
        verdict = _verdict(target)
        task = await _running(verdict)
        await clock.advance(2)
        assert verdict.ready() and len(target.probes) == 1
        target.default, target.renew_rejected, target.refused_renewal = TOKEN, True, True
        await clock.advance(6)  # the next (idle) tick sees the refused renewal: one round
        assert verdict.refusal == "credentials_refused"
        assert len(target.probes) == 2
        await _stop(task)

    asyncio.run(scenario())
