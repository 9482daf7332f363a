"""The one place that opens a store; CLIPDEX_STORE chooses the backend.

    open_writer(settings, identity) ─▶ WriteSide: writer, catalog, compaction    an indexer process
    open_reader(settings, identity) ─▶ ReadSide: catalog, vectors                a search process
    open_catalog(settings)          ─▶ Catalog, or None when there is no store   status, dead letters
    open_portable(settings, backend, identity) ─▶ PortableStore                  `clipdex migrate`

    sqlite   shared.sqlite: SqliteStore (every role) + LiveIndex/IndexSearch (a FAISS index per process)
    milvus   shared.milvus: MilvusStore (writer, catalog) + MilvusSearch (Milvus searches; no local index)

Writers and readers are bound to a model identity: the first one records it, and every later one with
another model is refused (ModelMismatchError). A process that both indexes and serves (`clipdex run`)
opens one of each on one model. Callers keep the role they need, never the backend's class.

Writers: one process per source of items (each watched folder, Kafka), each holding its source's
writer lock (`writer_lock`, a file in the data directory, `shared.lockfile`) for as long as it runs; a
second writer of the same source gets WriterBusy naming the first, at once, before it loads a model.
Writers of different sources may share a store: their items never share an id (`kafka:...`,
`folder:<name>/...`), each write is one transaction, versions are checked inside it, and each retries
only its own dead letters. The locks are files in the local data directory: on Milvus they keep one
writer per source per data directory (the consumers of one group, each with its own data directory and
writer counters, write side by side, as the Milvus store expects). `clipdex compact` holds no writer
lock: its only store write, a new index generation, is serialised with the indexers' own compactions by
the compaction lock.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from shared import lockfile
from shared.config import Settings
from shared.errors import StoreError
from shared.lockfile import Holder
from shared.milvus import collections
from shared.milvus.client import Milvus
from shared.milvus.expr import item_key
from shared.milvus.search import MilvusSearch
from shared.milvus.store import MilvusStore
from shared.roles import Catalog, CompactionLedger, Portable, VectorSearch, Writer
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.search import IndexSearch
from shared.sqlite.store import SqliteStore
from shared.types import ModelIdentity

Backend = Literal["sqlite", "milvus"]


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


class PortableStore(Writer, Catalog, Portable, Protocol):
    """A whole store, as a migration reads or fills it."""

    def close(self) -> None: ...


def describe(settings: Settings) -> str:
    """Where the configured store is, for people: a data directory, or a Milvus server."""
    if settings.store == "milvus":
        named = settings.milvus_collection or "one collection per model"
        return f"Milvus at {settings.milvus_uri} (database {settings.milvus_db}, {named})"
    return str(settings.data_dir)


def open_writer(settings: Settings, identity: ModelIdentity | None) -> WriteSide:
    """The store of an indexer, bound to its model. `identity=None`: bind nothing yet (the caller binds
    once its model is loaded, or is a command that loads none: `clipdex compact`, `clipdex dlq purge`).
    The caller holds the writer lock of the source it writes (`writer_lock`)."""
    if settings.store == "milvus":
        store = _milvus(settings, identity)
        return WriteSide(store, store, None, store.close)
    sqlite = _sqlite(settings)
    try:
        if identity is not None:
            sqlite.bind_model(identity)
    except BaseException:
        sqlite.close()
        raise
    return WriteSide(sqlite, sqlite, sqlite, sqlite.close)


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
    """The store of a search process, bound to its model, ready to search. The caller refreshes it
    (`vectors.refresh()`) to follow the writers."""
    if settings.store == "milvus":
        store = _milvus(settings, identity)
        try:
            vectors = MilvusSearch(store)
            vectors.refresh()
        except BaseException:
            store.close()
            raise
        return ReadSide(store, vectors, store.close)
    sqlite = _sqlite(settings)
    try:
        sqlite.bind_model(identity)
        index = LiveIndex(sqlite, identity.dim, IndexParams.from_settings(settings), settings.index_dir)
        index.refresh()
    except BaseException:
        sqlite.close()
        raise
    return ReadSide(sqlite, IndexSearch(sqlite, index), sqlite.close)


@contextmanager
def open_catalog(settings: Settings) -> Iterator[Catalog | None]:
    """The catalog alone, for commands that load neither a model nor an index; None when no store
    exists yet (nothing is created)."""
    if settings.store == "milvus":
        store = _milvus_existing(settings)
        try:
            yield store
        finally:
            if store is not None:
                store.close()
        return
    if not settings.db_path.exists():
        yield None
        return
    with _sqlite(settings) as sqlite:
        yield sqlite


def store_exists(settings: Settings) -> bool:
    with open_catalog(settings) as catalog:
        return catalog is not None


def open_portable(settings: Settings, backend: Backend, identity: ModelIdentity | None) -> PortableStore | None:
    """The store of `backend` (whatever CLIPDEX_STORE says) as a migration reads (`identity` None: it must
    exist, else None) or fills it (bound to `identity`, created if missing)."""
    if backend == "milvus":
        return _milvus(settings, identity) if identity is not None else _milvus_existing(settings)
    if identity is None and not settings.db_path.exists():
        return None
    sqlite = _sqlite(settings)
    if identity is not None:
        try:
            sqlite.bind_model(identity)
        except BaseException:
            sqlite.close()
            raise
    return sqlite


def _sqlite(settings: Settings) -> SqliteStore:
    return SqliteStore(settings.db_path, vector_dtype=settings.vector_dtype)


# -- Milvus ------------------------------------------------------------------------------------------------


def _connect(settings: Settings) -> Milvus:
    """pymilvus is imported here, on first use: the SQLite store never loads it."""
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    return Milvus.connect(settings.milvus_uri, token, settings.milvus_db)


def _milvus(settings: Settings, identity: ModelIdentity | None) -> MilvusStore:
    """The collections of `identity`'s model (created and loaded if missing), bound to it; with no
    identity, the store's existing collection."""
    if identity is None:
        store = _milvus_existing(settings)
        if store is None:
            raise StoreError(f"no clipdex collection in {describe(settings)} yet: index something first")
        return store
    milvus = _connect(settings)
    try:
        names = collections.Names.of(collections.name_for(settings, identity))
        collections.ensure(milvus, names, identity.dim)
        store = MilvusStore(milvus, names, dim=identity.dim, slot=_slot(settings))
        store.bind_model(identity)
    except BaseException:
        milvus.close()
        raise
    return store


def _milvus_existing(settings: Settings) -> MilvusStore | None:
    milvus = _connect(settings)
    try:
        name = collections.find(milvus, settings)
        if name is None:
            milvus.close()
            return None
        names = collections.Names.of(name)
        for each in (names.items, names.meta, names.dead_letters):
            milvus.load(each)
        return MilvusStore(milvus, names, dim=collections.vector_dim(milvus, names.items), slot=_slot(settings))
    except BaseException:
        milvus.close()
        raise


def _slot(settings: Settings) -> str:
    """This writer's name among the store's writers: its host and scratch directory, so a restarted
    indexer continues its own counters instead of adding a row."""
    return item_key(f"{socket.gethostname()}:{os.path.abspath(settings.data_dir)}")
