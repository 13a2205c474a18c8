"""Secret hygiene: a wrapper whose ``repr`` never shows the value, and short fingerprints.

A fingerprint is the first 12 hex digits of a SHA-256 of the value: enough to tell two tokens
apart in a log line or a test, useless for recovering the token.
"""

from __future__ import annotations

import hashlib
from typing import Final

FINGERPRINT_LEN: Final = 12


def fingerprint(value: str | bytes | None) -> str:
    """Return a short, stable, non-reversible fingerprint of a secret (``"-"`` for none)."""
    if value is None or value == "" or value == b"":
        return "-"
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:FINGERPRINT_LEN]


class Secret:
    """A string that does not show itself in ``repr``/``str``; call ``reveal()`` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret(fp={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)
