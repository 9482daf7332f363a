"""The read side's wire shapes: what MCP tools and the HTTP API return, as pydantic models.

The same models give the MCP tools their output schemas and the HTTP API its OpenAPI components, so the
two front doors cannot drift apart.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.query import MAX_DEPTH, MAX_TERMS, MAX_TOP_K, MAX_WEIGHT
from shared.roles import DeadLetter
from shared.status import Reembed, Status
from shared.types import Filters, Hit, IndexInfo, Item, MetaValue, ModelIdentity, SearchResult
from tools.redaction import pretrained_tag

FilterValue = str | int | float | bool | None

COLLAPSE = (
    "How copies show: hash (default) folds items with the same image file into the best-ranked one and "
    "lists the others in its duplicates; near also folds re-encoded or resized copies (vectors at least "
    "CLIPDEX_NEAR_DUPLICATE_COSINE alike); parent shows one hit per product, its best-ranked image, and lists "
    "the product's other images that matched in duplicates (other items fold as with hash); none shows every "
    "item."
)
SORT_BY = (
    "metadata.KEY: order the results by that metadata value (numbers before text; items without it last), "
    "then by score. It sorts the relevant results: those that pass min_score and max_drop, at most "
    f"{MAX_DEPTH:,}; set max_drop or min_score so that only good matches are sorted."
)


class SearchFilters(BaseModel):
    """Which items may appear in the results: all conditions must hold. Keys other than `metadata` and
    `source` are taken as metadata keys, so {"category": "shoes"} works too."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, FilterValue] = Field(
        default_factory=dict,
        description='Metadata keys and the exact value each must have, e.g. {"category": "shoes", "year": 2021}.',
    )
    source: str | None = Field(
        None, description='Only items from this source: "folder" (the watched folder) or "kafka" (the catalog).'
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, value: Any) -> Any:
        """Accept {"category": "shoes"} as well as {"metadata": {"category": "shoes"}}."""
        if isinstance(value, dict):
            extra = {k: v for k, v in value.items() if k not in ("metadata", "source")}
            if extra:
                nested = value.get("metadata") or {}
                if not isinstance(nested, dict):
                    return value
                return {"metadata": {**nested, **extra}, "source": value.get("source")}
        return value

    def to_filters(self) -> Filters:
        values: dict[str, MetaValue] = dict(self.metadata)
        return Filters(metadata=values, source=self.source)


class HitOut(BaseModel):
    id: str = Field(description="The item id; pass it to get_item or find_similar(item_id=...).")
    uri: str = Field(description="Where the image lives (a path or a URL).")
    score: float = Field(description="Cosine similarity to the query, -1 to 1; higher is closer.")
    metadata: dict[str, Any] = Field(description="The item's metadata as the catalog or folder gave it.")
    duplicates: list[str] = Field(
        default_factory=list,
        description="Ids of the items folded into this hit: copies of this image (collapse=hash: the same file; "
        "collapse=near: also re-encoded or resized copies), or the product's other images (collapse=parent).",
    )

    @classmethod
    def of(cls, hit: Hit) -> HitOut:
        return cls(
            id=hit.id, uri=hit.uri, score=round(hit.score, 6), metadata=hit.metadata, duplicates=list(hit.duplicates)
        )


class ModelOut(BaseModel):
    name: str
    pretrained: str = Field(description="The pretrained tag, or the checkpoint's file name.")
    dim: int

    @classmethod
    def of(cls, model: ModelIdentity) -> ModelOut:
        return cls(name=model.name, pretrained=pretrained_tag(model.pretrained), dim=model.dim)


class IndexInfoOut(BaseModel):
    items: int = Field(description="Searchable items.")
    vectors: int = Field(description="Vectors in the index this server searches.")
    delta_size: int = Field(description="Vectors not yet compacted into the main index.")
    generation: int = Field(description="Main index generation (0: none built yet).")
    newest_indexed_at: datetime | None = Field(description="When the newest item was indexed (UTC).")
    model: ModelOut | None = Field(None, description="The model that answered (after a model change, the new one).")

    @classmethod
    def of(cls, info: IndexInfo) -> IndexInfoOut:
        return cls(
            items=info.items,
            vectors=info.vectors,
            delta_size=info.delta_size,
            generation=info.generation,
            newest_indexed_at=info.newest_indexed_at,
            model=None if info.model is None else ModelOut.of(info.model),
        )


NEXT_CURSOR = (
    "Pass it as `cursor` (with the same query and options) for the next page; null when there are no more "
    f"results (pages reach {MAX_DEPTH:,} deep)."
)
PARTIAL = (
    "The search stopped looking before it was sure it had the best matches (a filter on a null value, "
    "checked on a bounded number of the nearest items): better matches may exist. Narrow the filter."
)


class SearchOutput(BaseModel):
    hits: list[HitOut] = Field(description="Best first (or in sort_by order).")
    index: IndexInfoOut = Field(description="How big and how fresh the searched index is.")
    query_truncated: bool = Field(
        False, description="The query was longer than the model's context and only its start was used."
    )
    next_cursor: str | None = Field(None, description=NEXT_CURSOR)
    partial: bool = Field(False, description=PARTIAL)

    @classmethod
    def of(cls, result: SearchResult) -> SearchOutput:
        return cls(
            hits=[HitOut.of(h) for h in result.hits],
            index=IndexInfoOut.of(result.index),
            query_truncated=result.query_truncated,
            next_cursor=result.next_cursor,
            partial=result.partial,
        )


class McpHitOut(HitOut):
    resource: str = Field(
        description="The item as an MCP resource: read it for the metadata, or add /thumbnail (a JPEG of at "
        "most 256 px) or /image (the image file) to it."
    )


class McpSearchOutput(SearchOutput):
    hits: list[McpHitOut] = Field(description="Best first (or in sort_by order).")  # type: ignore[assignment]

    @classmethod
    def of_result(cls, result: SearchResult) -> McpSearchOutput:
        base = SearchOutput.of(result)
        hits = [McpHitOut(**h.model_dump(), resource=item_resource(h.id)) for h in base.hits]
        return cls(
            hits=hits,
            index=base.index,
            query_truncated=base.query_truncated,
            next_cursor=base.next_cursor,
            partial=base.partial,
        )


ITEM_RESOURCE = "clipdex://items/"


def item_resource(item_id: str) -> str:
    """`clipdex://items/{id}`, the id percent-encoded (ids hold `:` and `/`)."""
    return ITEM_RESOURCE + quote(item_id, safe="")


# -- the body of POST /search -----------------------------------------------------------------------------


class TermIn(BaseModel):
    """One term: exactly one of text, item_id, image_base64, path, url or upload, and a weight."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Words describing the image.")
    item_id: str | None = Field(None, description="A stored item: its look (the item itself is left out).")
    image_base64: str | None = Field(None, description="An image file's bytes in standard base64.")
    path: str | None = Field(None, description="An image file on the server, under an allowed root.")
    url: str | None = Field(None, description="An image URL on an allowed host.")
    upload: str | None = Field(None, description="The name of a multipart file part (multipart requests only).")
    weight: float = Field(
        1.0,
        description=f"How much this term counts, -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, not 0; negative pushes "
        "results away from it (CLIP has no negation: it does not filter).",
    )


class SearchIn(BaseModel):
    """POST /search: weighted terms and how to shape the results."""

    model_config = ConfigDict(extra="forbid")

    terms: list[TermIn] = Field(description=f"1 to {MAX_TERMS} terms; at least one with a positive weight.")
    top_k: int = Field(10, description=f"Results per page, 1 to {MAX_TOP_K}.")
    filters: SearchFilters | None = Field(None, description="Only items with these metadata values and/or source.")
    min_score: float | None = Field(None, description="Drop results with a cosine below this (-1 to 1).")
    max_drop: float | None = Field(
        None, description="Drop results scoring more than this below the best result (0 to 2); off by default."
    )
    collapse: Literal["hash", "near", "parent", "none"] = Field("hash", description=COLLAPSE)
    sort_by: str | None = Field(None, description=SORT_BY)
    order: Literal["asc", "desc"] = Field("desc", description="With sort_by: desc (largest, newest first) or asc.")
    cursor: str | None = Field(None, description="A previous page's next_cursor, to get the next page.")


class ItemOut(BaseModel):
    id: str
    source: str = Field(description='"folder" or "kafka".')
    uri: str
    status: str = Field(description='"indexed" (searchable) or "failed" (see reason).')
    reason: str | None = Field(description="Why the item failed, if it did.")
    retriable: bool = Field(description="Its last failure was transient: the indexer tries it again.")
    searchable: bool = Field(description="The item has a vector and can appear in results.")
    metadata: dict[str, Any]
    sha256: str | None = Field(description="Content hash of the indexed image.")
    version: int | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, item: Item) -> ItemOut:
        return cls(
            id=item.id,
            source=item.source,
            uri=item.uri,
            status=item.status,
            reason=item.reason,
            retriable=item.retriable,
            searchable=item.vector_id is not None,
            metadata=item.metadata,
            sha256=item.sha256,
            version=item.version,
            created_at=item.created_at,
            updated_at=item.updated_at,
        )


class ReembedOut(BaseModel):
    """A re-embed in progress (`clipdex reembed`): search uses `model` of the status until it switches."""

    model: ModelOut = Field(description="The model the store is being moved to.")
    state: str = Field(description='"running" (a process fills it now) or "paused" (none does).')
    done: int = Field(description="Live items covered: re-embedded, or failed (their source is gone).")
    total: int = Field(description="Live items to cover.")
    failed: int = Field(description="Items whose source could not be read again (dead letters).")
    rate: float = Field(description="Items per second of the running re-embed (0 when paused).")
    eta_s: float | None = Field(description="Seconds to the switch at that rate; null when not known.")
    started_at: datetime | None

    @classmethod
    def of(cls, re: Reembed) -> ReembedOut:
        cov = re.coverage
        return cls(
            model=ModelOut.of(re.model),
            state="running" if re.running else "paused",
            done=cov.done + cov.failed,
            total=cov.total,
            failed=cov.failed,
            rate=round(re.rate, 3),
            eta_s=None if re.eta_s is None else round(re.eta_s, 1),
            started_at=re.started_at,
        )


class DeadLetterOut(BaseModel):
    id: int = Field(description="The dead letter's number, for `clipdex dlq retry ID`.")
    item_id: str | None
    source: str
    reason: str = Field(description="Why it could not be indexed (paths shortened, URL query strings left out).")
    tries: int = Field(description="Fetches in its last delivery (transient failures are retried at once first).")
    at: datetime
    retriable: bool = Field(description="The failure was transient (a timeout, HTTP 5xx...): trying again may work.")
    attempts: int = Field(description="How many times it has been delivered to the indexer.")
    retry_at: datetime | None = Field(description="When the indexer tries it again by itself; null: it will not.")

    @classmethod
    def of(cls, d: DeadLetter) -> DeadLetterOut:
        return cls(
            id=d.id,
            item_id=d.item_id,
            source=d.source,
            reason=d.reason,
            tries=d.tries,
            at=d.created_at,
            retriable=d.retriable,
            attempts=d.attempts,
            retry_at=d.retry_at,
        )


class IndexerOut(BaseModel):
    source: str = Field(description='"folder" or "kafka".')
    state: str = Field(description='"running", "connecting", "stopped" or "failed".')
    lag_s: float | None = Field(description="Event to durable, as its last batch measured it.")
    pending: int = Field(description="Events it has seen and not yet written.")
    seconds_since_update: float = Field(description="How long ago it last reported.")


class DeadLettersOut(BaseModel):
    dead_letters: list[DeadLetterOut] = Field(description="Newest first.")


class IndexStatusOut(BaseModel):
    items: int = Field(description="Searchable items.")
    failed: int = Field(description="Items that could not be indexed.")
    vectors: int = Field(description="Live vectors in the store.")
    tombstones: int = Field(description="Deleted or replaced vectors not yet purged by a compaction.")
    dead_letters: int = Field(description="Events or files that were refused, with a reason.")
    dead_letters_retrying: int = Field(description="Of them, those the indexer will try again by itself.")
    recent_dead_letters: list[DeadLetterOut] = Field(description="The latest few dead letters.")
    model: ModelOut = Field(description="The store's model (new items are indexed with it).")
    answering_model: ModelOut = Field(
        description="The model that answers this server's queries: the store's, except for the few seconds "
        "after a re-embed switched it, while this server loads the new one."
    )
    reembed: ReembedOut | None = Field(description="A re-embed to another model in progress, or null.")
    switch_error: str | None = Field(
        None, description="Why this server could not follow the store to its new model (it answers with the old)."
    )
    index_vectors: int = Field(description="Vectors in the index this server searches.")
    delta_size: int = Field(description="Vectors not yet compacted into the main index.")
    generation: int = Field(description="Main index generation (0: none built yet).")
    last_compaction_at: datetime | None
    newest_indexed_at: datetime | None
    pending_changes: int = Field(description="Store changes this server has not picked up yet (lag).")
    refreshed_seconds_ago: float = Field(description="How long ago this server last read new vectors.")
    lag_s: float | None = Field(
        description="How far the indexers lag behind their sources, event to searchable, in seconds "
        "(0 when they have caught up; null when no indexer is running)."
    )
    pending: int = Field(description="Events the running indexers have seen and not yet indexed.")
    indexers: list[IndexerOut] = Field(description="The indexers writing to this store, running or last seen.")

    @classmethod
    def of(cls, status: Status) -> IndexStatusOut:
        """A server's status: the store's counts, the indexers' lag, and its own index (status.searcher)."""
        stats, searcher, model = status.stats, status.searcher, status.model
        assert searcher is not None and model is not None, "a server's store is bound to its model"
        return cls(
            answering_model=ModelOut.of(searcher.model or model),
            reembed=None if status.reembed is None else ReembedOut.of(status.reembed),
            switch_error=status.switch_error,
            items=stats.items,
            failed=stats.failed,
            vectors=stats.vectors,
            tombstones=stats.tombstones,
            dead_letters=stats.dead_letters,
            dead_letters_retrying=stats.retrying,
            recent_dead_letters=[DeadLetterOut.of(d) for d in status.recent_dead_letters],
            model=ModelOut.of(model),
            index_vectors=searcher.vectors,
            delta_size=searcher.delta_size,
            generation=searcher.generation,
            last_compaction_at=stats.last_compaction_at,
            newest_indexed_at=stats.newest_indexed_at,
            pending_changes=searcher.pending_changes,
            refreshed_seconds_ago=round(max(0.0, time.time() - searcher.refreshed_at), 3),
            lag_s=status.lag_s,
            pending=status.pending,
            indexers=[
                IndexerOut(
                    source=str(hb.get("source")),
                    state=str(hb.get("state")),
                    lag_s=hb.get("lag_s") if isinstance(hb.get("lag_s"), int | float) else None,
                    pending=int(hb.get("pending") or 0),
                    seconds_since_update=float(hb.get("seconds_since_update") or 0.0),
                )
                for hb in status.indexers
            ],
        )


class ErrorOut(BaseModel):
    error: str = Field(description="What went wrong and what to change.")
