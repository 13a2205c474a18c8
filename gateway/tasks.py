"""Task plumbing that never loses an error or a cancel: stopping a background task, waiting on
an event against the injected clock, and logging what a finished task raised.

``task.cancel(); with suppress(CancelledError): await task`` is wrong when the code doing it
is itself being cancelled: the suppress swallows the cancel aimed at it, and it runs on as
if nothing happened. :func:`cancel_and_wait` re-raises that one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.clock import Clock


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended. Its own cancellation is absorbed; a cancel
    of the caller that arrives while it waits is raised again (one that came earlier, whose
    clean-up is running this, is not: the clean-up goes on). Another exception the task ends
    with propagates, as it would from ``await task``."""
    if task is None:
        return
    current = asyncio.current_task()
    before = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > before:
            raise
        return
    if current is not None and current.cancelling() > before:
        # The caller's cancel reached the task, which absorbed it and returned: raised here.
        raise asyncio.CancelledError


async def sleep_or_until(clock: Clock, seconds: float,
                         until: asyncio.Future[Any] | None = None) -> None:
    """Until ``until`` ends or ``seconds`` pass on ``clock`` (the injected one, so a fake clock
    drives every wait). ``until`` is left running; a cancel of the caller is never lost."""
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    if until is None:
        await sleeper
        return
    try:
        await asyncio.wait([until, sleeper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()


async def sleep_or_set(clock: Clock, event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` is set or ``seconds`` pass on ``clock``."""
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await sleep_or_until(clock, seconds, waiter)
    finally:
        waiter.cancel()


def log_task_failure(task: asyncio.Future[Any], log: logging.Logger, what: str) -> bool:
    """For a done callback: log, once and with its traceback, what ``task`` raised (a cancel
    is not a failure). True if it failed."""
    if task.cancelled():
        return False
    exc = task.exception()
    if exc is None:
        return False
    log.error("%s failed", what, exc_info=exc, extra={"fields": {
        "event": "task_failed", "task": what, "error": type(exc).__name__}})
    return True
