"""The Prometheus text rendering of counters, histograms and the gauges of a server's status."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from shared.roles import Coverage, SearcherState
from shared.status import NO_STORE, Reembed, Status
from shared.types import ModelIdentity
from tools.metrics import Counter, Histogram, Metrics


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


def test_models_by_role_and_re_embed_progress_are_gauges() -> None:
    old, new = ModelIdentity("old", "none", 32, "a" * 32), ModelIdentity("new", "/models/x.safetensors", 16, "b" * 32)
    searcher = SearcherState(10, 0, 1, 0, time.time(), model=old)
    reembed = Reembed(new, datetime.now(tz=UTC), Coverage(total=10, done=3, failed=1), True, 2.5, 2.4, 42)
    status = Status(Path("."), True, old, NO_STORE, None, 0, [], searcher=searcher, reembed=reembed)
    lines = Metrics().render(status).splitlines()
    assert lines.count("# TYPE clipdex_model_info gauge") == 1  # one HELP and TYPE for its three series
    assert 'clipdex_model_info{role="store",name="old",pretrained="none",dim="32"} 1' in lines
    assert 'clipdex_model_info{role="answering",name="old",pretrained="none",dim="32"} 1' in lines
    assert 'clipdex_model_info{role="reembed",name="new",pretrained="…/x.safetensors",dim="16"} 1' in lines
    progress = {"items_total": "10", "items_done": "4", "items_failed": "1", "rate": "2.5", "eta_seconds": "2.4"}
    for name, value in {**progress, "running": "1", "active": "1"}.items():
        assert f"clipdex_reembed_{name} {value}" in lines
    idle = Metrics().render(Status(Path("."), True, old, NO_STORE, None, 0, [], searcher=searcher)).splitlines()
    assert "clipdex_reembed_active 0" in idle and "clipdex_reembed_eta_seconds NaN" in idle
    assert not any(line.startswith('clipdex_model_info{role="reembed"') for line in idle)
