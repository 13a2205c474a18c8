"""Several worker processes on one host (``GATEWAY_WORKERS`` > 1): the supervisor's pool.

The supervisor binds the proxy listener once and hands the bound socket to each worker
(``python -m gateway.worker``, see there for the pipe protocol), so TCP and unix listeners work
alike and the kernel spreads connections over the workers. It answers the workers' token
requests from its one :class:`~gateway.token.manager.TokenManager` (so only one login or
refresh ever runs, by construction), forwards their 401s as invalidations, pushes every new
token and client-key change to all of them, and keeps each worker's latest metrics for the
admin listener's totals. Workers stay in the supervisor's process group and session, exit
when it does (end of their pipe), and one that dies is logged and restarted, with a delay
that doubles (up to :data:`MAX_RESTART_DELAY`) while it keeps dying young.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from gateway.config_values import ListenAddress, UnixAddress
from gateway.errors import TokenUnavailable
from gateway.metrics import counters_only, merge_expositions
from gateway.proxy.access import ClientKey
from gateway.proxy.idempotency_store import LocalStore, serve_remote
from gateway.token.manager import TokenManager
from gateway.token.value import Token
from gateway.worker import PIPE_LIMIT, send, token_to_wire

log = logging.getLogger("gateway.supervisor")
MIN_RESTART_DELAY: Final = 1.0
MAX_RESTART_DELAY: Final = 30.0
#: A worker that lived at least this long died "old": its next restart is quick again.
HEALTHY_AFTER: Final = 10.0


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
class _Worker:
    slot: int
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float = MIN_RESTART_DELAY
    metrics: str = ""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Its Idempotency-Key claims in flight (key, owner): "unknown" if it dies.
    claims: set[tuple[str, str]] = field(default_factory=set)


class WorkerPool:
    def __init__(self, count: int, listener: socket.socket, manager: TokenManager,
                 idempotency: LocalStore | None = None) -> None:
        self._listener = listener
        self._manager = manager
        self._idempotency = idempotency
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
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.worker", str(listen_fd), str(control_fd),
            pass_fds=(listen_fd, control_fd), stdin=asyncio.subprocess.DEVNULL)
        theirs.close()
        worker.started = time.monotonic()
        reader, worker.writer = await asyncio.open_connection(sock=ours, limit=PIPE_LIMIT)
        worker.tasks = [asyncio.create_task(self._serve(worker, reader)),
                        asyncio.create_task(self._watch(worker))]
        log.info("worker started", extra={"fields": {
            "event": "worker_started", "slot": worker.slot, "pid": worker.proc.pid}})

    async def _serve(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            kind = doc.get("type")
            if kind == "get":
                task = asyncio.create_task(self._answer(worker, int(doc.get("newer_than", 0))))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
            elif kind == "idem" and self._idempotency is not None:
                task = asyncio.create_task(self._idem(worker, doc))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
            elif kind == "invalidate":
                self._manager.invalidate(int(doc["generation"]), str(doc.get("reason", "")))
            elif kind == "metrics":
                worker.metrics = str(doc.get("text", ""))

    async def _answer(self, worker: _Worker, newer_than: int) -> None:
        try:
            tok = await self._manager.get(newer_than)
        except TokenUnavailable as exc:
            message: dict[str, Any] = {"type": "error", "newer_than": newer_than,
                                       "code": exc.code, "message": exc.message,
                                       "retry_after": exc.retry_after}
        else:
            message = {"type": "token", "newer_than": newer_than, "token": token_to_wire(tok)}
        if worker.writer is not None and not worker.writer.is_closing():
            send(worker.writer, message)

    async def _idem(self, worker: _Worker, doc: dict[str, Any]) -> None:
        assert self._idempotency is not None
        reply = await serve_remote(self._idempotency, doc, worker.claims)
        if not reply.get("id"):
            return  # a fire-and-forget release
        if worker.writer is not None and not worker.writer.is_closing():
            send(worker.writer, reply)

    async def _watch(self, worker: _Worker) -> None:
        assert worker.proc is not None
        code = await worker.proc.wait()
        if self._stopping:
            return
        lived = time.monotonic() - worker.started
        worker.delay = MIN_RESTART_DELAY if lived >= HEALTHY_AFTER else min(
            worker.delay * 2, MAX_RESTART_DELAY)
        log.error("worker exited; restarting it in %gs", worker.delay, extra={"fields": {
            "event": "worker_died", "slot": worker.slot, "pid": worker.proc.pid,
            "code": code, "lived_s": round(lived, 1)}})
        if worker.writer is not None:
            worker.writer.close()
        if worker.claims and self._idempotency is not None:
            log.warning("a dead worker's requests with an Idempotency-Key have an unknown "
                        "outcome", extra={"fields": {"event": "idempotency_orphaned",
                                                     "slot": worker.slot,
                                                     "claims": len(worker.claims)}})
            self._idempotency.orphan(worker.claims)
            worker.claims = set()
        if worker.metrics:  # keep what it counted (up to its last push) in the totals
            texts = [t for t in (self._retired, counters_only(worker.metrics)) if t]
            self._retired = merge_expositions(texts).decode()
            worker.metrics = ""
        await asyncio.sleep(worker.delay)
        if not self._stopping:
            worker.restarts += 1
            await self._spawn(worker)

    def broadcast_token(self, tok: Token | None) -> None:
        if tok is None:
            return
        for worker in self._workers:
            if worker.writer is not None and not worker.writer.is_closing():
                send(worker.writer, {"type": "token", "token": token_to_wire(tok)})

    def broadcast_client_keys(self, keys: tuple[ClientKey, ...]) -> None:
        message = {"type": "client_keys", "keys": [[k.name, k.digest.hex()] for k in keys]}
        for worker in self._workers:
            if worker.writer is not None and not worker.writer.is_closing():
                send(worker.writer, message)

    def metrics_texts(self) -> list[str]:
        texts = [w.metrics for w in self._workers if w.metrics]
        return [*texts, self._retired] if self._retired else texts

    def status(self) -> list[dict[str, Any]]:
        return [{"slot": w.slot, "pid": w.proc.pid if w.proc else None,
                 "alive": w.proc is not None and w.proc.returncode is None,
                 "restarts": w.restarts, "requests": _requests(w.metrics)}
                for w in self._workers]

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each drains), wait up to ``grace``, then kill the rest."""
        self._stopping = True
        procs = [w.proc for w in self._workers if w.proc is not None
                 and w.proc.returncode is None]
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
        for worker in self._workers:
            for t in worker.tasks:
                t.cancel()
            if worker.writer is not None:
                worker.writer.close()
        self._listener.close()


def _requests(exposition: str) -> int:
    """Requests a worker admitted, from its latest metrics (since its last start)."""
    total = 0.0
    for fam in text_string_to_metric_families(exposition):
        if fam.name == "repairy_gateway_client_requests":
            total += sum(sample.value for sample in fam.samples)
    return int(total)
