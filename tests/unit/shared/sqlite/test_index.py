"""The FAISS main + delta index against a brute-force oracle, on a real SQLite store and real FAISS files,
through writes, deletes and compactions."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from faiss.contrib.datasets import SyntheticDataset

import shared.sqlite.index as index_module
from indexer.compaction import compact
from shared.roles import Delete, Upsert
from shared.sqlite.index import IndexParams, LiveIndex, main_path
from shared.sqlite.store import SqliteStore

DIM = 32


def params(**overrides: Any) -> IndexParams:
    values: dict[str, Any] = {
        "kind": "flat",
        "ann_threshold": 200_000,
        "ivf_nlist": None,
        "ivf_nprobe": None,
        "hnsw_m": 16,
        "hnsw_ef_search": 64,
        "compact_delta_size": 1_000_000,
        "compact_max_age_s": 1e9,
    }
    values.update(overrides)
    return IndexParams(**values)


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(n: int, nq: int, dim: int = DIM, seed: int = 1338) -> tuple[np.ndarray, np.ndarray]:
    """faiss's SyntheticDataset (a 10-d manifold in `dim` dimensions), normalised: base and queries."""
    ds = SyntheticDataset(dim, 0, n, nq, metric="IP", seed=seed)
    base, queries = ds.get_database(), ds.get_queries()
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(base), np.ascontiguousarray(queries)


@dataclass
class Oracle:
    """The live set as the truth: item id → (vector id, vector). Writes go to the store and here."""

    store: SqliteStore
    live: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    counter: int = 0

    def put(self, item_id: str, vec: np.ndarray) -> int:
        self.counter += 1
        result = self.store.apply(upserts=[upsert(item_id, vec, sha=f"sha-{self.counter}")])
        self.live[item_id] = (result.vector_ids[0], vec)
        return result.vector_ids[0]

    def put_many(self, vecs: np.ndarray, prefix: str = "item") -> None:
        ups = []
        for i, vec in enumerate(vecs):
            self.counter += 1
            ups.append(upsert(f"{prefix}-{self.counter}-{i}", vec, sha=f"sha-{self.counter}"))
        result = self.store.apply(upserts=ups)
        for up, vid in zip(ups, result.vector_ids, strict=True):
            assert up.embedding is not None
            self.live[up.id] = (vid, up.embedding)

    def delete(self, *item_ids: str) -> None:
        self.store.apply(deletes=[Delete(i) for i in item_ids])
        for item_id in item_ids:
            del self.live[item_id]

    def top_k(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self.live:
            return []
        ids = np.array([vid for vid, _ in self.live.values()], dtype=np.int64)
        mat = np.stack([vec for _, vec in self.live.values()])
        scores = mat @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in order]


def upsert(item_id: str, vec: np.ndarray, sha: str, **metadata: Any) -> Upsert:
    return Upsert(item_id, "api", f"mem://{item_id}", sha, dict(metadata), vec.astype(np.float32), None)


def assert_exact(index: LiveIndex, oracle: Oracle, queries: np.ndarray, k: int) -> None:
    for q in queries:
        got = index.search(q, k)
        want = oracle.top_k(q, k)
        assert [vid for vid, _ in got] == [vid for vid, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-5)


def recall_at(index: LiveIndex, oracle: Oracle, queries: np.ndarray, k: int) -> float:
    found = 0
    for q in queries:
        got = {vid for vid, _ in index.search(q, k)}
        found += len(got & {vid for vid, _ in oracle.top_k(q, k)})
    return found / (k * len(queries))


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with SqliteStore(tmp_path / "db.sqlite3") as s:
        yield s


# -- exactness with a flat main --------------------------------------------------------------------------


def test_random_sequence_of_writes_and_compactions_is_exact_at_every_step(store: SqliteStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pick = random.Random(7)
    oracle = Oracle(store)
    p = params(kind="flat")
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    queries = unit_vectors(rng, 4)
    compactions = 0
    for step in range(160):
        roll = pick.random()
        if roll < 0.45 or len(oracle.live) < 3:
            oracle.put_many(unit_vectors(rng, pick.randint(1, 6)), prefix=f"s{step}")
        elif roll < 0.65:
            oracle.put(pick.choice(sorted(oracle.live)), unit_vectors(rng, 1)[0])  # replacement
        elif roll < 0.85:
            oracle.delete(pick.choice(sorted(oracle.live)))
        elif roll < 0.92:
            item = pick.choice(sorted(oracle.live))  # metadata-only update: same vector, same hash
            sha = store.states([item])[item].sha256
            assert sha is not None
            store.apply(upserts=[Upsert(item, "api", "mem://x", sha, {"step": step}, None)])
        else:
            compact(store, p, DIM, tmp_path / "index")
            compactions += 1
        index.refresh()
        for k in (1, 10):
            assert_exact(index, oracle, queries, k)
        assert index.size == len(oracle.live)
    assert compactions >= 5
    assert index.generation == compactions


def test_search_is_exact_with_more_tombstones_than_k_in_main(store: SqliteStore, tmp_path: Path) -> None:
    """Deleting the best matches after compaction: oversampling must widen until k live ones are found."""
    rng = np.random.default_rng(3)
    oracle = Oracle(store)
    oracle.put_many(unit_vectors(rng, 300))
    p = params(kind="flat")
    compact(store, p, DIM, tmp_path / "index")
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    index.refresh()
    query = unit_vectors(rng, 1)[0]
    by_score = [vid for vid, _ in oracle.top_k(query, 300)]
    doomed = {item for item, (vid, _) in oracle.live.items() if vid in set(by_score[:120])}
    oracle.delete(*sorted(doomed))
    index.refresh()
    assert_exact(index, oracle, query[None, :], 10)
    assert_exact(index, oracle, query[None, :], 100)


def test_a_deleted_vector_added_and_removed_between_refreshes_is_never_found(
    store: SqliteStore, tmp_path: Path
) -> None:
    rng = np.random.default_rng(4)
    oracle = Oracle(store)
    index = LiveIndex(store, DIM, params(), tmp_path / "index")
    index.refresh()
    vec = unit_vectors(rng, 1)[0]
    oracle.put("ghost", vec)
    oracle.delete("ghost")
    oracle.put_many(unit_vectors(rng, 5))
    index.refresh()
    assert all(vid != -1 for vid, _ in index.search(vec, 10))
    assert_exact(index, oracle, vec[None, :], 10)
    assert index.size == 5


# -- searching among given ids (a filter's candidates) -------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_search_among_ids_is_exact_whatever_the_main_index(kind: str, store: SqliteStore, tmp_path: Path) -> None:
    """IVF probes every list and HNSW scans its stored vectors when given ids: a rare filter's items are
    found wherever they rank, in main, in the delta, with tombstones among them."""
    base, queries = clustered_vectors(3000, 8)
    oracle = Oracle(store)
    oracle.put_many(base[:2500])
    p = params(kind=kind, ivf_nlist=50, ivf_nprobe=1, hnsw_ef_search=16)
    compact(store, p, DIM, tmp_path / "index")
    oracle.put_many(base[2500:])  # the delta
    doomed = sorted(oracle.live)[::97]
    dead = [oracle.live[i][0] for i in doomed]
    oracle.delete(*doomed)  # tombstones in main and the delta
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    index.refresh()
    among_items = random.Random(5).sample(sorted(oracle.live), 40)
    among = np.array(sorted([oracle.live[i][0] for i in among_items] + dead), dtype=np.int64)
    for q in queries:
        got = index.search(q, 10, among)
        scores = {vid: float(vec @ q) for vid, vec in (oracle.live[i] for i in among_items)}
        want = sorted(scores, key=lambda v: -scores[v])[:10]
        assert [vid for vid, _ in got] == want
    assert len(index.search(queries[0], 100, among)) == 40
    assert index.search(queries[0], 10, np.zeros(0, np.int64)) == []


# -- approximate mains -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_main_keeps_recall_at_10_through_writes_and_compactions(
    kind: str, store: SqliteStore, tmp_path: Path
) -> None:
    base, queries = clustered_vectors(6000, 50)
    oracle = Oracle(store)
    p = params(kind="auto", ann_threshold=1000) if kind == "ivf" else params(kind="hnsw")
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    oracle.put_many(base[:4000])
    result = compact(store, p, DIM, tmp_path / "index")
    assert result.kind == kind
    index.refresh()
    assert recall_at(index, oracle, queries, 10) >= 0.95
    # More vectors in the delta, some deletes in main, and a second compaction into the trained index.
    oracle.put_many(base[4000:])
    oracle.delete(*sorted(oracle.live)[:500])
    index.refresh()
    assert recall_at(index, oracle, queries, 10) >= 0.95
    result = compact(store, p, DIM, tmp_path / "index")
    assert result.kind == kind and result.vectors == len(oracle.live)
    index.refresh()
    assert index.generation == 2
    assert recall_at(index, oracle, queries, 10) >= 0.95
    deleted_ids = set(range(1, 10_000)) - {vid for vid, _ in oracle.live.values()}
    for q in queries:
        assert not {vid for vid, _ in index.search(q, 50)} & deleted_ids


def test_auto_kind_switches_to_ivf_above_the_threshold_and_rebuilds_when_outgrown(
    store: SqliteStore, tmp_path: Path
) -> None:
    base, _ = clustered_vectors(8000, 1)
    oracle = Oracle(store)
    p = params(kind="auto", ann_threshold=1500)
    oracle.put_many(base[:1000])
    assert compact(store, p, DIM, tmp_path / "index").kind == "flat"
    oracle.put_many(base[1000:2000])
    first = compact(store, p, DIM, tmp_path / "index")
    assert (first.kind, first.rebuilt) == ("ivf", True)
    oracle.put_many(base[2000:2200])
    assert compact(store, p, DIM, tmp_path / "index").rebuilt is False
    oracle.put_many(base[2200:])
    grown = compact(store, p, DIM, tmp_path / "index")
    assert (grown.kind, grown.rebuilt, grown.vectors) == ("ivf", True, 8000)


# -- crashes and damaged files -----------------------------------------------------------------------------


def _seeded(store: SqliteStore, tmp_path: Path, n: int = 200) -> tuple[Oracle, IndexParams, np.ndarray]:
    rng = np.random.default_rng(11)
    oracle = Oracle(store)
    p = params(kind="flat")
    oracle.put_many(unit_vectors(rng, n))
    compact(store, p, DIM, tmp_path / "index")  # generation 1
    oracle.put_many(unit_vectors(rng, 50))
    oracle.delete(*sorted(oracle.live)[:30])
    return oracle, p, unit_vectors(rng, 5)


class Boom(Exception):
    pass


def _raise_boom(*args: object, **kwargs: object) -> None:
    raise Boom("killed mid-compaction")


@pytest.mark.parametrize("where", ["before_swap", "os.replace", "faiss.write_index"])
def test_a_compaction_that_fails_midway_leaves_the_previous_generation_in_force(
    where: str, store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oracle, p, queries = _seeded(store, tmp_path)
    reader = LiveIndex(store, DIM, p, tmp_path / "index")
    reader.refresh()
    hook = None
    if where == "before_swap":
        hook = _raise_boom
    elif where == "os.replace":
        monkeypatch.setattr(index_module.os, "replace", _raise_boom)
    else:
        monkeypatch.setattr(index_module.faiss, "write_index", _raise_boom)
    with pytest.raises(Boom):
        compact(store, p, DIM, tmp_path / "index", before_swap=hook)
    monkeypatch.undo()
    assert store.index_meta().generation == 1
    fresh = LiveIndex(store, DIM, p, tmp_path / "index")
    fresh.refresh()
    reader.refresh()
    for live in (fresh, reader):
        assert live.generation == 1
        assert_exact(live, oracle, queries, 10)
    # The next compaction goes through and still nothing is missing.
    assert compact(store, p, DIM, tmp_path / "index").generation == 2
    reader.refresh()
    assert_exact(reader, oracle, queries, 10)
    assert sorted(p.name for p in (tmp_path / "index").glob("main-*")) == ["main-1.faiss", "main-2.faiss"]


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_a_missing_or_corrupt_main_is_rebuilt_from_the_store_with_a_warning(
    damage: str, store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    oracle, p, queries = _seeded(store, tmp_path)
    path = main_path(tmp_path / "index", 1)
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"this is not a faiss index" * 100)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    with caplog.at_level(logging.WARNING, logger="shared.sqlite.index"):
        index.refresh()
    assert any("rebuilding it from the store" in r.getMessage() for r in caplog.records)
    assert_exact(index, oracle, queries, 10)
    # The writer's next compaction rebuilds it too, and writes a good generation.
    result = compact(store, p, DIM, tmp_path / "index")
    assert result.rebuilt and result.vectors == len(oracle.live)
    assert faiss.read_index(str(main_path(tmp_path / "index", 2))).ntotal == len(oracle.live)


def flip_vectors(path: Path) -> None:
    """Damage the middle of a main file, where the vectors are, as a failing disk might: FAISS still
    loads it, and one vector now scores 10 against anything that points its way."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4 * DIM] = np.full(DIM, 10.0, np.float32).tobytes()
    path.write_bytes(bytes(data))
    faiss.read_index(str(path))  # loads without complaint


def test_a_main_file_whose_bytes_changed_on_disk_is_rebuilt_from_the_store_not_searched(
    store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    oracle, p, queries = _seeded(store, tmp_path)
    flip_vectors(main_path(tmp_path / "index", 1))
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    with caplog.at_level(logging.WARNING, logger="shared.sqlite.index"):
        index.refresh()
    assert any("sha256" in r.getMessage() and "rebuilding it from the store" in r.getMessage() for r in caplog.records)
    assert_exact(index, oracle, queries, 10)
    result = compact(store, p, DIM, tmp_path / "index")  # the writer does not extend the damaged file either
    assert result.rebuilt
    index.refresh()
    assert_exact(index, oracle, queries, 10)


def test_each_main_file_s_sha256_is_recorded_with_its_generation(store: SqliteStore, tmp_path: Path) -> None:
    _, p, _ = _seeded(store, tmp_path)
    compact(store, p, DIM, tmp_path / "index")
    meta = store.index_meta()
    data = main_path(tmp_path / "index", meta.generation).read_bytes()
    assert meta.checksum == hashlib.sha256(data).hexdigest()


def test_a_write_that_fails_midway_leaves_no_temporary_file(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, p, _ = _seeded(store, tmp_path)
    real = index_module.faiss.write_index

    def disk_full(index: Any, path: str) -> None:
        real(index, path)
        with open(path, "r+b") as fh:
            fh.truncate(100)  # part of it made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_module.faiss, "write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        compact(store, p, DIM, tmp_path / "index")
    assert sorted(f.name for f in (tmp_path / "index").iterdir()) == ["compact.lock", "main-1.faiss"]
    assert store.index_meta().generation == 1


# -- threads ----------------------------------------------------------------------------------------------------


def test_concurrent_refreshes_never_add_a_vector_twice(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresher thread and a caller refreshing after a write may overlap."""
    rng = np.random.default_rng(6)
    oracle = Oracle(store)
    index = LiveIndex(store, DIM, params(), tmp_path / "index")
    index.refresh()
    oracle.put_many(unit_vectors(rng, 20))
    both_read = threading.Barrier(2, timeout=0.5)
    original = SqliteStore.changes_since

    def changes_then_wait(self: SqliteStore, seq: int) -> Any:
        changes = original(self, seq)
        # Let the other refresh read the same changes before either applies them; when refreshes are
        # serialised, the second never gets here while the first waits, and the barrier times out.
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait()
        return changes

    monkeypatch.setattr(SqliteStore, "changes_since", changes_then_wait)
    threads = [threading.Thread(target=index.refresh) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert index.delta_size == 20
    hits = index.search(unit_vectors(rng, 1)[0], 20)
    assert len({vid for vid, _ in hits}) == 20


def test_size_counts_each_live_vector_once_after_deletes_in_the_delta(store: SqliteStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    oracle = Oracle(store)
    p = params()
    oracle.put_many(unit_vectors(rng, 10), prefix="main")
    compact(store, p, DIM, tmp_path / "index")
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    index.refresh()
    oracle.put_many(unit_vectors(rng, 10), prefix="delta")
    index.refresh()
    in_main = [i for i in oracle.live if i.startswith("main")][:3]
    in_delta = [i for i in oracle.live if i.startswith("delta")][:3]
    oracle.delete(*in_main, *in_delta)
    index.refresh()
    assert index.size == len(oracle.live) == 14


def test_searches_run_while_refresh_and_compaction_run(store: SqliteStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    oracle = Oracle(store)
    p = params(kind="flat")
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    oracle.put_many(unit_vectors(rng, 300))
    index.refresh()
    queries = unit_vectors(rng, 8)
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                while not stop.is_set():
                    fn()
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return run

    def search() -> None:
        for q in queries:
            hits = index.search(q, 10)
            assert len(hits) == 10 and len({vid for vid, _ in hits}) == 10

    def compact_now() -> None:
        compact(store, p, DIM, tmp_path / "index")

    threads = [threading.Thread(target=guarded(f)) for f in (search, search, index.refresh, compact_now)]
    for t in threads:
        t.start()
    try:
        for step in range(40):
            oracle.put_many(unit_vectors(rng, 5), prefix=f"w{step}")
            oracle.delete(*sorted(oracle.live)[:3])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    index.refresh()
    assert index.generation >= 1
    assert_exact(index, oracle, queries, 10)


def test_index_files_of_old_generations_are_removed(store: SqliteStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    oracle = Oracle(store)
    for _ in range(4):
        oracle.put_many(unit_vectors(rng, 5))
        compact(store, params(), DIM, tmp_path / "index")
    names = sorted(p.name for p in (tmp_path / "index").iterdir() if p.name.startswith("main-"))
    assert names == ["main-3.faiss", "main-4.faiss"]
    assert os.path.exists(tmp_path / "index" / "compact.lock")


def test_a_compaction_committed_while_a_reader_loads_main_is_not_missed(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's compaction purges tombstones the reader's old main still needs filtered: the reader must
    not pair the old main with the new store state."""
    rng = np.random.default_rng(12)
    oracle = Oracle(store)
    p = params()
    oracle.put_many(unit_vectors(rng, 50), prefix="main")
    compact(store, p, DIM, tmp_path / "index")
    query = unit_vectors(rng, 1)[0]
    victim_vid = oracle.top_k(query, 1)[0][0]
    victim = next(item for item, (vid, _) in oracle.live.items() if vid == victim_vid)
    original = LiveIndex._load_main
    calls = []

    def load_then_writer_compacts(self: LiveIndex, generation: int, high_water: int, checksum: str | None) -> Any:
        index = original(self, generation, high_water, checksum)
        if not calls:  # the writer deletes the best match and compacts while this reader loads main
            oracle.delete(victim)
            compact(store, p, DIM, tmp_path / "index")
        calls.append(generation)
        return index

    monkeypatch.setattr(LiveIndex, "_load_main", load_then_writer_compacts)
    index = LiveIndex(store, DIM, p, tmp_path / "index")
    index.refresh()
    assert victim_vid not in {vid for vid, _ in index.search(query, 10)}
    assert_exact(index, oracle, query[None, :], 10)
    assert index.generation == 2


def test_index_meta_is_read_in_one_snapshot(store: SqliteStore) -> None:
    rng = np.random.default_rng(13)
    Oracle(store).put_many(unit_vectors(rng, 10))
    writer = SqliteStore(store.path)
    fired = []

    def commit_meanwhile(sql: str) -> None:  # another process records a generation while we read
        if "high_water" in sql and not fired:
            fired.append(sql)
            writer.record_generation(7, 10, 10, "flat")

    store._db.set_trace_callback(commit_meanwhile)
    try:
        meta = store.index_meta()
    finally:
        store._db.set_trace_callback(None)
        writer.close()
    assert fired
    assert (meta.generation, meta.high_water, meta.main_seq) in {(0, 0, 0), (7, 10, 10)}
