"""Idempotency-Key: the policy (which requests, which key, what is kept) and its records.

On the configured routes (``GATEWAY_IDEMPOTENCY_ROUTES``, by default ``POST /bookings`` and
``POST /bookings/*/*``) a caller may send ``Idempotency-Key`` (the IETF draft's header: a
structured-field string or a bare value, at most 255 characters). The first request with a key
claims it (an *in-flight* record) and is forwarded; its final answer becomes the key's record:

* ``done``: a 2xx/3xx/4xx answer (except 401, 408, 425, 429), kept whole, replayed to repeats
  with ``Idempotent-Replayed: true`` and the first request's ``X-Request-ID``;
* ``not_kept``: such an answer with a body over ``GATEWAY_IDEMPOTENCY_MAX_BODY``; repeats get
  409 ``idempotent_answer_not_kept`` (never a second booking);
* ``unknown``: the upstream may have acted but the outcome is not known (a timeout, a broken
  answer, a 5xx other than 503): repeats get 502 ``outcome_unknown``;
* released (no record): nothing reached the upstream, or it said "try again" (401, 408, 425,
  429, 503): a repeat is forwarded as if new.

A repeat with another request fingerprint (method, raw path and query, body digest) gets 422
``idempotency_key_mismatch``; a repeat while the first is in flight waits for it up to
``GATEWAY_IDEMPOTENCY_WAIT``, then gets 409 ``idempotency_in_flight``. Keys are scoped per
calling client and per credential owner, and stored only as a digest.

An in-flight record goes *claimed* → *sending* → settled: the leader marks it *sending* in the
store before its first upstream send. The leader is bounded by its deadline
(:func:`leader_deadline`) and its record carries a lease of that deadline plus
:data:`LEASE_MARGIN`. Past the lease (its leader died or lost the store), a *sending* record
counts as ``unknown``, and a merely *claimed* one (nothing was sent) may be taken over by a
repeat. Records carry a format version (:data:`RECORD_VERSION`): one of a version this release
does not know reads as in flight (until its lease) or ``unknown``, never as absent.

The stores are in :mod:`gateway.proxy.idempotency_store`; the handler drives the policy.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from gateway.errors import BadRequest, GatewayError
from gateway.proxy.routes import comparable_path

IDEMPOTENCY_KEY: Final = "Idempotency-Key"
REPLAYED: Final = "Idempotent-Replayed"
MAX_KEY_LENGTH: Final = 255
#: Statuses that say "nothing happened, try again": never kept.
RETRYABLE_STATUSES: Final = frozenset({401, 408, 425, 429, 503})
#: Headers of a kept answer that belong to the first exchange only.
_NOT_KEPT_HEADERS: Final = frozenset({"x-request-id", "x-cache", "age", "date"})
_SF_STRING = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$')
#: Bytes counted per record and per kept header beyond their text: what Python really holds
#: for them, with the store's own bookkeeping (measured: benchmarks/idempotency_flood.py).
_RECORD_OVERHEAD: Final = 580
_HEADER_OVERHEAD: Final = 100
#: The record format this release writes (1: 1ca7d9a and earlier, no "v" field).
RECORD_VERSION: Final = 2
#: A claim's lease runs this long past its leader's deadline.
LEASE_MARGIN: Final = 5.0

State = Literal["in_flight", "done", "not_kept", "unknown"]


class IdempotencyMismatch(GatewayError):
    status = 422
    default_code = "idempotency_key_mismatch"


class IdempotencyInFlight(GatewayError):
    status = 409
    default_code = "idempotency_in_flight"


class AnswerNotKept(GatewayError):
    status = 409
    default_code = "idempotent_answer_not_kept"


class OutcomeUnknown(GatewayError):
    status = 502
    default_code = "outcome_unknown"


class IdempotencyUnavailable(GatewayError):
    """The store cannot be reached or is full: the request is not sent (it could not be
    protected), and the caller may retry."""

    status = 503
    default_code = "idempotency_unavailable"


@dataclass(frozen=True)
class IdempotencyRule:
    method: str
    pattern: str  # a path whose ``*`` stands for one segment
    #: ``pattern`` compiled once (a trailing slash ignored).
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = re.compile(re.escape(comparable_path(self.pattern)).replace(r"\*", "[^/]+"))
        object.__setattr__(self, "regex", compiled)

    def matches(self, method: str, path: str) -> bool:
        """``path`` in :func:`~gateway.proxy.routes.comparable_path` form."""
        return method == self.method and self.regex.fullmatch(path) is not None


def parse_idempotency_routes(value: object) -> tuple[IdempotencyRule, ...]:
    """``METHOD /path`` entries, comma-separated, ``*`` standing for one path segment (a
    trailing slash is ignored); ``off`` or empty: none."""
    text = str(value).strip()
    if text.lower() in ("", "off", "none"):
        return ()
    rules = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split()
        if len(parts) != 2 or parts[0].upper() not in ("POST", "PUT", "PATCH", "DELETE"):
            raise ValueError(f"{entry!r} is not 'METHOD /path-glob' with METHOD one of POST, "
                             "PUT, PATCH, DELETE (e.g. POST /bookings)")
        if not parts[1].startswith("/"):
            raise ValueError(f"{entry!r}: the path glob must start with /")
        rules.append(IdempotencyRule(parts[0].upper(), parts[1]))
    return tuple(rules)


def protected(rules: tuple[IdempotencyRule, ...], method: str, path: str) -> bool:
    """Whether a request to ``method path`` (decoded) honours Idempotency-Key: compared as the
    ``/auth`` refusal compares, in :func:`~gateway.proxy.routes.comparable_path` form."""
    comparable = comparable_path(path)
    return any(rule.matches(method, comparable) for rule in rules)


def parse_key(value: str) -> str:
    """The key of an ``Idempotency-Key`` header: a structured-field string (``"abc"``) or a
    bare token; 400 ``invalid_idempotency_key`` when empty or over 255 characters."""
    text = value.strip()
    match = _SF_STRING.match(text)
    if match is not None:
        text = match.group(1).replace('\\"', '"').replace("\\\\", "\\")
    if not text:
        raise BadRequest("the Idempotency-Key header is empty", code="invalid_idempotency_key")
    if len(text) > MAX_KEY_LENGTH:
        raise BadRequest(f"the Idempotency-Key is longer than {MAX_KEY_LENGTH} characters",
                         code="invalid_idempotency_key")
    return text


def storage_key(scope: str, client: str, key: str) -> str:
    """Where a key's record lives: a digest of whose credentials, which client, which key (the
    key itself is never stored)."""
    raw = "\0".join((scope, client, key)).encode()
    return hashlib.sha256(raw).hexdigest()[:40]


def leader_deadline(token_wait: float, connect: float, total: float) -> float:
    """How long a leader may work on a key: a token (``GATEWAY_TOKEN_WAIT_TIMEOUT``), a
    connection (``GATEWAY_CONNECT_TIMEOUT``), then the request's own deadline
    (``GATEWAY_TOTAL_TIMEOUT``, from the first send). The leader is cut off there."""
    return token_wait + connect + total


def fingerprint(method: str, raw_path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(f"{method} {raw_path}\n".encode())
    digest.update(body)
    return digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Record:
    """What a key holds. ``owner`` names the claim (only it may release the key)."""

    state: State
    fingerprint: str
    owner: str
    request_id: str
    lease_until: float = 0.0  # wall clock: the leader's deadline plus LEASE_MARGIN
    status: int = 0
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    #: In flight: the leader may have sent (it marks this before its first send).
    sending: bool = False

    @classmethod
    def claim(cls, fp: str, request_id: str, lease_until: float) -> Record:
        return cls("in_flight", fp, secrets.token_hex(8), request_id, lease_until)

    def settled(self, state: State, status: int = 0, reason: str = "",
                headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> Record:
        return replace(self, state=state, status=status, reason=reason, headers=headers,
                       body=body, lease_until=0.0, sending=False)

    def marked_sending(self) -> Record:
        return replace(self, sending=True)

    def in_flight_at(self, now: float) -> bool:
        return self.state == "in_flight" and now < self.lease_until

    def abandoned_at(self, now: float) -> bool:
        """A claim whose leader is gone (past its lease) before it sent anything: nothing can
        have happened, so another request may take the key over."""
        return self.state == "in_flight" and not self.sending and now >= self.lease_until

    def lapsed(self, now: float) -> Record:
        """What this record means at ``now``: an in-flight record past its lease is
        ``unknown`` once its leader began sending (a claim that never sent stays as it is,
        for :meth:`abandoned_at`)."""
        if self.state == "in_flight" and self.sending and now >= self.lease_until:
            return self.settled("unknown")
        return self

    @property
    def size(self) -> int:
        return (len(self.body) + sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in self.headers)
                + len(self.request_id) + _RECORD_OVERHEAD)

    def to_dict(self, *, body: bool = True) -> dict[str, Any]:
        """The record as JSON-ready data; ``body=False`` leaves the body out (it travels
        beside, as the channel's attachment). Version 1 readers (1ca7d9a) ignore ``v`` and
        ``snd`` and read an in-flight record as in flight."""
        doc: dict[str, Any] = {"v": RECORD_VERSION, "s": self.state, "fp": self.fingerprint,
                               "o": self.owner, "rid": self.request_id}
        if self.lease_until:
            doc["l"] = self.lease_until
        if self.sending:
            doc["snd"] = 1
        if self.status:
            doc.update(st=self.status, r=self.reason, h=[list(h) for h in self.headers])
            if body:
                doc["b"] = base64.b64encode(self.body).decode()
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any], body: bytes | None = None) -> Record:
        """A record from :meth:`to_dict`'s form (``body``: the body that travelled beside).
        Version 1 records (no ``v``) did not say whether their leader had sent: an in-flight
        one counts as sending. A version this release does not know counts as in flight
        until its lease, else ``unknown``: never as absent, never replayed."""
        version = doc.get("v", 1)
        if not isinstance(version, int) or version > RECORD_VERSION:
            return cls("in_flight" if doc.get("s") == "in_flight" else "unknown",
                       str(doc.get("fp", "")), str(doc.get("o", "")), str(doc.get("rid", "")),
                       float(doc.get("l", 0.0)) if doc.get("s") == "in_flight" else 0.0,
                       sending=True)
        state = doc["s"]
        if state not in ("in_flight", "done", "not_kept", "unknown"):
            raise ValueError("unknown record state")
        return cls(state, str(doc["fp"]), str(doc["o"]), str(doc["rid"]),
                   float(doc.get("l", 0.0)), int(doc.get("st", 0)), str(doc.get("r", "")),
                   tuple((str(k), str(v)) for k, v in doc.get("h", ())),
                   body if body is not None else base64.b64decode(doc.get("b", "")),
                   sending=state == "in_flight" and (version == 1 or bool(doc.get("snd"))))


def kept_headers(headers: Any) -> tuple[tuple[str, str], ...]:
    """The headers of an answer worth replaying (those of the first exchange left out)."""
    return tuple((k, v) for k, v in headers.items() if k.lower() not in _NOT_KEPT_HEADERS)


def settle_status(status: int) -> State | None:
    """What an upstream answer with ``status`` makes of the key: None releases it."""
    if status in RETRYABLE_STATUSES:
        return None
    if status >= 500:
        return "unknown"
    return "done"


def refusal(record: Record, fp: str, now: float) -> GatewayError | None:
    """The error for a repeat that finds ``record`` (None: it is a replayable answer, or still
    in flight)."""
    if record.fingerprint != fp:
        return IdempotencyMismatch("this Idempotency-Key was used with another request "
                                   "(method, path or body differ)")
    if record.lapsed(now).state == "unknown":
        return OutcomeUnknown("the first request with this Idempotency-Key may have reached "
                              "Repairy, but its outcome is unknown: check before retrying "
                              f"(first request {record.request_id})")
    if record.state == "not_kept":
        return AnswerNotKept(f"the first request with this Idempotency-Key was answered "
                             f"{record.status}, but its answer was too large to keep "
                             f"(first request {record.request_id})")
    return None
