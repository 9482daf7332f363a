"""Compaction: when a threshold is passed (size, age, deletes), and beside the indexer, in the background,
off the event loop. What a compaction builds is checked against an oracle in tests/unit/shared/sqlite."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from indexer.compaction import Compactor, compact, needs_compaction
from shared.roles import Delete, Upsert
from shared.sqlite.index import IndexParams
from shared.sqlite.spaces import SpaceLedgers
from shared.sqlite.store import SqliteStore

DIM = 8


def params(delta_size: int = 1_000_000, max_age_s: float = 3600) -> IndexParams:
    return IndexParams("flat", 1000, None, None, 32, 64, compact_delta_size=delta_size, compact_max_age_s=max_age_s)


def add(store: SqliteStore, n: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.apply([Upsert(f"kafka:{start + i}", "kafka", f"{i}.jpg", f"h{start + i}", {}, vectors[i]) for i in range(n)])


def test_needs_compaction_by_delta_size_and_by_age(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        assert not needs_compaction(store, params(10))
        add(store, 9)
        assert not needs_compaction(store, params(10))
        assert needs_compaction(store, params(10, max_age_s=1e-6))
        add(store, 1, start=9)
        assert needs_compaction(store, params(10))
        compact(store, params(), DIM, tmp_path / "index")
        assert not needs_compaction(store, params(10, max_age_s=1e-6))


def test_deletes_alone_trigger_a_compaction(tmp_path: Path) -> None:
    """A catalog that only deletes adds nothing to the delta; its tombstones must still be purged."""
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        add(store, 100)
        compact(store, params(), DIM, tmp_path / "index")
        store.apply(deletes=[Delete(f"kafka:{i}") for i in range(9)])
        assert not needs_compaction(store, params(10))
        store.apply(deletes=[Delete("kafka:9")])
        assert needs_compaction(store, params(10))
        result = compact(store, params(), DIM, tmp_path / "index")
        assert (result.purged, result.vectors) == (10, 90)
        assert not needs_compaction(store, params(10))


def test_compacts_only_past_a_threshold(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        compactor = Compactor(SpaceLedgers(store), params(5))
        add(store, 4)
        assert compactor.compact_if_needed() == []
        add(store, 1, start=4)
        [result] = compactor.compact_if_needed()
        assert result.generation == 1 and result.vectors == 5
        assert store.index_meta().generation == 1 and store.delta_size(store.index_meta().high_water) == 0
        assert compactor.compact_if_needed() == []


async def test_compacts_in_the_background_while_the_loop_runs(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        compactor = Compactor(SpaceLedgers(store), params(3), check_interval_s=0.02)
        async with compactor.running():
            add(store, 3)
            deadline = time.monotonic() + 10
            while store.index_meta().generation == 0:
                assert time.monotonic() < deadline, "no compaction"
                await asyncio.sleep(0.02)
        assert compactor.compactions == 1 and (tmp_path / "index" / "space-1" / "main-1.faiss").exists()
