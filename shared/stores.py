"""The one place that opens a store; the settings choose the backend (today the SQLite backend only).

    open_writer(settings, identity) ─▶ WriteSide: writer, catalog, compaction    an indexer process
    open_reader(settings, identity) ─▶ ReadSide: catalog, vectors                a search process
    open_catalog(settings)          ─▶ Catalog, or None when there is no store   status, dead letters

Writers and readers are bound to a model identity: the first one records it, and every later one with
another model is refused (ModelMismatchError). A process that both indexes and serves (`clipdex run`)
opens one of each on one model. Callers keep the role they need, never the backend's class.

Writers: one process per source of items (each watched folder, Kafka), each holding its source's
writer lock (`writer_lock`, a file in the data directory, `shared.lockfile`) for as long as it runs; a
second writer of the same source gets WriterBusy naming the first, at once, before it loads a model.
Writers of different sources may share a store: their items never share an id (`kafka:...`,
`folder:<name>/...`), each write is one transaction, versions are checked inside it, and each retries
only its own dead letters. `clipdex compact` holds no writer lock: its only store write, a new index
generation, is serialised with the indexers' own compactions by the compaction lock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shared import lockfile
from shared.config import Settings
from shared.lockfile import Holder
from shared.roles import Catalog, CompactionLedger, VectorSearch, Writer
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.search import IndexSearch
from shared.sqlite.store import SqliteStore
from shared.types import ModelIdentity


@dataclass
class WriteSide:
    writer: Writer
    catalog: Catalog
    compaction: CompactionLedger | None  # None: the backend compacts by itself
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
    _close: Callable[[], None] = field(repr=False)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> ReadSide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_writer(settings: Settings, identity: ModelIdentity | None) -> WriteSide:
    """The store of an indexer, bound to its model. `identity=None`: bind nothing yet (the caller binds
    once its model is loaded, or is a command that loads none). The caller holds the writer lock of
    the source it writes (`writer_lock`)."""
    store = _sqlite(settings)
    try:
        if identity is not None:
            store.bind_model(identity)
    except BaseException:
        store.close()
        raise
    return WriteSide(store, store, store, store.close)


def writer_lock(settings: Settings, source: str, scope: str = "", *, what: str = "") -> AbstractContextManager[Holder]:
    """Hold the writer lock of one source of items in this store (`source` "folder" with the folder's
    absolute path as `scope`, or "kafka") for a block; counted within a process. WriterBusy at once,
    naming the holder, when another process holds it. `what`: the source, for people."""
    return lockfile.hold(_lock_path(settings, source, scope), what=what or f"{source} {scope}".strip())


def writers(settings: Settings) -> list[Holder]:
    """The processes that write to the store now, one per source (this one included)."""
    return lockfile.holders(settings.data_dir) if settings.data_dir.is_dir() else []


def announce_retries(settings: Settings, source: str, scope: str, prefixes: Sequence[str]) -> None:
    """Tell other processes (`clipdex dlq retry`) which item ids' dead letters this writer retries."""
    lockfile.announce_retries(_lock_path(settings, source, scope), prefixes)


def _lock_path(settings: Settings, source: str, scope: str) -> Path:
    tag = f"-{hashlib.sha256(scope.encode()).hexdigest()[:16]}" if scope else ""
    return settings.data_dir / f"{lockfile.PREFIX}{source}{tag}.lock"


def open_reader(settings: Settings, identity: ModelIdentity) -> ReadSide:
    """The store of a search process, bound to its model, with its vectors loaded for search. The
    caller refreshes them (`vectors.refresh()`) to follow the writers."""
    store = _sqlite(settings)
    try:
        store.bind_model(identity)
        index = LiveIndex(store, identity.dim, IndexParams.from_settings(settings), settings.index_dir)
        index.refresh()
    except BaseException:
        store.close()
        raise
    return ReadSide(store, IndexSearch(store, index), store.close)


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
    return SqliteStore(settings.db_path, vector_dtype=settings.vector_dtype)
