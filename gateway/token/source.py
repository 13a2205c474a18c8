"""The token side's interfaces: what the request path asks of it (:class:`TokenSource`: the
manager, or a worker's view of the supervisor's manager), what the manager calls
(:class:`AuthCalls`) and tells (:class:`TokenEvents`), and its status (:class:`TokenStatus`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.token.auth_client import Exchange, ProbeResult
from gateway.token.value import RenewalKind, Token


class AuthCalls(Protocol):
    """What the manager needs of an auth client."""

    async def login(self) -> Exchange: ...

    async def refresh(self, token: Token) -> Exchange: ...

    async def probe(self, token: Token) -> ProbeResult:
        """One cheap authenticated call (GATEWAY_CHECK_PATH) with ``token``."""
        ...


class TokenSource(Protocol):
    """What the proxy needs of the token side: the manager itself, or a worker's view of the
    supervisor's manager (``gateway.worker``)."""

    @property
    def current(self) -> Token | None: ...

    @property
    def partner_id(self) -> str:
        """The partner of the current credentials (it follows a rotation): part of every
        cache and Idempotency-Key scope."""
        ...

    def usable(self) -> Token | None:
        """The current token if it is usable now (no waiting); else None: call :meth:`get`."""
        ...

    async def get(self, newer_than: int = 0) -> Token: ...

    def invalidate(self, generation: int, reason: str) -> bool: ...

    def route_explained(self, generation: int) -> None:
        """A route refused a newer token too (it is marked persistent 401): the invalidation
        of ``generation`` was that route's, not a revocation (not contention)."""
        ...

    def ready(self) -> bool: ...

    def contended(self) -> bool:
        """Someone else logs in with our credentials now (a 401 on a newer token says nothing
        about the route then)."""
        ...

    async def still_current(self, generation: int) -> bool: ...


class TokenEvents(Protocol):
    """Hooks for observers (metrics); every method must be cheap and never raise."""

    def renewal(self, kind: RenewalKind, ok: bool, reason: str, seconds: float) -> None: ...

    def token_changed(self, token: Token | None) -> None: ...

    def invalidated(self, reason: str) -> None: ...

    def contention(self, began: bool) -> None:
        """Someone else logs in with our credentials: contention began, or lasts longer."""
        ...


class NoEvents:
    """No observer."""

    def renewal(self, kind: RenewalKind, ok: bool, reason: str, seconds: float) -> None:
        pass

    def token_changed(self, token: Token | None) -> None:
        pass

    def invalidated(self, reason: str) -> None:
        pass

    def contention(self, began: bool) -> None:
        pass


@dataclass(frozen=True)
class TokenStatus:
    """A snapshot for health and debug endpoints (never holds the token's value in text)."""

    token: Token | None
    usable: bool
    stale: bool
    renewal_due_at: float
    next_attempt_at: float | None
    last_outcome: str | None
    last_error: str | None
    last_renewal_wall: float | None
    consecutive_failures: int
    blocked: str | None
    contention_invalidations: int = 0
    #: Seconds contention lasts from now if nothing more happens (0: none).
    contended_for: float = 0.0

    @property
    def contended(self) -> bool:
        """Someone else logs in with our credentials (logins are slowed meanwhile)."""
        return self.contended_for > 0

    @property
    def credentials_rejected(self) -> bool:
        return self.blocked == "invalid_credentials"
