"""`VectorSearch` on Milvus: Milvus searches its own segments, so a search replica holds no index and no
state; filters and exclusions are pushed down as expressions (`shared.milvus.expr`).

    query ─▶ Milvus search (cosine, `status == "indexed" and array_contains(tags, …) and not key in […]`)
          ─▶ one hit per item id (a superseded version a racing writer has not deleted yet is dropped)
          ─▶ the exact filter check on the returned values (a tag is a hash) ─▶ min_score ─▶ top_k
             └── widen (x4) while fewer than top_k passed and Milvus had more ◀──┘
          ─▶ Found(hits with their content hash, partial, the hits' vectors when asked for)

`SearchService` asks for up to 4,000 hits (it folds copies, sorts and pages above this); one Milvus
search answers up to 16,384 rows (offset + limit), which milvus-lite honours too (measured: 4,000 and
16,384 rows in one call), so no paging is needed. Filters are inside Milvus's search, so the widening
only makes up for rows the exact check drops (a hash collision, a superseded version): `partial` is
set only if 16,384 rows were not enough for that.

Consistency: searches read Bounded. A replica then answers from what its query node holds without
waiting for the newest writes to arrive (Strong would wait, on every search, for the time tick of every
channel); the staleness is bounded by Milvus's `common.gracefulTime` (5 s by default) and in practice
the few hundred milliseconds a write takes to reach the query node. Writers read Strong
(`shared.milvus.store`), because their decisions (versions, superseded rows) must see every other
writer's acknowledged writes.

`refresh` (every CLIPDEX_REFRESH_INTERVAL_MS, from the server's refresher) reads the counts and the newest
write time that every result carries, and is how a replica notices that Milvus is gone (and back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Set
from datetime import UTC, datetime
from typing import Any

import numpy as np

from shared.milvus import expr as ex
from shared.milvus.store import MilvusStore, newest_rows
from shared.roles import Found, SearcherState
from shared.types import Embedding, Filters, Hit, IndexInfo

logger = logging.getLogger(__name__)

SEARCH_CONSISTENCY = "Bounded"
_MAX_FETCH = 16_384  # Milvus's largest top-k
_HIT_FIELDS = ["item_id", "source", "uri", "sha256", "metadata", "version"]


class MilvusSearch:
    def __init__(self, store: MilvusStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._items = 0
        self._newest: float | None = None
        self._refreshed_at = 0.0

    def search(
        self,
        query: Embedding,
        top_k: int,
        filters: Filters | None = None,
        min_score: float | None = None,
        exclude: Set[str] = frozenset(),
        *,
        with_vectors: bool = False,
    ) -> Found:
        expr = ex.search_expr(filters, sorted(ex.item_key(i) for i in exclude))
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        fields = [*_HIT_FIELDS, "vector"] if with_vectors else _HIT_FIELDS
        fetch = min(top_k, _MAX_FETCH)
        while True:
            found = self.store.milvus.search(
                self.store.names.items, vector.tolist(), fetch, expr, fields, consistency=SEARCH_CONSISTENCY
            )
            hits, rows = self._hits(found, top_k, filters, min_score, exclude)
            if len(hits) >= top_k or len(found) < fetch or _below(found, min_score):
                break
            if fetch >= _MAX_FETCH:  # Milvus had more rows, and the checks dropped too many of them to be sure
                return Found(hits, partial=True, vectors=_vectors(rows, vector.shape[0]) if with_vectors else None)
            fetch = min(fetch * 4, _MAX_FETCH)
        return Found(hits, vectors=_vectors(rows, vector.shape[0]) if with_vectors else None)

    @staticmethod
    def _hits(
        found: list[dict[str, Any]],
        top_k: int,
        filters: Filters | None,
        min_score: float | None,
        exclude: Set[str],
    ) -> tuple[list[Hit], list[dict[str, Any]]]:
        """The first top_k rows that pass, as hits, and the rows themselves."""
        newest = newest_rows(found)
        hits: list[Hit] = []
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for row in found:  # best first
            item_id = str(row["item_id"])
            score = float(row["distance"])
            if min_score is not None and score < min_score:
                break
            if item_id in seen or newest[item_id] is not row or item_id in exclude:
                continue
            metadata = dict(row.get("metadata") or {})
            if filters is not None and not filters.matches_values(str(row["source"]), metadata):
                continue
            seen.add(item_id)
            hits.append(Hit(item_id, str(row["uri"]), score, metadata, sha256=str(row["sha256"]) or None))
            rows.append(row)
            if len(hits) == top_k:
                break
        return hits, rows

    def item_vector(self, item_id: str) -> Embedding | None:
        found = self.store.milvus.query(
            self.store.names.items,
            f'{ex.keys_in("key", [ex.item_key(item_id)])} and status == "indexed"',
            ["item_id", "version", "vector"],
            consistency=SEARCH_CONSISTENCY,
        )
        row = newest_rows(r for r in found if r["item_id"] == item_id).get(item_id)
        return None if row is None else np.asarray(row["vector"], dtype=np.float32)

    def info(self) -> IndexInfo:
        """What every result carries: the counts of the last refresh (no call to Milvus)."""
        with self._lock:
            items, newest = self._items, self._newest
        return IndexInfo(
            items=items,
            vectors=items,
            delta_size=0,
            generation=0,
            newest_indexed_at=None if newest is None else datetime.fromtimestamp(newest, tz=UTC),
        )

    def state(self) -> SearcherState:
        with self._lock:
            return SearcherState(
                vectors=self._items, delta_size=0, generation=0, pending_changes=0, refreshed_at=self._refreshed_at
            )

    def refresh(self) -> None:
        """Read the counts and the newest write (two small queries). Raises StoreUnavailable while Milvus
        is away."""
        milvus, names = self.store.milvus, self.store.names
        items = milvus.count(names.items, 'status == "indexed"', consistency=SEARCH_CONSISTENCY)
        _, newest = self.store.writer_counters(consistency=SEARCH_CONSISTENCY)
        with self._lock:
            self._items, self._newest, self._refreshed_at = items, newest, time.time()


def _below(found: list[dict[str, Any]], min_score: float | None) -> bool:
    return min_score is not None and bool(found) and float(found[-1]["distance"]) < min_score


def _vectors(rows: list[dict[str, Any]], dim: int) -> Embedding:
    """The rows' vectors, row by row (what `collapse=near` compares)."""
    if not rows:
        return np.zeros((0, dim), np.float32)
    return np.asarray([row["vector"] for row in rows], dtype=np.float32)
