"""Property tests on a fake clock: the retry back-off, the retry budget, the circuit breaker and
the token buckets can never turn an outage into a flood, whatever the sequence of events."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.errors import CircuitOpen
from gateway.proxy.limits import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    Outcome,
    Ticket,
    TokenBucket,
    WindowCounter,
)
from gateway.proxy.retry import RetryBudget, backoff

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.8e9 + self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


OUTCOMES: list[Outcome] = ["success", "failure", "neutral"]


@given(attempt=st.integers(min_value=-5, max_value=10**12),
       floor=st.floats(min_value=1e-3, max_value=10.0),
       extra=st.floats(min_value=0.0, max_value=100.0), rand=st.floats(allow_nan=True))
def test_backoff_stays_within_floor_and_cap_for_any_attempt(attempt: int, floor: float,
                                                            extra: float, rand: float) -> None:
    cap = floor + extra
    wait = backoff(attempt, floor, cap, rand)
    assert floor <= wait <= cap


@given(steps=st.lists(st.tuples(st.floats(min_value=0.0, max_value=3.0),
                                st.integers(min_value=0, max_value=30),
                                st.integers(min_value=0, max_value=60)), max_size=200),
       ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
       floor_rate=st.sampled_from([0.0, 1.0, 10.0]))
@settings(max_examples=150, deadline=None)
def test_retry_budget_bounds_retries_in_every_window(
        steps: list[tuple[float, int, int]], ratio: float, floor_rate: float) -> None:
    """At every grant, the retries granted in the trailing 90 % of the window are at most
    ``ratio`` x the requests of the trailing window plus the floor (so over an hour: at most
    ``ratio`` x about twice the requests, plus the floor rate x 3,600 x 1.1)."""
    window = 10.0
    clock = Clock()
    budget = RetryBudget(ratio, floor_rate, window, clock)
    requests: deque[float] = deque()
    grants: deque[float] = deque()
    for advance, n_requests, n_retries in steps:
        clock.now += advance
        for _ in range(n_requests):
            budget.request()
            requests.append(clock.now)
        granted = False
        for _ in range(n_retries):
            if budget.try_spend():
                grants.append(clock.now)
                granted = True
        if not granted:
            continue
        recent_grants = sum(1 for t in grants if t > clock.now - 0.9 * window)
        recent_requests = sum(1 for t in requests if t > clock.now - window)
        assert recent_grants <= ratio * recent_requests + floor_rate * window + 1e-9


@given(events=st.lists(st.tuples(st.floats(min_value=0.0, max_value=5.0),
                                 st.sampled_from(["success", "failure", "neutral"])),
                       max_size=300),
       probes=st.integers(min_value=1, max_value=3),
       failures=st.integers(min_value=0, max_value=8))
@example(events=[(0.0, "failure"), (2.0, "neutral"), (0.0, "neutral"), (0.0, "neutral"),
                 (0.0, "success")], probes=1, failures=1)  # neutral probes, one after another
@settings(max_examples=200, deadline=None)
def test_open_breaker_lets_at_most_the_probes_through_per_cooldown(
        events: list[tuple[float, Outcome]], probes: int, failures: int) -> None:
    """However outcomes arrive, while the breaker is not closed the upstream sees at most
    ``probes`` requests per cool-down that say anything about its health; it opens after
    ``failures`` failures in a row; with ``failures=0`` it is off and never refuses. A probe
    whose outcome is neutral (the caller left, a protocol error: nothing learned) hands its
    place to the next request, as resilience4j's ignored calls do: the bound on those is the
    probes' concurrency, which a sequential history cannot exceed."""
    cooldown = 2.0
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(failures, 0.5, 20, 10.0, cooldown, probes), clock)
    admitted_not_closed: list[float] = []
    in_a_row = 0
    for advance, outcome in events:
        clock.now += advance
        was_closed = breaker.state is BreakerState.CLOSED
        refused: CircuitOpen | None = None
        try:
            ticket = breaker.admit()
        except CircuitOpen as exc:
            refused = exc
        if refused is not None:
            assert failures > 0
            assert refused.retry_after is not None and refused.retry_after > 0
            continue
        if not (was_closed and not ticket.probe) and outcome != "neutral":
            admitted_not_closed.append(clock.now)
        breaker.record(ticket, outcome)
        if not ticket.probe:
            in_a_row = in_a_row + 1 if outcome == "failure" else (
                in_a_row if outcome == "neutral" else 0)
            if failures and in_a_row >= failures:
                assert breaker.state is BreakerState.OPEN
                in_a_row = 0
        else:
            in_a_row = 0
    # Sequential requests: each probe finishes before the next; at most one probe round per
    # cool-down after an open, so in any cool-down-long span: <= probes + one per success.
    for i, t in enumerate(admitted_not_closed):
        within = [u for u in admitted_not_closed[i:] if u < t + cooldown]
        assert len(within) <= max(probes, 1) * 2 + 1


@given(actions=st.lists(st.sampled_from(["admit", "neutral", "failure", "success", "wait"]),
                        max_size=200),
       probes=st.integers(min_value=1, max_value=3))
# A stale probe of an earlier period must not give a place back in the current one; a neutral
# outcome gives back one place, not two (each caught a deliberately broken breaker).
@example(actions=["wait", "admit", "admit", "failure", "wait", "admit", "admit", "neutral",
                  "admit"], probes=2)
@example(actions=["wait", "admit", "admit", "neutral", "admit", "admit"], probes=2)
@settings(max_examples=300, deadline=None)
def test_half_open_breaker_never_has_more_than_the_probes_in_flight(
        actions: list[str], probes: int) -> None:
    """The bound on probes whose outcome is neutral: however admissions and outcomes
    interleave, no half-open period has more than ``probes`` of its probes in flight at
    once (a neutral outcome hands its place on; it never adds one)."""
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(1, 0.5, 20, 10.0, 2.0, probes), clock)
    breaker.record(breaker.admit(), "failure")  # open
    in_flight: deque[Ticket] = deque()
    for action in actions:
        if action == "wait":
            clock.now += 2.0  # a cool-down passes
        elif action == "admit":
            try:
                ticket = breaker.admit()
            except CircuitOpen:
                continue
            if ticket.probe:
                in_flight.append(ticket)
        elif in_flight:
            breaker.record(in_flight.popleft(), action)  # type: ignore[arg-type]
        if in_flight:
            latest = max(t.epoch for t in in_flight)
            assert sum(t.epoch == latest for t in in_flight) <= probes


@given(attempt=st.integers(min_value=1, max_value=40),
       floor=st.floats(min_value=1e-3, max_value=1.0))
def test_backoff_spreads_retries_from_the_first_one(attempt: int, floor: float) -> None:
    """Full jitter above the floor: two retries that failed together wait different times."""
    cap = floor * 100
    assert backoff(attempt, floor, cap, 0.0) == floor
    assert backoff(attempt, floor, cap, 1.0) >= min(cap, floor * 2)
    assert backoff(attempt, floor, cap, 1.0) > backoff(attempt, floor, cap, 0.0)


def test_breaker_check_changes_nothing_and_a_scrape_sees_half_open_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(1, 0.5, 20, 10.0, 5.0, 1), clock)
    breaker.record(breaker.admit(), "failure")
    assert breaker.observed_state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        breaker.check()
    clock.now += 5.0
    breaker.check()  # would pass: the cool-down is over
    assert breaker.state is BreakerState.OPEN  # ... but only admit() moves it
    assert breaker.observed_state.name == "HALF_OPEN"  # what /metrics shows: no alert


def test_breaker_opens_on_failure_share_and_ignores_answered_statuses() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(100, 0.5, 20, 10.0, 1.0, 1), clock)
    for i in range(40):
        ticket = breaker.admit()
        breaker.record(ticket, "failure" if i % 2 else "success")
        if breaker.state is BreakerState.OPEN:
            break
    assert breaker.state is BreakerState.OPEN
    assert i >= 19  # not before 20 requests were seen
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 1.0
    probe = breaker.admit()
    assert probe.probe
    assert breaker.state.name == "HALF_OPEN"
    with pytest.raises(CircuitOpen):
        breaker.admit()  # one probe at a time
    breaker.record(probe, "neutral")  # a caller who left says nothing about the upstream
    assert breaker.state.name == "HALF_OPEN"
    probe = breaker.admit()
    breaker.record(probe, "success")
    assert breaker.state.name == "CLOSED"


@given(rate=st.floats(min_value=0.01, max_value=1000.0),
       burst=st.integers(min_value=1, max_value=100),
       steps=st.lists(st.floats(min_value=0.0, max_value=10.0), max_size=200))
@settings(max_examples=150, deadline=None)
def test_token_bucket_never_grants_more_than_burst_plus_rate_times_time(
        rate: float, burst: int, steps: list[float]) -> None:
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock)
    start = clock.now
    granted = 0
    for advance in steps:
        clock.now += advance
        while (wait := bucket.take()) is None:
            granted += 1
            assert granted <= burst + rate * (clock.now - start) + 1e-6
        assert 0 < wait <= 1.0 / rate + 1e-9
    clock.now -= 1e6  # a clock that jumps back grants nothing extra
    assert bucket.take() is not None or burst + rate * (clock.now + 1e6 - start) >= granted + 1


@given(adds=st.lists(st.tuples(st.floats(min_value=0.0, max_value=4.0),
                               st.integers(min_value=0, max_value=5)), max_size=200))
def test_window_counter_counts_between_90_and_100_percent_of_the_window(
        adds: list[tuple[float, int]]) -> None:
    clock = Clock()
    counter = WindowCounter(10.0, clock)
    seen: list[tuple[float, int]] = []
    for advance, n in adds:
        clock.now += advance
        counter.add(n)
        seen.append((clock.now, n))
        total = counter.total()
        assert total <= sum(k for t, k in seen if t > clock.now - 10.0 - 1e-9)
        assert total >= sum(k for t, k in seen if t > clock.now - 9.0 + 1e-9)
