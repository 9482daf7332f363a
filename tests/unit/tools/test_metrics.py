"""The Prometheus text rendering of counters and histograms."""

from __future__ import annotations

from tools.metrics import Counter, Histogram


def test_counter_renders_labelled_values_with_escaping() -> None:
    counter = Counter("x_total", "Things.", ("route", "status"))
    counter.inc("/a", "200")
    counter.inc("/a", "200")
    counter.inc('/b"\n', "404", amount=0.5)
    lines = counter.render()
    assert lines[:2] == ["# HELP x_total Things.", "# TYPE x_total counter"]
    assert 'x_total{route="/a",status="200"} 2' in lines
    assert 'x_total{route="/b\\"\\n",status="404"} 0.5' in lines


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    hist = Histogram("lat_seconds", "Latency.", ("kind",), buckets=(0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 2.0):
        hist.observe(value, "text")
    lines = hist.render()
    assert 'lat_seconds_bucket{kind="text",le="0.01"} 2' in lines  # le is inclusive
    assert 'lat_seconds_bucket{kind="text",le="0.1"} 3' in lines
    assert 'lat_seconds_bucket{kind="text",le="1"} 3' in lines
    assert 'lat_seconds_bucket{kind="text",le="+Inf"} 4' in lines
    assert 'lat_seconds_count{kind="text"} 4' in lines
    assert any(line.startswith('lat_seconds_sum{kind="text"} 2.06') for line in lines)
    assert hist.count("text") == 4 and hist.count("image") == 0
