"""Several worker processes on one host (``GATEWAY_WORKERS`` > 1): the supervisor's pool.

The supervisor binds the proxy listener once and hands the bound socket to each worker
(``python -m gateway.worker``), so TCP and unix listeners work alike and the kernel spreads
connections over the workers. Each worker incarnation gets a channel of its own
(:mod:`gateway.coordination.channel`, where its invariants are): a reply goes back on the
channel its call came by, so nothing meant for a dead worker reaches its successor, and a
worker that stops reading (its channel overflows) is killed and restarted like a dead one.

It answers the workers' token requests from its one :class:`~gateway.token.manager.
TokenManager` per credential profile (so only one login or refresh of a profile ever runs, by
construction), forwards their 401s as invalidations of the profile they name, pushes every new
token and client-key change to all of them, and keeps each worker's latest metrics for the
admin listener's totals. Workers stay in the supervisor's process group and session, exit when
it does (end of their channel), and one that dies is logged and restarted, with a delay that
doubles (up to :data:`MAX_RESTART_DELAY`) while it keeps dying young.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from gateway.config_values import ListenAddress, UnixAddress
from gateway.coordination.channel import MAX_QUEUED, STALL_AFTER, Channel, Fault, Message
from gateway.errors import TokenUnavailable
from gateway.logs import CREDENTIAL
from gateway.metrics_merge import counters_only, merge_expositions
from gateway.proxy.access import ClientKey
from gateway.proxy.idempotency_remote import serve_remote
from gateway.proxy.idempotency_store import LocalStore
from gateway.tasks import cancel_and_wait
from gateway.token.config import DEFAULT_PROFILE
from gateway.token.manager import TokenManager
from gateway.token.renewal import token_to_wire
from gateway.token.value import Token

log = logging.getLogger("gateway.supervisor")
MIN_RESTART_DELAY: Final = 1.0
MAX_RESTART_DELAY: Final = 30.0
#: A worker that lived at least this long died "old": its next restart is quick again.
HEALTHY_AFTER: Final = 10.0
#: How long a scrape waits for the workers' metrics before using their last push (seconds).
PULL_WAIT: Final = 1.0


def bind_listener(address: ListenAddress, backlog: int = 1024) -> socket.socket:
    """The proxy listener, bound once by the supervisor."""
    if isinstance(address, UnixAddress):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


@dataclass
class _Incarnation:
    """One life of a worker: its process, its channel, and what it holds in the supervisor."""

    proc: asyncio.subprocess.Process
    channel: Channel
    #: Its Idempotency-Key claims in flight (key, owner): settled as a dead worker's.
    claims: set[tuple[str, str]] = field(default_factory=set)
    #: Its store calls the supervisor is working on.
    pending: int = 0
    #: A scrape waiting for its metrics: the pull's id, and the answer's future.
    pull: tuple[int, asyncio.Future[None]] | None = None


@dataclass
class _Worker:
    slot: int
    life: _Incarnation | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float = MIN_RESTART_DELAY
    metrics: str = ""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class WorkerPool:
    def __init__(self, count: int, listener: socket.socket, managers: Mapping[str, TokenManager],
                 idempotency: LocalStore | None = None, *, max_queued: int = MAX_QUEUED,
                 stall: float = STALL_AFTER, on_fault: Callable[[Fault], None] | None = None,
                 on_traffic: Callable[[str, int, int], None] | None = None,
                 command: Sequence[str] = (sys.executable, "-m", "gateway.worker")) -> None:
        self._listener = listener
        self._command = tuple(command)  # run with the listener's and the channel's fds
        #: Each credential profile's token manager, by name (messages name their profile;
        #: none: ``default``).
        self._managers = dict(managers)
        self._idempotency = idempotency
        self._max_queued = max_queued
        self._stall = stall
        self._on_fault = on_fault
        self._on_traffic = on_traffic
        self._pulls = 0
        self._workers = [_Worker(i) for i in range(count)]
        self._stopping = False
        self._answers: set[asyncio.Task[None]] = set()
        #: Counters of workers that exited, so the totals never go backwards.
        self._retired = ""

    async def start(self) -> None:
        for worker in self._workers:
            await self._spawn(worker)

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        listen_fd, control_fd = self._listener.fileno(), theirs.fileno()
        proc = await asyncio.create_subprocess_exec(
            *self._command, str(listen_fd), str(control_fd),
            pass_fds=(listen_fd, control_fd), stdin=asyncio.subprocess.DEVNULL)
        theirs.close()
        worker.started = time.monotonic()
        channel = await Channel.open(ours, peer=f"worker {worker.slot} (pid {proc.pid})",
                                     max_queued=self._max_queued, stall=self._stall,
                                     on_fault=self._on_fault,
                                     on_overflow=functools.partial(_kill, proc))
        life = worker.life = _Incarnation(proc, channel)
        worker.tasks = [
            asyncio.create_task(channel.serve(functools.partial(self._handle, worker, life))),
            asyncio.create_task(self._watch(worker, life))]
        log.info("worker started", extra={"fields": {
            "event": "worker_started", "slot": worker.slot, "pid": proc.pid}})

    def _handle(self, worker: _Worker, life: _Incarnation, message: Message) -> None:
        """One message from one incarnation; what it asks is answered on its own channel."""
        doc = message.fields
        name = str(doc.get("profile") or DEFAULT_PROFILE)
        if name not in self._managers:  # never from our workers: they know our profiles
            raise ValueError(f"no credential profile {name!r}")
        manager, context = self._managers[name], None
        if len(self._managers) > 1:  # what this call makes the manager do logs under its name
            context = contextvars.copy_context()
            context.run(CREDENTIAL.set, name)
        run = _call if context is None else context.run
        if message.kind == "get":
            self._track(self._answer(life.channel, name, int(doc["newer_than"])), context)
        elif message.kind == "idem":
            if self._idempotency is None:
                raise ValueError("no Idempotency-Key store here")
            self._track(self._idem(life, message))
        elif message.kind == "invalidate":
            run(manager.invalidate, int(doc["generation"]), str(doc.get("reason", "")))
        elif message.kind == "route_explained":
            run(manager.route_explained, int(doc["generation"]))
        elif message.kind == "traffic":
            if self._on_traffic is not None:
                self._on_traffic(name, int(doc["calls"]), int(doc["refused"]))
        elif message.kind == "metrics":
            if worker.life is life:
                worker.metrics = str(doc["text"])
                pull = life.pull
                if pull is not None and doc.get("id") == pull[0] and not pull[1].done():
                    pull[1].set_result(None)
        else:
            raise ValueError(f"{message.kind} is not for the supervisor")

    def _track(self, coro: Any, context: contextvars.Context | None = None) -> None:
        task = asyncio.create_task(coro, context=context)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _answer(self, channel: Channel, name: str, newer_than: int) -> None:
        manager = self._managers[name]
        try:
            tok = await manager.get(newer_than)
        except TokenUnavailable as exc:
            channel.send("error", {"profile": name, "newer_than": newer_than,
                                   "code": exc.code, "message": exc.message,
                                   "retry_after": exc.retry_after})
        else:
            channel.send("token", {"profile": name, "newer_than": newer_than,
                                   "token": token_to_wire(tok),
                                   "contended_for": manager.status().contended_for})

    async def _idem(self, life: _Incarnation, message: Message) -> None:
        assert self._idempotency is not None
        life.pending += 1
        try:
            reply, attachment = await serve_remote(self._idempotency, message, life.claims)
        finally:
            life.pending -= 1
        if life.channel.closed:  # its worker died meanwhile: what it now holds is orphaned
            self._orphan(life)
            return  # and the reply is dropped: it was meant for that incarnation only
        if reply.get("id"):  # not a fire-and-forget release
            life.channel.send("idem_reply", reply, attachment)

    def _orphan(self, life: _Incarnation) -> None:
        if life.claims and self._idempotency is not None:
            log.warning("a dead worker's requests with an Idempotency-Key were settled: "
                        "unknown if they were sending, released if not", extra={"fields": {
                            "event": "idempotency_orphaned", "claims": len(life.claims)}})
            self._idempotency.orphan(life.claims)
            life.claims = set()

    async def _watch(self, worker: _Worker, life: _Incarnation) -> None:
        code = await life.proc.wait()
        life.channel.close()
        self._orphan(life)
        if self._stopping:
            return
        lived = time.monotonic() - worker.started
        worker.delay = MIN_RESTART_DELAY if lived >= HEALTHY_AFTER else min(
            worker.delay * 2, MAX_RESTART_DELAY)
        log.error("worker exited; restarting it in %gs", worker.delay, extra={"fields": {
            "event": "worker_died", "slot": worker.slot, "pid": life.proc.pid,
            "code": code, "lived_s": round(lived, 1)}})
        if worker.metrics:  # keep what it counted (up to its last push) in the totals
            texts = [t for t in (self._retired, counters_only(worker.metrics)) if t]
            self._retired = merge_expositions(texts).decode()
            worker.metrics = ""
        await asyncio.sleep(worker.delay)
        if not self._stopping:
            worker.restarts += 1
            await self._spawn(worker)

    def broadcast_token(self, name: str, tok: Token | None, contended_for: float = 0.0) -> None:
        """Profile ``name``'s token, to every worker: each channel takes it without waiting
        (a stalled one overflows and is restarted, never holding up the others).
        ``contended_for``: how long credential contention lasts from now (0: none)."""
        if tok is None:
            return
        message = {"profile": name, "token": token_to_wire(tok),
                   "contended_for": contended_for}
        for worker in self._workers:
            if worker.life is not None:
                worker.life.channel.send("token", message)

    def broadcast_of(self, name: str, manager: TokenManager, tok: Token | None) -> None:
        """Profile ``name``'s token (None: its manager's current one), with how long its
        contention lasts."""
        self.broadcast_token(name, manager.current if tok is None else tok,
                             manager.status().contended_for)

    def broadcast_client_keys(self, keys: tuple[ClientKey, ...]) -> None:
        message = {"keys": [[k.name, k.digest.hex()] for k in keys]}
        for worker in self._workers:
            if worker.life is not None:
                worker.life.channel.send("client_keys", message)

    async def pull_metrics(self, within: float = PULL_WAIT) -> None:
        """A scrape is waiting: ask every live worker for its metrics now, and wait up to
        ``within`` for their answers (a worker that does not answer in time counts with its
        last push, at most a second old)."""
        waits = []
        for worker in self._workers:
            life = worker.life
            if life is None or life.channel.closed:
                continue
            if life.pull is None or life.pull[1].done():
                self._pulls += 1
                life.pull = (self._pulls, asyncio.get_running_loop().create_future())
                life.channel.send("metrics_pull", {"id": self._pulls})
            waits.append(life.pull[1])
        if waits:
            await asyncio.wait(waits, timeout=within)

    def metrics_texts(self) -> list[str]:
        texts = [w.metrics for w in self._workers if w.metrics]
        return [*texts, self._retired] if self._retired else texts

    def status(self) -> list[dict[str, Any]]:
        return [{"slot": w.slot, "pid": w.life.proc.pid if w.life else None,
                 "alive": w.life is not None and w.life.proc.returncode is None,
                 "restarts": w.restarts, "requests": _requests(w.metrics),
                 "store_calls": w.life.pending if w.life else 0,
                 "channel_queued_bytes": w.life.channel.queued if w.life else 0}
                for w in self._workers]

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each drains), wait up to ``grace``, then kill the rest."""
        self._stopping = True
        procs = [w.life.proc for w in self._workers if w.life is not None
                 and w.life.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs],
                                            timeout=grace + 1)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for task in pending:
                with contextlib.suppress(Exception):
                    await task
        for answer in list(self._answers):  # nothing asks for a token once workers are gone
            with contextlib.suppress(Exception):
                await cancel_and_wait(answer)
        for worker in self._workers:
            for t in worker.tasks:
                if t is not asyncio.current_task():
                    with contextlib.suppress(Exception):  # each logs its own failures
                        await cancel_and_wait(t)
            if worker.life is not None:
                worker.life.channel.close()
        self._listener.close()


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the current context (``Context.run``'s shape)."""
    return fn(*args)


def _kill(proc: asyncio.subprocess.Process) -> None:
    """A worker that stopped reading its channel: killed, then restarted by its watcher."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def _requests(exposition: str) -> int:
    """Requests a worker admitted, from its latest metrics (since its last start)."""
    total = 0.0
    for fam in text_string_to_metric_families(exposition):
        if fam.name == "repairy_gateway_client_requests":
            total += sum(sample.value for sample in fam.samples)
    return int(total)
