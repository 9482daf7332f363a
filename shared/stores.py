"""The one place that opens a store; the settings choose the backend (today the SQLite backend only).

    open_writer(settings, identity) ─▶ WriteSide: writer, catalog, spaces, compaction    an indexer process
    open_reader(settings, identity) ─▶ ReadSide: catalog, vectors (one space)             a search process
    open_catalog(settings)          ─▶ Catalog, or None when there is no store            status, dead letters

Writers and readers are bound to a model identity, which must be the store's active space: the first
one records it, and every later one with another model is refused (ModelMismatchError). A reader searches
the space of its model only; after a switch (`clipdex reembed`) a search process opens a new reader for
the new model (`shared.core`). A process that both indexes and serves (`clipdex run`) opens one of each.
Callers keep the role they need, never the backend's class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from shared.config import Settings
from shared.roles import Catalog, CompactionLedgers, Spaces, VectorSearch, Writer
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.search import IndexSearch
from shared.sqlite.spaces import SpaceLedgers, SqliteSpaces
from shared.sqlite.store import SqliteStore
from shared.types import ModelIdentity


@dataclass
class WriteSide:
    writer: Writer
    catalog: Catalog
    spaces: Spaces
    compaction: CompactionLedgers | None  # None: the backend compacts by itself
    _close: Callable[[], None] = field(repr=False)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> WriteSide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ReadSide:
    catalog: Catalog
    vectors: VectorSearch
    model: ModelIdentity  # the model of the space searched
    _close: Callable[[], None] = field(repr=False)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> ReadSide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_writer(settings: Settings, identity: ModelIdentity | None) -> WriteSide:
    """The store of an indexer, bound to its model. `identity=None`: a maintenance command that loads no
    model (`clipdex compact`, `clipdex dlq purge`, `clipdex reembed`) and binds nothing."""
    store = _sqlite(settings)
    try:
        if identity is not None:
            store.bind_model(identity)
    except BaseException:
        store.close()
        raise
    return WriteSide(store, store, SqliteSpaces(store), SpaceLedgers(store), store.close)


def open_reader(settings: Settings, identity: ModelIdentity) -> ReadSide:
    """The store of a search process, bound to its model, with that space's vectors loaded for search.
    The caller refreshes them (`vectors.refresh()`) to follow the writers."""
    store = _sqlite(settings)
    try:
        store.bind_model(identity)
        feed = store.feed()
        index = LiveIndex(feed, identity.dim, IndexParams.from_settings(settings), feed.index_dir)
        index.refresh()
    except BaseException:
        store.close()
        raise
    return ReadSide(store, IndexSearch(feed, index, identity), identity, store.close)


@contextmanager
def open_catalog(settings: Settings) -> Iterator[Catalog | None]:
    """The catalog alone, for commands that load neither a model nor an index; None when no store
    exists yet (nothing is created)."""
    if not settings.db_path.exists():
        yield None
        return
    with _sqlite(settings) as store:
        yield store


def _sqlite(settings: Settings) -> SqliteStore:
    return SqliteStore(settings.db_path, vector_dtype=settings.vector_dtype, index_dir=settings.index_dir)
