"""`VectorSearch` on the SQLite backend: a FAISS `LiveIndex` of the store's change feed, whose vector ids
are resolved to items by the same feed.

    query ─▶ LiveIndex.search(k) ─▶ (vector id, score)... ─▶ feed.items_for_vectors ─▶ filters ─▶ Hits
              └───────────── widen k (x4) until top_k items pass, or candidates run out ◀──┘
"""

from __future__ import annotations

from collections.abc import Set

import numpy as np

from shared.roles import ChangeFeed, SearcherState
from shared.sqlite.index import LiveIndex
from shared.types import Embedding, Filters, Hit, IndexInfo, ModelIdentity


class IndexSearch:
    def __init__(self, feed: ChangeFeed, index: LiveIndex, model: ModelIdentity | None = None) -> None:
        self.feed = feed
        self.index = index
        self.model = model

    def search(
        self,
        query: Embedding,
        top_k: int,
        filters: Filters | None = None,
        min_score: float | None = None,
        exclude: Set[str] = frozenset(),
    ) -> list[Hit]:
        filters = filters or Filters()
        selective = not filters.empty or bool(exclude)
        fetch = top_k * 4 + len(exclude) if selective else top_k
        query = np.asarray(query, dtype=np.float32)
        while True:  # widen the candidate list until top_k pass the filters or candidates run out
            candidates = self.index.search(query, fetch)
            items = self.feed.items_for_vectors([vid for vid, _ in candidates])
            hits: list[Hit] = []
            below_min = False
            for vid, score in candidates:
                if min_score is not None and score < min_score:
                    below_min = True
                    break
                item = items.get(vid)
                if item is None or item.id in exclude or not filters.matches(item):
                    continue  # deleted since the index last refreshed, or filtered out
                hits.append(Hit(item.id, item.uri, score, item.metadata))
                if len(hits) == top_k:
                    return hits
            if below_min or len(candidates) < fetch:
                return hits
            fetch *= 4

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
            model=self.model,
        )

    def state(self) -> SearcherState:
        index = self.index
        return SearcherState(
            vectors=index.size,
            delta_size=index.delta_size,
            generation=index.generation,
            pending_changes=max(0, self.feed.index_meta().seq - index.seq),
            refreshed_at=index.refreshed_at,
            model=self.model,
        )

    def refresh(self) -> None:
        self.index.refresh()
