"""The decode pool's threads."""

from __future__ import annotations

import pytest
import torch

from indexer.decode import decode_pool


def test_decode_threads_run_torch_on_one_core_and_leave_the_model_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    def process_wide(n: int) -> None:
        raise AssertionError("torch.set_num_threads halves the model's speed in the other threads")

    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", process_wide)
    with decode_pool(2) as pool:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(8))) == {1}
    assert torch.get_num_threads() == before
