"""Credential contention: someone else is logging in with our credentials.

Against an API that keeps one live token per credential, a second holder (a replica without
the shared store, a developer's laptop, an old deployment) revokes our token with each of its
logins, and our re-login revokes its token in turn: a slow storm that heals quietly each time.

:class:`ContentionWatch` counts the invalidations that only such a holder explains: the
newest token's, renewed here because the fleet's store did not move (no peer renewed). An
invalidation a route explains (it refused the newer token too, and was marked persistent 401)
is taken back. ``threshold`` of them within ``window`` seconds mean contention; it lasts until
``window`` passes without one. While it lasts the manager logs in at most once per
``GATEWAY_LOGIN_RETRY_INTERVAL``. Pure bookkeeping: times are arguments.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final

log = logging.getLogger("gateway.token")

#: Invalidations remembered at most (the threshold is bounded by its setting).
MAX_RECORDS: Final = 1024
#: Invalidations never counted: no route verdict can follow a streamed body's 401, and the
#: probe's 401s are the verdict's own business.
UNCOUNTED: Final = frozenset({"upstream_401_streamed", "probe_401"})


class ContentionWatch:
    def __init__(self, threshold: int, window: float) -> None:
        self.threshold = max(1, threshold)
        self.window = window
        #: (when, generation) of each unexplained invalidation, oldest first.
        self._records: deque[tuple[float, int]] = deque(maxlen=min(MAX_RECORDS,
                                                                   self.threshold))
        #: Contention lasts until then (None: never detected).
        self.until: float | None = None
        self.detected = 0
        #: Generations a route explained: never counted again.
        self._explained: deque[int] = deque(maxlen=64)
        self._unverified = 0  # invalidated for an uncounted reason only
        #: When the last login or refresh was sent (for :meth:`hold_until`).
        self.last_call: float | None = None

    def invalidated(self, generation: int, reason: str, first: bool) -> None:
        """The manager was told ``generation`` was refused (``first``: it was not yet)."""
        if first and reason in UNCOUNTED:
            self._unverified = generation
        elif generation == self._unverified and reason not in UNCOUNTED:
            self._unverified = 0  # a counted 401 on it too: it counts

    def renewing(self, now: float, generation: int, login_every: float) -> bool:
        """The manager renews the refused ``generation`` itself (no fleet peer did): record
        it unless only an uncounted reason refused it. True when contention begins."""
        if generation == self._unverified:
            return False
        return self.record(now, generation, login_every)

    def record(self, now: float, generation: int, login_every: float) -> bool:
        """An unexplained invalidation of ``generation``: True when contention begins (then
        an error line says what to look for; logins come ``login_every`` seconds apart). A
        generation counts once, however many attempts its renewal takes."""
        if generation in self._explained or any(g == generation for _, g in self._records):
            return False
        self._records.append((now, generation))
        if self.active(now):
            self.until = now + self.window
            return False
        if self.count(now) < self.threshold:
            return False
        self.until = now + self.window
        self.detected += 1
        log.error("credential contention: %d tokens revoked within %gs by logins elsewhere; "
                  "someone else uses these credentials (a replica without GATEWAY_REDIS_URL, "
                  "an old deployment, a laptop). Logging in at most once per %gs meanwhile",
                  self.threshold, self.window, login_every, extra={"fields": {
                      "event": "credential_contention", "setting": "GATEWAY_REDIS_URL",
                      "invalidations": self.threshold, "window_s": self.window}})
        return True

    def retract(self, generation: int) -> bool:
        """A route, not a revocation, explained the invalidation of ``generation``."""
        self._explained.append(generation)
        kept = [r for r in self._records if r[1] != generation]
        if len(kept) == len(self._records):
            return False
        self._records.clear()
        self._records.extend(kept)
        return True

    def clear(self) -> None:
        """Start over (new credentials)."""
        self._records.clear()
        self.until = None

    def active(self, now: float) -> bool:
        return self.until is not None and now < self.until

    def remaining(self, now: float) -> float:
        """Seconds it lasts from ``now`` if nothing more happens (0: none)."""
        return 0.0 if self.until is None else max(0.0, self.until - now)

    def hold_until(self, now: float, every: float) -> float | None:
        """While it lasts, auth calls come ``every`` seconds apart: when the next may go, if
        that is later than ``now`` (else None)."""
        last = self.last_call
        if last is None or not self.active(now) or now >= last + every:
            return None
        return last + every

    def count(self, now: float) -> int:
        """Unexplained invalidations within the window."""
        return sum(1 for at, _ in self._records if now - at <= self.window)
