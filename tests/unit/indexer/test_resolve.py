"""The pipeline's stages on their own: resolve's rules as pure functions, and decoding overlapped with the
model within a bounded window."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from indexer.decode import decode_pool
from indexer.embed import decode_and_embed
from indexer.events import Event
from indexer.pipeline import embed_batch_for
from indexer.records import Record
from indexer.resolve import Fetched, Work, classify, pending_ids, plan
from shared.errors import ImageRejected
from shared.roles import StoredState


def rec(item_id: str, op: str = "upsert", version: int | None = None, source: str = "kafka") -> Record:
    event = Event(op=op, id=item_id, uri=None if op == "delete" else f"{item_id}.jpg", version=version)  # type: ignore[arg-type]
    return Record(source, event.model_dump_json(), event)


def test_ids_are_namespaced_by_source() -> None:
    assert pending_ids([rec("a"), rec("a", source="folder"), Record("kafka", "junk", None, "bad")]) == [
        "folder:a",
        "kafka:a",
    ]


def test_plan_sorts_a_batch() -> None:
    stored = {"kafka:old": StoredState("h", 9, "indexed", True)}
    batch = plan(
        [rec("a"), rec("gone", "delete"), rec("old", version=3), Record("kafka", "junk", None, "not JSON"), rec("a")],
        stored,
    )
    assert [w.item_id for w in batch.upserts] == ["kafka:a"]
    assert [w.item_id for w in batch.deletes] == ["kafka:gone"]
    assert [w.item_id for w in batch.skipped] == ["kafka:old"]
    assert batch.superseded == 1
    assert [f.reason for f in batch.invalid] == ["InvalidEvent: not JSON"]
    assert batch.invalid[0].record.raw == "junk" and batch.invalid[0].dead_letter().payload == "junk"


def test_an_equal_version_is_not_older() -> None:
    stored = {"kafka:a": StoredState("h", 3, "indexed", True)}
    assert [w.item_id for w in plan([rec("a", version=3)], stored).upserts] == ["kafka:a"]
    assert plan([rec("a", version=None)], stored).upserts  # no version: never older


def _fetched(item_id: str, sha: str, stored: StoredState | None = None) -> Fetched:
    record = rec(item_id)
    assert record.event is not None
    return Fetched(Work(f"kafka:{item_id}", record, record.event, stored), b"", sha)


def test_classify_by_content_hash() -> None:
    vec = np.ones(4, np.float32)
    out = classify(
        [
            _fetched("same", "h1", StoredState("h1", None, "indexed", True)),
            _fetched("failed-before", "h2", StoredState("h2", None, "failed", False)),
            _fetched("renamed", "h3"),
            _fetched("new", "h4"),
            _fetched("copy-of-new", "h4"),
        ],
        known={"h3": vec},
    )
    assert [f.work.item_id for f in out.unchanged] == ["kafka:same"]
    assert [f.work.item_id for f, _ in out.reused] == ["kafka:renamed"]
    assert [f.work.item_id for f in out.to_embed] == ["kafka:failed-before", "kafka:new"]
    assert [f.work.item_id for f in out.copies] == ["kafka:copy-of-new"]


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


def test_the_cpu_embeds_whole_micro_batches_and_a_gpu_overlaps_quarters() -> None:
    assert embed_batch_for(64, "cpu") == 64  # a CPU model is much slower in small batches
    assert embed_batch_for(256, "cuda") == 64  # the GPU encodes a quarter while the CPU decodes the next
    assert embed_batch_for(64, "cuda") == 32
    assert embed_batch_for(8, "cuda") == 8


def test_decode_threads_run_torch_on_one_core_and_leave_the_model_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    def process_wide(n: int) -> None:
        raise AssertionError("torch.set_num_threads halves the model's speed in the other threads")

    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", process_wide)
    with decode_pool(2) as pool:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(8))) == {1}
    assert torch.get_num_threads() == before
