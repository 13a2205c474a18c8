"""One credential profile's view of the metrics: every token, probe, fleet and upstream series
it touches carries ``credential="<profile>"`` (a label bounded by the configured profiles).

The view is the token manager's, the probe's and the fleet's event sink (``TokenEvents``,
``VerdictEvents``, ``FleetEvents``) and what the request path counts upstream answers with.
The families themselves live on :class:`gateway.metrics.Metrics` (:class:`Families` is what
this module needs of it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.metrics_counts import CountedCounter, CountedHistogram
from gateway.token.value import RenewalKind, Token

NS: Final = "repairy_gateway"
#: Refusals the probe can confirm (each exported from the start, 0 until confirmed).
REFUSALS: Final = ("partner_refused", "credentials_refused")


class Families(Protocol):
    """The labelled families a view writes to (``gateway.metrics.Metrics`` has them)."""

    registry: CollectorRegistry
    renewals: Counter
    renewal_duration: Histogram
    token_expiry: Gauge
    refresh_expiry: Gauge
    token_generation: Gauge
    last_renewal_success: Gauge
    invalidations: Counter
    persistent_401: Counter
    store_adoptions: Counter
    store_lease_waits: Counter
    store_errors: Counter
    store_up: Gauge | None
    store_key_mismatch: Gauge | None
    upstream_requests: CountedCounter
    upstream_duration: CountedHistogram
    upstream_errors: Counter
    replayed: Counter
    retries: Counter
    retry_budget_exhausted: Counter
    breaker_state: Gauge
    breaker_opened: Counter
    upstream_slots_in_use: Gauge
    probes: Counter
    upstream_refused: Gauge
    credential_contention: Counter
    credential_contention_active: Gauge
    credential_ready: Gauge


class CredentialMetrics:
    """The metrics of one credential profile (made by ``Metrics.credential(name)``)."""

    def __init__(self, families: Families, name: str) -> None:
        self.f = families
        self.name = name
        f = families
        # Exported from the start: a dashboard shows the profile before its first token.
        f.token_expiry.labels(name).set(0)
        f.refresh_expiry.labels(name).set(0)
        for reason in REFUSALS:
            f.upstream_refused.labels(name, reason).set(0)
        self._upstream_children: dict[tuple[str, str, int],
                                      tuple[list[float], list[float], Any]] = {}

    # -- bound gauges ----------------------------------------------------------------------
    def bind_contention(self, contended: Callable[[], bool]) -> None:
        self.f.credential_contention_active.labels(self.name).set_function(
            lambda: 1.0 if contended() else 0.0)

    def bind_ready(self, ready: Callable[[], bool]) -> None:
        self.f.credential_ready.labels(self.name).set_function(lambda: 1.0 if ready() else 0.0)

    def bind_breaker(self, state: Callable[[], float]) -> None:
        self.f.breaker_state.labels(self.name).set_function(state)

    def bind_slots(self, in_use: Callable[[], float]) -> None:
        self.f.upstream_slots_in_use.labels(self.name).set_function(in_use)

    # -- TokenEvents -------------------------------------------------------------------------
    def renewal(self, kind: RenewalKind, ok: bool, reason: str, seconds: float) -> None:
        self.f.renewals.labels(self.name, kind, "success" if ok else "failure", reason).inc()
        self.f.renewal_duration.labels(self.name, kind).observe(seconds)

    def token_changed(self, token: Token | None) -> None:
        f, name = self.f, self.name
        if token is None:
            f.token_expiry.labels(name).set(0)
            f.refresh_expiry.labels(name).set(0)
            return
        f.token_expiry.labels(name).set(token.wall(token.expires_at))
        f.refresh_expiry.labels(name).set(token.wall(token.refresh_expires_at)
                                          if token.refresh_expires_at is not None else 0)
        f.token_generation.labels(name).set(token.generation)
        f.last_renewal_success.labels(name).set(token.obtained_wall)

    def invalidated(self, reason: str) -> None:
        self.f.invalidations.labels(self.name, reason).inc()

    def contention(self, began: bool) -> None:
        if began:
            self.f.credential_contention.labels(self.name).inc()

    # -- VerdictEvents -----------------------------------------------------------------------
    def probed(self, outcome: str) -> None:
        self.f.probes.labels(self.name, outcome).inc()

    def refusal(self, reason: str | None) -> None:
        for known in REFUSALS:
            self.f.upstream_refused.labels(self.name, known).set(1 if known == reason else 0)

    # -- FleetEvents -------------------------------------------------------------------------
    def adopted(self) -> None:
        self.f.store_adoptions.labels(self.name).inc()

    def lease_wait(self) -> None:
        self.f.store_lease_waits.labels(self.name).inc()

    def store_error(self, op: str) -> None:
        self.f.store_errors.labels(self.name, op).inc()

    def store_is_up(self, up: bool) -> None:
        """The store answers this profile's fleet (registered on the first report: absent
        without a store, where a 0 would read as "down")."""
        if self.f.store_up is None:
            self.f.store_up = Gauge(f"{NS}_store_up", "1 while the shared token store "
                                    "answers (0: down; absent without a store).",
                                    ["credential"], registry=self.f.registry)
        self.f.store_up.labels(self.name).set(1 if up else 0)
        self._mismatch_gauge()

    def _mismatch_gauge(self) -> Gauge:
        if self.f.store_key_mismatch is None:
            self.f.store_key_mismatch = Gauge(
                f"{NS}_store_key_mismatch", "1 while the profile's fleet token entry is live "
                "but sealed with another GATEWAY_STORE_KEY (this replica answers 503 "
                "store_key_mismatch for it and never logs in; absent without a store).",
                ["credential"], registry=self.f.registry)
        return self.f.store_key_mismatch

    def key_mismatch(self, on: bool) -> None:
        self._mismatch_gauge().labels(self.name).set(1 if on else 0)

    # -- upstream (per request: label children are looked up once, then kept) ---------------
    def upstream_response(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._upstream_children.get(key)
        if children is None:
            kind = ("status_5xx" if status >= 500 else
                    f"status_{status}" if status in (401, 429) else None)
            f = self.f
            children = self._upstream_children[key] = (
                f.upstream_requests.cell(self.name, method, route, str(status)),
                f.upstream_duration.cell(self.name, method, route),
                f.upstream_errors.labels(self.name, kind) if kind else None)
        count, duration, error = children
        count[0] += 1
        self.f.upstream_duration.observe(duration, seconds)
        if error is not None:
            error.inc()

    def upstream_error(self, kind: str) -> None:
        self.f.upstream_errors.labels(self.name, kind).inc()

    def replayed(self, reason: str) -> None:
        self.f.replayed.labels(self.name, reason).inc()

    def retried(self, reason: str) -> None:
        self.f.retries.labels(self.name, reason).inc()

    def budget_exhausted(self) -> None:
        self.f.retry_budget_exhausted.labels(self.name).inc()

    def breaker_opened(self) -> None:
        self.f.breaker_opened.labels(self.name).inc()

    def marked_persistent_401(self, route: str) -> None:
        self.f.persistent_401.labels(self.name, route).inc()
