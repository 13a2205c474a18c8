"""The event loop the gateway runs on: uvloop by default, asyncio's own on request.

``GATEWAY_EVENT_LOOP=uvloop`` (the default) runs on uvloop, a runtime dependency on Linux,
imported only here and only then; where it is not installed (another platform) the gateway
says so once and runs on asyncio's loop. ``GATEWAY_EVENT_LOOP=asyncio`` turns it off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("gateway.app")
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``coro`` to completion on the chosen loop (``asyncio.run`` semantics)."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("GATEWAY_EVENT_LOOP=uvloop but uvloop is not installed: running on "
                        "asyncio's event loop", extra={"fields": {"event": "uvloop_missing"}})
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
