"""The index info every search result carries: right, and cheap (no scan of the vectors table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.embedder import Embedder
from shared.roles import Delete, Upsert
from shared.search import SearchService
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.search import IndexSearch
from shared.sqlite.store import SqliteStore
from tests.conftest import tiny_settings_for


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_info_matches_the_store_without_reading_its_stats(
    tmp_path: Path, tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tiny_settings_for(tmp_path)
    rng = np.random.default_rng(0)
    with SqliteStore(settings.db_path) as store:
        dim = tiny_embedder.identity.dim
        index = LiveIndex(store, dim, IndexParams.from_settings(settings), settings.index_dir)
        service = SearchService(IndexSearch(store, index), store, tiny_embedder)
        index.refresh()
        assert service.info().items == 0 and service.info().newest_indexed_at is None

        store.apply(upserts=[Upsert(f"k:{i}", "kafka", "u", f"h{i}", {}, _unit(rng, dim)) for i in range(5)])
        store.apply(upserts=[Upsert("k:0", "kafka", "u", "h0-new", {}, _unit(rng, dim))], deletes=[Delete("k:1")])
        index.refresh()
        stats = store.stats()
        with monkeypatch.context() as patch:
            patch.setattr(store, "stats", lambda: pytest.fail("info() must not scan the store"))
            info = service.info()
            result = service.search_text("anything", top_k=10)
        assert info.items == stats.items == 4
        assert info.newest_indexed_at == stats.newest_indexed_at is not None
        assert result.index == info
