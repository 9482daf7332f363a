"""The store roles: the narrow interfaces that callers depend on, never a backend's class.

    indexer: pipeline ─────────▶ Writer            one micro-batch in one transaction; the resolver's lookups
    status, items, dead letters ▶ Catalog           items, dead letters, counts, embedding spaces
    search: SearchService ─────▶ VectorSearch      the best live items for a vector, and how fresh they are
    indexer: re-embed ─────────▶ Spaces            a shadow space for another model: fill, switch, drop
    clipdex migrate ───────────▶ Portable          items, vectors and dead letters, out of one backend, into another
    ── the SQLite backend's own seams ──
    FAISS LiveIndex ───────────▶ ChangeFeed        vectors added and deleted since a change counter
    indexer: compaction ───────▶ CompactionLedger  the main index's generations, on top of the feed

A backend implements the first four; `shared.stores` opens the one the settings choose. The SQLite
backend (`shared.sqlite`: the store is the truth, FAISS files are derived) also implements the last two,
because its search processes keep their own FAISS index current and its indexer compacts it. A backend
that searches and compacts by itself (a vector database) needs neither.

Nothing here names SQLite or FAISS: ids, vectors (`Embedding`), items and counts only. The dataclasses
below are what the roles take and return.

Embedding spaces: a store holds the vectors of one model (its active space) and, while `clipdex reembed`
runs, of a second one (the shadow space). Writers bind to the active space and readers search exactly
one space; an item's new content tombstones its vectors in every space (the shadow space gets the new
content from the re-embed), and a delete deletes them everywhere. `Spaces.switch` makes the shadow active
in one transaction once it covers every live item; the old space is retired, then dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence, Set
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from shared.types import Embedding, Filters, Hit, IndexInfo, Item, Metadata, ModelIdentity

VectorIds = NDArray[np.int64]


# -- what a micro-batch writes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Upsert:
    """Index or update one item. `embedding=None` is a metadata-only update of an unchanged image."""

    id: str
    source: str
    uri: str
    sha256: str
    metadata: Metadata
    embedding: Embedding | None
    version: int | None = None


@dataclass(frozen=True)
class Delete:
    id: str
    version: int | None = None  # a versioned delete removes no newer version


@dataclass(frozen=True)
class Failure:
    """An item that could not be indexed. It is marked failed (an older good vector stays searchable)
    and a dead letter keeps the raw event or path and the reason.

    `retriable`: the failure was transient (a timeout, HTTP 5xx, EIO...). `retry_at`: when the running
    indexer tries it again by itself (None: never; a person can still `clipdex dlq retry` it).
    `attempts`: how many times the record has been delivered to the pipeline, this time included."""

    source: str
    payload: str
    reason: str
    id: str | None = None
    uri: str | None = None
    tries: int = 1  # fetches within this delivery
    retriable: bool = False
    attempts: int = 1
    retry_at: datetime | None = None


@dataclass
class ApplyResult:
    indexed: int = 0
    updated: int = 0  # metadata-only
    deleted: int = 0
    failed: int = 0
    skipped: int = 0  # older than the version stored when the write happened (another writer got there first)
    vector_ids: list[int] = field(default_factory=list)  # the new vectors' ids, where the backend numbers them
    # Metadata-only upserts of items whose content changed since the resolver read them: not written;
    # the caller embeds them and writes again.
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoredState:
    """What the resolver needs to know about an item already stored."""

    sha256: str | None
    version: int | None
    status: str
    has_vector: bool


class Writer(Protocol):
    """The indexer's door to the store. One writer per source of items at a time (`shared.stores`);
    writers of different sources may share a store, since their item ids never collide."""

    def bind_model(self, identity: ModelIdentity) -> None:
        """Write into the active space, which must be this model's: recorded on first use; any other model
        afterwards is a ModelMismatchError (the model of a shadow space too, until the switch)."""
        ...

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        """What is stored for these item ids (absent ids are not in the result)."""
        ...

    def product_images(self, products: Sequence[str]) -> dict[str, StoredState]:
        """What is stored for the images of these products (item ids `shared.types.image_id` made, failed
        ones too), so an update that no longer names one can delete it."""
        ...

    def embeddings_by_sha(self, hashes: Sequence[str]) -> dict[str, Embedding]:
        """Stored embeddings of these contents: a renamed or copied image needs no model call."""
        ...

    def apply(
        self,
        upserts: Sequence[Upsert] = (),
        deletes: Sequence[Delete] = (),
        failures: Sequence[Failure] = (),
        retried: Sequence[int] = (),
    ) -> ApplyResult:
        """Write one micro-batch: all of it is durable when this returns. On a StoreError, nothing that a
        replay of the same batch does not make whole was written (SQLite: nothing at all; a backend
        without transactions may have written part of it, which the replay writes again, idempotently).
        Replacing an item's vector and deleting an item take the old vector out of search, in every space.
        ModelSwitched (nothing written): the bound space is no longer the active one.

        Versions are checked in the write itself, not only by the resolver's earlier read, so two writers
        racing on one item cannot regress it: an upsert or delete whose version is below the stored one
        is skipped (`ApplyResult.skipped`); an upsert without a version keeps the stored version.

        Dead letters: `retried` are the ids of dead letters this batch tried again; they are removed in
        the same write (a failure again is one of `failures`, a new letter). Any upsert, delete or failure
        of an item ends the automatic retry of that item's earlier dead letters (`retry_at` becomes None):
        a later event wins, and only the newest failure of an item is ever retried."""
        ...

    def register_folder(self, path: str) -> str:
        """The short name of a watched folder (an absolute path) in this store, registered on first use
        and the same ever after: folder item ids are `folder:<name>/<path in the folder>`, so the files of
        two folders never share an id. Names are unique in the store (the folder's own name, then -2...)."""
        ...

    def rename_items(self, renames: Mapping[str, str]) -> int:
        """Give items new ids (old → new), keeping their vectors (no new vector, nothing for a search
        index to reload) and moving their dead letters along; an old id whose new id is already taken is
        deleted instead. Returns how many were renamed. (Folder ids from before the folder namespace.)"""
        ...


def folder_name(path: str) -> str:
    """A folder's own name as a part of its item ids (`Writer.register_folder` adds -2... when it is
    taken): letters, digits, `.`, `_` and `-` only."""
    name = re.sub(r"[^\w.-]+", "_", path.rstrip("/").rsplit("/", 1)[-1], flags=re.ASCII).strip("._")
    return name[:64] or "folder"


# -- the catalog: items, dead letters, counts -----------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    id: int
    source: str
    item_id: str | None
    payload: str
    reason: str
    tries: int
    created_at: datetime
    retriable: bool = False  # the failure was transient
    attempts: int = 1  # deliveries to the pipeline so far
    retry_at: datetime | None = None  # when an indexer tries it again by itself; None: never


@dataclass(frozen=True)
class StoreStats:
    """Counts and the state of the stored index. A backend without main generations or a delta (one
    that compacts by itself) reports 0 for them."""

    items: int  # searchable
    failed: int
    vectors: int  # live
    dead_letters: int
    tombstones: int  # deleted or replaced vectors not yet purged
    newest_indexed_at: datetime | None
    last_compaction_at: datetime | None
    generation: int  # of the main index (0: none yet)
    delta_size: int  # live vectors not yet compacted into main
    delta_age_s: float | None  # how old the oldest of them is
    changes: int  # a counter that grows with every write
    retrying: int = 0  # dead letters waiting for an automatic retry


SpaceState = Literal["active", "shadow", "retired", "dropping"]


@dataclass(frozen=True)
class Space:
    """The vectors of one model. `active`: what the store is searched and indexed with; `shadow`: being
    filled by a re-embed; `retired`: active before the last switch, kept a grace period for servers still
    answering from it; `dropping`: being deleted (an abort, or a retired space past its grace)."""

    id: int
    model: ModelIdentity | None  # None: nothing bound yet
    model_configs: str | None  # the open_clip config folder another process needs to load the model
    state: SpaceState
    created_at: datetime | None  # None: not recorded (a backend with one space)
    switched_at: datetime | None  # when it became active, or was retired


@dataclass(frozen=True)
class Coverage:
    """How far a shadow space is. `total`: live items (with a vector in the active space); `done`: of
    them, those with a vector in the shadow space too; `failed`: those whose source could not be read
    again (dead letters). The switch waits for `remaining` to reach 0."""

    total: int
    done: int
    failed: int

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done - self.failed)


class Catalog(Protocol):
    """Items, dead letters and counts: what status, item lookups and a folder's reconciliation read."""

    def model_identity(self) -> ModelIdentity | None:
        """The model the store was built with; None before the first write."""
        ...

    def get_item(self, item_id: str) -> Item | None: ...

    def items(self, source: str | None = None, prefix: str = "") -> list[Item]:
        """Every item (of one source, with ids starting with `prefix`), by id."""
        ...

    def item_ids(self, source: str | None = None, prefix: str = "") -> dict[str, str | None]:
        """id → content hash of the items of one source whose ids start with `prefix`."""
        ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest first."""
        ...

    def delete_dead_letters(self, ids: Sequence[int]) -> int: ...

    def due_dead_letters(self, prefix: str, now: datetime, limit: int = 100) -> list[DeadLetter]:
        """Dead letters of items whose ids start with `prefix` that are due for a retry (`retry_at` at
        or before `now`), the longest waiting first."""
        ...

    def folders(self) -> dict[str, str]:
        """Every folder registered in the store (`Writer.register_folder`): name -> absolute path."""
        ...

    def schedule_dead_letters(self, ids: Sequence[int], at: datetime) -> int:
        """Make these dead letters due at `at` (`clipdex dlq retry` beside a running indexer, which then
        retries them). A small write, safe beside the writer."""
        ...

    def stats(self) -> StoreStats:
        """Counts over the whole store: not for every query (a quarter of a second at 100k vectors)."""
        ...

    def spaces(self) -> list[Space]:
        """The store's embedding spaces, oldest first (cheap: a refresh asks it every tick)."""
        ...

    def coverage(self, space: int) -> Coverage:
        """How far a shadow space is (counts: for status, not for every query)."""
        ...


# -- moving a store to another backend ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredItem:
    """An item as stored, with its vector (None: a failed item without one): what a migration copies."""

    item: Item
    embedding: Embedding | None


class Portable(Protocol):
    """What `clipdex migrate` reads from one backend and writes to another, vectors included (no model
    call). Imports keep ids, versions, statuses and times, and are idempotent: a migration that stopped
    starts again and skips what the target already holds."""

    def export_items(self, chunk: int = 1000) -> Iterator[list[StoredItem]]:
        """Every item, failed ones too, in chunks."""
        ...

    def import_items(self, items: Sequence[StoredItem]) -> None: ...

    def export_dead_letters(self) -> list[DeadLetter]: ...

    def import_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Add the letters the store does not hold yet (same source, item, payload, reason and time)."""
        ...


# -- the read side: searching vectors -------------------------------------------------------------------


@dataclass(frozen=True)
class SearcherState:
    """What one search process holds, for status and metrics."""

    vectors: int  # searchable vectors
    delta_size: int  # of them, not yet in a main index (0 where the backend has none)
    generation: int  # the main index generation searched (0 where the backend has none)
    pending_changes: int  # store changes this process has not picked up yet
    refreshed_at: float  # time.time() of the last refresh; 0.0: never
    model: ModelIdentity | None = None  # the model of the space searched: the one that answers queries


@dataclass(frozen=True)
class Found:
    """What `VectorSearch.search` returns: the hits, best first, and how sure the backend is of them."""

    hits: list[Hit]
    # True when the backend stopped looking before it was sure it had the top_k best matches (a filter that
    # passes few of the nearest vectors, checked on a bounded number of them): better matches may exist.
    partial: bool = False
    # The hits' vectors, row by row, when asked for (`with_vectors`): near-duplicate collapsing compares them.
    vectors: Embedding | None = None


class VectorSearch(Protocol):
    """The read side's door to the vectors. A backend that filters inside its own search (a vector
    database) pushes `filters` and `exclude` down; results must be the same either way.

    `SearchService` asks for up to `MAX_CANDIDATES` (4,000) hits at once and does the rest itself (the
    relative cutoff, collapsing copies, sorting by a metadata field, pages): a backend ranks, filters and
    returns hits with their content hash, nothing more."""

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
        """The top_k live items by cosine similarity to `query` that pass `filters`, best first (ties in
        any order); none scoring below `min_score`, none whose id is in `exclude`; each hit with its
        `sha256`. Bounded work whatever the filter: where the backend cannot be sure it found the best
        matches within its bound, it returns what it has with `partial=True`."""
        ...

    def item_vector(self, item_id: str) -> Embedding | None:
        """The stored vector of a searchable item (find-similar by id needs no model call)."""
        ...

    def info(self) -> IndexInfo:
        """Size and freshness, attached to every result: cheap."""
        ...

    def state(self) -> SearcherState: ...

    def refresh(self) -> None:
        """Catch up with the store's writes (a no-op where the backend searches the store itself)."""
        ...


# -- embedding spaces: re-embedding into a shadow space, the switch ------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A live item that a shadow space still lacks: where to read it again, and its active vector now (a
    vector for the shadow space is only written if the item still has that one: not replaced meanwhile)."""

    id: str
    source: str
    uri: str
    sha256: str | None
    metadata: Metadata
    version: int | None
    active_vector: int


@dataclass(frozen=True)
class SpaceVector:
    item: Pending
    sha256: str  # of the bytes embedded (the source may have changed since the item was indexed)
    embedding: Embedding


@dataclass(frozen=True)
class SpaceFailure:
    """An item whose source could not be read again: a re-embed dead letter, counted as covered.
    `retriable`: the failure was transient (shown so; the letter is not retried by itself: `clipdex dlq
    retry` indexes it, with the new model once the store has switched)."""

    item: Pending
    reason: str
    tries: int = 1
    retriable: bool = False


class Spaces(Protocol):
    """The re-embed's door: a shadow space for another model, filled item by item, then switched to."""

    def create_shadow(self, identity: ModelIdentity, model_configs: str | None) -> Space:
        """A new shadow space for this model, or the one already there for it (a resumed re-embed).
        StoreError when there is no active space, when the model is the active one, or when a shadow
        space for another model exists."""
        ...

    def pending(self, space: int, *, after: str = "", limit: int = 64) -> list[Pending]:
        """Live items without a vector (or a failure) in the shadow space, by id, ids above `after`."""
        ...

    def embeddings_in(self, space: int, hashes: Sequence[str]) -> dict[str, Embedding]:
        """Vectors of these contents already in the space (a copy needs no model call)."""
        ...

    def add_vectors(self, space: int, vectors: Sequence[SpaceVector], failures: Sequence[SpaceFailure] = ()) -> int:
        """One transaction: each vector whose item is unchanged since `pending` read it, each failure as
        a dead letter. Returns how many vectors were written. SpaceGone: the space is no longer a shadow
        (aborted, or already switched)."""
        ...

    def switch(self, space: int) -> bool:
        """If the shadow space covers every live item: make it active and retire the active one, in one
        transaction (items that failed are marked failed, with the reason). False: not covered yet."""
        ...

    def abort(self) -> Space | None:
        """Give up the shadow space (it is dropped by `drop_spaces`); None when there is none."""
        ...

    def drop_spaces(self, grace_s: float) -> list[int]:
        """Delete aborted spaces, and retired ones retired more than `grace_s` ago; their ids."""
        ...


# -- the SQLite backend's seams: the change feed and compaction --------------------------------------------


@dataclass(frozen=True)
class IndexMeta:
    generation: int  # 0: no main index yet
    high_water: int  # highest vector_id contained in main
    main_seq: int  # the change counter when main was built
    seq: int  # the change counter now
    checksum: str | None = None  # sha256 of main's file (None: recorded before checksums were)


@dataclass(frozen=True)
class Changes:
    seq: int
    added_ids: VectorIds
    added: Embedding
    tombstoned_ids: VectorIds


class ChangeFeed(Protocol):
    """What a search process's own index refreshes from: vectors by id (int64, growing), a change counter
    bumped by every insert and tombstone, and the main index generation to load. The ids it hands out
    resolve back to items here too."""

    def index_meta(self) -> IndexMeta: ...

    def changes_since(self, seq: int) -> Changes:
        """Vectors added and tombstoned after `seq`, read in one snapshot."""
        ...

    def live_vectors(
        self, *, above: int = 0, upto: int | None = None, chunk: int = 50_000
    ) -> Iterator[tuple[VectorIds, Embedding]]:
        """(ids, embeddings) of live vectors with above < id <= upto, in chunks, by id."""
        ...

    def tombstoned_ids(self, *, upto: int, after_seq: int = 0) -> VectorIds: ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Reads inside the block see one consistent state of the store."""
        ...

    def items_for_vectors(self, vector_ids: Sequence[int], filters: Filters | None = None) -> dict[int, Item]:
        """Live items by their current vector id; a tombstoned vector has none. With `filters`, may leave
        out items that do not pass them (never one that does)."""
        ...

    def item_vector(self, item_id: str) -> tuple[int, Embedding] | None: ...

    def matching_vectors(self, filters: Filters, limit: int) -> VectorIds | None:
        """The vectors of the live items that may pass `filters` (a superset), from an index, when at most
        `limit` match; None when more do, or when the filter has no condition the index holds."""
        ...

    def embeddings(self, vector_ids: Sequence[int]) -> dict[int, Embedding]:
        """Stored vectors by id."""
        ...

    def newest_indexed_at(self) -> datetime | None:
        """When the newest vector was written; cheap at any size."""
        ...


class CompactionLedger(ChangeFeed, Protocol):
    """What compaction reads and records about one space: the delta's size and age, the main generation
    in force, and where its index files go."""

    @property
    def dim(self) -> int: ...

    @property
    def index_dir(self) -> Path: ...

    def delta_size(self, high_water: int) -> int: ...

    def tombstone_count(self, *, upto: int, after_seq: int) -> int:
        """Vectors up to `upto` tombstoned after `after_seq`: the deleted vectors a main index still holds."""
        ...

    def oldest_uncompacted_age_s(self, high_water: int) -> float | None: ...

    def snapshot_for_compaction(self) -> tuple[int, int]:
        """(highest vector id, change counter) at one instant."""
        ...

    def record_generation(
        self, generation: int, high_water: int, main_seq: int, kind: str, checksum: str | None = None
    ) -> int:
        """Point readers at a new main index (its file's sha256: `checksum`); purge the tombstones it no
        longer holds; return how many."""
        ...


class CompactionLedgers(Protocol):
    """The spaces an indexer keeps compacted."""

    def ledgers(self, states: Set[SpaceState] = frozenset({"active", "shadow"})) -> list[CompactionLedger]:
        """The spaces in these states: the active one, and a shadow one while a re-embed fills it."""
        ...
