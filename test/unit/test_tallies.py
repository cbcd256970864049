"""The delivery path's plain counters and histograms export what prometheus_client's would for the same updates."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from async_component.dataplane.tallies import CounterFamily, HistogramFamily

BUCKETS = (0.005, 0.01, 0.1, 1, 10)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text a scrape gets, without the ``_created`` samples (their times differ by construction)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("observations", [
    [],
    [0.001],
    [0.005, 0.0051, 0.01, 0.5, 1.0, 10.0, 10.5, 1e9],  # on the bounds, between them and past the last
    [0.0, 0.0, 3.0],
])
def test_a_histogram_exports_the_same_buckets_count_and_sum(observations):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = HistogramFamily("req_seconds", "Seconds", ["service"], registry=ours, buckets=BUCKETS)
    reference = Histogram("req_seconds", "Seconds", ["service"], registry=theirs, buckets=BUCKETS)
    plain = HistogramFamily("plain_seconds", "Seconds", registry=ours, buckets=BUCKETS)
    plain_reference = Histogram("plain_seconds", "Seconds", registry=theirs, buckets=BUCKETS)
    for value in observations:
        mine.labels("a").observe(value)
        reference.labels("a").observe(value)
        plain.observe(value)
        plain_reference.observe(value)
    assert exposition(ours) == exposition(theirs)


def test_a_counter_exports_the_same_totals_per_label_set():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = CounterFamily("outcomes_total", "Outcomes", ["service", "outcome"], registry=ours)
    reference = Counter("outcomes_total", "Outcomes", ["service", "outcome"], registry=theirs)
    plain, plain_reference = (CounterFamily("events_total", "Events", registry=ours),
                              Counter("events_total", "Events", registry=theirs))
    for labels, amount in [(("a", "succeeded"), 1), (("a", "failed"), 2), (("b", "succeeded"), 1),
                           (("a", "succeeded"), 3)]:
        mine.labels(*labels).inc(amount)
        reference.labels(*labels).inc(amount)
    plain.inc()
    plain_reference.inc()
    assert exposition(ours) == exposition(theirs)
    assert ours.get_sample_value("outcomes_total", {"service": "a", "outcome": "succeeded"}) == 4
    assert ours.get_sample_value("outcomes_created", {"service": "b", "outcome": "succeeded"}) > 0


def test_a_removed_label_set_is_no_longer_exported_and_a_counter_never_goes_down():
    registry = CollectorRegistry()
    counter = CounterFamily("outcomes_total", "Outcomes", ["service"], registry=registry)
    counter.labels("a").inc()
    counter.remove("a")
    assert registry.get_sample_value("outcomes_total", {"service": "a"}) is None
    with pytest.raises(KeyError):
        counter.remove("a")
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("a", "b")
