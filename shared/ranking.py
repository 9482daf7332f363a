"""From a backend's ranked candidates to one page: the relative cutoff, copies folded, the order, the page.

    hits, best first ─▶ drop_tail (max_drop) ─▶ collapse (hash | near | parent | none) ─▶ order (score | metadata)
                     ─▶ page_after (the cursor's place) ─▶ top_k hits + whether more follow

Pure functions of lists: no store, no model. Each step keeps what a prefix of the candidates decides
within that prefix (a copy is folded into the best-ranked item it copies, the tail is cut from the best
score), so a deeper search extends a shallower one instead of reshuffling it: what pages rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import cmp_to_key

import numpy as np

from shared.query import Collapse, Place, compare
from shared.types import Embedding, Hit, parent_of


def drop_tail(hits: Sequence[Hit], max_drop: float | None) -> tuple[list[Hit], bool]:
    """The hits scoring at least the best score minus `max_drop`, and whether any were dropped."""
    if max_drop is None or not hits:
        return list(hits), False
    floor = hits[0].score - max_drop
    kept = [h for h in hits if h.score >= floor]
    return kept, len(kept) < len(hits)


def collapse(hits: Sequence[Hit], mode: Collapse, vectors: Embedding | None = None, near: float = 1.0) -> list[Hit]:
    """One hit per group, the best-ranked of each, with the others' ids in `duplicates`.

    `hash`: the same content hash. `near`: that, or a vector at cosine >= `near` to the hit that leads the
    group (each item joins the best-ranked leader it is that close to; leaders are never merged with each
    other, so groups do not chain). `parent`: the images of one product (the id says whose: `parent_of`);
    an item that is no product's image groups by its hash. `hits` are best first; `vectors` (for `near`)
    row by row with them."""
    if mode == Collapse.NONE or not hits:
        return list(hits)
    leader_of: list[int] = list(range(len(hits)))
    by_key: dict[tuple[str, str], int] = {}
    for i, hit in enumerate(hits):
        key = _group_key(hit, mode)
        if key is not None:
            leader_of[i] = by_key.setdefault(key, i)
    if mode == Collapse.NEAR:
        assert vectors is not None and len(vectors) == len(hits), "near-duplicate collapsing needs the hits' vectors"
        free = np.array([leader_of[i] == i for i in range(len(hits))])
        for i in range(len(hits)):
            if leader_of[i] != i or not free[i]:
                continue
            free[i] = False  # a leader: it claims the later free items close to it, and their hash copies
            later = np.flatnonzero(free[i + 1 :]) + i + 1
            if len(later):
                close = later[vectors[later] @ vectors[i] >= near]
                for j in close:
                    leader_of[j] = i
                free[close] = False
        for i in range(len(hits)):  # a hash copy follows its leader into that leader's group
            leader_of[i] = leader_of[leader_of[i]]
    members: dict[int, list[str]] = {}
    for i, lead in enumerate(leader_of):
        if lead != i:
            members.setdefault(lead, []).append(hits[i].id)
    return [
        replace(hit, duplicates=tuple(members.get(i, ()))) if i in members else hit
        for i, hit in enumerate(hits)
        if leader_of[i] == i
    ]


def _group_key(hit: Hit, mode: Collapse) -> tuple[str, str] | None:
    """What the hits of one group share before any vector is compared (None: a group of its own)."""
    if mode == Collapse.PARENT:
        # Two products may show the same picture (a placeholder, a shared lifestyle shot): each product
        # still gets its hit, so a product's images never fold by hash into another product's.
        product = parent_of(hit.id)
        if product is not None:
            return ("parent", product)
    return None if hit.sha256 is None else ("sha256", hit.sha256)


def order(hits: Sequence[Hit], sort_key: str | None, descending: bool) -> list[Hit]:
    """The hits in the result order (`shared.query.compare`): by score then id, or by a metadata value."""
    places = {id(h): Place.of(h, sort_key) for h in hits}
    return sorted(hits, key=cmp_to_key(lambda a, b: compare(places[id(a)], places[id(b)], descending)))


def page_after(
    hits: Sequence[Hit], after: Place | None, size: int, sort_key: str | None, descending: bool
) -> tuple[list[Hit], int]:
    """The `size` hits that come right after the place `after` (from the start without one) in `hits`
    (already in order), and how many hits come before the page."""
    start = 0
    if after is not None:
        while start < len(hits) and compare(Place.of(hits[start], sort_key), after, descending) <= 0:
            start += 1
    return list(hits[start : start + size]), start
