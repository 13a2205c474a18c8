"""The soak's invariants, checked while it runs and once more at the end, and its report.

* at most one booking in the sandbox per Idempotency-Key (per client: the scope);
* no caller gets an answer recorded for another key or another client (each booking carries
  its client and key in ``notes``, and the answer must carry the caller's);
* every 2xx booking answer names a booking the sandbox holds;
* no ``500 internal_error``, and no traceback, unhandled task error or unstructured line in any
  replica's log;
* successful logins at most: the first one + Redis restarts + credential rotations + sandbox
  revocations + lease holders killed mid-renewal + ambiguous refreshes (checked every step,
  against the sandbox's live counter);
* after the warm-up: supervisor RSS at most idle + 3 x GATEWAY_IDEMPOTENCY_MAX_BODY + 32 MiB,
  worker RSS at most idle + 64 MiB.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.soak_parts import AofRedis, Replica, rss_kib
from gateway.sandbox import Sandbox

IDEMPOTENCY_MAX_BODY_KIB = 256  # GATEWAY_IDEMPOTENCY_MAX_BODY the soak sets
SUPERVISOR_HEADROOM_KIB = 3 * IDEMPOTENCY_MAX_BODY_KIB + 32 * 1024
WORKER_HEADROOM_KIB = 64 * 1024
#: How late a log line may reach its file after what it records (batches, pipes): 2 s.
LOG_LAG = 2.0
#: A refresh failure with one of these reasons may have used up its refresh token.
AMBIGUOUS = frozenset({"lease_lost", "internal_error"})
#: Log content that is a breach wherever it appears.
BAD = ("Traceback", "Task exception was never retrieved", "was never awaited",
       "Task was destroyed")


@dataclass
class Tally:
    """What the callers and the faults did, and the breaches found."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    reads: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    replays: int = 0
    answered: int = 0
    left_or_timed_out: int = 0
    unresolved: int = 0
    holders_killed: int = 0
    rotation_logins_allowed: int = 0
    breaches: list[str] = field(default_factory=list)

    def breach(self, what: str) -> None:
        print(f"BREACH: {what}", flush=True)
        self.breaches.append(what)

    def answer(self, sb: Sandbox, client: str, key: str, doc: Any,
               replayed: bool) -> str | None:
        """A 2xx booking answer: it names a booking the sandbox holds, made for this client
        and key. Its booking id, or None after recording a breach."""
        self.answered += 1
        self.replays += replayed
        booking = doc.get("data", doc) if isinstance(doc, dict) else None
        if not isinstance(booking, dict) or not isinstance(booking.get("id"), str):
            self.breach(f"a 2xx booking answer without a booking, key {key} ({client}): "
                        f"{str(doc)[:200]}")
            return None
        if booking.get("notes") != f"soak|{client}|{key}":
            self.breach(f"key {key} ({client}) got the answer made for "
                        f"{booking.get('notes')!r}")
            return None
        if booking["id"] not in sb.state.data.bookings:
            self.breach(f"key {key} ({client}) got booking {booking['id']}, which the "
                        "sandbox does not hold")
            return None
        return str(booking["id"])


@dataclass
class Checks:
    sb: Sandbox
    replicas: list[Replica]
    redis: AofRedis
    tally: Tally
    per_key: Counter[str] = field(default_factory=Counter)
    seen_bookings: int = 0
    events: Counter[str] = field(default_factory=Counter)
    idle_supervisor: int = 0
    idle_worker: int = 0
    peak_supervisor: int = 0
    peak_worker: int = 0
    logins: int = 0
    _login_history: list[tuple[float, int]] = field(default_factory=list)

    @property
    def breaches(self) -> list[str]:
        return self.tally.breaches

    async def measure_idle(self, http: aiohttp.ClientSession) -> None:
        for replica in self.replicas:
            if replica.pid is not None:
                self.idle_supervisor = max(self.idle_supervisor, rss_kib(replica.pid) or 0)
            for pid in await replica.refresh_workers(http):
                self.idle_worker = max(self.idle_worker, rss_kib(pid) or 0)

    async def step(self, http: aiohttp.ClientSession, after_warm_up: bool) -> None:
        self.check_bookings()
        self.scan_logs()
        self.check_logins()
        if after_warm_up:
            await self.check_memory(http)

    def check_bookings(self) -> None:
        """One booking per (client, key): the bookings the sandbox made since the last look."""
        bookings = list(self.sb.state.data.bookings.values())
        for booking in bookings[self.seen_bookings:]:
            notes = booking.get("notes")
            if isinstance(notes, str) and notes.startswith("soak|"):
                self.per_key[notes] += 1
                if self.per_key[notes] == 2:
                    self.tally.breach(f"two bookings in the sandbox for {notes}")
        self.seen_bookings = len(bookings)

    def scan_logs(self) -> None:
        for replica in self.replicas:
            for line in replica.new_log().splitlines():
                self._line(replica.name, line)

    def _line(self, replica: str, line: str) -> None:
        if not line.strip():
            return
        if any(bad in line for bad in BAD):
            self.tally.breach(f"replica {replica} logged: {line[:400]}")
            return
        try:
            doc = json.loads(line)
        except ValueError:
            self.tally.breach(f"replica {replica} wrote an unstructured line: {line[:400]}")
            return
        event = doc.get("event")
        if event == "task_failed" or doc.get("level") == "critical":
            self.tally.breach(f"replica {replica}: {line[:400]}")
        if '"internal_error"' in line:
            self.tally.breach(f"replica {replica}: internal error: {line[:400]}")
        if event == "token_renewal" and doc.get("outcome") == "failure" and doc.get(
                "kind") == "refresh" and doc.get("reason") in AMBIGUOUS:
            self.events["refresh_ambiguous"] += 1
        elif event:
            self.events[str(event)] += 1

    async def check_memory(self, http: aiohttp.ClientSession) -> None:
        for replica in self.replicas:
            pid = replica.pid
            if pid is not None and (rss := rss_kib(pid)) is not None:
                self.peak_supervisor = max(self.peak_supervisor, rss)
                if rss > self.idle_supervisor + SUPERVISOR_HEADROOM_KIB:
                    self.tally.breach(f"supervisor {replica.name} RSS {rss} KiB > idle "
                                      f"{self.idle_supervisor} + {SUPERVISOR_HEADROOM_KIB}")
            if not replica.up:
                continue
            for wpid in await replica.refresh_workers(http):
                if (rss := rss_kib(wpid)) is not None:
                    self.peak_worker = max(self.peak_worker, rss)
                    if rss > self.idle_worker + WORKER_HEADROOM_KIB:
                        self.tally.breach(f"worker {wpid} ({replica.name}) RSS {rss} KiB > "
                                          f"idle {self.idle_worker} + {WORKER_HEADROOM_KIB}")

    def login_terms(self) -> dict[str, int]:
        t = self.tally
        return {"first login": 1, "Redis restarts": t.faults["redis_kill"],
                "credential rotations": t.rotation_logins_allowed,
                "rotation logins with the store down (logged)":
                    self.events["rotation_local_login"],
                # GATEWAY_REDIS_DOWN_POLICY=local: with Redis down, each replica renews in the
                # last part of its token's life; with one live token per credential, each of
                # those can end in a login (the second replica's refresh token is used up).
                "renewals made locally with Redis down (logged)":
                    self.events["store_down_local_renewal"],
                "sandbox revocations": t.faults["token_revocation"],
                "lease holders killed mid-renewal": t.holders_killed,
                "ambiguous refreshes": self.events["refresh_ambiguous"]}

    def check_logins(self, lag: float = LOG_LAG) -> None:
        """The logins the sandbox counted ``lag`` seconds ago against the terms known now:
        a term read from a log (an ambiguous refresh) reaches the file a moment after the
        login it allows. At the end (lag 0) every log is in."""
        now = time.monotonic()
        self.logins = int(self.sb.state.control.stats()["logins_succeeded"])
        self._login_history.append((now, self.logins))
        while len(self._login_history) > 1 and self._login_history[1][0] <= now - lag:
            self._login_history.pop(0)
        seen = self.logins if lag == 0 else next(
            (n for t, n in reversed(self._login_history) if t <= now - lag), 0)
        bound = sum(self.login_terms().values())
        if seen > bound and not any("logins >" in b for b in self.tally.breaches):
            self.tally.breach(f"{seen} logins > {bound} allowed: {self.login_terms()}")

    def finish(self, sb: Sandbox) -> None:
        self.check_bookings()
        self.check_logins(lag=0)

    def report(self, seed: int, seconds: float, auth_timeout: str, access_ttl: float,
               refresh_ttl: float) -> str:
        t = self.tally
        kib = 1024
        sup_bound = (self.idle_supervisor + SUPERVISOR_HEADROOM_KIB) // kib
        lines = [
            f"## soak: {seconds:g} s, seed {seed}",
            f"- token lifetimes: access {access_ttl:g} s, refresh {refresh_ttl:g} s; "
            f"GATEWAY_AUTH_TIMEOUT {auth_timeout}",
            "- faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(t.faults.items())),
            f"- booking requests {t.requests}: 2xx answers {t.answered} (replays {t.replays}), "
            f"bookings in the sandbox {sum(self.per_key.values())} for {len(self.per_key)} "
            f"keys, outcome_unknown {t.codes['outcome_unknown']}, left or timed out "
            f"{t.left_or_timed_out}, keys never answered 2xx {t.unresolved}",
            "- booking statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(t.statuses.items())),
            "- error codes: " + ", ".join(f"{k} {v}" for k, v in t.codes.most_common()),
            "- catalogue reads: " + ", ".join(f"{k} {v}" for k, v in sorted(t.reads.items())),
            f"- logins {self.logins} <= {sum(self.login_terms().values())}: "
            + ", ".join(f"{k} {v}" for k, v in self.login_terms().items()),
            f"- RSS peak: supervisor {self.peak_supervisor // kib} MiB (idle "
            f"{self.idle_supervisor // kib}, bound {sup_bound}), "
            f"worker {self.peak_worker // kib} MiB (idle {self.idle_worker // kib}, bound "
            f"{(self.idle_worker + WORKER_HEADROOM_KIB) // kib})",
            f"- breaches: {len(t.breaches)}",
            *(f"  - {b}" for b in t.breaches),
        ]
        return "\n".join(lines)
