"""The supervisor channel: one socket pair between the supervisor and one worker incarnation.

**Framing.** A message is one JSON object on one line; ``"t"`` names its type (:data:`Kind`).
A message may carry an attachment of raw bytes (a kept answer's body): its ``"n"`` field says
how many, and they follow the newline at once. Bodies cross as they are, never as base64
inside JSON, and a reply can hand over the bytes the store already holds without copying them.

**Types**, with the fields :data:`FIELDS` requires of each. Worker → supervisor: ``get`` (a
token newer than a generation), ``invalidate`` (the upstream refused generation G),
``route_explained`` (a route refused a newer token too: G's invalidation was the route's),
``metrics`` (the worker's exposition: each second, and in answer to ``metrics_pull`` with its
``id``), ``traffic`` (a second's upstream answers and 401/403 among them), ``idem`` (a call on
the supervisor's Idempotency-Key store). Supervisor → worker: ``token``, ``error`` (no token
can be had), ``client_keys``, ``metrics_pull`` (a scrape is waiting), ``idem_reply``.
The token messages and ``traffic`` name their credential profile in ``"profile"`` (absent:
``default``): a profile's token reaches only that profile's waiters in the worker.

**Invariants.**

1. *A channel is one incarnation's.* A restarted worker gets a new socket pair, so a new
   channel, and numbers its calls afresh on it. A reply is sent on the channel its call came
   in on (captured when it arrived), never on "the worker's current channel", and is dropped
   once that channel is closed: nothing meant for a dead worker reaches its successor.
2. *A reply settles only its own call*: the id it carries, on the channel it came by, once.
3. *A malformed message is skipped.* Bad JSON, an unknown type, a missing field, or a message
   its handler cannot use is logged, counted (``repairy_gateway_channel_faults_total{fault=
   "malformed"}``) and skipped; reading goes on. Only lost framing (a line over
   :data:`MAX_LINE`, an attachment cut short or over :data:`MAX_ATTACHMENT`) ends the channel
   (``fault="framing"``).
4. *Sending never blocks and never raises.* Messages wait in the channel's own queue, and
   one task writes them out in order, an attachment a chunk at a time as the socket takes
   it (so each channel holds about one chunk in its transport on any event loop, and
   attachments wait as references to bytes their owner holds anyway). A peer has stopped
   reading when its queued lines pass ``max_queued`` or it takes nothing for ``stall``
   seconds while something waits: the channel closes (``fault="overflow"``) and calls
   ``on_overflow`` (the supervisor then restarts that worker, whose Idempotency-Key claims
   are settled as a dead worker's). A busy but reading peer is never cut off, and one
   stalled peer never holds up a send to another.
5. *An ended channel fails its calls at once*: each call still waiting raises
   :class:`ChannelClosed`, and later sends return False.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

log = logging.getLogger("gateway.channel")

Kind = Literal["get", "token", "error", "invalidate", "route_explained", "metrics",
               "metrics_pull", "traffic", "client_keys", "idem", "idem_reply"]
#: The fields each type must carry (more may come).
FIELDS: Final[dict[str, frozenset[str]]] = {
    "get": frozenset({"newer_than"}),
    "token": frozenset({"token"}),
    "error": frozenset({"newer_than"}),
    "invalidate": frozenset({"generation"}),
    "route_explained": frozenset({"generation"}),
    "metrics": frozenset({"text"}),
    "metrics_pull": frozenset({"id"}),
    "traffic": frozenset({"calls", "refused"}),
    "client_keys": frozenset({"keys"}),
    "idem": frozenset({"id", "op", "key"}),
    "idem_reply": frozenset({"id"}),
}
#: Longest line (a worker's metrics exposition is the largest message without attachment).
MAX_LINE: Final = 8 * 1024 * 1024
#: Largest attachment (GATEWAY_IDEMPOTENCY_MAX_BODY is at most 8 MiB).
MAX_ATTACHMENT: Final = 16 * 1024 * 1024
#: Most bytes of message lines waiting for a peer (attachments wait as references).
MAX_QUEUED: Final = 16 * 1024 * 1024
#: A peer that takes nothing for this long while messages wait for it has stopped reading.
STALL_AFTER: Final = 10.0
#: Attachments are written this much at a time, each once the socket took the last.
CHUNK: Final = 256 * 1024
#: After a stall's wait runs out, how long the socket gets to show progress (a loop that was
#: frozen runs its overdue timers before its I/O).
_GRACE: Final = 0.05

Fault = Literal["malformed", "overflow", "framing"]


class ChannelClosed(Exception):
    """The channel ended (its peer is gone, or it overflowed) before the call was answered."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    fields: Mapping[str, Any]
    attachment: bytes = b""


class Channel:
    """One end of one incarnation's socket pair (see the module's invariants).

    Messages wait in a queue of their own and one task writes them out in order, an
    attachment in :data:`CHUNK` pieces, each after the socket took the previous one: so the
    bytes held for a peer are its queued lines (bounded by ``max_queued``), references to
    the attachments (bytes the store holds anyway) and at most about one chunk in the
    transport, whichever event loop runs. A peer that takes nothing for ``stall`` seconds
    while something waits has stopped reading."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 peer: str, max_queued: int = MAX_QUEUED, stall: float = STALL_AFTER,
                 on_fault: Callable[[Fault], None] | None = None,
                 on_overflow: Callable[[], None] | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self.peer = peer
        self._max_queued = max_queued
        self._stall = stall
        self._on_fault = on_fault
        self._on_overflow = on_overflow
        self._closers: list[Callable[[], None]] = []
        self.closed = False
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._queued_lines = 0
        self._queued_attachments = 0
        self._more = asyncio.Event()
        self._idle = asyncio.Event()  # nothing waits, and the socket took what was written
        self._idle.set()
        writer.transport.set_write_buffer_limits(high=CHUNK, low=CHUNK // 4)
        self._pump_task = asyncio.ensure_future(self._pump())

    @classmethod
    async def open(cls, sock: socket.socket, *, peer: str, max_queued: int = MAX_QUEUED,
                   stall: float = STALL_AFTER, on_fault: Callable[[Fault], None] | None = None,
                   on_overflow: Callable[[], None] | None = None) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_LINE)
        return cls(reader, writer, peer=peer, max_queued=max_queued, stall=stall,
                   on_fault=on_fault, on_overflow=on_overflow)

    @property
    def queued(self) -> int:
        """Bytes sent but not yet taken by the peer's socket (attachments included)."""
        if self.closed:
            return 0
        return (self._queued_lines + self._queued_attachments
                + self._writer.transport.get_write_buffer_size())

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the channel ends (at once if it has)."""
        if self.closed:
            callback()
        else:
            self._closers.append(callback)

    def send(self, kind: Kind, fields: Mapping[str, Any], attachment: bytes = b"") -> bool:
        """Queue one message (never waits); False if the channel is closed, or if this send
        overflowed its queue of lines (the peer stopped reading: the channel closes)."""
        if self.closed:
            return False
        doc = {"t": kind, **fields}
        if attachment:
            doc["n"] = len(attachment)
        line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        if self._queued_lines + len(line) > self._max_queued:
            self._overflowed(f"{self._queued_lines} bytes of messages waiting")
            return False
        self._queue.append((line, attachment))
        self._queued_lines += len(line)
        self._queued_attachments += len(attachment)
        self._idle.clear()
        self._more.set()
        return True

    async def _pump(self) -> None:
        """Write the queue out, in order; an attachment a chunk at a time, each once the
        socket took enough of what came before."""
        writer = self._writer
        try:
            while not self.closed:
                if not self._queue:
                    self._idle.set()
                    self._more.clear()
                    await self._more.wait()
                    continue
                line, attachment = self._queue.popleft()
                self._queued_lines -= len(line)
                writer.write(line)
                view = memoryview(attachment)
                for start in range(0, len(view), CHUNK):
                    if not await self._room():
                        return
                    piece = view[start:start + CHUNK]
                    writer.write(piece)
                    self._queued_attachments -= len(piece)
                if not await self._room():  # lines too: at most about a chunk in the socket
                    return
        except (ConnectionError, RuntimeError, OSError):  # the peer is gone
            self.close()

    async def _room(self) -> bool:
        """Wait until the socket took most of what was written (False: the peer took
        nothing for ``stall`` seconds, and the channel is closed as overflowed).

        A stall is judged by the peer's progress, not by this process's clock alone: when
        the wait runs out (this loop may itself have been frozen meanwhile, its timers then
        firing before its I/O), the socket gets :data:`_GRACE` to be written to, and any
        progress since the wait began starts a new one."""
        transport = self._writer.transport
        while not self.closed:
            before = transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(self._stall):
                    await self._writer.drain()
                return not self.closed
            except TimeoutError:
                await asyncio.sleep(_GRACE)  # let the I/O that waited behind the timer run
                if not self.closed and transport.get_write_buffer_size() < before:
                    continue  # it took something: a slow or paused reader, not a stalled one
                self._overflowed(f"nothing taken for {self._stall:g}s")
                return False
        return False

    def _overflowed(self, why: str) -> None:
        log.error("a channel's peer stopped reading (%s): closing it", why,
                  extra={"fields": {"event": "channel_overflow", "peer": self.peer}})
        self._fault("overflow")
        self.close()
        if self._on_overflow is not None:
            self._on_overflow()

    async def serve(self, handle: Callable[[Message], None]) -> None:
        """Read messages and hand each to ``handle`` until the channel ends (then close it).
        A message ``handle`` cannot use (it raises) counts as malformed and is skipped."""
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except ValueError:  # over MAX_LINE: where the next message starts is lost
                    self._framing_lost("a line over the limit")
                    return
                except (ConnectionError, OSError):
                    return
                if not line.endswith(b"\n"):
                    return  # the end (or the peer died mid-message)
                message, size = self._parse(line)
                if size < 0:
                    return
                attachment = b""
                if size:
                    try:
                        attachment = await self._reader.readexactly(size)
                    except (asyncio.IncompleteReadError, ConnectionError, OSError):
                        return  # the peer died mid-attachment
                if message is None:
                    continue
                try:
                    handle(Message(message.kind, message.fields, attachment))
                except Exception as exc:
                    self._malformed(f"unusable {message.kind} ({type(exc).__name__})")
        finally:
            self.close()
            # How the connection ended (a reset, say) is kept on the stream until someone
            # asks: asked here, so it never surfaces as "exception was never retrieved".
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._writer.wait_closed()

    def _parse(self, line: bytes) -> tuple[Message | None, int]:
        """The message on ``line`` (None if malformed) and the size of its attachment (-1:
        the framing is lost)."""
        try:
            doc = json.loads(line)
        except ValueError:
            self._malformed("not JSON")
            return None, 0
        if not isinstance(doc, dict):
            self._malformed("not an object")
            return None, 0
        size = doc.pop("n", 0)
        if not isinstance(size, int) or not 0 <= size <= MAX_ATTACHMENT:
            self._framing_lost("a bad attachment size")
            return None, -1
        kind = doc.pop("t", None)
        required = FIELDS.get(kind) if isinstance(kind, str) else None
        if required is None or not required <= doc.keys():
            self._malformed(f"unknown type or missing fields ({str(kind)[:20]})")
            return None, size
        return Message(cast(Kind, kind), doc), size

    def _malformed(self, why: str) -> None:
        log.warning("skipped a malformed message on a worker channel: %s", why,
                    extra={"fields": {"event": "channel_malformed", "peer": self.peer}})
        self._fault("malformed")

    def _framing_lost(self, why: str) -> None:
        log.error("a worker channel lost its framing (%s): closing it", why,
                  extra={"fields": {"event": "channel_framing_lost", "peer": self.peer}})
        self._fault("framing")

    def _fault(self, fault: Fault) -> None:
        if self._on_fault is not None:
            self._on_fault(fault)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued_lines = self._queued_attachments = 0
        if self._pump_task is not asyncio.current_task():
            self._pump_task.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
        closers, self._closers = self._closers, []
        for callback in closers:
            callback()

    async def flush(self, within: float) -> None:
        """Wait up to ``within`` for what was sent to leave (at exit), then close."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(within):
                await self._idle.wait()
                self._writer.close()  # writes out what the transport still holds, then ends
                await self._writer.wait_closed()
        self.close()


class Calls:
    """Calls made over one channel, each waiting for the reply with its id (numbered per
    channel, so per incarnation)."""

    def __init__(self, channel: Channel, kind: Kind) -> None:
        self._channel = channel
        self._kind = kind
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        channel.on_close(self._fail_all)

    @property
    def pending(self) -> int:
        return len(self._waiting)

    async def call(self, fields: Mapping[str, Any], attachment: bytes = b"", *,
                   within: float) -> Message:
        """Send one call and wait up to ``within`` seconds for its reply (TimeoutError), or
        :class:`ChannelClosed` when the channel ends first."""
        self._next += 1
        call = self._next
        future = self._waiting[call] = asyncio.get_running_loop().create_future()
        try:
            if not self._channel.send(self._kind, {**fields, "id": call}, attachment):
                raise ChannelClosed("the channel is closed")
            async with asyncio.timeout(within):
                reply: Message = await future
                return reply
        finally:
            self._waiting.pop(call, None)

    def settle(self, reply: Message) -> None:
        """A reply came: it settles the call with its id, if that call still waits."""
        future = self._waiting.get(int(reply.fields["id"]))
        if future is not None and not future.done():
            future.set_result(reply)

    def _fail_all(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("the channel ended"))
                future.exception()  # retrieved: a caller may have given up already
