"""A memory-bounded cache: ``cachetools.TLRUCache`` (each entry expiring at its own time)
bounded in size units *and* in entries, counting what it drops for room. The GET cache and the
in-process Idempotency-Key store both keep their entries in one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cachetools import TLRUCache

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(TLRUCache[K, V]):
    """``maxsize`` counts ``getsizeof`` units (bytes); ``max_entries`` counts entries;
    ``expires(value)`` is when a value expires on ``timer``'s clock."""

    def __init__(self, *, max_size: int, max_entries: int, expires: Callable[[V], float],
                 timer: Callable[[], float], getsizeof: Callable[[V], int],
                 on_evict: Callable[[], None] | None = None) -> None:
        super().__init__(maxsize=max_size, ttu=lambda _key, value, _now: expires(value),
                         timer=timer, getsizeof=getsizeof)
        self._max_entries = max_entries
        self._on_evict = on_evict

    def popitem(self) -> tuple[K, V]:
        """Drop the entry that expires first, for room (counted)."""
        item = super().popitem()
        if self._on_evict is not None:
            self._on_evict()
        return item

    def put(self, key: K, value: V) -> bool:
        """Keep ``value`` under ``key`` within both bounds; False if it alone is too big."""
        if self.getsizeof(value) > self.maxsize:
            return False
        self.pop(key, None)
        while len(self) >= self._max_entries:
            self.popitem()
        self[key] = value
        return True
