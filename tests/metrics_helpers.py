"""Reading the gateway's metrics in tests: the default credential profile's series unless a
test names another (the token, probe, store and upstream families carry ``credential``)."""

from __future__ import annotations

import re
from typing import Final

from prometheus_client import CollectorRegistry

#: The families labelled by credential profile (gateway.metrics_credential).
CREDENTIAL_FAMILIES: Final = re.compile(
    r"^repairy_gateway_(token_renewals|token_renewal_duration_seconds|"
    r"token_expiry_timestamp_seconds|refresh_token_expiry_timestamp_seconds|token_generation|"
    r"token_last_renewal_success_timestamp_seconds|token_invalidations|persistent_401|"
    r"store_adoptions|store_lease_waits|store_errors|upstream_requests|"
    r"upstream_request_duration_seconds|upstream_errors|requests_replayed|retries|"
    r"retry_budget_exhausted|circuit_breaker_state|circuit_breaker_opened|"
    r"upstream_slots_in_use|probes|upstream_refused|credential_contention|store_up|"
    r"store_key_mismatch|"
    r"credential_contention_active|credential_ready)(_total|_count|_sum|_bucket|_created)?$")


def value(registry: CollectorRegistry, name: str,
          labels: dict[str, str] | None = None) -> float | None:
    """``registry.get_sample_value``, with ``credential="default"`` added for a family that
    carries it (unless given)."""
    labels = dict(labels or {})
    if CREDENTIAL_FAMILIES.match(name):
        labels.setdefault("credential", "default")
    return registry.get_sample_value(name, labels)
