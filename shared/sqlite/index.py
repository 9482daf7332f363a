"""FAISS main + delta indexes, derived from the store (like Milvus sealed and growing segments).

- main: built from the live vectors up to a high-water mark, saved as `index/main-<generation>.faiss`
  (temporary file, fsync, atomic rename, then the generation and the file's sha256 are recorded in
  SQLite; a failed write removes its temporary file). Flat below a size threshold, IVF (or HNSW) above
  it. A main whose file is missing, unreadable or not the recorded bytes (a bit flipped on disk, which
  FAISS itself would load without a word) is rebuilt from SQLite, with a warning.
- delta: an in-memory flat index of the live vectors above the high-water mark, which every query process
  keeps current by following the store's change counter (`LiveIndex.refresh`).
- tombstones: vector ids deleted since main was built, dropped at search time (oversample, then drop) and
  purged from main by the next compaction (`indexer.compaction`, the writer's side, which builds new
  generations with the functions here).

Searches run while a refresh or a compaction runs: a new main is built aside and swapped in whole.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from shared.config import Settings
from shared.roles import ChangeFeed, IndexMeta, VectorIds
from shared.types import Embedding

logger = logging.getLogger(__name__)

Candidates = list[tuple[int, float]]  # (vector_id, score), best first


@dataclass(frozen=True)
class IndexParams:
    kind: str  # auto | flat | ivf | hnsw
    ann_threshold: int
    ivf_nlist: int | None
    ivf_nprobe: int | None
    hnsw_m: int
    hnsw_ef_search: int
    compact_delta_size: int
    compact_max_age_s: float
    use_gpu: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> IndexParams:
        return cls(
            s.index_kind,
            s.ann_threshold,
            s.ivf_nlist,
            s.ivf_nprobe,
            s.hnsw_m,
            s.hnsw_ef_search,
            s.compact_delta_size,
            s.compact_max_age_s,
            s.faiss_gpu,
        )

    def choose_kind(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "flat" if n < self.ann_threshold else "ivf"

    def nlist(self, n: int) -> int:
        if self.ivf_nlist:
            return self.ivf_nlist
        # ~sqrt(n) lists (1000 at 1M: k-means on a 64k sample takes ~20 s on 2 cores; 4*sqrt(n) would
        # take minutes), and at least 39 training points per list so k-means is meaningful
        return max(1, min(int(math.sqrt(n)), n // 39))

    def nprobe(self, nlist: int) -> int:
        # ~3% of the lists and at least 32 (or all of them): recall@10 0.99 at 100k and 1M vectors, p50
        # 1 to 3 ms on 2 cores (16 gave 0.967 at 100k; bench/RESULTS.md)
        return self.ivf_nprobe or max(min(nlist, 32), nlist // 32)


# -- building, saving and loading a main index ----------------------------------------------------------------


def new_index(kind: str, dim: int, params: IndexParams, train: Embedding | None = None, n: int | None = None) -> Any:
    """An empty index that takes explicit ids and scores by inner product (cosine on unit vectors)."""
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = max(40, 2 * params.hnsw_m)
        hnsw.hnsw.efSearch = params.hnsw_ef_search
        return faiss.IndexIDMap2(hnsw)
    if kind == "ivf":
        assert train is not None and len(train) > 0, "an IVF index needs training vectors"
        nlist = params.nlist(n if n is not None else len(train))  # sized for the whole collection
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(np.ascontiguousarray(train))
        ivf.nprobe = params.nprobe(nlist)
        return ivf  # faiss's Python wrapper keeps a reference to the quantizer for the index's lifetime
    raise ValueError(f"unknown index kind {kind!r}")


def index_kind(index: Any) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    return "flat"


def tune(index: Any, params: IndexParams) -> None:
    """Apply search-time parameters after a load."""
    kind = index_kind(index)
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = params.nprobe(ivf.nlist)
    elif kind == "hnsw":
        hnsw: Any = faiss.downcast_index(index.index)
        hnsw.hnsw.efSearch = params.hnsw_ef_search


def main_path(index_dir: Path, generation: int) -> Path:
    return index_dir / f"main-{generation}.faiss"


def write_main(index: Any, index_dir: Path, generation: int) -> str:
    """Write atomically: a reader sees the old file or the whole new one, never a half-written one; a
    failure (a full disk) leaves no temporary file behind. Returns the file's sha256, for the store."""
    index_dir.mkdir(parents=True, exist_ok=True)
    final = main_path(index_dir, generation)
    tmp = final.with_suffix(".faiss.tmp")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()  # read back: what the disk holds
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(index_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest


class ChecksumMismatch(ValueError):
    """A main index file is not the bytes that were written (damaged on disk, or replaced)."""


def read_main(index_dir: Path, generation: int, checksum: str | None = None) -> Any:
    """Load a main index, checking its bytes first against `checksum` (None: a generation written before
    checksums were recorded, loaded unchecked)."""
    path = main_path(index_dir, generation)
    if checksum is not None:
        with open(path, "rb") as fh:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
        if actual != checksum:
            raise ChecksumMismatch(f"its sha256 is {actual[:12]}..., the store recorded {checksum[:12]}...")
    return faiss.read_index(str(path))


def build_from_store(feed: ChangeFeed, params: IndexParams, dim: int, upto: int) -> Any:
    """A main index of every live vector up to `upto`, read from the store (the truth)."""
    ids_parts, vec_parts = [], []
    for ids, vecs in feed.live_vectors(upto=upto):
        ids_parts.append(ids)
        vec_parts.append(vecs)
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    vecs = np.concatenate(vec_parts) if vec_parts else np.zeros((0, dim), np.float32)
    kind = params.choose_kind(len(ids))
    if kind == "ivf" and len(ids) == 0:
        kind = "flat"
    train = _training_sample(vecs, params.nlist(len(vecs))) if kind == "ivf" else None
    index = new_index(kind, dim, params, train=train, n=len(ids))
    if len(ids):
        index.add_with_ids(vecs, ids)
    return index


def _training_sample(vecs: Embedding, nlist: int, per_list: int = 64) -> Embedding:
    """k-means needs a few dozen points per list, not the whole collection: 64k of 1M trains 1000 lists."""
    if len(vecs) <= per_list * nlist:
        return vecs
    rng = np.random.default_rng(0)
    return vecs[np.sort(rng.choice(len(vecs), size=per_list * nlist, replace=False))]


# -- the live index of one query process --------------------------------------------------------------------


@dataclass
class _Main:
    index: Any
    generation: int
    high_water: int


class LiveIndex:
    """Main + delta + tombstones, kept current from the store. Thread-safe: `search` may run in many
    threads while `refresh` runs in another."""

    def __init__(self, feed: ChangeFeed, dim: int, params: IndexParams, index_dir: Path) -> None:
        self.feed = feed
        self.dim = dim
        self.params = params
        self.index_dir = index_dir
        self._lock = threading.Lock()  # guards delta, tombstones and the swap of main
        # One refresh at a time: two that read the same changes would add the same vectors twice.
        self._refresh_lock = threading.Lock()
        self._main = _Main(new_index("flat", dim, params), -1, 0)
        self._delta: Any = new_index("flat", dim, params)
        self._tombstones: set[int] = set()
        self._seq = -1
        self.refreshed_at = 0.0

    # -- keeping current ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pick up a new main generation, new vectors and tombstones. Cheap when nothing changed."""
        with self._refresh_lock:
            meta = self.feed.index_meta()
            if meta.generation != self._main.generation:
                self._reload(meta)
            elif meta.seq != self._seq:
                changes = self.feed.changes_since(self._seq)
                with self._lock:
                    if len(changes.tombstoned_ids):
                        self._delta.remove_ids(changes.tombstoned_ids)
                        # Only main's vectors need filtering at search time (and counting in `size`).
                        in_main = changes.tombstoned_ids[changes.tombstoned_ids <= self._main.high_water]
                        self._tombstones.update(int(v) for v in in_main)
                    fresh = changes.added_ids > self._main.high_water
                    if fresh.any():
                        self._delta.add_with_ids(changes.added[fresh], changes.added_ids[fresh])
                    self._seq = changes.seq
            self.refreshed_at = time.time()

    def _reload(self, meta: IndexMeta, attempts: int = 3) -> None:
        """Load main (or rebuild it from the store), then a fresh delta and tombstones, and swap."""
        for attempt in range(attempts):
            generation, high_water = meta.generation, meta.high_water
            index = self._load_main(generation, high_water, meta.checksum)
            tune(index, self.params)
            if self.params.use_gpu:
                index = to_gpu(index)
            delta = new_index("flat", self.dim, self.params)
            with self.feed.snapshot():  # one snapshot, so the next refresh neither misses nor repeats a change
                now = self.feed.index_meta()
                if now.generation != generation and attempt + 1 < attempts:
                    # A compaction committed while main loaded, and purged tombstones this main still
                    # holds: pairing it with today's store would resurrect deleted vectors. Load the new one.
                    meta = now
                    continue
                for ids, vecs in self.feed.live_vectors(above=high_water):
                    delta.add_with_ids(vecs, ids)
                tombstones = {int(v) for v in self.feed.tombstoned_ids(upto=high_water, after_seq=meta.main_seq)}
            break
        with self._lock:
            self._main = _Main(index, generation, high_water)
            self._delta = delta
            self._tombstones = tombstones
            self._seq = now.seq
        logger.info(
            "loaded main generation %d (%d vectors, %s); delta %d",
            generation,
            index.ntotal,
            index_kind(index),
            delta.ntotal,
        )

    def _load_main(self, generation: int, high_water: int, checksum: str | None) -> Any:
        if generation == 0:
            return new_index("flat", self.dim, self.params)
        try:
            index = read_main(self.index_dir, generation, checksum)
            if index.d != self.dim:
                raise ValueError(f"dimension {index.d}, expected {self.dim}")
            return index
        except (RuntimeError, ValueError, OSError) as exc:
            logger.warning(
                "main index generation %d at %s is missing or corrupt (%s); rebuilding it from the store",
                generation,
                main_path(self.index_dir, generation),
                exc,
            )
            return build_from_store(self.feed, self.params, self.dim, upto=high_water)

    # -- searching ------------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        with self._lock:
            return int(self._main.index.ntotal + self._delta.ntotal - len(self._tombstones))

    @property
    def delta_size(self) -> int:
        with self._lock:
            return int(self._delta.ntotal)

    @property
    def generation(self) -> int:
        return self._main.generation

    @property
    def seq(self) -> int:
        """The store's change counter as of the last refresh (the store's own minus this is the lag)."""
        return self._seq

    def search(self, query: Embedding, k: int, among: VectorIds | None = None) -> Candidates:
        """The k best live vectors for one query, best first; only those in `among` when it is given
        (exact: every one of them is scored, whatever the kind of main index)."""
        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        selector = None if among is None else faiss.IDSelectorBatch(among)
        with _one_omp_thread():
            with self._lock:
                main, tombstones = self._main, frozenset(self._tombstones)
                params = None if selector is None else _selecting(selector)
                found = _search(self._delta, query, k, params)
            total = int(main.index.ntotal) if among is None else min(int(main.index.ntotal), len(among))
            fetch = k + min(len(tombstones), 4 * k)
            while True:  # oversample, drop tombstones; widen until k survive or main is exhausted
                fetch = min(fetch, total)
                scored = (
                    _search(main.index, query, fetch)
                    if selector is None
                    else _search_among(main.index, query, fetch, selector)
                )
                live = [c for c in scored if c[0] not in tombstones]
                if len(live) >= k or fetch >= total:
                    break
                fetch *= 4
        found += live
        found.sort(key=lambda c: -c[1])
        return found[:k]


@contextmanager
def _one_omp_thread() -> Iterator[None]:
    """One query gains nothing from OpenMP threads, but on a busy machine their spin-waits cost
    milliseconds per FAISS call. The setting is per calling thread, so compaction keeps its threads."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _search(index: Any, query: Embedding, k: int, params: Any = None) -> Candidates:
    k = min(k, int(index.ntotal))
    if k <= 0:
        return []
    scores, ids = index.search(query, k) if params is None else index.search(query, k, params=params)
    return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]


def _search_among(index: Any, query: Embedding, k: int, selector: Any) -> Candidates:
    """An exact search of only the selected ids: a scan that scores just the members (about 10 ms at 100k
    vectors, a third of an unfiltered flat search), whatever the kind of index."""
    kind = index_kind(index)
    if kind == "ivf":  # every list, so nothing selected is missed
        ivf_params: Any = faiss.SearchParametersIVF()
        ivf_params.sel = selector
        ivf_params.nprobe = faiss.extract_index_ivf(index).nlist
        return _search(index, query, k, ivf_params)
    if kind == "hnsw":  # the graph would stop early among few members: scan its stored vectors instead
        hnsw: Any = faiss.downcast_index(index.index)
        translated = faiss.IDSelectorTranslated(index.id_map, selector)
        found = _search(faiss.downcast_index(hnsw.storage), query, k, _selecting(translated))
        id_map = faiss.vector_to_array(index.id_map)
        return [(int(id_map[i]), s) for i, s in found]
    return _search(index, query, k, _selecting(selector))


def _selecting(selector: Any) -> Any:
    """Search parameters that score only the selector's ids (the caller keeps `selector` alive)."""
    params: Any = faiss.SearchParameters()
    params.sel = selector
    return params


def to_gpu(index: Any) -> Any:
    """A GPU copy for searching, when faiss-gpu and a GPU are present; otherwise the index itself."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        logger.warning("CLIPDEX_FAISS_GPU is set but faiss has no GPU here; searching on the CPU")
        return index
    resources = faiss.StandardGpuResources()
    gpu: Any = faiss.index_cpu_to_gpu(resources, 0, index)
    gpu.referenced_resources = resources
    return gpu
