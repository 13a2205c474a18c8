"""The per-request families counted in plain Python export exactly what prometheus_client's own
Counter and Histogram would, for any observations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import REQUEST_BUCKETS
from gateway.metrics_counts import CountedCounter, CountedHistogram

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

_labels = st.tuples(st.sampled_from(["GET", "POST", "PATCH"]),
                    st.sampled_from(["/bookings/{id}", "/workshops", "other", 'q"\\\n']))
_seconds = st.one_of(st.floats(min_value=0, max_value=100),
                     st.sampled_from([0.0, *REQUEST_BUCKETS, 1e-9, 30.000001, 1e6]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_labels, _seconds), max_size=60))
def test_metrics_counts_export_what_prometheus_client_would(
        observations: list[tuple[tuple[str, str], float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = CountedCounter("x_requests", "Requests, \"quoted\" and \\ escaped.",
                             ["method", "route"], ours)
    histogram = CountedHistogram("x_duration_seconds", "Durations.", ["method", "route"],
                                 REQUEST_BUCKETS, ours)
    ref_counter = Counter("x_requests", "Requests, \"quoted\" and \\ escaped.",
                          ["method", "route"], registry=theirs)
    ref_histogram = Histogram("x_duration_seconds", "Durations.", ["method", "route"],
                              buckets=REQUEST_BUCKETS, registry=theirs)
    for labels, seconds in observations:
        counter.cell(*labels)[0] += 1
        histogram.observe(histogram.cell(*labels), seconds)
        ref_counter.labels(*labels).inc()
        ref_histogram.labels(*labels).observe(seconds)
    assert generate_latest(ours) == generate_latest(theirs)


def test_metrics_counts_cells_are_kept_per_label_set() -> None:
    registry = CollectorRegistry()
    counter = CountedCounter("y", "Y.", ["a"], registry)
    cell = counter.cell("one")
    assert counter.cell("one") is cell and counter.cell("two") is not cell
    cell[0] += 2
    assert registry.get_sample_value("y_total", {"a": "one"}) == 2.0
    assert registry.get_sample_value("y_total", {"a": "two"}) == 0.0
