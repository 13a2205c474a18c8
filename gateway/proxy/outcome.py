"""What happened to one request (:class:`Outcome`), and its one access line
(:func:`log_request`)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Final, NamedTuple

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.logs import access_sink, fast_iso_ms
from gateway.proxy.access import ANONYMOUS
from gateway.proxy.body import BodyReader
from gateway.proxy.cache import CacheRule
from gateway.proxy.idempotency import settle_status
from gateway.proxy.lanes import Lane
from gateway.proxy.retry import Attempts
from gateway.proxy.routes import method_label

log = logging.getLogger("gateway.proxy")


@dataclass(slots=True)
class Outcome:
    """What happened to one request, for its log line and metrics."""

    #: The request's credential profile (the default until admission chose): its upstream
    #: answers are counted in its metrics.
    lane: Lane
    route: str = "other"
    client: str = ANONYMOUS
    status: int | None = None
    upstream_status: int | None = None
    generation: int | None = None
    replayed: bool = False
    error: str | None = None
    bytes_out: int = 0
    reader: BodyReader | None = None
    attempts: Attempts | None = None
    counted: bool = False  # in the per-client limits (to hand back)
    path: str = ""
    cache: str | None = None  # HIT, MISS, COALESCED on cached routes
    cache_rule: CacheRule | None = None
    cache_key: str = ""
    cache_sent: CIMultiDict[str] | None = None  # the headers sent upstream (for Vary)
    #: The partner of the cache key or Idempotency-Key scope (empty: neither), and of the
    #: token last sent: a rotation between the two must not file one partner's answer under
    #: the other's.
    partner: str = ""
    sent_partner: str = ""
    cache_leader: bool = False  # leads the single flight for cache_key (to land)
    source: str = "upstream"
    method: str = "GET"
    idempotency: str | None = None  # new, replayed, or the refusal's code
    # -- for the audit trail (:mod:`gateway.proxy.audit`) --
    request_id: str = ""
    peer: str = ""
    started: float = 0.0
    idempotency_key: str | None = None
    audited: bool = False
    audit_leader: bool = False  # an Idempotency-Key leader writes it, caller or not

    def answered(self, resp: aiohttp.ClientResponse, seconds: float) -> None:
        """An upstream attempt got its status line."""
        self.upstream_status = resp.status
        if resp.status >= 500 and self.attempts is not None and settle_status(
                resp.status) == "unknown":
            self.attempts.maybe_acted = True
        self.lane.metrics.upstream_response(method_label(self.method), self.route,
                                            resp.status, seconds)


def log_request(request: web.BaseRequest, rid: str, outcome: Outcome, started: float,
                loop: asyncio.AbstractEventLoop | None = None) -> None:
    """The request's one access line: preformatted into the log batch when our JSON handler
    is the only one (the same bytes ``logging`` would write: :func:`access_line`), through
    ``logging`` otherwise. ``loop``: the running loop, if the caller knows it."""
    attempts = outcome.attempts
    retried = attempts.retried if attempts is not None else None
    line = AccessLine(
        rid, outcome.client, outcome.lane.name, request.method[:16], outcome.route,
        outcome.status,
        outcome.upstream_status, outcome.error, round((time.monotonic() - started) * 100_000) / 100,
        outcome.reader.bytes_in if outcome.reader else 0, outcome.bytes_out,
        outcome.generation, outcome.replayed, bool(retried),
        ",".join(retried) if retried else None, outcome.cache, outcome.idempotency)
    sink = access_sink(log)
    if sink is not None:
        sink.write(access_line(time.time(), f"{request.method} {outcome.route} "
                                            f"{outcome.status}", line), loop)
    else:
        log.info("%s %s %s", request.method, outcome.route, outcome.status,
                 extra={"fields": line.fields()})


class AccessLine(NamedTuple):
    """The access line's fields, in their order on the line."""

    request_id: str
    client: str
    credential: str
    method: str
    route: str
    status: int | None
    upstream_status: int | None
    error: str | None
    duration_ms: float
    bytes_in: int
    bytes_out: int
    token_generation: int | None
    replayed: bool
    retried: bool
    retries: str | None
    cache: str | None
    idempotency: str | None

    def fields(self) -> dict[str, object]:
        return {"event": "request", **self._asdict()}


_str: Final = json.encoder.encode_basestring_ascii  # the C encoder of json.dumps


#: The access line's parts that repeat from request to request (all but the time, the request
#: id, the duration and the byte counts), by the fields they are made of. Bounded: the values
#: come from small sets (methods, route templates, statuses, codes, client names), and the
#: cache starts afresh if they ever add up to more.
_PARTS: dict[tuple[object, ...], tuple[str, str, str]] = {}
_MOST_PARTS: Final = 1024


def _parts(msg: str, f: AccessLine) -> tuple[str, str, str]:
    status, upstream, generation = f.status, f.upstream_status, f.token_generation
    head = (f'", "level": "info", "logger": "gateway.proxy", "msg": {_str(msg)}, '
            '"event": "request", "request_id": ')
    middle = (
        f', "client": {_str(f.client)}, "credential": {_str(f.credential)}, '
        f'"method": {_str(f.method)}, "route": {_str(f.route)}, '
        f'"status": {"null" if status is None else int.__repr__(status)}, '
        f'"upstream_status": {"null" if upstream is None else int.__repr__(upstream)}, '
        f'"error": {"null" if f.error is None else _str(f.error)}, "duration_ms": ')
    tail = (
        f', "token_generation": {"null" if generation is None else int.__repr__(generation)}, '
        f'"replayed": {"true" if f.replayed else "false"}, '
        f'"retried": {"true" if f.retried else "false"}, '
        f'"retries": {"null" if f.retries is None else _str(f.retries)}, '
        f'"cache": {"null" if f.cache is None else _str(f.cache)}, '
        f'"idempotency": {"null" if f.idempotency is None else _str(f.idempotency)}}}\n')
    return head, middle, tail


def access_line(created: float, msg: str, f: AccessLine) -> str:
    """``json_line(created, "info", "gateway.proxy", msg, f.fields())``, byte for byte (a
    property test holds it to that), without building the dict or walking it: the parts that
    repeat are made once (:data:`_PARTS`)."""
    key = (msg, f.client, f.credential, f.method, f.route, f.status, f.upstream_status, f.error,
           f.token_generation, f.replayed, f.retried, f.retries, f.cache, f.idempotency)
    parts = _PARTS.get(key)
    if parts is None:
        if len(_PARTS) >= _MOST_PARTS:
            _PARTS.clear()
        parts = _PARTS[key] = _parts(msg, f)
    head, middle, tail = parts
    duration = f.duration_ms
    return (f'{{"ts": "{fast_iso_ms(created)}{head}{_str(f.request_id)}{middle}'
            f'{float.__repr__(duration) if math.isfinite(duration) else json.dumps(duration)}'
            f', "bytes_in": {int.__repr__(f.bytes_in)}, "bytes_out": '
            f'{int.__repr__(f.bytes_out)}{tail}')
