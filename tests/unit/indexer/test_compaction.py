"""Compaction beside the indexer: on the size threshold, in the background, off the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from indexer.compaction import Compactor
from shared.roles import Upsert
from shared.sqlite.index import IndexParams
from shared.sqlite.store import SqliteStore

DIM = 8


def params(delta_size: int) -> IndexParams:
    return IndexParams("flat", 1000, None, None, 32, 64, compact_delta_size=delta_size, compact_max_age_s=3600)


def add(store: SqliteStore, n: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.apply([Upsert(f"kafka:{start + i}", "kafka", f"{i}.jpg", f"h{start + i}", {}, vectors[i]) for i in range(n)])


def test_compacts_only_past_a_threshold(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        compactor = Compactor(store, params(5), DIM, tmp_path / "index")
        add(store, 4)
        assert compactor.compact_if_needed() is None
        add(store, 1, start=4)
        result = compactor.compact_if_needed()
        assert result is not None and result.generation == 1 and result.vectors == 5
        assert store.index_meta().generation == 1 and store.delta_size(store.index_meta().high_water) == 0
        assert compactor.compact_if_needed() is None


async def test_compacts_in_the_background_while_the_loop_runs(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        compactor = Compactor(store, params(3), DIM, tmp_path / "index", check_interval_s=0.02)
        async with compactor.running():
            add(store, 3)
            deadline = time.monotonic() + 10
            while store.index_meta().generation == 0:
                assert time.monotonic() < deadline, "no compaction"
                await asyncio.sleep(0.02)
        assert compactor.compactions == 1 and (tmp_path / "index" / "main-1.faiss").exists()
