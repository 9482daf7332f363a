"""Compaction: fold the delta into a new main FAISS index and purge tombstones (the writer's side of
the SQLite backend; a backend that compacts by itself has no CompactionLedger and no compactor).

    compact(): read the current main (its checksum verified) ─▶ drop its tombstones, add the delta (or
               rebuild from the store) ─▶ write main-<n+1>.faiss atomically ─▶ record generation n+1 and
               the file's sha256 (readers swap) ─▶ purge

`Compactor` runs it on thresholds beside the indexer, off the event loop: every `check_interval_s` it asks
the ledger whether the delta passed its size or age threshold (CLIPDEX_COMPACT_DELTA_SIZE,
CLIPDEX_COMPACT_MAX_AGE_S) and, if so, compacts in a thread. Indexing goes on meanwhile; a failed
compaction is logged and tried again later (the delta only grows; nothing is lost). `clipdex compact`
runs the same on demand, and a file lock in `compact` keeps the two from overlapping.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss

from shared.config import Settings
from shared.errors import ClipdexError, StoreError
from shared.roles import CompactionLedger
from shared.sqlite.index import IndexParams, build_from_store, index_kind, read_main, write_main

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompactionResult:
    generation: int
    vectors: int
    kind: str
    rebuilt: bool
    purged: int
    seconds: float


def needs_compaction(ledger: CompactionLedger, params: IndexParams) -> bool:
    meta = ledger.index_meta()
    delta = ledger.delta_size(meta.high_water)
    if delta >= params.compact_delta_size:
        return True
    # Deletes add nothing to the delta, but every reader filters their tombstones on each search
    # (oversampling more and more) until a compaction purges them.
    if ledger.tombstone_count(upto=meta.high_water, after_seq=meta.main_seq) >= params.compact_delta_size:
        return True
    age = ledger.oldest_uncompacted_age_s(meta.high_water)
    return age is not None and age >= params.compact_max_age_s


def compact(
    ledger: CompactionLedger,
    params: IndexParams,
    dim: int,
    index_dir: Path,
    *,
    before_swap: Callable[[], None] | None = None,
) -> CompactionResult:
    """Fold the delta into a new main generation and purge tombstones.

    A crash anywhere before the generation is recorded leaves the previous generation in force. A file
    lock keeps two writers (the indexer and `clipdex compact`) from compacting at once.
    """
    started = time.monotonic()
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / "compact.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        meta = ledger.index_meta()
        upto, seq = ledger.snapshot_for_compaction()
        base = _current_main(ledger, index_dir, dim, meta.generation, meta.checksum)
        if base is not None:
            dead = ledger.tombstoned_ids(upto=meta.high_water)
            if len(dead):
                base.remove_ids(dead)
            for ids, vecs in ledger.live_vectors(above=meta.high_water, upto=upto):
                base.add_with_ids(vecs, ids)
            if params.choose_kind(base.ntotal) != index_kind(base) or _ivf_outgrown(base, params):
                base = None
        rebuilt = base is None
        if base is None:
            base = build_from_store(ledger, params, dim, upto=upto)
        generation = meta.generation + 1
        checksum = write_main(base, index_dir, generation)
        if before_swap is not None:
            before_swap()
        purged = ledger.record_generation(generation, upto, seq, index_kind(base), checksum)
        _remove_old_generations(index_dir, keep={generation, meta.generation})
    result = CompactionResult(
        generation, int(base.ntotal), index_kind(base), rebuilt, purged, time.monotonic() - started
    )
    logger.info(
        "compacted: generation %d, %d vectors (%s%s), %d tombstones purged, %.2f s",
        result.generation,
        result.vectors,
        result.kind,
        ", rebuilt" if rebuilt else "",
        purged,
        result.seconds,
    )
    return result


def _current_main(
    ledger: CompactionLedger, index_dir: Path, dim: int, generation: int, checksum: str | None
) -> Any | None:
    """The current main to extend in place, or None when it must be rebuilt from the ledger (a damaged
    main is never extended: its damage would pass into every later generation)."""
    if generation == 0:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    try:
        index = read_main(index_dir, generation, checksum)
    except (RuntimeError, OSError, ValueError) as exc:
        logger.warning("main generation %d unreadable (%s); rebuilding it from the store", generation, exc)
        return None
    if index_kind(index) == "hnsw" or index.d != dim:
        return None  # HNSW cannot remove vectors
    return index


def _ivf_outgrown(index: Any, params: IndexParams) -> bool:
    """An IVF trained when the collection was a quarter of its size has lists too long: retrain."""
    if index_kind(index) != "ivf":
        return False
    return bool(params.nlist(int(index.ntotal)) > 2 * faiss.extract_index_ivf(index).nlist)


def _remove_old_generations(index_dir: Path, keep: set[int]) -> None:
    for path in index_dir.glob("main-*.faiss*"):
        stem = path.name.split(".")[0]
        try:
            generation = int(stem.removeprefix("main-"))
        except ValueError:
            continue
        if generation not in keep or path.name.endswith(".tmp"):
            try:
                path.unlink()
            except OSError as exc:
                raise StoreError(f"cannot remove old index file {path}: {exc}") from exc


class Compactor:
    def __init__(
        self, ledger: CompactionLedger, params: IndexParams, dim: int, index_dir: Path, *, check_interval_s: float = 5.0
    ) -> None:
        self.ledger = ledger
        self.params = params
        self.dim = dim
        self.index_dir = index_dir
        self.check_interval_s = check_interval_s
        self.compactions = 0

    @classmethod
    def from_settings(cls, ledger: CompactionLedger, settings: Settings, dim: int) -> Compactor:
        # Check often enough that the age threshold is kept to within a few percent.
        interval = min(5.0, max(0.1, settings.compact_max_age_s / 20))
        return cls(ledger, IndexParams.from_settings(settings), dim, settings.index_dir, check_interval_s=interval)

    def compact_if_needed(self) -> CompactionResult | None:
        """Blocking: compact when a threshold is passed."""
        if not needs_compaction(self.ledger, self.params):
            return None
        return self.compact()

    def compact(self) -> CompactionResult:
        """Blocking: compact now."""
        result = compact(self.ledger, self.params, self.dim, self.index_dir)
        self.compactions += 1
        return result

    async def run(self, stop: asyncio.Event) -> None:
        """Check and compact until `stop` is set; a compaction in progress is finished, never abandoned."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.compact_if_needed)
            except (ClipdexError, OSError, RuntimeError):
                logger.exception("compaction failed; searches keep using the current index, trying again later")
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_interval_s)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Compactor]:
        """Run in the background for the duration of the block."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.run(stop), name="clipdex-compactor")
        try:
            yield self
        finally:
            stop.set()
            await task
