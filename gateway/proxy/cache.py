"""The GET cache: read-mostly routes answered from memory, concurrent misses coalesced.

Off by default; ``GATEWAY_CACHE_ROUTES`` turns it on per route pattern with a lifetime
(``GET /workshops/*/services=60s``). It follows RFC 9111's rules for a *shared* cache:

* only status 200 to a GET, with a known length within ``GATEWAY_CACHE_MAX_ENTRY``;
* never an answer with ``Set-Cookie``, nor one whose ``Cache-Control`` says ``no-store``,
  ``private`` or ``no-cache`` (the gateway does not revalidate), nor ``Pragma: no-cache``
  without ``Cache-Control``, nor ``Vary: *``; nor when the caller's request says ``no-store``;
* the lifetime is the configured one, capped by ``s-maxage``, else ``max-age``, else
  ``Expires`` minus ``Date`` (a past or invalid ``Expires``: not kept), less the ``Age`` the
  upstream reports;
* the key is the partner, the method, the raw path and query, and the values *sent upstream*
  (all lines of each) of the headers the answer's ``Vary`` names; ``Vary`` on
  ``Authorization`` or ``X-Partner-ID`` keys on the partner, never on the token: no token is
  in any stored field. The gateway never decompresses: a gzip body must never reach a
  caller that did not accept it.

The one deliberate exception (docs/how-it-works.md lists it): RFC 9111 §3.5 keeps a shared
cache from reusing an answer to a request with ``Authorization`` unless the answer says
``public``; every request here carries the gateway's token, and the route's opt-in in
``GATEWAY_CACHE_ROUTES`` stands in for ``public``.

A HEAD is answered from the GET entry's head. Concurrent misses for one key make one upstream
call (single flight): the others wait for it and are answered from what it stored (or go
upstream themselves if it stored nothing). A caller's ``Cache-Control: no-cache`` bypasses
the cache and refreshes it. Answers carry ``Age`` and ``X-Cache: HIT|MISS|COALESCED``.

Memory is bounded in bytes and entries (``cachetools.TLRUCache``, each entry expiring at its
own time); the cache is per process (each worker and replica keeps its own), and with
``GATEWAY_CACHE_SHARED`` also shared through the fleet's Redis
(:mod:`gateway.proxy.cache_shared`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.clock import Clock
from gateway.config_values import parse_positive_duration
from gateway.proxy.bounded import BoundedCache

X_CACHE: Final = "X-Cache"
_MAX_AGE = re.compile(r"(?:^|,)\s*(s-maxage|max-age)\s*=\s*\"?(\d{1,10})\"?\s*(?=,|$)", re.I)
_DIRECTIVE = re.compile(r"(?:^|,)\s*([a-z-]+)", re.I)
#: Vary on our own credentials: keyed on the partner (part of every key), never the token.
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "x-partner-id"})
PARTNER_VALUE: Final = "<partner>"
_ENTRY_OVERHEAD: Final = 512  # bytes counted per entry beyond its body and headers


@dataclass(frozen=True)
class CacheRule:
    pattern: str  # fnmatch glob over the decoded path
    ttl: float

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)


def parse_cache_routes(value: object) -> tuple[CacheRule, ...]:
    """``GET /glob=60s`` entries (``GET`` may be left out), comma-separated."""
    rules = []
    for raw in str(value).split(","):
        entry = raw.strip()
        if not entry:
            continue
        route, sep, ttl_text = entry.rpartition("=")
        parts = route.split()
        if not sep or not parts or len(parts) > 2 or (len(parts) == 2
                                                      and parts[0].upper() != "GET"):
            raise ValueError(f"{entry!r} is not 'GET /path-glob=TTL' (e.g. "
                             "GET /workshops/*/services=60s)")
        pattern = parts[-1]
        if not pattern.startswith("/"):
            raise ValueError(f"{entry!r}: the path glob must start with /")
        try:
            ttl = parse_positive_duration(ttl_text.strip())
        except ValueError as exc:
            raise ValueError(f"{entry!r}: the lifetime {exc}") from None
        rules.append(CacheRule(pattern, ttl))
    return tuple(rules)


@dataclass(frozen=True)
class CachedAnswer:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # as passed back (hop-by-hop already dropped)
    body: bytes
    vary: tuple[str, ...]  # lower-case header names
    vary_values: tuple[str | None, ...]
    stored_at: float  # wall-clock seconds, for Age
    expires_at: float  # monotonic
    size: int


class SharedTier(Protocol):
    """The fleet-wide tier behind this cache (:class:`~gateway.proxy.cache_shared.SharedCache`):
    read on a local miss, written behind every store."""

    async def get(self, key: str) -> CachedAnswer | None: ...

    def put(self, key: str, entry: CachedAnswer) -> None: ...

    async def close(self) -> None: ...


def directives(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """The names of the ``Cache-Control`` directives, lower case, all lines."""
    control = ",".join(headers.getall("Cache-Control", []))
    return {m.group(1).lower() for m in _DIRECTIVE.finditer(control)}


def answer_lifetime(headers: CIMultiDictProxy[str] | CIMultiDict[str], configured: float,
                    now: float) -> float | None:
    """How long a shared cache may keep this answer (None: not at all); ``now`` is the wall
    clock, for ``Expires`` without ``Date``."""
    if "Set-Cookie" in headers:
        return None
    words = directives(headers)
    if words & {"no-store", "private", "no-cache"}:
        return None
    if "Cache-Control" not in headers and "no-cache" in ",".join(
            headers.getall("Pragma", [])).lower():
        return None
    if "*" in [v.strip() for v in ",".join(headers.getall("Vary", [])).split(",")]:
        return None
    control = ",".join(headers.getall("Cache-Control", []))
    ages = {m.group(1).lower(): int(m.group(2)) for m in _MAX_AGE.finditer(control)}
    limit: float | None = ages.get("s-maxage", ages.get("max-age"))
    if limit is None and "Expires" in headers:
        expires = _http_date(headers.getone("Expires"))
        if expires is None:
            return None  # RFC 9111 §5.3: an invalid Expires is in the past
        date = _http_date(headers.get("Date", "")) if "Date" in headers else None
        limit = expires - (now if date is None else date)
    ttl = configured if limit is None else min(configured, limit)
    age = headers.get("Age", "").strip()
    if age.isdigit():
        ttl -= min(int(age), 10**9)
    return ttl if ttl > 0 else None


def _http_date(text: str) -> float | None:
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


def sent_values(names: tuple[str, ...],
                sent: CIMultiDictProxy[str] | CIMultiDict[str]) -> tuple[str | None, ...]:
    """What was sent upstream of each header named in ``Vary``, as a digest of all its lines
    (None: absent; a caller's ``Cookie`` is never stored as such); the partner, never the
    token, for our own credentials."""
    out: list[str | None] = []
    for name in names:
        if name in CREDENTIAL_HEADERS:
            out.append(PARTNER_VALUE)
            continue
        lines = sent.getall(name, [])
        out.append(hashlib.sha256(", ".join(v.strip() for v in lines).encode()).hexdigest()[:32]
                   if lines else None)
    return tuple(out)


def matching(entry: CachedAnswer | None,
             sent: CIMultiDictProxy[str] | CIMultiDict[str]) -> CachedAnswer | None:
    """``entry`` if it was stored for the values this request sends upstream of the ``Vary``
    headers."""
    if entry is None or sent_values(entry.vary, sent) != entry.vary_values:
        return None
    return entry


def vary_names(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> tuple[str, ...]:
    names = {v.strip().lower() for v in ",".join(headers.getall("Vary", [])).split(",")}
    return tuple(sorted(n for n in names if n))


def cache_key(partner: str, raw_path: str) -> str:
    """The key of a GET: the partner is part of every key, local and shared."""
    return f"{partner}\0GET {raw_path}"


class GetCache:
    """The per-process GET cache (see the module's docstring)."""

    def __init__(self, rules: tuple[CacheRule, ...], *, max_bytes: int, max_entries: int,
                 max_entry: int, clock: Clock,
                 on_evict: Callable[[], None] | None = None) -> None:
        self.rules = rules
        self.max_entry = max_entry
        self._clock = clock
        self._store: BoundedCache[str, CachedAnswer] = BoundedCache(
            max_size=max_bytes, max_entries=max_entries, expires=lambda value: value.expires_at,
            timer=clock.monotonic, getsizeof=lambda value: value.size, on_evict=on_evict)
        self._flights: dict[str, asyncio.Future[None]] = {}
        #: The fleet's layer (GATEWAY_CACHE_SHARED), or None.
        self.shared: SharedTier | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    @property
    def stored_bytes(self) -> int:
        return int(self._store.currsize)

    def __len__(self) -> int:
        return len(self._store)

    def rule_for(self, path: str) -> CacheRule | None:
        for rule in self.rules:
            if rule.matches(path):
                return rule
        return None

    def lookup(self, key: str, sent: CIMultiDict[str]) -> CachedAnswer | None:
        """The entry for ``key`` stored for what this request sends upstream, or None."""
        return matching(self._store.get(key), sent)

    def adopt(self, key: str, entry: CachedAnswer) -> None:
        """Keep an entry read from the fleet's layer (within this process's limits)."""
        self._store.put(key, entry)

    def store(self, key: str, rule: CacheRule, status: int, reason: str,
              headers: CIMultiDict[str], body: bytes, sent: CIMultiDict[str]) -> bool:
        """Keep a 200 answer if the upstream allows it; True if kept. ``sent``: the headers
        the request went upstream with (``Vary`` is judged on them)."""
        if status != 200 or len(body) > self.max_entry:
            return False
        ttl = answer_lifetime(headers, rule.ttl, self._clock.time())
        if ttl is None:
            return False
        vary = vary_names(headers)
        kept = tuple((k, v) for k, v in headers.items()
                     if k.lower() not in ("age", "x-cache", "x-request-id"))
        size = len(body) + sum(len(k) + len(v) for k, v in kept) + len(key) + _ENTRY_OVERHEAD
        entry = CachedAnswer(status, reason, kept, body, vary,
                             sent_values(vary, sent),
                             self._clock.time(), self._clock.monotonic() + ttl, size)
        if not self._store.put(key, entry):
            return False
        if self.shared is not None:
            self.shared.put(key, entry)
        return True

    def forget(self, key: str) -> None:
        self._store.pop(key, None)

    # -- single flight -------------------------------------------------------------------------
    def leader(self, key: str) -> asyncio.Future[None] | None:
        """None if this caller leads the upstream call for ``key`` (call :meth:`landed`
        after); else the future to wait on."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight
        self._flights[key] = asyncio.get_running_loop().create_future()
        return None

    def landed(self, key: str) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None and not flight.done():
            flight.set_result(None)

    def age(self, entry: CachedAnswer) -> int:
        return max(0, int(self._clock.time() - entry.stored_at))
