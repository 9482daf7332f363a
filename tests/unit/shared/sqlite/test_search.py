"""`IndexSearch`: the index info every result carries (right, and cheap), and filtered searches that are
bounded: looked up in the filter tags, exact among few candidates, and `partial` when a bound cut them short."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shared.sqlite.search as search_module
from indexer.compaction import compact
from shared.embedder import Embedder
from shared.roles import Delete, Upsert
from shared.search import SearchService
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.search import IndexSearch
from shared.sqlite.store import SqliteStore
from shared.types import Filters
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


# -- filtered searches are bounded --------------------------------------------------------------------------

DIM = 16


@pytest.fixture
def filtered(tmp_path: Path) -> Iterator[tuple[SqliteStore, LiveIndex, IndexSearch]]:
    """600 items ranked by their index (item-0 best for QUERY), in a compacted main and a delta: every
    tenth is "rare", every item is "common", none is "missing"."""
    rng = np.random.default_rng(1)
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        p = IndexParams("ivf", 1, 10, 1, 16, 64, 10**6, 1e9)  # nprobe 1: a plain search misses most lists
        ups = [
            Upsert(
                f"item-{i}",
                "kafka",
                f"u{i}",
                f"sha-{i}",
                {"tag": "rare" if i % 10 == 9 else "common", "rank": i},
                _towards(QUERY, 0.99 - 0.0015 * i, rng),
            )
            for i in range(600)
        ]
        store.apply(upserts=ups[:500])
        compact(store, p, DIM, tmp_path / "index")
        store.apply(upserts=ups[500:])
        index = LiveIndex(store, DIM, p, tmp_path / "index")
        index.refresh()
        yield store, index, IndexSearch(store, index)


QUERY = np.eye(DIM, dtype=np.float32)[0]


def _towards(target: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    other = rng.standard_normal(DIM).astype(np.float32)
    other -= (other @ target) * target
    other /= np.linalg.norm(other)
    return (cos * target + np.sqrt(1 - cos**2) * other).astype(np.float32)


def test_a_filter_that_matches_nothing_touches_neither_faiss_nor_the_items(
    filtered: tuple[SqliteStore, LiveIndex, IndexSearch], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, index, search = filtered
    monkeypatch.setattr(index, "search", lambda *a, **k: pytest.fail("searched FAISS"))
    monkeypatch.setattr(store, "items_for_vectors", lambda *a, **k: pytest.fail("read items"))
    for filters in (Filters({"tag": "none such"}), Filters(source="folder"), Filters({"tag": "rare", "rank": 0})):
        found = search.search(QUERY, 10, filters)
        assert found.hits == [] and not found.partial


def test_a_rare_filter_finds_its_items_wherever_they_rank_even_with_an_approximate_main(
    filtered: tuple[SqliteStore, LiveIndex, IndexSearch],
) -> None:
    _, _, search = filtered
    found = search.search(QUERY, 100, Filters({"tag": "rare"}))
    assert [h.id for h in found.hits] == [f"item-{i}" for i in range(9, 600, 10)] and not found.partial
    assert all(h.sha256 == f"sha-{h.id.split('-')[1]}" for h in found.hits)
    found = search.search(QUERY, 3, Filters({"tag": "rare"}), exclude={"item-9"}, with_vectors=True)
    assert [h.id for h in found.hits] == ["item-19", "item-29", "item-39"]
    assert found.vectors is not None and found.vectors.shape == (3, DIM)
    np.testing.assert_allclose(found.vectors @ QUERY, [h.score for h in found.hits], atol=1e-5)


def test_a_filter_no_index_holds_checks_a_bounded_number_and_says_so(
    filtered: tuple[SqliteStore, LiveIndex, IndexSearch], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, search = filtered
    looked: list[int] = []
    real = store.items_for_vectors
    monkeypatch.setattr(store, "items_for_vectors", lambda ids, f=None: looked.append(len(ids)) or real(ids, f))
    monkeypatch.setattr(search_module, "MAX_SCAN", 64)
    found = search.search(QUERY, 10, Filters({"tag": None}))  # every item has a tag: none passes
    assert found.hits == [] and found.partial and sum(looked) <= 64
    found = search.search(QUERY, 10, Filters({"absent-key": None}))  # every item passes: no bound reached
    assert len(found.hits) == 10 and not found.partial


def test_a_common_filter_ranks_then_checks(
    filtered: tuple[SqliteStore, LiveIndex, IndexSearch], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, search = filtered
    monkeypatch.setattr(search_module, "PREFILTER_MAX", 50)  # "common" (540 items) is too many to list
    monkeypatch.setattr(store, "matching_vectors", _spy(store.matching_vectors, calls := []))
    found = search.search(QUERY, 5, Filters({"tag": "common"}), min_score=-1.0)
    assert calls == [50] and len(found.hits) == 5 and not found.partial
    assert all(h.metadata["tag"] == "common" for h in found.hits)


def test_faiss_runs_outside_the_store_lock(
    filtered: tuple[SqliteStore, LiveIndex, IndexSearch], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, index, search = filtered
    free: list[bool] = []
    real = index.search

    def checking(*args: object) -> object:
        def probe() -> None:
            got = store._lock.acquire(blocking=False)
            free.append(got)
            if got:
                store._lock.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(index, "search", checking)
    search.search(QUERY, 10, Filters({"tag": "rare"}))
    search.search(QUERY, 10, Filters({"absent": None}))
    search.search(QUERY, 10)
    assert free and all(free)


def _spy(fn: Any, calls: list[Any]) -> Any:
    def wrapped(filters: Filters, limit: int) -> Any:
        calls.append(limit)
        return fn(filters, limit)

    return wrapped
