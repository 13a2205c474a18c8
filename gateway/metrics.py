"""Prometheus metrics: every family the gateway exports, on an injected registry.

The token, probe, fleet and upstream families carry a ``credential`` label, written through
one profile's view (:meth:`Metrics.credential`, :mod:`gateway.metrics_credential`). Label
values come from fixed sets (profiles, renewal reasons, error kinds, route templates,
standard methods, HTTP status codes): never a raw path, a token or a secret.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from gateway import __version__
from gateway.metrics_counts import CountedCounter, CountedHistogram
from gateway.metrics_credential import REFUSALS, CredentialMetrics
from gateway.metrics_merge import merge_expositions

__all__ = ["REFUSALS", "REQUEST_BUCKETS", "CredentialMetrics", "Metrics"]

NS = "repairy_gateway"
# The *_created series double the exposition for no alerting value; this process owns the
# client library, so switch them off for all registries.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RENEWAL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: What callers feel, 5 ms to 30 s: the latency SLO's threshold is one of these boundaries.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:  # process_*, python_gc_*, python_info: for the real server, not tests
            process_collector.ProcessCollector(registry=r)
            platform_collector.PlatformCollector(registry=r)
            gc_collector.GCCollector(registry=r)
        self.renewals = Counter(f"{NS}_token_renewals", "Token logins and refreshes by outcome.",
                                ["credential", "kind", "outcome", "reason"], registry=r)
        self.renewal_duration = Histogram(
            f"{NS}_token_renewal_duration_seconds", "Duration of login and refresh calls.",
            ["credential", "kind"], buckets=_RENEWAL_BUCKETS, registry=r)
        self.token_expiry = Gauge(f"{NS}_token_expiry_timestamp_seconds",
                                  "Unix time the current access token expires (0: none).",
                                  ["credential"], registry=r)
        self.refresh_expiry = Gauge(
            f"{NS}_refresh_token_expiry_timestamp_seconds",
            "Unix time the current refresh token expires (0: none held).", ["credential"],
            registry=r)
        self.token_generation = Gauge(f"{NS}_token_generation",
                                      "Generation number of the current token.",
                                      ["credential"], registry=r)
        self.last_renewal_success = Gauge(
            f"{NS}_token_last_renewal_success_timestamp_seconds",
            "Unix time of the last successful login or refresh.", ["credential"], registry=r)
        self.invalidations = Counter(f"{NS}_token_invalidations",
                                     "Tokens dropped before expiry, by reason.",
                                     ["credential", "reason"],
                                     registry=r)
        self.persistent_401 = Counter(
            f"{NS}_persistent_401", "Times a route was marked persistent 401 (it refused a "
            "brand-new token too; its 401s then pass back without renewing), by route template.",
            ["credential", "route"], registry=r)
        self.store_adoptions = Counter(
            f"{NS}_store_adoptions", "Tokens adopted from the shared store (renewed by another "
            "replica).", ["credential"], registry=r)
        self.store_lease_waits = Counter(
            f"{NS}_store_lease_waits", "Renewals this replica left to the replica holding the "
            "fleet's lease.", ["credential"], registry=r)
        self.store_errors = Counter(
            f"{NS}_store_errors", "Failed operations on the shared token store, by operation.",
            ["credential", "op"], registry=r)
        #: Registered on the first report of a store (absent without one: a 0 would read as
        #: "down" on a dashboard).
        self.store_up: Gauge | None = None
        self.store_key_mismatch: Gauge | None = None
        self.credential_reloads = Counter(
            f"{NS}_credential_reloads", "Credential file checks that found a change, by "
            "outcome (success: switched; failure: kept the old ones).", ["outcome"], registry=r)
        # The families every request touches are counted in plain Python (metrics_counts).
        self.upstream_requests = CountedCounter(
            f"{NS}_upstream_requests", "Upstream responses received (replays included).",
            ["credential", "method", "route", "status"], r)
        self.upstream_duration = CountedHistogram(
            f"{NS}_upstream_request_duration_seconds",
            "Time from sending a request upstream to receiving its response headers.",
            ["credential", "method", "route"], _LATENCY_BUCKETS, r)
        self.upstream_errors = Counter(
            f"{NS}_upstream_errors",
            "Upstream failures: connect, timeout, tls, protocol, status_5xx, status_429, "
            "status_401.", ["credential", "kind"], registry=r)
        self.replayed = Counter(f"{NS}_requests_replayed",
                                "Requests sent again upstream, by reason.",
                                ["credential", "reason"],
                                registry=r)
        self.retries = Counter(
            f"{NS}_retries", "Upstream retries, by reason: connection_refused, "
            "connection_reset (a reused keep-alive connection failed before the status line), "
            "status_<code> (GATEWAY_RETRY_ON_STATUS).", ["credential", "reason"], registry=r)
        self.retry_budget_exhausted = Counter(
            f"{NS}_retry_budget_exhausted", "Retries the policy allowed but the retry budget "
            "refused (the first answer or error was passed back).", ["credential"],
            registry=r)
        self.breaker_state = Gauge(
            f"{NS}_circuit_breaker_state", "Upstream circuit breaker: 0 closed, 1 half-open "
            "(probing), 2 open (answering 503 upstream_circuit_open). With workers: the most "
            "open of them. A breaker guards a base URL: profiles sharing one show the same.",
            ["credential"], registry=r)
        self.breaker_opened = Counter(
            f"{NS}_circuit_breaker_opened", "Times the upstream circuit breaker opened (counted "
            "for each profile on its base URL).", ["credential"], registry=r)
        self.limited = Counter(
            f"{NS}_limited_requests", "Requests refused by a gateway limit: rate (429), "
            "client_rate (429), client_concurrency (429 client_busy), upstream_slots (503 "
            "upstream_busy), by client.", ["limit", "client"], registry=r)
        self.cache_requests = Counter(
            f"{NS}_cache_requests", "GET cache lookups on cached routes: hit, shared_hit "
            "(found in the fleet's Redis), miss, coalesced (answered from a concurrent miss's "
            "upstream call), bypass (Cache-Control: no-cache).", ["result"], registry=r)
        self.cache_shared_errors = Counter(
            f"{NS}_cache_shared_errors", "Shared GET cache operations that failed (get, set, "
            "decode): each counted as a miss, never a failed request.", ["op"], registry=r)
        self.cache_stored = Counter(
            f"{NS}_cache_stored", "Answers the GET cache kept.", registry=r)
        self.cache_shared_evictions = Counter(
            f"{NS}_cache_shared_evictions", "Answers the shared GET cache dropped from Redis to "
            "stay within GATEWAY_CACHE_SHARED_MAX_BYTES (the soonest to expire first).",
            registry=r)
        self.cache_evictions = Counter(
            f"{NS}_cache_evictions", "Answers the GET cache dropped for room (not expiry).",
            registry=r)
        self.cache_bytes = Gauge(f"{NS}_cache_bytes", "Memory the GET cache holds.",
                                 registry=r)
        self.cache_entries = Gauge(f"{NS}_cache_entries", "Answers the GET cache holds.",
                                   registry=r)
        self.idempotency_requests = Counter(
            f"{NS}_idempotency_requests", "Requests with an Idempotency-Key on a protected "
            "route: new (sent), replayed (the kept answer), in_flight (409), "
            "idempotency_key_mismatch (422), outcome_unknown (502), idempotent_answer_not_kept "
            "(409).", ["result"], registry=r)
        self.idempotency_settled = Counter(
            f"{NS}_idempotency_settled", "How keys of sent requests settled: done (answer "
            "kept), not_kept (too large), unknown (the upstream may have acted), released "
            "(nothing done: a retry may send).", ["state"], registry=r)
        self.idempotency_evictions = Counter(
            f"{NS}_idempotency_evictions", "Kept answers dropped for room before their time "
            "(in-process store).", registry=r)
        self.idempotency_bytes = Gauge(
            f"{NS}_idempotency_bytes", "Memory the in-process Idempotency-Key store holds.",
            registry=r)
        self.idempotency_entries = Gauge(
            f"{NS}_idempotency_entries", "Keys the in-process Idempotency-Key store holds.",
            registry=r)
        self.channel_faults = Counter(
            f"{NS}_channel_faults", "Faults on the channels between the supervisor and its "
            "workers: malformed (a message skipped), overflow (a peer stopped reading: the "
            "worker is restarted), framing (the channel ended).", ["fault"], registry=r)
        self.upstream_slots_in_use = Gauge(
            f"{NS}_upstream_slots_in_use", "Upstream exchanges in progress (bounded by "
            "GATEWAY_UPSTREAM_CONCURRENCY or GATEWAY_POOL_SIZE, per profile).", ["credential"],
            registry=r)
        self.responses = CountedCounter(
            f"{NS}_responses", "Responses to callers: source=upstream (passed through) or "
            "gateway (made by the gateway, with its error code).",
            ["source", "status", "code"], r)
        self.client_requests = CountedCounter(
            f"{NS}_client_requests", "Admitted requests by client name (from the client key; "
            "'anonymous' when no keys are configured).", ["client"], r)
        self.inflight = Gauge(f"{NS}_inflight_requests", "Proxied requests in progress.",
                              registry=r)
        #: The value behind ``inflight`` (a plain count: no lock per request).
        self.inflight_count = 0
        self.inflight.set_function(lambda: float(self.inflight_count))
        self.ready = Gauge(f"{NS}_ready", "1 while ready to serve (a usable token, no refusal "
                           "confirmed by the probe, not draining).", registry=r)
        self.request_duration = CountedHistogram(
            f"{NS}_request_duration_seconds", "What callers feel: from the request's arrival "
            "to its answer's last byte, gateway included, by route template, method and "
            "status class (499: the caller left).", ["route", "method", "code_class"],
            REQUEST_BUCKETS, r)
        self.probes = Counter(
            f"{NS}_probes", "Probes of GATEWAY_CHECK_PATH by outcome: ok, partner_refused "
            "(403), token_refused (401), inconclusive (no answer, 5xx, 429, other).",
            ["credential", "outcome"], registry=r)
        self.upstream_refused = Gauge(
            f"{NS}_upstream_refused", "1 while the probe confirms that Repairy refuses the "
            "configuration (/readyz is 503 with this reason).", ["credential", "reason"],
            registry=r)
        self.credential_contention = Counter(
            f"{NS}_credential_contention", "Times credential contention began: tokens revoked "
            "by logins elsewhere (someone else uses these credentials).", ["credential"],
            registry=r)
        self.credential_contention_active = Gauge(
            f"{NS}_credential_contention_active", "1 while credential contention lasts "
            "(logins slowed to one per GATEWAY_LOGIN_RETRY_INTERVAL).", ["credential"],
            registry=r)
        self.credential_ready = Gauge(
            f"{NS}_credential_ready", "1 while the profile holds a usable token and the probe "
            "confirms no refusal (readiness waits only for required profiles).",
            ["credential"], registry=r)
        build = Gauge(f"{NS}_build_info", "Build information.", ["version", "python_version"],
                      registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        self._sources: list[Callable[[], list[str]]] = []
        # Label children by label values (all from bounded sets: methods, route templates,
        # statuses, error codes, configured client names).
        self._credentials: dict[str, CredentialMetrics] = {}
        self._response_children: dict[tuple[str, int, str], list[float]] = {}
        self._client_children: dict[str, list[float]] = {}
        self._request_children: dict[tuple[str, str, int], list[float]] = {}

    def bind_ready(self, is_ready: Callable[[], bool]) -> None:
        self.ready.set_function(lambda: 1.0 if is_ready() else 0.0)

    def credential(self, name: str) -> CredentialMetrics:
        """The view of one credential profile (made once: its label children are kept)."""
        view = self._credentials.get(name)
        if view is None:
            view = self._credentials[name] = CredentialMetrics(self, name)
        return view

    def add_source(self, source: Callable[[], list[str]]) -> None:
        """Expositions of other processes (workers) to add into :meth:`render`."""
        self._sources.append(source)

    def render(self) -> bytes:
        own = generate_latest(self.registry)
        texts = [text for source in self._sources for text in source()]
        if not texts:
            return own
        return merge_expositions([own.decode(), *texts])  # with workers: once per scrape

    def response(self, source: str, status: int, code: str) -> None:
        key = (source, status, code)
        child = self._response_children.get(key)
        if child is None:
            child = self._response_children[key] = self.responses.cell(source, str(status),
                                                                        code)
        child[0] += 1

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        """One request answered (or left: 499), as the caller felt it."""
        key = (method, route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.request_duration.cell(
                route, method, f"{status // 100}xx")
        self.request_duration.observe(child, seconds)

    def client_request(self, client: str) -> None:
        child = self._client_children.get(client)
        if child is None:
            child = self._client_children[client] = self.client_requests.cell(client)
        child[0] += 1
