"""The one place that opens a store; the settings choose the backend (today the SQLite backend only).

    open_writer(settings, identity) ─▶ WriteSide: writer, catalog, compaction    an indexer process
    open_reader(settings, identity) ─▶ ReadSide: catalog, vectors                a search process
    open_catalog(settings)          ─▶ Catalog, or None when there is no store   status, dead letters

Writers and readers are bound to a model identity: the first one records it, and every later one with
another model is refused (ModelMismatchError). A process that both indexes and serves (`clipdex run`)
opens one of each on one model. Callers keep the role they need, never the backend's class.

One writer process per data directory (the SQLite backend): `open_writer` holds `<data dir>/writer.lock`
(`shared.lockfile`) until it is closed, and a second writer gets WriterBusy naming the holder. Commands
take it before loading a model (`writer_lock`), so a refusal is immediate. `clipdex compact` opens a
writer that does not hold it (`exclusive=False`): its only store write, a new index generation, is
serialised with the indexer's own compactions by the compaction lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

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


def open_writer(settings: Settings, identity: ModelIdentity | None, *, exclusive: bool = True) -> WriteSide:
    """The store of an indexer, bound to its model, holding the data directory's writer lock until it is
    closed (WriterBusy: another process writes). `identity=None`: bind nothing yet (the caller binds
    once its model is loaded, or is a command that loads none). `exclusive=False`: no writer lock
    (`clipdex compact` beside a running indexer)."""
    with ExitStack() as undo:
        if exclusive:
            undo.enter_context(writer_lock(settings))
        store = undo.enter_context(_sqlite(settings))
        if identity is not None:
            store.bind_model(identity)
        release = undo.pop_all()
    return WriteSide(store, store, store, release.close)


def writer_lock(settings: Settings) -> AbstractContextManager[Holder]:
    """Hold the data directory's writer lock for a block (counted within a process: `open_writer` in
    the block holds the same one). WriterBusy at once, naming the holder, when another process holds it."""
    return lockfile.hold(settings.data_dir / lockfile.LOCK_NAME)


def writer_holder(settings: Settings) -> Holder | None:
    """The process that writes to the store now (this one included), or None."""
    return lockfile.holder(settings.data_dir / lockfile.LOCK_NAME)


def announce_retries(settings: Settings, prefixes: Sequence[str]) -> None:
    """Tell other processes (`clipdex dlq retry`) which item ids' dead letters this writer retries."""
    lockfile.announce_retries(settings.data_dir / lockfile.LOCK_NAME, prefixes)


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
