"""Metric families that every request touches, counted in plain Python and exported at scrape.

A ``prometheus_client`` counter takes a lock and runs a few Python frames per increment, and
its histogram walks its buckets in Python: with five families a request, that was some 5 % of
the gateway's CPU. Here a label set's values are one list (a "cell") that the request path
adds to directly (``cell[0] += 1``; a histogram's bucket is found by ``bisect``, in C); the
families are built from the cells when the registry is collected. The exposition is the same
as ``prometheus_client``'s own ``Counter`` and ``Histogram`` would write (a property test
holds it to that). The cells are written and read on the event loop's thread only (the
request path, the ``/metrics`` handler, a worker's push), so no lock is taken.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString


class CountedCounter:
    """A counter family: ``cell(*labels)[0] += n``."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self._cells: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def cell(self, *labels: str) -> list[float]:
        """The label set's cell (made on first use; keep it: it is the same list later)."""
        found = self._cells.get(labels)
        if found is None:
            found = self._cells[labels] = [0.0]
        return found

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.doc, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, cell in self._cells.items():
            family.add_metric(list(labels), cell[0])
        return [family]


class CountedHistogram:
    """A histogram family: :meth:`observe` into a cell ``[sum, bucket counts..., +Inf]``."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        self._cells: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def cell(self, *labels: str) -> list[float]:
        found = self._cells.get(labels)
        if found is None:
            found = self._cells[labels] = [0.0] * (len(self.bounds) + 2)
        return found

    def observe(self, cell: list[float], value: float) -> None:
        """One observation: counted in the first bucket whose bound is at least ``value``
        (``prometheus_client``'s rule), or +Inf. (A NaN, which no duration is, lands in the
        first bucket; ``prometheus_client`` counts it in none.)"""
        cell[0] += value
        cell[bisect_left(self.bounds, value) + 1] += 1

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, cell in self._cells.items():
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, cell[1:], strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, cell[0])
        return [family]
