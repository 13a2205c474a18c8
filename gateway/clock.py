"""Time, injectable: a clock for expiry and scheduling, a wall clock for display, and sleeping.

The scheduling clock is ``CLOCK_BOOTTIME`` where the platform has it: unlike
``CLOCK_MONOTONIC`` it keeps counting while the host is suspended, so a token's expiry is
measured in real elapsed time. Callers cap their sleeps and decide again when they wake.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


#: The clock id expiry is measured on: BOOTTIME (Linux) counts suspended time too.
SCHEDULING_CLOCK: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class SystemClock:
    """The real clocks. ``monotonic`` and ``time`` are the C functions themselves, with no
    Python frame around them: the request path reads the clock several times a request."""

    monotonic: Callable[[], float] = staticmethod(functools.partial(time.clock_gettime,
                                                                    SCHEDULING_CLOCK))
    time: Callable[[], float] = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
