"""Sandbox control state: counters, injected faults and the log of received requests.

These back the ``/__sandbox/`` control API that tests, demos and benchmarks use to observe and
disturb the sandbox. Nothing here touches tokens or data; ``sandbox.server`` wires it in.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

from multidict import CIMultiDictProxy

from gateway.redact import fingerprint

Kind = Literal["token", "refresh", "api"]
Scope = Literal["any", "auth", "api"]
_SCOPES = ("any", "auth", "api")
GATE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The longest a request waits at a closed gate.
HOLD_MAX = 60.0


class ControlError(ValueError):
    """A control request the sandbox cannot apply (bad fault spec)."""


@dataclass
class Fault:
    """One injected fault: applied to the next ``remaining`` matching requests, or to every
    matching request until ``until`` (a ``duration`` in seconds), or for good (``persistent``).

    ``chunk`` sends the answer (the fault's own, or the real one when the fault sets no
    status) with chunked transfer in pieces of that many bytes, ``chunk_delay`` apart;
    ``retry_after_date`` sends ``Retry-After`` as an HTTP date instead of seconds.
    ``headers`` adds response headers to the answer (``Cache-Control``, ``Vary``, ...).
    ``reset`` closes the connection at once, before any byte of an answer (a keep-alive
    connection the server dropped); ``bare`` answers ``status`` (default 200) with ``body``
    and no ``Content-Type`` or ``Server`` header. ``partner`` limits the fault to requests
    carrying that ``X-Partner-ID`` (the gateway sends it on the auth calls too).
    """

    remaining: int = 1
    status: int | None = None
    retry_after: float | None = None
    latency: float = 0.0
    drop: bool = False
    path: str | None = None
    scope: Scope = "any"
    body: str | None = None  # verbatim response body (JSON) instead of the standard error
    length: int = 1 << 20  # the Content-Length a dropped response claims before it is cut
    chunk: int | None = None
    chunk_delay: float = 0.02
    retry_after_date: bool = False
    until: float | None = None  # monotonic (sandbox clock); None: count-limited
    persistent: bool = False
    reset: bool = False
    bare: bool = False
    headers: dict[str, str] | None = None
    hold: str | None = None  # held until that gate opens (at most HOLD_MAX)
    #: The request is handled first (a booking is made), then the fault replaces or delays
    #: the answer: Repairy acted, and the caller cannot tell.
    after: bool = False
    partner: str | None = None

    @classmethod
    def from_json(cls, spec: object, now: float = 0.0) -> Fault:
        if not isinstance(spec, dict):
            raise ControlError("a fault is a JSON object")
        unknown = set(spec) - {"count", "status", "retry_after", "latency", "drop", "path",
                               "scope", "body", "length", "chunk", "chunk_delay",
                               "retry_after_date", "duration", "persistent", "reset", "bare",
                               "headers", "hold", "after", "partner"}
        if unknown:
            raise ControlError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        count = spec.get("count", 1)
        status = spec.get("status")
        retry_after = spec.get("retry_after")
        latency = spec.get("latency", 0.0)
        drop = spec.get("drop", False)
        path = spec.get("path")
        scope = spec.get("scope", "any")
        body = spec.get("body")
        length = spec.get("length", 1 << 20)
        if not isinstance(length, int) or length < 64:
            raise ControlError("length must be an integer of at least 64 bytes")
        if body is not None and not isinstance(body, str):
            raise ControlError("body must be a string")
        if not isinstance(count, int) or count < 1:
            raise ControlError("count must be a positive integer")
        if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
            raise ControlError("status must be an HTTP status code")
        if retry_after is not None and not isinstance(retry_after, int | float):
            raise ControlError("retry_after must be a number of seconds")
        if not isinstance(latency, int | float) or latency < 0:
            raise ControlError("latency must be a non-negative number of seconds")
        if not isinstance(drop, bool):
            raise ControlError("drop must be true or false")
        if path is not None and not isinstance(path, str):
            raise ControlError("path must be a glob pattern such as /bookings/*")
        if scope not in _SCOPES:
            raise ControlError(f"scope must be one of {', '.join(_SCOPES)}")
        chunk = spec.get("chunk")
        chunk_delay = spec.get("chunk_delay", 0.02)
        retry_after_date = spec.get("retry_after_date", False)
        duration = spec.get("duration")
        persistent = spec.get("persistent", False)
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool)
                                  or chunk < 1):
            raise ControlError("chunk must be a positive number of bytes")
        if not isinstance(chunk_delay, int | float) or not 0 <= chunk_delay <= 10:
            raise ControlError("chunk_delay must be 0 to 10 seconds")
        if not isinstance(retry_after_date, bool) or not isinstance(persistent, bool):
            raise ControlError("retry_after_date and persistent must be true or false")
        if duration is not None and (not isinstance(duration, int | float) or duration <= 0):
            raise ControlError("duration must be a positive number of seconds")
        reset = spec.get("reset", False)
        bare = spec.get("bare", False)
        if not isinstance(reset, bool) or not isinstance(bare, bool):
            raise ControlError("reset and bare must be true or false")
        headers = spec.get("headers")
        if headers is not None and (not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise ControlError("headers must be an object of header names to string values")
        hold = spec.get("hold")
        if hold is not None and not (isinstance(hold, str) and GATE_NAME.fullmatch(hold)):
            raise ControlError("hold must be a gate name: 1 to 64 of A-Z a-z 0-9 _ . -")
        after = spec.get("after", False)
        if not isinstance(after, bool):
            raise ControlError("after must be true or false")
        partner = spec.get("partner")
        if partner is not None and not (isinstance(partner, str) and partner):
            raise ControlError("partner must be a Partner ID")
        if status is None and not (drop or latency or reset or bare or headers or hold) and (
                chunk is None):
            raise ControlError("a fault needs at least one of status, latency, drop, reset, "
                               "bare, headers, chunk, hold")
        return cls(count, status, retry_after, float(latency), drop, path, scope, body, length,
                   chunk, float(chunk_delay), retry_after_date,
                   None if duration is None else now + float(duration), persistent, reset,
                   bare, headers, hold, after, partner)

    def matches(self, path: str, kind: Kind, partner: str | None = None) -> bool:
        if self.partner is not None and partner != self.partner:
            return False
        if self.scope == "auth" and kind == "api":
            return False
        if self.scope == "api" and kind != "api":
            return False
        return self.path is None or fnmatch.fnmatchcase(path, self.path)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ControlState:
    """Counters, faults and the request log of one sandbox."""

    def __init__(self, request_log_size: int = 1000) -> None:
        self.faults: list[Fault] = []
        self.requests: deque[dict[str, Any]] = deque(maxlen=request_log_size)
        self.counters: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        #: Gates that held requests wait on (``hold``), and how many each holds now.
        self.gates: dict[str, asyncio.Event] = {}
        self.holding: Counter[str] = Counter()
        #: Per Partner ID: logins, refreshes, calls (API requests carrying that X-Partner-ID
        #: with a valid token) and wrong_partner_calls (among them, those whose token belongs
        #: to another partner).
        self.partners: dict[str, Counter[str]] = {}

    async def hold(self, gate: str) -> None:
        """Hold a request until ``gate`` opens, or for HOLD_MAX at the most (a test that
        forgets to open it slows down, never hangs)."""
        event = self.gates.setdefault(gate, asyncio.Event())
        self.holding[gate] += 1
        try:
            async with asyncio.timeout(HOLD_MAX):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            self.holding[gate] -= 1

    def open_gate(self, gate: str) -> int:
        """Open ``gate``: what it holds goes on, and later requests pass it. Returns how
        many it held."""
        self.gates.setdefault(gate, asyncio.Event()).set()
        return self.holding[gate]

    def reset(self) -> None:
        for event in self.gates.values():
            event.set()  # release whatever is held
        self.gates.clear()
        self.faults.clear()
        self.requests.clear()
        self.counters.clear()
        self.statuses.clear()
        self.partners.clear()

    def count_received(self, kind: Kind) -> None:
        key = {"token": "token_requests", "refresh": "refresh_requests", "api": "api_requests"}
        self.counters[key[kind]] += 1

    def count_partner(self, partner: str, what: str) -> None:
        counts = self.partners.get(partner)
        if counts is None:
            if len(self.partners) >= 1000:  # made-up Partner IDs cannot grow it without end
                return
            counts = self.partners[partner] = Counter()
        counts[what] += 1

    def count_status(self, status: int) -> None:
        self.statuses[status] += 1

    def take_fault(self, path: str, kind: Kind, now: float = 0.0,
                   partner: str | None = None) -> Fault | None:
        """Consume one use of the first fault matching this request (expired ones go)."""
        self.faults[:] = [f for f in self.faults if f.until is None or now < f.until]
        for fault in self.faults:
            if fault.matches(path, kind, partner):
                if fault.until is None and not fault.persistent:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self.faults.remove(fault)
                self.counters["faults_applied"] += 1
                return fault
        return None

    def record(self, method: str, raw_path: str, headers: CIMultiDictProxy[str]) -> None:
        path, _, query = raw_path.partition("?")
        self.requests.append({"method": method, "path": path, "query": query,
                              "headers": redacted_headers(headers)})

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: self.counters[name]
            for name in ("token_requests", "refresh_requests", "api_requests",
                         "rejected_requests", "faults_applied", "logins_succeeded",
                         "refreshes_succeeded", "client_disconnects")
        }
        out["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        out["held"] = {gate: n for gate, n in sorted(self.holding.items()) if n}
        out["partners"] = {partner: {what: counts[what] for what in (
            "logins", "refreshes", "calls", "wrong_partner_calls")}
            for partner, counts in sorted(self.partners.items())}
        return out


def redacted_headers(headers: CIMultiDictProxy[str]) -> list[list[str]]:
    """Headers as ``[name, value]`` pairs, ``Authorization`` shown only as a fingerprint."""
    shown: list[list[str]] = []
    for name, value in headers.items():
        if name.lower() == "authorization":
            scheme, _, cred = value.partition(" ")
            value = f"{scheme} fp:{fingerprint(cred)}" if cred else f"fp:{fingerprint(value)}"
        shown.append([name, value])
    return shown
