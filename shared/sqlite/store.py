"""The SQLite store: the source of truth. FAISS files are derived from it and can be rebuilt from it.

`SqliteStore` implements every store role of `shared.roles`: the Writer, the Catalog, the ChangeFeed
that FAISS live indexes refresh from, and the CompactionLedger.

Tables: `items` (one row per live or failed item), `vectors` (embeddings, with a tombstone flag and a
change counter `seq` bumped on insert and on tombstone), `dead_letters` (with when each is retried, if
ever), `folders` (the short name of each watched folder, which namespaces its item ids), and `meta`
(model identity, main-index generation, high-water mark and file checksum, the change counter).

One writer (the indexer; `shared.lockfile` keeps it to one process) applies each micro-batch in ONE
transaction with `apply()`. Any number of readers, in this or other processes, follow `seq` to keep their
delta index current (WAL mode lets them read while the writer writes). Every SQLite failure, on a read as
on a write, is a StoreError (a server answers 503).

Schema versions: 1 (the first), 2 (item_tags, the filter tags), 3 (dead letters: retriable, attempts,
retry_at; items: retriable; the folders table). A store of an older version is migrated when it is
opened, version by version in one transaction (`_MIGRATIONS`); a newer one is refused.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ModelMismatchError, StoreError
from shared.roles import (
    ApplyResult,
    Changes,
    DeadLetter,
    Delete,
    Failure,
    IndexMeta,
    StoredItem,
    StoredState,
    StoreStats,
    Upsert,
    VectorIds,
    folder_name,
)
from shared.sqlite import tags
from shared.types import Embedding, Filters, Item, Metadata, ModelIdentity, parent_of

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # the versions and what each added: _MIGRATIONS
_BUSY_TIMEOUT_MS = 10_000
_PAGE_SIZE = 16_384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    uri TEXT NOT NULL,
    sha256 TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('indexed', 'failed')),
    reason TEXT,
    version INTEGER,
    vector_id INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    retriable INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_vector_id ON items(vector_id);
CREATE TABLE IF NOT EXISTS vectors (
    vector_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    sha256 TEXT,
    embedding BLOB NOT NULL,
    tombstoned INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS vectors_seq ON vectors(seq);
CREATE INDEX IF NOT EXISTS vectors_sha256 ON vectors(sha256);
CREATE INDEX IF NOT EXISTS vectors_tombstoned ON vectors(tombstoned);
CREATE TABLE IF NOT EXISTS item_tags (
    tag INTEGER NOT NULL,
    vector_id INTEGER NOT NULL,
    PRIMARY KEY (tag, vector_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS item_tags_vector ON item_tags(vector_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    item_id TEXT,
    payload TEXT NOT NULL,
    reason TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    retriable INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    retry_at REAL
);
"""

_SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS folders (name TEXT PRIMARY KEY, path TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_due ON dead_letters(retry_at) WHERE retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_retrying ON dead_letters(item_id) WHERE retry_at IS NOT NULL;
"""
_SCHEMA += _SCHEMA_3  # a new store is created at the current version

# Migrations, one per schema version (to version N from N-1), run in order inside the opening transaction.
# 2: item_tags, the filter tags (then filled from the stored items: `_fill_item_tags`).
# 3: dead letters that are retried by themselves (retriable, attempts, retry_at), items.retriable, folders.
_MIGRATIONS: dict[int, str] = {
    2: """
CREATE TABLE IF NOT EXISTS item_tags (
    tag INTEGER NOT NULL,
    vector_id INTEGER NOT NULL,
    PRIMARY KEY (tag, vector_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS item_tags_vector ON item_tags(vector_id);
""",
    3: """
ALTER TABLE items ADD COLUMN retriable INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN retriable INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
ALTER TABLE dead_letters ADD COLUMN retry_at REAL;
"""
    + _SCHEMA_3,
}


# -- the store ----------------------------------------------------------------------------------------------


class SqliteStore:
    """One connection, guarded by a lock, so one Store may be shared by the threads of a process."""

    def __init__(self, path: Path, *, vector_dtype: str = "float32", readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            if not readonly:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(path), timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            # A 2 KiB float32 embedding row fills a 4 KiB page alone; 16 KiB pages hold seven, so a vector
            # costs ~2.4 KiB on disk instead of ~4.2. Takes effect when the file is created (before WAL).
            self._db.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            with self._write():
                self._create_schema()
                self._set_default("vector_dtype", vector_dtype)
                self._set_default("seq", "0")
                self._set_default("generation", "0")
                self._set_default("high_water", "0")
                self._set_default("main_seq", "0")
            self.vector_dtype = np.dtype(self._meta("vector_dtype"))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc

    def _create_schema(self) -> None:
        """A new store at the current version, or an older one migrated version by version (inside the
        caller's transaction, so two processes opening one old store migrate it once)."""
        fresh = (
            self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None
        )
        if fresh:
            _run_script(self._db, _SCHEMA)
            self._set_meta("schema_version", str(SCHEMA_VERSION))
            return
        version = int(self._meta("schema_version"))
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version}, newer than this clipdex knows ({SCHEMA_VERSION}): "
                "a newer clipdex wrote this store; upgrade this one"
            )
        for to in range(version + 1, SCHEMA_VERSION + 1):
            _run_script(self._db, _MIGRATIONS[to])
            if to == 2:
                self._fill_item_tags()
            self._set_meta("schema_version", str(to))
            logger.info("migrated the store at %s from schema version %d to %d", self.path, to - 1, to)

    def _fill_item_tags(self) -> None:
        """The filter tags of the items stored before version 2 had them."""
        rows = self._db.execute("SELECT vector_id, source, metadata FROM items WHERE vector_id IS NOT NULL")
        for vector_id, source, metadata in rows.fetchall():
            self._tag(vector_id, source, json.loads(metadata) if metadata else {})

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"store write failed ({self.path}): {exc}") from exc

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads (WAL readers do not block the writer)."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    yield self._db
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"store read failed ({self.path}): {exc}") from exc

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """Statements outside a snapshot, under the lock; a failure of SQLite is a StoreError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StoreError(f"store read failed ({self.path}): {exc}") from exc

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        with self.read():
            yield

    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"store meta key {key!r} missing")
        return str(row[0])

    def _meta_opt(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _set_default(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- model identity -------------------------------------------------------------------------------

    def bind_model(self, identity: ModelIdentity) -> None:
        """Record the model on first use; refuse any other model afterwards."""
        with self._write():
            stored = self._meta_opt("model")
            if stored is None:
                self._set_meta("model", json.dumps(identity.__dict__))
                return
        have = ModelIdentity(**json.loads(stored))
        # The weights decide, not where they were loaded from: the same checkpoint at another path (a
        # container mount, a relative path) gives the same embeddings.
        if (have.name, have.dim, have.checksum) != (identity.name, identity.dim, identity.checksum):
            raise ModelMismatchError(
                f"the store at {self.path} was built with model {have.name} / {have.pretrained} "
                f"(dim {have.dim}, weights {have.checksum[:12]}), but the configured model is "
                f"{identity.name} / {identity.pretrained} (dim {identity.dim}, weights {identity.checksum[:12]}). "
                "Embeddings of two models cannot be mixed: use another CLIPDEX_DATA_DIR, or the model "
                "the store was built with."
            )

    def model_identity(self) -> ModelIdentity | None:
        with self._reading():
            stored = self._meta_opt("model")
        return None if stored is None else ModelIdentity(**json.loads(stored))

    # -- the write path -------------------------------------------------------------------------------------

    def apply(
        self,
        upserts: Sequence[Upsert] = (),
        deletes: Sequence[Delete] = (),
        failures: Sequence[Failure] = (),
        retried: Sequence[int] = (),
    ) -> ApplyResult:
        """Write one micro-batch in one transaction: all of it is durable, or none of it."""
        result = ApplyResult()
        now = time.time()
        with self._write() as db:
            seq = int(self._meta("seq"))
            touched: list[str] = []  # items this batch wrote: their older dead letters are not retried
            for chunk in _chunks([int(i) for i in retried], 500):
                db.execute(f"DELETE FROM dead_letters WHERE id IN ({_marks(chunk)})", chunk)
            for up in upserts:
                row = db.execute("SELECT vector_id, sha256, version FROM items WHERE id = ?", (up.id,)).fetchone()
                if row is not None and _older(up.version, row[2]):
                    result.skipped += 1  # a newer version was written since the resolver read this item
                    continue
                version = up.version if up.version is not None else (row[2] if row else None)
                old_vector = row[0] if row else None
                if up.embedding is None and (old_vector is None or row[1] != up.sha256):
                    result.conflicts.append(up.id)  # its content changed since the resolver read it
                    continue
                if old_vector is not None:
                    db.execute("DELETE FROM item_tags WHERE vector_id = ?", (old_vector,))
                if up.embedding is None:
                    vector_id = old_vector
                    result.updated += 1
                else:
                    if old_vector is not None:
                        seq += 1
                        db.execute(
                            "UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?",
                            (seq, old_vector),
                        )
                    seq += 1
                    cur = db.execute(
                        "INSERT INTO vectors(item_id, sha256, embedding, seq, created_at) VALUES (?, ?, ?, ?, ?)",
                        (up.id, up.sha256, self._blob(up.embedding), seq, now),
                    )
                    vector_id = cur.lastrowid
                    result.indexed += 1
                    result.vector_ids.append(int(vector_id or 0))
                self._tag(vector_id, up.source, up.metadata)
                db.execute(
                    """INSERT INTO items(id, source, uri, sha256, metadata, status, reason, version, vector_id,
                                         created_at, updated_at, retriable)
                       VALUES (?, ?, ?, ?, ?, 'indexed', NULL, ?, ?, ?, ?, 0)
                       ON CONFLICT(id) DO UPDATE SET source = excluded.source, uri = excluded.uri,
                           sha256 = excluded.sha256, metadata = excluded.metadata, status = 'indexed',
                           reason = NULL, version = excluded.version, vector_id = excluded.vector_id,
                           updated_at = excluded.updated_at, retriable = 0""",
                    (
                        up.id,
                        up.source,
                        up.uri,
                        up.sha256,
                        json.dumps(up.metadata),
                        version,
                        vector_id,
                        now,
                        now,
                    ),
                )
                touched.append(up.id)
            for de in deletes:
                row = db.execute("SELECT vector_id, version FROM items WHERE id = ?", (de.id,)).fetchone()
                if row is None:
                    touched.append(de.id)
                    continue
                if _older(de.version, row[1]):
                    result.skipped += 1
                    continue
                if row[0] is not None:
                    seq += 1
                    db.execute("UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?", (seq, row[0]))
                    db.execute("DELETE FROM item_tags WHERE vector_id = ?", (row[0],))
                db.execute("DELETE FROM items WHERE id = ?", (de.id,))
                result.deleted += 1
                touched.append(de.id)
            touched += [f.id for f in failures if f.id is not None]
            for chunk in _chunks(touched, 500):
                db.execute(
                    "UPDATE dead_letters SET retry_at = NULL "
                    f"WHERE retry_at IS NOT NULL AND item_id IN ({_marks(chunk)})",
                    chunk,
                )
            for fail in failures:
                self._record_failure(db, fail, now)
                result.failed += 1
            self._set_meta("seq", str(seq))
        return result

    def _record_failure(self, db: sqlite3.Connection, fail: Failure, now: float) -> None:
        db.execute(
            "INSERT INTO dead_letters(source, item_id, payload, reason, tries, created_at, retriable, attempts, "
            "retry_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                fail.source,
                fail.id,
                fail.payload,
                fail.reason,
                fail.tries,
                now,
                int(fail.retriable),
                fail.attempts,
                None if fail.retry_at is None else fail.retry_at.timestamp(),
            ),
        )
        if fail.id is None:
            return
        # A failed update keeps the item's older good vector live: nothing that was searchable is lost.
        db.execute(
            """INSERT INTO items(id, source, uri, status, reason, created_at, updated_at, retriable)
               VALUES (?, ?, ?, 'failed', ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET reason = excluded.reason, updated_at = excluded.updated_at,
                   retriable = excluded.retriable,
                   status = CASE WHEN items.vector_id IS NULL THEN 'failed' ELSE items.status END""",
            (fail.id, fail.source, fail.uri or fail.payload, fail.reason, now, now, int(fail.retriable)),
        )

    def _tag(self, vector_id: int | None, source: str, metadata: Metadata) -> None:
        """Index the facts a filter can ask about (shared.sqlite.tags) under the item's current vector."""
        self._db.executemany(
            "INSERT OR IGNORE INTO item_tags(tag, vector_id) VALUES (?, ?)",
            [(t, vector_id) for t in tags.item_tags(source, metadata)],
        )

    # -- folders ------------------------------------------------------------------------------------------

    def register_folder(self, path: str) -> str:
        """The short name of the folder at `path` (absolute), registered on first use."""
        with self._write() as db:
            row = db.execute("SELECT name FROM folders WHERE path = ?", (path,)).fetchone()
            if row is not None:
                return str(row[0])
            base = folder_name(path)
            taken = {
                r[0] for r in db.execute("SELECT name FROM folders WHERE name = ? OR name LIKE ?", (base, base + "-%"))
            }
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
            db.execute("INSERT INTO folders(name, path, created_at) VALUES (?, ?, ?)", (name, path, time.time()))
            logger.info("folder %s is %r in this store (its item ids are folder:%s/...)", path, name, name)
            return name

    def folders(self) -> dict[str, str]:
        """name -> absolute path of every registered folder."""
        with self._reading() as db:
            return {str(r[0]): str(r[1]) for r in db.execute("SELECT name, path FROM folders ORDER BY name")}

    def rename_items(self, renames: Mapping[str, str]) -> int:
        renamed = 0
        with self._write() as db:
            seq = int(self._meta("seq"))
            for old, new in renames.items():
                row = db.execute("SELECT vector_id FROM items WHERE id = ?", (old,)).fetchone()
                if row is None or old == new:
                    continue
                if db.execute("SELECT 1 FROM items WHERE id = ?", (new,)).fetchone() is not None:
                    if row[0] is not None:  # the new id is already indexed: the old one goes
                        seq += 1
                        db.execute("UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?", (seq, row[0]))
                        db.execute("DELETE FROM item_tags WHERE vector_id = ?", (row[0],))
                    db.execute("DELETE FROM items WHERE id = ?", (old,))
                    continue
                db.execute("UPDATE items SET id = ? WHERE id = ?", (new, old))
                db.execute("UPDATE vectors SET item_id = ? WHERE item_id = ?", (new, old))
                db.execute("UPDATE dead_letters SET item_id = ? WHERE item_id = ?", (new, old))
                renamed += 1
            self._set_meta("seq", str(seq))
        return renamed

    def _blob(self, embedding: Embedding) -> bytes:
        return np.ascontiguousarray(embedding, dtype=self.vector_dtype).tobytes()

    def _decode(self, blobs: Sequence[bytes]) -> Embedding:
        if not blobs:
            return np.zeros((0, 0), np.float32)
        arr = np.frombuffer(b"".join(blobs), dtype=self.vector_dtype).reshape(len(blobs), -1)
        return np.ascontiguousarray(arr, dtype=np.float32)

    # -- what the resolver asks --------------------------------------------------------------------------

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        out: dict[str, StoredState] = {}
        with self.read() as db:
            for chunk in _chunks(list(ids), 500):
                marks = ",".join("?" * len(chunk))
                for row in db.execute(
                    f"SELECT id, sha256, version, status, vector_id FROM items WHERE id IN ({marks})", chunk
                ):
                    out[row[0]] = StoredState(row[1], row[2], row[3], row[4] is not None)
        return out

    def product_images(self, products: Sequence[str]) -> dict[str, StoredState]:
        out: dict[str, StoredState] = {}
        with self.read() as db:
            for product in products:  # its images' ids start with "<product>#": a range of the primary key
                for row in db.execute(
                    "SELECT id, sha256, version, status, vector_id FROM items WHERE id >= ? AND id < ?",
                    (f"{product}#", f"{product}#\U0010ffff"),
                ):
                    if parent_of(row[0]) == product:  # not another product's, whose id starts with "<product>#"
                        out[row[0]] = StoredState(row[1], row[2], row[3], row[4] is not None)
        return out

    def embeddings_by_sha(self, hashes: Sequence[str]) -> dict[str, Embedding]:
        """Stored embeddings of these contents (a renamed or copied file needs no model call)."""
        out: dict[str, Embedding] = {}
        with self.read() as db:
            for chunk in _chunks(list(set(hashes)), 500):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT sha256, embedding FROM vectors WHERE sha256 IN ({marks}) ORDER BY tombstoned",
                    chunk,
                ).fetchall()
                for sha, blob in rows:
                    if sha not in out:
                        out[sha] = self._decode([blob])[0]
        return out

    # -- what readers ask ---------------------------------------------------------------------------------

    def index_meta(self) -> IndexMeta:
        keys = ("generation", "high_water", "main_seq", "seq")
        with self._reading() as db:  # one statement, one snapshot: never one generation's number with another's
            rows = dict(
                db.execute("SELECT key, value FROM meta WHERE key IN (?, ?, ?, ?, 'main_sha256')", keys).fetchall()
            )
        if not set(keys) <= set(rows):
            raise StoreError(f"store meta keys missing: {sorted(set(keys) - set(rows))}")
        generation, high_water, main_seq, seq = (int(rows[k]) for k in keys)
        return IndexMeta(generation, high_water, main_seq, seq, checksum=rows.get("main_sha256") or None)

    def changes_since(self, seq: int) -> Changes:
        """Vectors added and tombstoned after `seq`, read in one snapshot."""
        with self.read() as db:
            now_seq = int(self._meta("seq"))
            rows = db.execute(
                "SELECT vector_id, tombstoned, CASE WHEN tombstoned THEN NULL ELSE embedding END "
                "FROM vectors WHERE seq > ? AND seq <= ? ORDER BY seq",
                (seq, now_seq),
            ).fetchall()
        added = [(r[0], r[2]) for r in rows if not r[1]]
        dead = [r[0] for r in rows if r[1]]
        return Changes(
            seq=now_seq,
            added_ids=np.array([a[0] for a in added], dtype=np.int64),
            added=self._decode([a[1] for a in added]),
            tombstoned_ids=np.array(dead, dtype=np.int64),
        )

    def live_vectors(
        self, *, above: int = 0, upto: int | None = None, chunk: int = 50_000
    ) -> Iterator[tuple[VectorIds, Embedding]]:
        """(ids, embeddings) of live vectors with above < vector_id <= upto, in chunks, by id."""
        limit = upto if upto is not None else 2**62
        last = above
        while True:
            with self._reading() as db:
                rows = db.execute(
                    "SELECT vector_id, embedding FROM vectors WHERE tombstoned = 0 AND vector_id > ? "
                    "AND vector_id <= ? ORDER BY vector_id LIMIT ?",
                    (last, limit, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield np.array([r[0] for r in rows], dtype=np.int64), self._decode([r[1] for r in rows])

    def tombstoned_ids(self, *, upto: int, after_seq: int = 0) -> VectorIds:
        with self._reading() as db:
            rows = db.execute(
                "SELECT vector_id FROM vectors WHERE tombstoned = 1 AND vector_id <= ? AND seq > ?",
                (upto, after_seq),
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def snapshot_for_compaction(self) -> tuple[int, int]:
        """(highest vector_id, change counter) at one instant."""
        with self.read() as db:
            max_id = db.execute("SELECT COALESCE(MAX(vector_id), 0) FROM vectors").fetchone()[0]
            return int(max_id), int(self._meta("seq"))

    def record_generation(
        self, generation: int, high_water: int, main_seq: int, kind: str, checksum: str | None = None
    ) -> int:
        """Point readers at a new main index; purge the tombstones it no longer contains."""
        with self._write() as db:
            self._set_meta("generation", str(generation))
            self._set_meta("high_water", str(high_water))
            self._set_meta("main_seq", str(main_seq))
            self._set_meta("main_kind", kind)
            self._set_meta("main_sha256", checksum or "")
            self._set_meta("last_compaction_at", str(time.time()))
            cur = db.execute(
                "DELETE FROM vectors WHERE tombstoned = 1 AND vector_id <= ? AND seq <= ?",
                (high_water, main_seq),
            )
            return int(cur.rowcount)

    # -- items -------------------------------------------------------------------------------------------

    def get_item(self, item_id: str) -> Item | None:
        with self._reading() as db:
            row = db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else _item(row)

    def items_for_vectors(self, vector_ids: Sequence[int], filters: Filters | None = None) -> dict[int, Item]:
        """Live items by their current vector. A tombstoned vector has no item, so never shows up. With
        `filters`, only the items that may pass them (a superset, checked in SQL from the filter tags and,
        for `null`, the metadata JSON): the others are never parsed."""
        where, params = _filter_sql(filters) if filters is not None else ("", [])
        out: dict[int, Item] = {}
        for chunk in _chunks([int(v) for v in vector_ids], 500):  # the lock is free between chunks
            with self._reading() as db:
                rows = db.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE vector_id IN ({_marks(chunk)}){where}", [*chunk, *params]
                ).fetchall()
            for row in rows:  # parsed outside the lock
                item = _item(row)
                assert item.vector_id is not None
                out[item.vector_id] = item
        return out

    def matching_vectors(self, filters: Filters, limit: int) -> VectorIds | None:
        """The vectors of the live items that may pass `filters` (a superset: the caller checks each item),
        looked up in the filter tags, when at most `limit` match; None when more do, or when no condition
        of the filter is indexed (only `null` values). Reads O(min(matches, limit)) index rows."""
        wanted = sorted(set(tags.filter_tags(filters)))
        if not wanted:
            return None
        with self._reading() as db:
            # Start from the rarest condition: each count stops at limit + 1 rows of the primary key.
            counts = []
            for t in wanted:
                (n,) = db.execute(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM item_tags WHERE tag = ? LIMIT ?)", (t, limit + 1)
                ).fetchone()
                if n == 0:
                    return np.zeros(0, np.int64)
                counts.append((n, t))
            counts.sort()
            if counts[0][0] > limit:
                return None
            rarest, *others = (t for _, t in counts)
            rows = db.execute(
                "SELECT vector_id FROM item_tags WHERE tag = ?"
                + " INTERSECT SELECT vector_id FROM item_tags WHERE tag = ?" * len(others),
                (rarest, *others),
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def embeddings(self, vector_ids: Sequence[int]) -> dict[int, Embedding]:
        """Stored vectors by id (tombstoned ones too, until a compaction purges them)."""
        out: dict[int, Embedding] = {}
        for chunk in _chunks([int(v) for v in vector_ids], 500):  # the lock is free between chunks
            with self._reading() as db:
                rows = db.execute(
                    f"SELECT vector_id, embedding FROM vectors WHERE vector_id IN ({_marks(chunk)})", chunk
                )
                found = rows.fetchall()
            if found:
                vecs = self._decode([r[1] for r in found])
                out.update((int(r[0]), vecs[i]) for i, r in enumerate(found))
        return out

    def item_vector(self, item_id: str) -> tuple[int, Embedding] | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT v.vector_id, v.embedding FROM items i JOIN vectors v ON v.vector_id = i.vector_id "
                "WHERE i.id = ?",
                (item_id,),
            ).fetchone()
        return None if row is None else (int(row[0]), self._decode([row[1]])[0])

    def item_ids(self, source: str | None = None, prefix: str = "") -> dict[str, str | None]:
        """id → sha256 of stored items (for reconciling a folder against the store)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT id, sha256 FROM items WHERE (? IS NULL OR source = ?) AND id >= ? AND id < ?",
                (source, source, prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def items(self, source: str | None = None, prefix: str = "") -> list[Item]:
        """Every item (of one source, with ids starting with `prefix`), by id: what a folder reconciles."""
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE (? IS NULL OR source = ?) AND id >= ? AND id < ? ORDER BY id",
                (source, source, prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return [_item(r) for r in rows]

    # -- migration --------------------------------------------------------------------------------------

    def export_items(self, chunk: int = 1000) -> Iterator[list[StoredItem]]:
        """Every item with its live vector (failed ones without), by id, in chunks."""
        last = ""
        while True:
            with self._lock:
                columns = ", ".join(f"i.{c.strip()}" for c in _ITEM_COLUMNS.split(","))
                rows = self._db.execute(
                    f"SELECT {columns}, v.embedding FROM items i LEFT JOIN vectors v ON v.vector_id = i.vector_id "
                    "WHERE i.id > ? ORDER BY i.id LIMIT ?",
                    (last, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [StoredItem(_item(r), None if r[-1] is None else self._decode([r[-1]])[0]) for r in rows]

    def import_items(self, items: Sequence[StoredItem]) -> None:
        """Write items as another store held them (ids, versions, statuses and times kept), in one
        transaction; an item already here is replaced, its old vector tombstoned."""
        with self._write() as db:
            seq = int(self._meta("seq"))
            for stored in items:
                it = stored.item
                row = db.execute("SELECT vector_id FROM items WHERE id = ?", (it.id,)).fetchone()
                if row is not None and row[0] is not None:
                    seq += 1
                    db.execute("UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?", (seq, row[0]))
                    db.execute("DELETE FROM item_tags WHERE vector_id = ?", (row[0],))
                vector_id = None
                if stored.embedding is not None:
                    seq += 1
                    vector_id = db.execute(
                        "INSERT INTO vectors(item_id, sha256, embedding, seq, created_at) VALUES (?, ?, ?, ?, ?)",
                        (it.id, it.sha256, self._blob(stored.embedding), seq, it.updated_at.timestamp()),
                    ).lastrowid
                    self._tag(vector_id, it.source, it.metadata)  # filtered searches find it by these
                db.execute(
                    f"INSERT OR REPLACE INTO items({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        it.id,
                        it.source,
                        it.uri,
                        it.sha256,
                        json.dumps(it.metadata),
                        it.status,
                        it.reason,
                        it.version,
                        vector_id,
                        it.created_at.timestamp(),
                        it.updated_at.timestamp(),
                        int(it.retriable),
                    ),
                )
            self._set_meta("seq", str(seq))

    def export_dead_letters(self) -> list[DeadLetter]:
        return self.dead_letters(limit=2**62)

    def import_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Add the letters not held yet (the same source, item, payload, reason and time)."""
        have = {_letter_identity(d) for d in self.export_dead_letters()}
        new = [d for d in letters if _letter_identity(d) not in have]
        with self._write() as db:
            db.executemany(
                "INSERT INTO dead_letters(source, item_id, payload, reason, tries, created_at, retriable, attempts, "
                "retry_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        d.source,
                        d.item_id,
                        d.payload,
                        d.reason,
                        d.tries,
                        d.created_at.timestamp(),
                        int(d.retriable),
                        d.attempts,
                        None if d.retry_at is None else d.retry_at.timestamp(),
                    )
                    for d in new
                ],
            )
        return len(new)

    # -- dead letters and stats -------------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {_LETTER_COLUMNS} FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_letter(r) for r in rows]

    def due_dead_letters(self, prefix: str, now: datetime, limit: int = 100) -> list[DeadLetter]:
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {_LETTER_COLUMNS} FROM dead_letters WHERE retry_at IS NOT NULL AND retry_at <= ? "
                "AND item_id >= ? AND item_id < ? ORDER BY retry_at, id LIMIT ?",
                (now.timestamp(), prefix, prefix + "\U0010ffff", limit),
            ).fetchall()
        return [_letter(r) for r in rows]

    def schedule_dead_letters(self, ids: Sequence[int], at: datetime) -> int:
        with self._write() as db:
            total = 0
            for chunk in _chunks([int(i) for i in ids], 500):
                total += db.execute(
                    f"UPDATE dead_letters SET retry_at = ? WHERE id IN ({_marks(chunk)})", [at.timestamp(), *chunk]
                ).rowcount
            return total

    def delete_dead_letters(self, ids: Sequence[int]) -> int:
        with self._write() as db:
            total = 0
            for chunk in _chunks([int(i) for i in ids], 500):
                total += db.execute(f"DELETE FROM dead_letters WHERE id IN ({_marks(chunk)})", chunk).rowcount
            return total

    def stats(self) -> StoreStats:
        with self.read() as db:
            items = db.execute("SELECT COUNT(*) FROM items WHERE vector_id IS NOT NULL").fetchone()[0]
            failed = db.execute("SELECT COUNT(*) FROM items WHERE status = 'failed'").fetchone()[0]
            # Counted on the vectors_tombstoned index: summing the table itself reads every embedding.
            vectors = db.execute("SELECT COUNT(*) FROM vectors WHERE tombstoned = 0").fetchone()[0]
            tombs = db.execute("SELECT COUNT(*) FROM vectors WHERE tombstoned = 1").fetchone()[0]
            dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            retrying = db.execute("SELECT COUNT(*) FROM dead_letters WHERE retry_at IS NOT NULL").fetchone()[0]
            newest = self._newest_vector_time(db)
            last_compaction = self._meta_opt("last_compaction_at")
            meta = self.index_meta()
            delta = self.delta_size(meta.high_water)
            delta_age = self.oldest_uncompacted_age_s(meta.high_water)
        return StoreStats(
            items=int(items),
            failed=int(failed),
            vectors=int(vectors),
            dead_letters=int(dead),
            tombstones=int(tombs),
            newest_indexed_at=_dt(newest) if newest else None,
            last_compaction_at=_dt(float(last_compaction)) if last_compaction else None,
            generation=meta.generation,
            delta_size=delta,
            delta_age_s=delta_age,
            changes=meta.seq,
            retrying=int(retrying),
        )

    def newest_indexed_at(self) -> datetime | None:
        """When the newest vector was written. Cheap at any size: it reads one row by its key."""
        with self._reading() as db:
            newest = self._newest_vector_time(db)
        return _dt(newest) if newest else None

    @staticmethod
    def _newest_vector_time(db: sqlite3.Connection) -> float | None:
        # vector_ids grow with time, so the last one is the newest; MAX(created_at) would read every row
        row = db.execute("SELECT created_at FROM vectors ORDER BY vector_id DESC LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def tombstone_count(self, *, upto: int, after_seq: int) -> int:
        """Vectors up to `upto` tombstoned after `after_seq`: the deleted vectors a main index still holds."""
        with self._reading() as db:
            row = db.execute(
                # `+vector_id`: look rows up by the change counter (the few changed since main was built),
                # not by the id range (every vector in main)
                "SELECT COUNT(*) FROM vectors WHERE seq > ? AND tombstoned = 1 AND +vector_id <= ?",
                (after_seq, upto),
            ).fetchone()
        return int(row[0])

    def delta_size(self, high_water: int) -> int:
        with self._reading() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM vectors WHERE tombstoned = 0 AND vector_id > ?", (high_water,)
            ).fetchone()
        return int(row[0])

    def oldest_uncompacted_age_s(self, high_water: int) -> float | None:
        with self._reading() as db:
            row = db.execute("SELECT MIN(created_at) FROM vectors WHERE vector_id > ?", (high_water,)).fetchone()
        return None if row[0] is None else max(0.0, time.time() - float(row[0]))


def _filter_sql(filters: Filters) -> tuple[str, list[Any]]:
    """SQL conditions on `items` that every item passing `filters` meets (values and keys are parameters)."""
    where = ""
    params: list[Any] = []
    for t in tags.filter_tags(filters):
        where += " AND EXISTS (SELECT 1 FROM item_tags t WHERE t.tag = ? AND t.vector_id = items.vector_id)"
        params.append(t)
    for key, value in filters.metadata.items():
        if value is None:  # null or absent
            where += " AND NOT EXISTS (SELECT 1 FROM json_each(items.metadata) j WHERE j.key = ? AND j.type != 'null')"
            params.append(key)
    return where, params


_ITEM_COLUMNS = (
    "id, source, uri, sha256, metadata, status, reason, version, vector_id, created_at, updated_at, retriable"
)
_LETTER_COLUMNS = "id, source, item_id, payload, reason, tries, created_at, retriable, attempts, retry_at"


def _item(row: Sequence[Any]) -> Item:
    return Item(
        id=row[0],
        source=row[1],
        uri=row[2],
        sha256=row[3],
        metadata=json.loads(row[4]) if row[4] else {},
        status=row[5],
        reason=row[6],
        version=row[7],
        vector_id=row[8],
        created_at=_dt(row[9]),
        updated_at=_dt(row[10]),
        retriable=bool(row[11]),
    )


def _letter(row: Sequence[Any]) -> DeadLetter:
    return DeadLetter(
        id=row[0],
        source=row[1],
        item_id=row[2],
        payload=row[3],
        reason=row[4],
        tries=row[5],
        created_at=_dt(row[6]),
        retriable=bool(row[7]),
        attempts=int(row[8]),
        retry_at=None if row[9] is None else _dt(row[9]),
    )


def _letter_identity(d: DeadLetter) -> tuple[str, str | None, str, str, float]:
    """What makes two dead letters the same one, whichever store kept it."""
    return (d.source, d.item_id, d.payload, d.reason, round(d.created_at.timestamp(), 3))


def _older(version: int | None, stored: int | None) -> bool:
    """The rule of `indexer.resolve`, checked again inside the transaction: only two versions compare."""
    return version is not None and stored is not None and version < stored


def _run_script(db: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(float(ts), tz=UTC)


def _chunks(values: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
