"""What the fleet's Redis must promise: its eviction policy, read and judged at start-up.

The booking records (Idempotency-Key) expire on their own, and the token entry has no expiry.
A Redis that evicts keys when it is full can drop either: a dropped booking record lets a
retried booking book twice; a dropped token entry costs a login. So:

* ``maxmemory-policy`` ``noeviction`` is the one safe policy for ``GATEWAY_REDIS_URL``;
* any other policy is an error at start-up while Idempotency-Key routes are on (exit 2, naming
  ``maxmemory-policy``), and a warning otherwise;
* a policy that cannot be read (managed Redis often disables ``CONFIG``, or it is down at
  start-up) is a warning and a note on ``/tokenz``, never an error.

``redis`` is imported only when used (through the client given).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.store")
SAFE: Final = "noeviction"


class EvictingStore(Exception):
    """The store's Redis may evict the booking records (a start-up error)."""


@dataclass(frozen=True)
class PolicyCheck:
    """What start-up learnt of the store's Redis: its policy (None: unreadable), and a note
    for ``/tokenz`` when something is not as the store needs it."""

    policy: str | None
    note: str | None


def judge(policy: str | None, idempotency_on: bool, why_unread: str = "") -> PolicyCheck:
    """The verdict on ``policy`` (:class:`EvictingStore` when it must stop the start-up)."""
    if policy is None:
        return PolicyCheck(None, "maxmemory-policy could not be read "
                           f"({why_unread or 'unknown reason'}): make sure it is noeviction "
                           "(docs/deployment.md, 'Redis for the fleet')")
    if policy == SAFE:
        return PolicyCheck(policy, None)
    if idempotency_on:
        raise EvictingStore(
            f"the Redis has maxmemory-policy {policy}, which can evict Idempotency-Key records "
            "(a retried booking would book twice): set maxmemory-policy noeviction, or set "
            "GATEWAY_IDEMPOTENCY_ROUTES=off")
    return PolicyCheck(policy, f"maxmemory-policy is {policy}: Redis may evict the fleet's "
                       "token entry or lease when full (a login more, never a failure); "
                       "noeviction is safe")


async def read_policy(client: Redis) -> tuple[str | None, str]:
    """The server's ``maxmemory-policy``, or None and why it could not be read."""
    try:
        found = await client.config_get("maxmemory-policy")
    except Exception as exc:  # CONFIG disabled or renamed (managed Redis), down, refused
        return None, _why(exc)
    value = found.get("maxmemory-policy") if isinstance(found, dict) else None
    return (str(value), "") if value else (None, "CONFIG GET answered nothing")


def _why(exc: Exception) -> str:
    text = str(exc).lower()
    if "unknown command" in text or "noperm" in text or "no permissions" in text:
        return "CONFIG is not allowed on this server"
    return f"Redis unreachable ({type(exc).__name__})"


async def check_store_policy(client: Redis, idempotency_on: bool) -> PolicyCheck:
    """Read and judge the store's policy, logging what it found."""
    policy, why = await read_policy(client)
    verdict = judge(policy, idempotency_on, why)
    if verdict.note is not None:
        log.warning("token store: %s", verdict.note, extra={"fields": {
            "event": "store_policy_warning", "maxmemory_policy": policy}})
    else:
        log.info("token store: maxmemory-policy noeviction", extra={"fields": {
            "event": "store_policy_ok", "maxmemory_policy": policy}})
    return verdict
