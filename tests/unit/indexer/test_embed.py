"""Decoding overlapped with the model, within a bounded window."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from indexer.embed import decode_and_embed
from shared.errors import ImageRejected


async def test_decoding_overlaps_the_model_and_stays_within_its_window() -> None:
    sub_batch, window = 4, 8
    second_batch_decoding = threading.Event()
    lock = threading.Lock()
    decoded: list[int] = []
    encoded = 0
    ahead: list[int] = []
    overlapped: list[bool] = []

    def decode(data: bytes) -> torch.Tensor:
        i = data[0]
        if i >= sub_batch:
            second_batch_decoding.set()
        with lock:
            decoded.append(i)
            ahead.append(len(decoded) - encoded)
        if i == 5:
            raise ImageRejected("not an image")
        return torch.full((3,), float(i))

    def encode(batch: torch.Tensor) -> np.ndarray:
        nonlocal encoded
        if not overlapped:  # the first call waits for the pool to start on the next sub-batch
            overlapped.append(second_batch_decoding.wait(timeout=10))
        with lock:
            encoded += len(batch)
        return batch.numpy().astype(np.float32)

    items = [(i, bytes([i])) for i in range(14)]
    with ThreadPoolExecutor(2) as decode_pool, ThreadPoolExecutor(1) as model_pool:
        out = await decode_and_embed(
            items, decode, encode, decode_pool=decode_pool, model_pool=model_pool, sub_batch=sub_batch, window=window
        )
    assert overlapped == [True]
    assert max(ahead) <= window + sub_batch  # bounded: never the whole batch decoded ahead of the model
    assert sorted(out.vectors) == [i for i in range(14) if i != 5]
    assert all(out.vectors[i][0] == i for i in out.vectors)
    assert list(out.failures) == [5] and "not an image" in str(out.failures[5])
    assert out.model_calls == 4
