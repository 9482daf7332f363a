"""The indexer's benchmark scripts still run (in their quick modes: tiny model, CPU, a few images)."""

from __future__ import annotations

import pytest

from bench import bench_index, gpu_throughput

pytestmark = pytest.mark.slow


def test_bench_index_quick_reports_the_three_throughputs(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_index.main(["--quick"])
    assert len(result["batches"]) == 3  # 24 images in batches of 8, each next to its own baselines
    assert min(result["encode_only_img_s"], result["seed_loop_img_s"], result["clipdex_index_img_s"]) > 0
    assert "clipdex index" in capsys.readouterr().out


def test_gpu_throughput_quick_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    result = gpu_throughput.main(["--quick", "--gpu-decode"])
    assert result["device"] == "cpu" and result["gpu_decode_end_to_end_img_s"] is None
    assert min(result["end_to_end_img_s"], result["encode_only_img_s"], result["decode_only_img_s"]) > 0
    assert "end to end" in capsys.readouterr().out
