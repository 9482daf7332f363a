"""Search by text, by image, or by a stored item's vector; results carry id, uri, score and metadata.

`SearchService` turns a query into a vector (the model, or a stored vector) and asks the backend's
`VectorSearch` for the best items; it never sees how the backend searches.
"""

from __future__ import annotations

import logging
from collections.abc import Set

from PIL import Image

from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import InvalidRequest, NotFound
from shared.roles import Catalog, VectorSearch
from shared.types import Embedding, Filters, Hit, IndexInfo, SearchResult

logger = logging.getLogger(__name__)

MAX_TOP_K = 100
MAX_QUERY_CHARS: int = Settings.model_fields["max_query_chars"].default  # without settings (tests, tools)


class SearchService:
    def __init__(
        self, vectors: VectorSearch, catalog: Catalog, embedder: Embedder, *, max_query_chars: int = MAX_QUERY_CHARS
    ) -> None:
        self.vectors = vectors
        self.catalog = catalog
        self.embedder = embedder
        self.max_query_chars = max_query_chars

    def search_text(
        self, query: str, top_k: int = 10, filters: Filters | None = None, min_score: float | None = None
    ) -> SearchResult:
        text, cut = cap_query(query, self.max_query_chars)
        if not text:
            raise InvalidRequest("the query is empty: describe the images you are looking for")
        _check_top_k(top_k)
        embedded = self.embedder.encode_text(text)  # cached by the capped text: a huge query is not kept
        hits = self.search_vector(embedded.vector, top_k, filters, min_score)
        return SearchResult(hits, self.info(), query_truncated=cut or embedded.truncated)

    def search_image(
        self, image: Image.Image, top_k: int = 10, filters: Filters | None = None, min_score: float | None = None
    ) -> SearchResult:
        _check_top_k(top_k)
        vector = self.embedder.encode_images([image])[0]
        return SearchResult(self.search_vector(vector, top_k, filters, min_score), self.info())

    def similar_to_item(
        self, item_id: str, top_k: int = 10, filters: Filters | None = None, min_score: float | None = None
    ) -> SearchResult:
        """Items like a stored one, by its stored vector (no model call), without the item itself."""
        _check_top_k(top_k)
        vector = self.vectors.item_vector(item_id)
        if vector is None:
            item = self.catalog.get_item(item_id)
            if item is None:
                raise NotFound(f"no item with id {item_id!r}")
            raise NotFound(f"item {item_id!r} has no vector (status {item.status}: {item.reason})")
        hits = self.search_vector(vector, top_k, filters, min_score, exclude={item_id})
        return SearchResult(hits, self.info())

    def search_vector(
        self,
        vector: Embedding,
        top_k: int,
        filters: Filters | None = None,
        min_score: float | None = None,
        exclude: Set[str] = frozenset(),
    ) -> list[Hit]:
        """The top_k live items by cosine similarity that pass the filters, best first."""
        return self.vectors.search(vector, top_k, filters, min_score, exclude)

    def info(self) -> IndexInfo:
        """Size and freshness of the searched index, which every result carries."""
        return self.vectors.info()


def cap_query(query: str, max_chars: int) -> tuple[str, bool]:
    """The query as the model will read it, at most `max_chars` long, and whether it was cut.

    Runs of whitespace become one space first, as CLIP's tokenizer does anyway: padding does not count
    against the cap, and "red  bike" and "red bike" share one cache entry. Only a prefix of the query is
    read, widened while it collapses to fewer than `max_chars` (a 1 MB query costs microseconds, not the
    30 ms and 11 MiB of splitting all of it)."""
    window = 4 * max_chars
    while True:
        head = query[:window]
        text = " ".join(head.split())
        if len(text) > max_chars:  # a prefix of the whole query's collapsed text, so cutting it is exact
            return text[:max_chars].rstrip(), True
        if len(head) == len(query):
            return text, False
        window *= 4


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidRequest(f"top_k must be between 1 and {MAX_TOP_K} (got {top_k})")
