"""One exposition from several processes (the supervisor's and its workers'): counters and
histograms summed, gauges by their kind (:data:`SUMMED_GAUGES`, :data:`MAX_GAUGES`, else this
process's own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

NS = "repairy_gateway"

#: Gauges that add up over processes; every other gauge is this process's own (the token's,
#: readiness, the build), the workers' copies of those are left out.
SUMMED_GAUGES = frozenset({f"{NS}_inflight_requests", f"{NS}_upstream_slots_in_use",
                           f"{NS}_cache_bytes", f"{NS}_cache_entries"})
#: Gauges whose fleet-of-workers value is the largest (any worker's open breaker shows).
MAX_GAUGES = frozenset({f"{NS}_circuit_breaker_state"})


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def counters_only(text: str) -> str:
    """The counters and histograms of an exposition (what a process that has exited leaves
    behind: its gauges meant nothing once it was gone)."""
    families = [fam for fam in text_string_to_metric_families(text) if fam.type != "gauge"]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode()


def merge_expositions(texts: list[str]) -> bytes:
    """One exposition from several: counters and histograms summed sample by sample, gauges
    from the first text (this process) except :data:`SUMMED_GAUGES` (summed) and
    :data:`MAX_GAUGES` (the largest)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, text in enumerate(texts):
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            acc = values[fam.name]
            summed = fam.type != "gauge" or fam.name in SUMMED_GAUGES
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if fam.name in MAX_GAUGES:
                    acc[key] = max(acc.get(key, sample.value), sample.value)
                elif summed:
                    acc[key] = acc.get(key, 0.0) + sample.value
                elif index == 0 or key not in acc:
                    acc[key] = sample.value
    for name, fam in families.items():
        for (sample_name, labels), value in values[name].items():
            fam.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
