"""What a search asks for: weighted terms, and how to shape the answer (cutoffs, copies, order, pages).

Composite queries
-----------------
A query is one or more terms, each a text or an image (a stored item, or an image given as bytes, a path
or a URL), each with a weight that may be negative. Every term is embedded and normalised (ê_i), and the
query vector is the normalised weighted sum:

    q = s / |s|,   s = Σ w_i ê_i

For a stored (unit) vector x the score is cos(x, q) = x·q = Σ w_i cos(x, ê_i) / |s|: the weighted sum of
x's similarities to each term, divided by one positive number that is the same for every item. So the
ranking is the ranking by Σ w_i cos(x, ê_i), and the score is still a cosine (between x and q), in -1..1.

CLIP has no notion of negation. A negative weight lowers the score of items similar to that term: "a
beach" with "people" at -0.5 ranks beaches that look less like the text "people" higher, but a beach full
of people can still be returned, and a term far from every image changes little. To exclude items, filter
on metadata. (The text "no people" is no help either: CLIP reads it much like "people".) Text and image
embeddings sit in different regions of CLIP's space (the modality gap), so with equal weights an image
term usually weighs more on the ranking than a text term; lower its weight to let the text lead.

Pages
-----
Results are in one total order: by score (rounded to 6 decimals, as shown), then id; or, with `sort_by`, by
that metadata value, then score, then id. A page's `next_cursor` holds the last hit's place in that order
and a fingerprint of the query; the next page starts strictly after that place. So pages never overlap,
and while the index does not change they concatenate to one deep search. A search reaches at most
MAX_DEPTH results deep.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from PIL import Image

from shared.errors import InvalidRequest
from shared.types import Embedding, Filters, Hit, MetaValue

MAX_TOP_K = 100  # results per page
MAX_DEPTH = 1_000  # how deep pages reach into one search
MAX_TERMS = 16
MAX_IMAGE_TERMS = 4  # images given as bytes, paths or URLs: each is read, decoded and embedded
MAX_WEIGHT = 100.0
MAX_CURSOR_CHARS = 4_096  # an id is at most 1 KiB; a cursor holds one

SORT_PREFIX = "metadata."


@dataclass(frozen=True)
class TextTerm:
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class ItemTerm:
    """A stored item's look (its stored vector: no model call). The item itself is left out of the results."""

    item_id: str
    weight: float = 1.0


@dataclass(frozen=True)
class ImageTerm:
    image: Image.Image
    digest: str  # sha256 of the image's bytes: names the image in a cursor's fingerprint
    weight: float = 1.0


Term = TextTerm | ItemTerm | ImageTerm


class Collapse(StrEnum):
    """How copies are shown: `hash` folds items with the same content hash into the best-ranked one,
    listing the others in its `duplicates`; `near` also folds items whose vectors are at least
    CLIPDEX_NEAR_DUPLICATE_COSINE alike (re-encoded or resized copies); `parent` folds a product's images
    (`shared.types.parent_of`) into its best-ranked one, and other items as `hash` does; `none` shows
    every item."""

    HASH = "hash"
    NEAR = "near"
    PARENT = "parent"
    NONE = "none"


@dataclass(frozen=True)
class SearchOptions:
    """Everything about a search but its terms."""

    top_k: int = 10
    filters: Filters | None = None
    min_score: float | None = None  # drop hits scoring below this cosine
    max_drop: float | None = None  # drop hits scoring below the best hit's score minus this
    collapse: Collapse = Collapse.HASH
    sort_by: str | None = None  # "metadata.KEY": order the results by that value (score breaks ties)
    order: Literal["asc", "desc"] = "desc"
    cursor: str | None = None  # a previous page's next_cursor

    def check(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be a whole number from 1 to {MAX_TOP_K} (got {self.top_k})")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise InvalidRequest(
                f"min_score is a cosine similarity and must be between -1 and 1 (got {self.min_score}); "
                "leave it out to get the top_k best matches whatever their score"
            )
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 2.0:
            raise InvalidRequest(
                f"max_drop is how far below the best score a result may fall, from 0 to 2 (got {self.max_drop})"
            )
        if self.collapse not in tuple(Collapse):
            raise InvalidRequest(f"collapse must be hash, near, parent or none (got {self.collapse!r})")
        if self.order not in ("asc", "desc"):
            raise InvalidRequest(f"order must be asc or desc (got {self.order!r})")
        if self.sort_by is not None and self.sort_key is None:
            raise InvalidRequest(
                f"sort_by takes {SORT_PREFIX}KEY (a metadata key, e.g. {SORT_PREFIX}year) or score "
                f"(got {self.sort_by!r})"
            )

    @property
    def sort_key(self) -> str | None:
        """The metadata key to sort by; None to keep the ranking by score."""
        if self.sort_by is None or self.sort_by == "score":
            return None
        key = self.sort_by.removeprefix(SORT_PREFIX)
        return key if self.sort_by.startswith(SORT_PREFIX) and key else None


def check_terms(terms: Sequence[Term]) -> None:
    if not terms:
        raise InvalidRequest("give at least one term: a text, or an image (an item id, image bytes, a path or a URL)")
    if len(terms) > MAX_TERMS:
        raise InvalidRequest(f"at most {MAX_TERMS} terms in one query (got {len(terms)})")
    for term in terms:
        w = term.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w == 0:
            raise InvalidRequest(f"a term's weight is a non-zero number (got {w!r})")
        if abs(w) > MAX_WEIGHT:
            raise InvalidRequest(f"a term's weight is between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g} (got {w})")
    images = sum(isinstance(term, ImageTerm) for term in terms)
    if images > MAX_IMAGE_TERMS:
        raise InvalidRequest(f"at most {MAX_IMAGE_TERMS} images in one query (got {images})")
    if all(term.weight < 0 for term in terms):
        raise InvalidRequest(
            "every term has a negative weight: say what to look for with at least one positive term "
            "(negative terms only push results away from what they describe)"
        )


def combine(weights: Sequence[float], vectors: Sequence[Embedding]) -> Embedding:
    """q = s / |s|, s = Σ w_i ê_i: the query vector of weighted terms (see the module's docstring)."""
    total = np.zeros(np.shape(vectors[0])[-1], dtype=np.float64)
    for weight, vector in zip(weights, vectors, strict=True):
        total += weight * (vector / np.linalg.norm(vector))
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise InvalidRequest("the terms cancel each other out: change a weight, or drop a term")
    return (total / norm).astype(np.float32)


# -- result order -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """A hit's place in the result order, as a cursor keeps it."""

    score: float  # rounded to 6 decimals
    id: str
    value: MetaValue = None  # the sort value (sorting by metadata only)
    has_value: bool = False  # False: the item has no usable sort value (it sorts last)

    @classmethod
    def of(cls, hit: Hit, sort_key: str | None) -> Place:
        score = round(hit.score, 6)
        if sort_key is None:
            return cls(score, hit.id)
        value = hit.metadata.get(sort_key)
        if isinstance(value, bool | int | float | str) and not (isinstance(value, float) and math.isnan(value)):
            return cls(score, hit.id, value, True)
        return cls(score, hit.id)


def compare(a: Place, b: Place, descending: bool) -> int:
    """-1 when `a` comes first, 1 when `b` does (0: the same place). Present sort values first, numbers
    before text (reversed with `descending`), items without one last; then score, best first; then id."""
    if a.has_value != b.has_value:
        return -1 if a.has_value else 1
    if a.has_value:
        ka, kb = _value_key(a.value), _value_key(b.value)
        if ka != kb:
            first = ka < kb
            return -1 if first != descending else 1
    if a.score != b.score:
        return -1 if a.score > b.score else 1
    if a.id != b.id:
        return -1 if a.id < b.id else 1
    return 0


def _value_key(value: MetaValue) -> tuple[int, Any]:
    if isinstance(value, bool | int | float):
        return (0, float(value) if isinstance(value, bool) else value)
    return (1, value)


# -- cursors ------------------------------------------------------------------------------------------------


def fingerprint(terms: Sequence[Term], options: SearchOptions) -> str:
    """What a cursor belongs to: the terms and every option but top_k (pages may differ in size)."""
    parts: list[Any] = []
    for term in terms:
        if isinstance(term, TextTerm):
            parts.append(["text", term.text, term.weight])
        elif isinstance(term, ItemTerm):
            parts.append(["item", term.item_id, term.weight])
        else:
            parts.append(["image", term.digest, term.weight])
    filters = options.filters or Filters()
    shape = [
        sorted(filters.metadata.items()),
        filters.source,
        options.min_score,
        options.max_drop,
        str(options.collapse),
        options.sort_key,
        options.order if options.sort_key else None,
    ]
    blob = json.dumps([parts, shape], ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Cursor:
    fingerprint: str
    offset: int  # results before the next page (a hint: the place decides)
    after: Place

    def encode(self) -> str:
        body = {"v": 1, "f": self.fingerprint, "o": self.offset, "s": self.after.score, "i": self.after.id}
        if self.after.has_value:
            body["m"] = self.after.value
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, fingerprint: str) -> Cursor:
        """The cursor, if it is one this server gave out for this very search."""
        if not isinstance(text, str) or len(text) > MAX_CURSOR_CHARS:
            raise InvalidRequest(_BAD_CURSOR)
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            body = json.loads(raw)
        except (ValueError, binascii.Error, RecursionError):
            raise InvalidRequest(_BAD_CURSOR) from None
        if not isinstance(body, dict) or body.get("v") != 1:
            raise InvalidRequest(_BAD_CURSOR)
        fp, offset, score, item_id = body.get("f"), body.get("o"), body.get("s"), body.get("i")
        if not (
            isinstance(fp, str)
            and isinstance(offset, int)
            and not isinstance(offset, bool)
            and 0 < offset < MAX_DEPTH
            and isinstance(score, int | float)
            and not isinstance(score, bool)
            and math.isfinite(score)
            and isinstance(item_id, str)
        ):
            raise InvalidRequest(_BAD_CURSOR)
        if fp != fingerprint:
            raise InvalidRequest(
                "this cursor belongs to another search: send it with the same query, filters and options "
                "as the page it came from (only top_k may change), or leave it out to start again"
            )
        value = body.get("m")
        has_value = "m" in body and isinstance(value, bool | int | float | str)
        return cls(fp, offset, Place(float(score), item_id, value if has_value else None, has_value))


_BAD_CURSOR = "the cursor is not one this server gave out: pass a next_cursor unchanged, or leave it out to start again"
