"""Several credentials on the request path: each profile's :class:`Lane` (its token source,
upstream guards, rate limit, persistent-401 routes and key scope) and the choice of a lane per
request (:class:`Lanes`: the credential header, and the profiles each client may use).

Invariant: a request is sent with the token of the lane it was admitted to, and what it
leaves behind (a kept Idempotency-Key answer, a cached GET) is filed under that lane's scope
only, so an answer never reaches a caller of another profile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from multidict import istr
from yarl import URL

from gateway.errors import CredentialNotAllowed, GatewayError, UnknownCredential, UpstreamError
from gateway.metrics_credential import CredentialMetrics
from gateway.proxy.access import ClientProfiles
from gateway.proxy.guards import Upstream
from gateway.proxy.limits import TokenBucket
from gateway.token.config import DEFAULT_PROFILE
from gateway.token.route_401 import Persistent401
from gateway.token.source import TokenSource
from gateway.token.traffic import Tally


@dataclass(eq=False, slots=True)
class Lane:
    """One credential profile's share of the request path (one per profile and process)."""

    name: str
    base_url: URL
    tokens: TokenSource
    #: The session and breaker of its base URL (shared by the profiles on it), its own slots
    #: and retry budget.
    upstream: Upstream
    route_401: Persistent401
    metrics: CredentialMetrics
    #: GATEWAY_RATE_LIMIT for this profile alone (Repairy's quotas are per partner).
    rate: TokenBucket | None = None
    #: Upstream answers passed back, and the 401/403 among them (this profile's probe).
    tally: Tally = field(default_factory=Tally)
    #: What this profile adds to the Idempotency-Key scope and the cache keys: nothing for
    #: ``default`` (the keys of releases before profiles), ``|profile:<name>`` otherwise.
    scope: str = field(init=False)

    def __post_init__(self) -> None:
        self.scope = "" if self.name == DEFAULT_PROFILE else f"|profile:{self.name}"

    def upstream_failed(self, error: GatewayError) -> None:
        """An attempt failed upstream (the retries' ``on_failure``): counted as this lane's."""
        if isinstance(error, UpstreamError):
            self.metrics.upstream_error(error.kind)


class Lanes:
    """The lanes of one process, and which one a request uses."""

    def __init__(self, lanes: Sequence[Lane], grants: ClientProfiles = (),
                 header: str = "X-Repairy-Credential") -> None:
        #: The credential header's name, made case-insensitive once (a lookup per request).
        self.header = istr(header)
        self.by_name = {lane.name: lane for lane in lanes}
        self.default = self.by_name[DEFAULT_PROFILE]
        self.single = len(self.by_name) == 1
        everyone = dict(grants).get("*", (DEFAULT_PROFILE,))
        self._any = (frozenset(everyone), self.by_name[everyone[0]])
        self._grants = {client: (frozenset(names), self.by_name[names[0]])
                        for client, names in grants if client != "*"}

    def __iter__(self) -> Iterator[Lane]:
        return iter(self.by_name.values())

    def choose(self, requested: str | None, client: str, keyed: bool) -> Lane:
        """The lane of a request: the one named in the credential header (``requested``),
        else the client's default. With client keys (``keyed``) a profile the client may not
        use and an unknown one are both 403 ``credential_not_allowed`` (names cannot be
        probed); without, an unknown one is 400 ``unknown_credential``."""
        if not keyed:
            if requested is None:
                return self.default
            lane = self.by_name.get(requested.strip())
            if lane is None:
                raise UnknownCredential("the credential header names no configured profile")
            return lane
        allowed, default = self._grants.get(client, self._any)
        if requested is None:
            return default
        name = requested.strip()
        if name not in allowed or name not in self.by_name:
            raise CredentialNotAllowed("this client may not use the credential it asked for")
        return self.by_name[name]

