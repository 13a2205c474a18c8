"""Persistent-401 routes (``gateway.token.route_401``) on a fake clock, and the clock the
token lifecycle measures expiry on."""

from __future__ import annotations

import time

import pytest

from gateway.clock import SCHEDULING_CLOCK, SystemClock
from gateway.token.route_401 import MAX_ROUTES, Persistent401
from tests.fake_clock import FakeClock

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

R = "/bookings/{id}"


def tracker(clock: FakeClock, marks: list[tuple[str, float]]) -> Persistent401:
    return Persistent401(clock, 60, 3600, lambda route, cool: marks.append((route, cool)))


def test_route_401_marks_after_a_newer_token_is_refused_too() -> None:
    """First 401 invalidates; the same route refusing the next generation is marked; while
    marked its 401s pass back; another route still invalidates at once."""
    marks: list[tuple[str, float]] = []
    t = tracker(FakeClock(), marks)
    assert t.unauthorized(R, 1) is True
    assert t.unauthorized(R, 1) is True  # concurrent requests with the same token
    assert t.unauthorized(R, 2) is False
    assert marks == [(R, 60)]
    assert t.unauthorized(R, 2) is False and t.unauthorized(R, 3) is False
    assert t.unauthorized("/quotes", 2) is True


async def test_route_401_cooldown_doubles_while_it_persists_up_to_the_cap() -> None:
    """60 s, 120 s, 240 s … up to 1 h while the route keeps refusing new tokens."""
    clock = FakeClock()
    marks: list[tuple[str, float]] = []
    t = tracker(clock, marks)
    gen = 1
    for _ in range(9):
        assert t.unauthorized(R, gen)
        gen += 1
        assert not t.unauthorized(R, gen)
        await clock.advance(marks[-1][1])
    assert [c for _, c in marks] == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


async def test_route_401_forgotten_once_the_route_works_again() -> None:
    """A success after the cool-down resets the doubling; a success with the token the route
    invalidated does not clear the pending verdict."""
    clock = FakeClock()
    marks: list[tuple[str, float]] = []
    t = tracker(clock, marks)
    assert t.unauthorized(R, 1)
    t.answered(R, 1)  # an old request with the same token: no verdict yet
    assert not t.unauthorized(R, 2)
    await clock.advance(61)
    t.answered(R, 3)
    assert t.marked() == {}
    assert t.unauthorized(R, 3)
    assert not t.unauthorized(R, 4)
    assert marks[-1] == (R, 60)


async def test_route_401_verdict_only_within_the_window() -> None:
    """A 401 long after the route invalidated an older token is a fresh revocation (days
    later, generation 50): it invalidates again instead of marking the route."""
    clock = FakeClock()
    marks: list[tuple[str, float]] = []
    t = Persistent401(clock, 60, 3600, lambda r, c: marks.append((r, c)), verdict_window=14)
    assert t.unauthorized(R, 1)  # a streamed POST: no replay, no verdict yet
    await clock.advance(3 * 86400)
    assert t.unauthorized(R, 50) is True
    assert marks == []
    assert t.unauthorized(R, 51) is False  # a replay right after: the route, not the token
    assert marks == [(R, 60)]


def test_route_401_would_mark_and_forget() -> None:
    """``would_mark`` tells the caller a verdict is coming (so that it can check the token is
    still the newest); ``forget`` drops an inconclusive one."""
    marks: list[tuple[str, float]] = []
    t = tracker(FakeClock(), marks)
    assert not t.would_mark(R, 1)
    assert t.unauthorized(R, 1)
    assert t.would_mark(R, 2) and not t.would_mark(R, 1)
    t.forget(R)
    assert not t.would_mark(R, 2)
    assert t.unauthorized(R, 2) is True  # a fresh 401: invalidate again, no mark
    assert marks == []


def test_route_401_tracks_a_bounded_number_of_routes() -> None:
    """Memory stays bounded however many routes answer 401."""
    t = tracker(FakeClock(), [])
    for i in range(MAX_ROUTES * 3):
        t.unauthorized(f"/r{i}", 1)
        t.unauthorized(f"/r{i}", 2)
    assert len(t.marked()) <= MAX_ROUTES


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux only")
def test_clock_measures_expiry_on_boottime() -> None:
    """Expiry is measured on CLOCK_BOOTTIME, which keeps counting while a host sleeps."""
    assert SCHEDULING_CLOCK == time.CLOCK_BOOTTIME
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    now = SystemClock().monotonic()
    assert before <= now <= time.clock_gettime(time.CLOCK_BOOTTIME)


def test_a_marked_route_explains_its_invalidation_at_once() -> None:
    """Outside contention, a route marked persistent 401 explains (takes back) the
    invalidation it caused, as soon as it is marked."""
    clock = FakeClock()
    explained: list[int] = []
    t = Persistent401(clock, 60, 3600, None, on_explained=explained.append)
    assert t.unauthorized("/bookings/{id}", 1)
    assert not t.unauthorized("/bookings/{id}", 2)
    assert explained == [1] and "/bookings/{id}" in t.marked()


def test_under_contention_a_suspect_is_marked_once_its_token_is_alive_elsewhere() -> None:
    """A suspect (a newer token refused while someone else logs in) becomes a mark, and its
    invalidation explained, only when that token is answered alive on another route for a
    request sent after the refusal."""
    clock = FakeClock()
    marks: list[tuple[str, float]] = []
    explained: list[int] = []
    t = Persistent401(clock, 60, 3600, lambda r, c: marks.append((r, c)),
                      on_explained=explained.append)
    assert t.unauthorized("/bookings/{id}", 1)  # invalidates generation 1
    clock.now += 1
    refused_at = clock.now
    assert t.would_mark("/bookings/{id}", 2)
    t.suspect("/bookings/{id}", 2)
    clock.now += 1
    t.suspect("/bookings/{id}", 2)  # refused again: the first refusal's time stands
    t.answered("/workshops/{id}/services", 2, sent_at=refused_at - 0.5)  # sent before it
    t.answered("/bookings/{id}", 2, sent_at=refused_at + 0.5)  # the same route
    t.answered("/workshops/{id}/services", 3, sent_at=refused_at + 0.5)  # another token
    t.answered("/workshops/{id}/services", 2, sent_at=refused_at + 0.5, status=503)  # edge
    assert marks == [] and explained == []
    t.answered("/workshops/{id}/services", 2, sent_at=refused_at + 0.5, status=404)
    assert marks == [("/bookings/{id}", 60)] and explained == [1]


def test_under_contention_a_suspect_whose_token_died_is_never_marked() -> None:
    clock = FakeClock()
    explained: list[int] = []
    t = Persistent401(clock, 60, 3600, None, verdict_window=14, on_explained=explained.append)
    t.unauthorized("/bookings/{id}", 1)
    t.suspect("/bookings/{id}", 2)
    clock.now += 15
    t.answered("/workshops/{id}/services", 2, sent_at=clock.now)
    assert explained == [] and t.marked() == {}
