"""The lock-free inter-token histogram exposes exactly what prometheus_client's Histogram would
for the same observations: same buckets (le as <=), count and sum, per label set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from llmserve.observability.loop_histogram import LoopHistogram

BUCKETS = (0.001, 0.0025, 0.01, 0.1, 1, 10)
# On a bound, between bounds, below the first, above the last.
VALUES = {"a": [0.001, 0.0011, 0.02, 0.1, 50.0, 0.0], "b": [1.0, 1.0000001]}


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if not line.startswith("#") and "_created" not in line
    ]


def test_same_exposition_as_prometheus_client_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("itl_seconds", "doc", ["model"], BUCKETS, registry=ours)
    reference = Histogram("itl_seconds", "doc", ["model"], buckets=BUCKETS, registry=theirs)
    for model, values in VALUES.items():
        for value in values:
            loop.labels(model).observe(value)
            reference.labels(model).observe(value)

    assert exposition(ours) == exposition(theirs)
    assert 'itl_seconds_bucket{le="0.001",model="a"} 2.0' in exposition(ours)


def test_a_label_set_is_one_child() -> None:
    histogram = LoopHistogram("h", "doc", ["model"], BUCKETS, registry=None)
    assert histogram.labels("m") is histogram.labels("m")
    assert histogram.labels("m") is not histogram.labels("n")
