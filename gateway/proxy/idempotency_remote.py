"""The Idempotency-Key store across processes: a worker's view (:class:`RemoteStore`) of the
supervisor's :class:`~gateway.proxy.idempotency_store.LocalStore`, over the worker's channel,
and the supervisor's side of it (:func:`serve_remote`)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gateway.coordination.channel import Calls, ChannelClosed, Message
from gateway.proxy.idempotency import IdempotencyUnavailable, Record
from gateway.proxy.idempotency_store import POLL_FLOOR, LocalStore

log = logging.getLogger("gateway.idempotency")


class RemoteStore:
    """A worker's view of the supervisor's :class:`LocalStore`: each operation is one ``idem``
    call on the worker's channel (:mod:`gateway.coordination.channel`).

    Bodies cross once per worker, not once per waiter: concurrent waits for one key share one
    call, and a claim's reply never carries a kept body (a repeat that needs it fetches it
    through that shared wait)."""

    def __init__(self, calls: Calls, release: Callable[[str, str], object],
                 timeout: float) -> None:
        self._calls = calls
        self._release_later = release  # a fire-and-forget release (key, owner)
        self._timeout = timeout  # for an answer, beyond the operation's own wait
        #: The one wait each key has in the supervisor, shared by this worker's waiters.
        self._waits: dict[str, asyncio.Task[Record | None]] = {}

    async def _ask(self, op: str, key: str, record: Record | None = None, wait: float = 0.0,
                   **args: Any) -> Message:
        fields: dict[str, Any] = {"op": op, "key": key, **args}
        body = b""
        if record is not None:
            fields["record"], body = record.to_dict(body=False), record.body
        try:
            reply = await self._calls.call(fields, body, within=self._timeout + wait)
        except (TimeoutError, ChannelClosed):
            raise IdempotencyUnavailable("the supervisor did not answer for the "
                                         "Idempotency-Key store", retry_after=1.0) from None
        if reply.fields.get("error"):
            raise IdempotencyUnavailable(str(reply.fields["error"]), retry_after=1.0)
        return reply

    @staticmethod
    def _record(reply: Message) -> Record | None:
        raw = reply.fields.get("record")
        return None if raw is None else Record.from_dict(raw, reply.attachment)

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        try:
            reply = await self._ask("claim", key, record, ttl=ttl)
        except IdempotencyUnavailable:  # it may have landed: take it back, nothing was sent
            self._release_later(key, record.owner)
            raise
        found = self._record(reply)
        if found is None or not reply.fields.get("more"):
            return found
        full = await self.wait(key, 0.0)  # the kept body, fetched once for all who need it
        if full is None or full.owner != found.owner or full.state != found.state:
            raise IdempotencyUnavailable("the Idempotency-Key record changed while it was "
                                         "read", retry_after=1.0)
        return full

    async def sending(self, key: str, record: Record) -> None:
        await self._ask("sending", key, owner=record.owner)

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        await self._ask("finish", key, record, ttl=ttl)

    async def release(self, key: str, owner: str) -> None:
        await self._ask("release", key, owner=owner)

    async def wait(self, key: str, within: float) -> Record | None:
        """Wait through the key's shared wait; one that ends early for this caller (it began
        sooner, or was a fetch) is followed by another for what is left of ``within``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, within)
        while True:
            task = self._waits.get(key)
            if task is None or task.done():
                task = self._waits[key] = asyncio.ensure_future(
                    self._wait_once(key, max(0.0, until - loop.time())))
                task.add_done_callback(functools.partial(self._forget_wait, key))
            record = await asyncio.shield(task)
            if record is None or record.state != "in_flight" or (
                    loop.time() >= until - POLL_FLOOR):
                return record

    def _forget_wait(self, key: str, task: asyncio.Task[Record | None]) -> None:
        if self._waits.get(key) is task:
            del self._waits[key]

    async def _wait_once(self, key: str, within: float) -> Record | None:
        return self._record(await self._ask("wait", key, wait=within, within=within))

    async def close(self) -> None:
        for task in list(self._waits.values()):
            task.cancel()


async def serve_remote(store: LocalStore, message: Message,
                       claims: set[tuple[str, str]]) -> tuple[dict[str, Any], bytes]:
    """The supervisor's side of :class:`RemoteStore`: run one operation, make the reply's
    fields and attachment. ``claims`` tracks the asking worker's (key, owner) claims in
    flight (settled as a dead worker's if it dies)."""
    doc = message.fields
    reply: dict[str, Any] = {"id": doc["id"]}
    attachment = b""
    try:
        op, key = doc["op"], str(doc["key"])
        result: Record | None = None
        if op == "claim":
            record = Record.from_dict(doc["record"], message.attachment)
            result = await store.claim(key, record, float(doc["ttl"]))
            if result is None:
                claims.add((key, record.owner))
            elif result.body:  # the body crosses through the worker's shared wait, once,
                if result.fingerprint == record.fingerprint:  # and only to be replayed
                    reply["more"] = True
                result = replace(result, body=b"")
        elif op == "sending":
            await store.sending(key, Record("in_flight", "", str(doc["owner"]), ""))
        elif op == "finish":
            record = Record.from_dict(doc["record"], message.attachment)
            await store.finish(key, record, float(doc["ttl"]))
            claims.discard((key, record.owner))
        elif op == "release":
            await store.release(key, str(doc["owner"]))
            claims.discard((key, str(doc["owner"])))
        elif op == "wait":
            result = await store.wait(key, min(float(doc["within"]), 600.0))
        else:
            raise ValueError(f"unknown operation {op!r}")
        if result is not None:
            reply["record"], attachment = result.to_dict(body=False), result.body
        else:
            reply["record"] = None
    except IdempotencyUnavailable as exc:
        reply["error"] = exc.message
    except Exception as exc:  # a malformed call: answered, never left to time out
        log.warning("skipped a malformed Idempotency-Key call from a worker",
                    extra={"fields": {"event": "channel_malformed",
                                      "error": type(exc).__name__}})
        reply["error"] = f"bad idempotency message ({type(exc).__name__})"
    return reply, attachment
