"""Search by weighted terms (texts, images, stored items); results carry id, uri, score and metadata.

`SearchService` turns the terms into one query vector (`shared.query` has the maths), asks the backend's
`VectorSearch` for ranked candidates, and shapes them into a page (`shared.ranking`):

    terms ─▶ vectors (the text tower, the image tower, or stored vectors: no model call)
          ─▶ q = normalised Σ w_i ê_i
          ─▶ VectorSearch.search(q, n, filters, min_score, exclude)        n candidates, best first
          ─▶ drop_tail (max_drop) ─▶ collapse ─▶ order ─▶ the page after the cursor
             └── n grows (x4) until the page is full, the candidates run out, or MAX_CANDIDATES ◀─┘

It never sees how the backend searches.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence, Set
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared import ranking
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import InvalidRequest, NotFound
from shared.query import (
    MAX_DEPTH,
    MAX_TOP_K,
    Collapse,
    Cursor,
    ImageTerm,
    ItemTerm,
    Place,
    SearchOptions,
    Term,
    TextTerm,
    check_terms,
    combine,
    fingerprint,
)
from shared.roles import Catalog, VectorSearch
from shared.types import Embedding, Filters, Hit, IndexInfo, SearchResult

logger = logging.getLogger(__name__)

__all__ = ["MAX_DEPTH", "MAX_QUERY_CHARS", "MAX_TOP_K", "SearchService", "cap_query"]

MAX_QUERY_CHARS: int = Settings.model_fields["max_query_chars"].default  # without settings (tests, tools)
NEAR_DUPLICATE_COSINE: float = Settings.model_fields["near_duplicate_cosine"].default
# Candidates asked of the backend at most for one page: enough for MAX_DEPTH results when copies fold
# three in four of them away.
MAX_CANDIDATES = 4 * MAX_DEPTH


@dataclass(frozen=True)
class _Ranked:
    hits: list[Hit]  # every result up to the depth needed, in result order
    complete: bool  # nothing beyond them passes (the candidates ran out, or the cutoff)
    partial: bool


class SearchService:
    def __init__(
        self,
        vectors: VectorSearch,
        catalog: Catalog,
        embedder: Embedder,
        *,
        max_query_chars: int = MAX_QUERY_CHARS,
        near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE,
    ) -> None:
        self.vectors = vectors
        self.catalog = catalog
        self.embedder = embedder
        self.max_query_chars = max_query_chars
        self.near_duplicate_cosine = near_duplicate_cosine

    # -- the one search -----------------------------------------------------------------------------------

    def search(self, terms: Sequence[Term], options: SearchOptions | None = None) -> SearchResult:
        """One page of results for weighted terms."""
        options = options or SearchOptions()
        options.check()
        check_terms(terms)
        terms, vectors, truncated = self._embedded(terms)
        vector = combine([t.weight for t in terms], vectors)
        exclude = frozenset(t.item_id for t in terms if isinstance(t, ItemTerm))
        print_ = fingerprint(terms, options)
        after = Cursor.decode(options.cursor, print_) if options.cursor is not None else None
        ranked = self._ranked(vector, options, exclude, after)
        descending = options.order == "desc"
        page, before = ranking.page_after(
            ranked.hits, after.after if after else None, options.top_k, options.sort_key, descending
        )
        shown = before + len(page)
        more = page and shown < min(len(ranked.hits), MAX_DEPTH)
        next_cursor = Cursor(print_, shown, Place.of(page[-1], options.sort_key)).encode() if more else None
        return SearchResult(page, self.info(), truncated, next_cursor, ranked.partial)

    def _ranked(self, vector: Embedding, options: SearchOptions, exclude: Set[str], after: Cursor | None) -> _Ranked:
        """The results, in order, deep enough for the page after `after` (and one more, to know if more
        follow); with sort_by, every relevant result up to MAX_DEPTH (the order depends on all of them)."""
        sort_key, descending = options.sort_key, options.order == "desc"
        need = MAX_DEPTH if sort_key else min(MAX_DEPTH, (after.offset if after else 0) + options.top_k + 1)
        fetch = min(MAX_CANDIDATES, need * (1 if options.collapse == Collapse.NONE else 2))
        near = options.collapse == Collapse.NEAR
        while True:
            found = self.vectors.search(vector, fetch, options.filters, options.min_score, exclude, with_vectors=near)
            hits, vectors = _by_score(found.hits, found.vectors)
            kept, cut = ranking.drop_tail(hits, options.max_drop)
            groups = ranking.collapse(
                kept, options.collapse, vectors[: len(kept)] if near else None, self.near_duplicate_cosine
            )
            complete = cut or (len(found.hits) < fetch and not found.partial)
            ordered = ranking.order(groups, sort_key, descending)[:MAX_DEPTH]
            if complete or found.partial or fetch >= MAX_CANDIDATES or self._deep_enough(ordered, need, options, after):
                partial = found.partial or (not complete and len(ordered) < need)
                return _Ranked(ordered, complete, partial)
            fetch = min(MAX_CANDIDATES, fetch * 4)

    @staticmethod
    def _deep_enough(ordered: list[Hit], need: int, options: SearchOptions, after: Cursor | None) -> bool:
        if len(ordered) < need:
            return False
        if after is None or options.sort_key:
            return True
        # The cursor's place may have moved down (items added above it): the page must still be full.
        _, before = ranking.page_after(ordered, after.after, options.top_k, None, options.order == "desc")
        return len(ordered) - before > options.top_k

    # -- terms to one vector --------------------------------------------------------------------------------

    def _embedded(self, terms: Sequence[Term]) -> tuple[list[Term], list[Embedding], bool]:
        """The terms with their texts as the model reads them, one vector per term, and whether a text was
        cut (here, at max_query_chars, or by the model's context)."""
        capped: list[Term] = []
        vectors: list[Embedding | None] = []
        truncated = False
        for term in terms:
            if isinstance(term, TextTerm):
                text, cut = cap_query(term.text, self.max_query_chars)
                if not text:
                    raise InvalidRequest("the query is empty: describe the images you are looking for")
                embedded = self.embedder.encode_text(text)  # cached by the capped text: a huge query is not kept
                truncated = truncated or cut or embedded.truncated
                capped.append(TextTerm(text, term.weight))
                vectors.append(embedded.vector)
            elif isinstance(term, ItemTerm):
                if not term.item_id.strip():
                    raise InvalidRequest("the item id is empty")
                capped.append(term)
                vectors.append(self._item_vector(term.item_id))
            else:
                capped.append(term)
                vectors.append(None)
        images = [t.image for t in terms if isinstance(t, ImageTerm)]
        if images:
            encoded = iter(self.embedder.encode_images(images))
            vectors = [next(encoded) if v is None else v for v in vectors]
        return capped, [v for v in vectors if v is not None], truncated

    def _item_vector(self, item_id: str) -> Embedding:
        vector = self.vectors.item_vector(item_id)
        if vector is None:
            item = self.catalog.get_item(item_id)
            if item is None:
                raise NotFound(f"no item with id {item_id!r}")
            raise NotFound(f"item {item_id!r} has no vector (status {item.status}: {item.reason})")
        return vector

    # -- the single-term searches (one text, one image, one stored item) --------------------------------------

    def search_text(
        self, query: str, top_k: int = 10, filters: Filters | None = None, min_score: float | None = None
    ) -> SearchResult:
        return self.search([TextTerm(query)], SearchOptions(top_k=top_k, filters=filters, min_score=min_score))

    def search_image(
        self, image: Image.Image, top_k: int = 10, filters: Filters | None = None, min_score: float | None = None
    ) -> SearchResult:
        term = ImageTerm(image, digest=hashlib.sha256(image.tobytes()).hexdigest())
        return self.search([term], SearchOptions(top_k=top_k, filters=filters, min_score=min_score))

    def similar_to_item(
        self, item_id: str, top_k: int = 10, filters: Filters | None = None, min_score: float | None = None
    ) -> SearchResult:
        """Items like a stored one, by its stored vector (no model call), without the item itself."""
        return self.search([ItemTerm(item_id)], SearchOptions(top_k=top_k, filters=filters, min_score=min_score))

    def search_vector(
        self,
        vector: Embedding,
        top_k: int,
        filters: Filters | None = None,
        min_score: float | None = None,
        exclude: Set[str] = frozenset(),
    ) -> list[Hit]:
        """The backend's top_k live items by cosine similarity that pass the filters, best first (no
        collapsing, no pages)."""
        return self.vectors.search(vector, top_k, filters, min_score, exclude).hits

    def info(self) -> IndexInfo:
        """Size and freshness of the searched index, which every result carries."""
        return self.vectors.info()


def _by_score(hits: list[Hit], vectors: Embedding | None) -> tuple[list[Hit], Embedding]:
    """The backend's hits in the one score order (ties by id), their vectors with them."""
    order = sorted(range(len(hits)), key=lambda i: (-round(hits[i].score, 6), hits[i].id))
    sorted_vectors = vectors[order] if vectors is not None and len(hits) else np.zeros((0, 0), np.float32)
    return [hits[i] for i in order], sorted_vectors


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
