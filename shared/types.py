"""Data passed between stages and between the two sides."""

from __future__ import annotations

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


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two embeddings comparable. The store refuses vectors of any other identity."""

    name: str
    pretrained: str
    dim: int
    checksum: str


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
    """Equality on metadata keys, and optionally the item's source."""

    metadata: dict[str, MetaValue] = field(default_factory=dict)
    source: str | None = None

    def matches(self, item: Item) -> bool:
        if self.source is not None and item.source != self.source:
            return False
        return all(item.metadata.get(k) == v for k, v in self.metadata.items())

    @property
    def empty(self) -> bool:
        return not self.metadata and self.source is None


@dataclass(frozen=True)
class Hit:
    id: str
    uri: str
    score: float
    metadata: Metadata


@dataclass(frozen=True)
class IndexInfo:
    items: int
    vectors: int
    delta_size: int
    generation: int
    newest_indexed_at: datetime | None


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    index: IndexInfo
    query_truncated: bool = False
