"""Which upstream 401s mean "the token is bad", and which mean "this route refuses us".

A route that answers 401 whatever the token (a resource of another partner, a permission the
partner lacks) must not cost a login per request. Keyed by route *template*:

* a 401 on a route that is not marked invalidates the token and the request is replayed once
  with a newer one (the caller's side does that);
* if the first answer of that route to a *newer* token is 401 again, the route is marked
  "persistent 401" for a cool-down (``cooldown``, doubling while it persists, up to
  ``cooldown_max``); while marked, its 401s are passed back without invalidating anything;
* any other answer from the route with a newer token clears it (and the doubling);
* the verdict must come within ``verdict_window`` of the first 401 (the replay's time): a 401
  long after, with some later token, is a fresh revocation and invalidates again.

A 401 on any other route always invalidates at once: there is no global limiter that could
delay a genuine revocation. Time comes from the injected clock.

**Whose fault, for contention** (:mod:`gateway.token.contention`). A marked route explains
the invalidation it caused (``on_explained``: it is taken back). While contention lasts, a
newer token refused by the route may just have been revoked by someone else's login: the
route is only *suspected* (:meth:`Persistent401.suspect`), and marked, with its invalidation
explained, once that same token is answered alive (not 401, 429 or 5xx) on another route for
a request sent after the refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.clock import Clock

#: Routes tracked at most (templates are a bounded set; this bounds "other" paths too).
MAX_ROUTES = 1024
V = TypeVar("V")


@dataclass(frozen=True)
class _Mark:
    until: float
    cooldown: float


@dataclass(frozen=True)
class _Suspect:
    refused: int  # the newer generation the route refused
    invalidated: int  # the generation its first 401 invalidated
    at: float


class Persistent401:
    def __init__(self, clock: Clock, cooldown: float, cooldown_max: float,
                 on_mark: Callable[[str, float], None] | None = None,
                 verdict_window: float = 30.0,
                 on_explained: Callable[[int], None] | None = None) -> None:
        self._clock = clock
        self._cooldown = cooldown
        self._max = max(cooldown, cooldown_max)
        self._on_mark = on_mark
        self._on_explained = on_explained
        self._window = verdict_window
        self._marks: dict[str, _Mark] = {}
        #: route -> (the generation it invalidated, when), awaiting a newer token's verdict
        self._pending: dict[str, tuple[int, float]] = {}
        #: route -> a newer token it refused, awaiting proof that token was alive
        self._suspects: dict[str, _Suspect] = {}

    def _pending_generation(self, route: str, now: float) -> int | None:
        entry = self._pending.get(route)
        if entry is None:
            return None
        if now - entry[1] > self._window:
            del self._pending[route]
            return None
        return entry[0]

    def unauthorized(self, route: str, generation: int) -> bool:
        """A 401 on ``route`` for a token of ``generation``: True to invalidate the token and
        replay, False to pass the 401 back as it is (the route is marked)."""
        now = self._clock.monotonic()
        mark = self._marks.get(route)
        if mark is not None and now < mark.until:
            return False
        pending = self._pending_generation(route, now)
        if pending is not None and generation > pending:
            # A token newer than the one this route invalidated was refused too: it is the
            # route, not the token.
            self._mark(route, pending, now)
            return False
        if pending is None or generation > pending:
            self._remember(self._pending, route, (generation, now))
        return True

    def _mark(self, route: str, invalidated: int, now: float) -> None:
        mark = self._marks.get(route)
        cooldown = self._cooldown if mark is None else min(mark.cooldown * 2, self._max)
        self._remember(self._marks, route, _Mark(now + cooldown, cooldown))
        self._pending.pop(route, None)
        self._suspects.pop(route, None)
        if self._on_mark is not None:
            self._on_mark(route, cooldown)
        if self._on_explained is not None:  # the generation it invalidated was not at fault
            self._on_explained(invalidated)

    def suspect(self, route: str, generation: int) -> None:
        """``route`` refused ``generation``, newer than the one it invalidated: it is to blame
        once that token is answered elsewhere, for a request sent after now
        (:meth:`answered`); if it never is, the token had died."""
        now = self._clock.monotonic()
        pending = self._pending_generation(route, now)
        known = self._suspects.get(route)
        if known is not None and known.refused == generation:
            return  # the earliest refusal stands: proof sent after it counts
        if pending is not None and generation > pending:
            self._remember(self._suspects, route, _Suspect(generation, pending, now))

    def would_mark(self, route: str, generation: int) -> bool:
        """Would a 401 for ``generation`` now mark ``route``? (So that the caller can first
        make sure that token is still the newest: a token another replica replaced meanwhile
        says nothing about the route.)"""
        now = self._clock.monotonic()
        mark = self._marks.get(route)
        if mark is not None and now < mark.until:
            return False
        pending = self._pending_generation(route, now)
        return pending is not None and generation > pending

    def forget(self, route: str) -> None:
        """Drop the pending verdict of ``route`` (it proved inconclusive)."""
        self._pending.pop(route, None)

    def answered(self, route: str, generation: int, sent_at: float | None = None,
                 status: int = 200) -> None:
        """A non-401 answer (``status``) on ``route`` with a token of ``generation``, for a
        request sent at ``sent_at``."""
        if not self._pending and not self._marks and not self._suspects:
            return  # the common case costs three truth tests
        now = self._clock.monotonic()
        if self._suspects and status < 500 and status != 429:  # the token was alive
            self._settle_suspects(route, generation, now if sent_at is None else sent_at, now)
        pending = self._pending_generation(route, now)
        if pending is not None and generation > pending:
            del self._pending[route]
        mark = self._marks.get(route)
        if mark is not None and now >= mark.until:
            del self._marks[route]  # it works again: the next mark starts from the base

    def _settle_suspects(self, route: str, generation: int, sent_at: float, now: float) -> None:
        for name, s in list(self._suspects.items()):
            if now - s.at > self._window:
                del self._suspects[name]  # never shown alive: it had died
            elif s.refused == generation and name != route and sent_at > s.at:
                self._mark(name, s.invalidated, now)  # that token was alive: the route

    def marked(self) -> dict[str, float]:
        """Routes marked now, with the seconds left (for the status endpoint)."""
        now = self._clock.monotonic()
        return {r: round(m.until - now, 3) for r, m in self._marks.items() if m.until > now}

    @staticmethod
    def _remember(table: dict[str, V], route: str, value: V) -> None:
        if route not in table and len(table) >= MAX_ROUTES:
            del table[next(iter(table))]  # forget the oldest
        table[route] = value
