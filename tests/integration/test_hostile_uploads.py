"""Hostile uploads through a real `clipdex serve` process: every one gets an answer, and the server's
memory stays bounded (issue 9: six of them grew it by 4.4 GB or more). That uploads, thumbnails and the
indexer share one decode budget is tested in-process, in tests/unit/test_decode_budget.py; the bench
(bench/bench_hostile_uploads.py) also measures the old code and a small budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_hostile_uploads import ROOT, hostile_uploads, serve_and_upload

pytestmark = pytest.mark.integration

GB = 2**30


def test_six_concurrent_hostile_uploads_get_answers_within_bounded_memory(tmp_path: Path) -> None:
    outcome = serve_and_upload(ROOT, tmp_path, hostile_uploads())
    assert all(s == 200 or 400 <= s < 500 for s in outcome.statuses), outcome
    assert outcome.statuses.count(200) == 3  # the 16-bit PNGs are within the limits: they are searched
    assert all("supported format" in e for e in outcome.errors if e), outcome.errors  # the ICOs
    assert outcome.growth < 1.2 * GB, f"peak RSS grew by {outcome.growth / 2**20:,.0f} MB"
