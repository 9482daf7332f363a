"""`VectorSearch` on the SQLite backend: a FAISS `LiveIndex` of the store's change feed, whose vector ids
are resolved to items by the same feed.

    query ─▶ filter? ─▶ feed.matching_vectors (the filter tags, at most PREFILTER_MAX ids)
               │          └─ none match ─▶ no hits, without touching FAISS
               │          └─ the ids ─▶ LiveIndex.search among them (exact) ─┐
               └─ no filter, or one too common to list ─▶ LiveIndex.search ─┤
                                                                           ▼
        feed.items_for_vectors ─▶ exact filter check, exclusions, min_score ─▶ Hits
        └── widen k (x4) until top_k pass, candidates run out, or MAX_SCAN were checked (then `partial`)

Every step is bounded: a filter that matches nothing answers from one index lookup, a rare one scores only
its own items, and a common one passes enough of the nearest vectors within a few widenings. FAISS runs
outside the store's lock; the store's reads take it one chunk at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Set

import numpy as np

from shared.roles import ChangeFeed, Found, SearcherState, VectorIds
from shared.sqlite.index import Candidates, LiveIndex
from shared.types import Embedding, Filters, Hit, IndexInfo, Item

logger = logging.getLogger(__name__)

# A filter whose tags match at most this many items is searched among them only (exact, whatever their
# rank). Listing them reads that many rows of an index: 20k take about 10 ms.
PREFILTER_MAX = 20_000
# Otherwise at least PREFILTER_MAX items pass the filter, so the nearest vectors pass it often enough; at
# most this many of them are checked (in SQL: about 50 ms for 10k) before the search gives up looking and
# says so (`partial`). Only a filter on `null` alone can reach it before finding top_k.
MAX_SCAN = 10_000


class IndexSearch:
    def __init__(self, feed: ChangeFeed, index: LiveIndex) -> None:
        self.feed = feed
        self.index = index

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
        filters = filters or Filters()
        query = np.asarray(query, dtype=np.float32)
        among = None if filters.empty else self.feed.matching_vectors(filters, PREFILTER_MAX)
        if among is not None and len(among) == 0:
            return Found([], vectors=np.zeros((0, query.shape[-1]), np.float32) if with_vectors else None)
        post_filtered = among is None and (not filters.empty or bool(exclude))
        fetch = min(top_k * 4, MAX_SCAN) + len(exclude) if post_filtered else top_k + len(exclude)
        items: dict[int, Item | None] = {}
        partial = False
        while True:  # widen the candidate list until top_k pass the checks, candidates run out, or the bound
            candidates = self._candidates(query, fetch, among)
            unknown = [vid for vid, _ in candidates if vid not in items]
            found = self.feed.items_for_vectors(unknown, None if filters.empty else filters)
            items.update((vid, found.get(vid)) for vid in unknown)
            hits, vids, below_min = _check(candidates, items, top_k, filters, min_score, exclude)
            if len(hits) == top_k or below_min or len(candidates) < fetch:
                break
            if among is None and fetch >= MAX_SCAN:
                partial = True
                break
            fetch = fetch * 4 if among is not None else min(fetch * 4, MAX_SCAN)
        vectors = None
        if with_vectors:
            stored = self.feed.embeddings(vids)
            vectors = np.stack([stored[v] for v in vids]) if vids else np.zeros((0, query.shape[-1]), np.float32)
        return Found(hits, partial=partial, vectors=vectors)

    def _candidates(self, query: Embedding, k: int, among: VectorIds | None) -> Candidates:
        if among is None:
            return self.index.search(query, k)
        try:
            return self.index.search(query, k, among)
        except RuntimeError:  # an index that takes no selector (faiss on a GPU): score the few from the store
            logger.debug("the index cannot search among ids; scoring %d stored vectors instead", len(among))
            stored = self.feed.embeddings([int(v) for v in among])
            vids = list(stored)
            if not vids:
                return []
            scores = np.stack([stored[v] for v in vids]) @ query.reshape(-1)
            order = np.argsort(-scores)[:k]
            return [(vids[i], float(scores[i])) for i in order]

    def item_vector(self, item_id: str) -> Embedding | None:
        stored = self.feed.item_vector(item_id)
        return None if stored is None else stored[1]

    def info(self) -> IndexInfo:
        """Every result carries it, so it stays cheap: the index's own counts and one row of the store."""
        size = self.index.size  # one live vector per searchable item
        return IndexInfo(
            items=size,
            vectors=size,
            delta_size=self.index.delta_size,
            generation=self.index.generation,
            newest_indexed_at=self.feed.newest_indexed_at(),
        )

    def state(self) -> SearcherState:
        index = self.index
        return SearcherState(
            vectors=index.size,
            delta_size=index.delta_size,
            generation=index.generation,
            pending_changes=max(0, self.feed.index_meta().seq - index.seq),
            refreshed_at=index.refreshed_at,
        )

    def refresh(self) -> None:
        self.index.refresh()


def _check(
    candidates: Candidates,
    items: dict[int, Item | None],
    top_k: int,
    filters: Filters,
    min_score: float | None,
    exclude: Set[str],
) -> tuple[list[Hit], list[int], bool]:
    """The first top_k candidates that pass, their vector ids, and whether min_score ended the list."""
    hits: list[Hit] = []
    vids: list[int] = []
    for vid, score in candidates:
        if min_score is not None and score < min_score:
            return hits, vids, True
        item = items.get(vid)
        if item is None or item.id in exclude or not filters.matches(item):
            continue  # deleted since the index last refreshed, excluded, or filtered out
        hits.append(Hit(item.id, item.uri, score, item.metadata, sha256=item.sha256))
        vids.append(vid)
        if len(hits) == top_k:
            break
    return hits, vids, False
