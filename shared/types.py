"""Data passed between stages and between the two sides."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

Embedding = NDArray[np.float32]
"""L2-normalised float32 vectors, shape [n, dim] (or [dim] for one)."""

Metadata = dict[str, Any]
MetaValue = str | int | float | bool | None


def namespaced_id(source: str, raw_id: str) -> str:
    """Item ids are namespaced by source, so a catalog id never collides with a folder path."""
    return f"{source}:{raw_id}"


# A product's images are items of their own: `<product id>#<the first 16 hex digits of sha256(URL)>`. The
# same URL keeps its item wherever it moves in the product's list; a store finds a product's images by
# their ids (`parent_of`), and the indexer deletes the ones a product no longer names.
IMAGE_KEY_DIGITS = 16
IMAGE_SUFFIX_LENGTH = 1 + IMAGE_KEY_DIGITS  # "#" and the key
_IMAGE_SUFFIX = re.compile(rf"#[0-9a-f]{{{IMAGE_KEY_DIGITS}}}")


def image_id(product_id: str, uri: str) -> str:
    """The item id of one image of a product (namespaced or not, the same way)."""
    key = hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()[:IMAGE_KEY_DIGITS]
    return f"{product_id}#{key}"


def parent_of(item_id: str) -> str | None:
    """The product id of an image's item id, or None for an item that is not a product's image."""
    if len(item_id) > IMAGE_SUFFIX_LENGTH and _IMAGE_SUFFIX.fullmatch(item_id, len(item_id) - IMAGE_SUFFIX_LENGTH):
        return item_id[:-IMAGE_SUFFIX_LENGTH]
    return None


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two embeddings comparable. The store refuses vectors of any other identity."""

    name: str
    pretrained: str
    dim: int
    checksum: str

    def same_weights(self, other: ModelIdentity) -> bool:
        """Do their embeddings mix? The weights decide, not where they were loaded from: the same
        checkpoint at another path (a container mount, a relative path) gives the same embeddings."""
        return (self.name, self.dim, self.checksum) == (other.name, other.dim, other.checksum)


@dataclass(frozen=True)
class Item:
    id: str
    source: str
    uri: str
    sha256: str | None
    metadata: Metadata
    status: Literal["indexed", "failed"]
    reason: str | None
    version: int | None
    vector_id: int | None
    created_at: datetime
    updated_at: datetime
    retriable: bool = False  # its last failure was transient (a timeout, HTTP 5xx...): worth trying again


@dataclass(frozen=True)
class Filters:
    """Equality on metadata keys, and optionally the item's source. `None` matches an absent key too."""

    metadata: dict[str, MetaValue] = field(default_factory=dict)
    source: str | None = None

    def matches(self, item: Item) -> bool:
        return self.matches_values(item.source, item.metadata)

    def matches_values(self, source: str, metadata: Metadata) -> bool:
        if self.source is not None and source != self.source:
            return False
        return all(same_value(metadata.get(k), v) for k, v in self.metadata.items())

    @property
    def empty(self) -> bool:
        return not self.metadata and self.source is None


def same_value(stored: Any, wanted: MetaValue) -> bool:
    """Equality as JSON means it, the same in every backend: `true` is not `1`, `2021` is `2021.0`, a
    string never equals a number, and a list or an object equals no filter value."""
    if wanted is None or stored is None:
        return stored is wanted
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return isinstance(stored, bool) and isinstance(wanted, bool) and stored == wanted
    if isinstance(stored, int | float) and isinstance(wanted, int | float):
        return stored == wanted  # Python compares an int and a float exactly
    return isinstance(stored, str) and isinstance(wanted, str) and stored == wanted


@dataclass(frozen=True)
class Hit:
    id: str
    uri: str
    score: float
    metadata: Metadata
    sha256: str | None = None  # the content hash: copies of one image share it (collapse=hash)
    duplicates: tuple[str, ...] = ()  # ids of the copies folded into this hit (collapse)


@dataclass(frozen=True)
class IndexInfo:
    items: int
    vectors: int
    delta_size: int
    generation: int
    newest_indexed_at: datetime | None
    model: ModelIdentity | None = None  # the model of the space searched: the one that answered


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    index: IndexInfo
    query_truncated: bool = False
    next_cursor: str | None = None  # pass it back for the next page; None: no more results
    partial: bool = False  # the search stopped looking before it was sure: matches further down may be missing
