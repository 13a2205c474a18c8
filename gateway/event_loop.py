"""The runtime the gateway's processes run on: the event loop (uvloop by default, asyncio's
own on request) and the garbage collector's tuning.

``GATEWAY_EVENT_LOOP=uvloop`` (the default) runs on uvloop, a runtime dependency on Linux,
imported only here and only then; where it is not installed (another platform) the gateway
says so once and runs on asyncio's loop. ``GATEWAY_EVENT_LOOP=asyncio`` turns it off.

Before the loop starts, the garbage collector is tuned for a long-running server
(:func:`tune_gc`): what start-up built (modules, settings: some 45,000 objects that live as
long as the process) is frozen out of its scans, and its youngest generation is collected
every :data:`GC_YOUNG_THRESHOLD` net allocations rather than Python's 700. A request that is
answered (forwarded, refused, or the upstream's own error status) makes no reference cycle
(a test holds it to that), so its objects are freed when it ends. A request that fails
upstream (a reset, a timeout, a body broken mid-stream) still leaves one through its
exception's traceback, and waits for the next pass: with this threshold, the objects of a few
hundred such requests. Measured before the change (a ``gc.callbacks`` probe over 8 s of wrk
load, docs/performance.md): 1,248 passes of the youngest generation and 10 full ones took
about 8 % of the process's time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("gateway.app")
T = TypeVar("T")
#: Net allocations of tracked objects between two collections of the youngest generation
#: (Python's default: 700). The older generations keep Python's ratios.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Freeze what exists now out of the collector's scans, and collect the youngest
    generation less often (see the module's docstring)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run(coro: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``coro`` to completion on the chosen loop (``asyncio.run`` semantics), the
    collector tuned first."""
    tune_gc()
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("GATEWAY_EVENT_LOOP=uvloop but uvloop is not installed: running on "
                        "asyncio's event loop", extra={"fields": {"event": "uvloop_missing"}})
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
