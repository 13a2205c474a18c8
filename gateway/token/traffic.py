"""What callers got from Repairy, for the verdict's re-probe: a :class:`Tally` the request
path adds to (two integer additions a request), and a :class:`TrafficWindow` of the last
minute, one bucket a second."""

from __future__ import annotations

from collections import deque
from typing import Final

#: The traffic window: this many one-second buckets.
WINDOW_SECONDS: Final = 60


class Tally:
    """Upstream answers passed back to callers, and how many of them were 401 or 403. The
    request path adds (two integer additions); the verdict takes them once a second."""

    __slots__ = ("calls", "refused")

    def __init__(self) -> None:
        self.calls = 0
        self.refused = 0

    def answered(self, status: int) -> None:
        self.calls += 1
        if status == 401 or status == 403:
            self.refused += 1

    def add(self, calls: int, refused: int) -> None:
        """Counts from elsewhere (a worker's second), clamped to sense."""
        calls = max(0, calls)
        self.calls += calls
        self.refused += min(max(0, refused), calls)

    def take(self) -> tuple[int, int]:
        counts = (self.calls, self.refused)
        self.calls = self.refused = 0
        return counts


class TrafficWindow:
    """The last :data:`WINDOW_SECONDS` seconds of (calls, refused), one bucket a second."""

    def __init__(self, seconds: int = WINDOW_SECONDS) -> None:
        self._buckets: deque[tuple[int, int]] = deque(maxlen=seconds)
        self.calls = 0
        self.refused = 0

    @property
    def empty(self) -> bool:
        return self.calls == 0

    def push(self, calls: int, refused: int, seconds: int = 1) -> None:
        """``seconds`` have passed since the last push: the counts are the newest one's."""
        maxlen = self._buckets.maxlen or 1
        for _ in range(min(max(seconds, 1), maxlen) - 1):
            self._push(0, 0)
        self._push(calls, refused)

    def _push(self, calls: int, refused: int) -> None:
        if len(self._buckets) == self._buckets.maxlen:
            old_calls, old_refused = self._buckets[0]
            self.calls -= old_calls
            self.refused -= old_refused
        self._buckets.append((calls, refused))
        self.calls += calls
        self.refused += refused

    def looks_refused(self, min_refusals: int, ratio: float) -> bool:
        return self.refused >= min_refusals and self.refused >= ratio * self.calls
