"""Counters and histograms of the delivery path, kept in plain numbers and exported when scraped.

Each replay updates six metrics. prometheus_client's ``Counter.inc`` and
``Histogram.observe`` check the metric, take a lock and (a histogram) walk its
buckets one by one: with them, a source spent ~7 µs of its ~80 µs per delivery
on metrics (perf/profiling.md). These families add a plain number per update
and build the same samples when a scrape (or a test) collects the registry.
The processes that use them update them from one thread, their event loop's.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class Count:
    """One label set's counter."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class Distribution:
    """One label set's histogram: a count per bucket (not cumulative until collected) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount
        self.sum += amount


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if not self.labelnames:  # exported at zero from the start, as prometheus_client does
            self.labels()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str):
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        values = tuple(str(value) for value in values)
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._child()
        return child

    def remove(self, *values: str) -> None:
        del self._children[tuple(str(value) for value in values)]

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _child(self):
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError


class CounterFamily(_Family):
    """Like ``prometheus_client.Counter``: ``labels(...).inc()``, samples ``<name>_total`` and ``<name>_created``."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def _child(self) -> Count:
        return Count()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> list[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created)
        return [family]


class HistogramFamily(_Family):
    """Like ``prometheus_client.Histogram``: ``labels(...).observe(x)``, samples ``_bucket``, ``_count``, ``_sum``."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: CollectorRegistry | None = None, *, buckets: Sequence[float]) -> None:
        bounds = sorted(float(bound) for bound in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self.bound_labels = tuple(floatToGoString(bound) for bound in self.bounds)
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def _child(self) -> Distribution:
        return Distribution(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> list[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            total, buckets = 0, []
            for bound, count in zip(self.bound_labels, child.counts):
                total += count
                buckets.append((bound, total))
            family.add_metric(values, buckets, child.sum)
        return [family]
