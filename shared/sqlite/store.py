"""The SQLite store: the source of truth. FAISS files are derived from it and can be rebuilt from it.

`SqliteStore` is the Writer and the Catalog of `shared.roles`; `SpaceFeed` (shared/sqlite/feed.py) is the
ChangeFeed and CompactionLedger of one embedding space; `SqliteSpaces` (shared/sqlite/spaces.py) creates,
fills, switches and drops spaces for a re-embed. The tables are in shared/sqlite/schema.py.

A store is bound to a model (`bind_model`): its writes go to that model's space, which must be the active
one, and its reads (the item's vector, status counts) are of that space. An unbound store (tests,
maintenance commands) reads and writes the active space.

One writer per source of items (`shared.lockfile` keeps it to one process; a re-embed is not one) applies
each micro-batch in ONE transaction with `apply()`. Any number of readers, in this or other processes,
follow the change counter `seq` to keep their delta index current (WAL mode lets them read while the
writer writes). Every SQLite failure, on a read as on a write, is a StoreError (a server answers 503).
Folders (`register_folder`) have a short name each, which namespaces their item ids.
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

from shared.errors import ModelMismatchError, ModelSwitched, StoreError
from shared.roles import (
    ApplyResult,
    Changes,
    Coverage,
    DeadLetter,
    Delete,
    Failure,
    IndexMeta,
    Space,
    StoredItem,
    StoredState,
    StoreStats,
    Upsert,
    VectorIds,
    folder_name,
)
from shared.sqlite import schema, tags
from shared.sqlite.feed import SpaceFeed
from shared.types import Embedding, Filters, Item, Metadata, ModelIdentity, parent_of

logger = logging.getLogger(__name__)

SCHEMA_VERSION = schema.SCHEMA_VERSION
_BUSY_TIMEOUT_MS = 10_000
_PAGE_SIZE = 16_384


# -- the store ----------------------------------------------------------------------------------------------


class SqliteStore:
    """One connection, guarded by a lock, so one Store may be shared by the threads of a process."""

    def __init__(self, path: Path, *, vector_dtype: str = "float32", index_dir: Path | None = None) -> None:
        self.path = path
        self.index_root = index_dir if index_dir is not None else path.parent / "index"
        self._lock = threading.RLock()
        self._space: int | None = None  # the space of the bound model; None: the active one
        migrated = False
        try:
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
            with self.write() as db:
                version = schema.schema_version(db)
                if version is None:
                    schema.create(db)
                    self._set_meta("schema_version", str(SCHEMA_VERSION))
                    self._set_meta("vector_dtype", vector_dtype)
                    self._set_meta("seq", "0")
                elif version < SCHEMA_VERSION:
                    migrated = schema.migrate(db, version, time.time(), self.path)
                elif version != SCHEMA_VERSION:
                    raise StoreError(
                        f"{path}: schema version {version}, newer than this clipdex knows ({SCHEMA_VERSION}): "
                        "a newer clipdex wrote this store; upgrade this one"
                    )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        if migrated:
            schema.move_index_files(self.index_root, self.space_dir(1))
        self.vector_dtype = np.dtype(self._meta("vector_dtype"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions (also used by the space feed and the re-embed of this package) -----------------------

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
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
    def locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads of one statement each (no transaction: callable inside `read`)."""
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

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def seq(self) -> int:
        """The change counter (inside a transaction: as of it)."""
        return int(self._meta("seq"))

    def set_seq(self, seq: int) -> None:
        self._set_meta("seq", str(seq))

    def blob(self, embedding: Embedding) -> bytes:
        return np.ascontiguousarray(embedding, dtype=self.vector_dtype).tobytes()

    def decode(self, blobs: Sequence[bytes]) -> Embedding:
        if not blobs:
            return np.zeros((0, 0), np.float32)
        arr = np.frombuffer(b"".join(blobs), dtype=self.vector_dtype).reshape(len(blobs), -1)
        return np.ascontiguousarray(arr, dtype=np.float32)

    # -- embedding spaces ------------------------------------------------------------------------------

    def space_dir(self, space: int) -> Path:
        """Where a space's main index files live."""
        return self.index_root / f"space-{space}"

    def feed(self, space: int | None = None) -> SpaceFeed:
        """The change feed and compaction ledger of one space (default: the bound or the active one)."""
        return SpaceFeed(self, space if space is not None else self.view_space())

    def spaces(self) -> list[Space]:
        with self.locked() as db:
            return [_space(r) for r in db.execute(f"SELECT {_SPACE_COLUMNS} FROM spaces ORDER BY id")]

    def space(self, space: int) -> Space | None:
        with self.locked() as db:
            return self.space_in(db, space)

    def space_in(self, db: sqlite3.Connection, space: int) -> Space | None:
        row = db.execute(f"SELECT {_SPACE_COLUMNS} FROM spaces WHERE id = ?", (space,)).fetchone()
        return None if row is None else _space(row)

    def active_space(self, db: sqlite3.Connection) -> Space | None:
        row = db.execute(f"SELECT {_SPACE_COLUMNS} FROM spaces WHERE state = 'active'").fetchone()
        return None if row is None else _space(row)

    @property
    def bound_space(self) -> int | None:
        return self._space

    def view_space(self) -> int:
        """The space this store reads: the bound one, else the active one (0: there is none yet)."""
        if self._space is not None:
            return self._space
        with self.locked() as db:
            row = db.execute("SELECT id FROM spaces WHERE state = 'active'").fetchone()
        return 0 if row is None else int(row[0])

    def bind_model(self, identity: ModelIdentity) -> None:
        """Record the model on first use; refuse any other model afterwards (a shadow space's too)."""
        with self.write() as db:
            active = self.active_space(db)
            if active is None:
                cur = db.execute(
                    "INSERT INTO spaces(model, state, created_at, switched_at) VALUES (?, 'active', ?, ?)",
                    (_model_json(identity), time.time(), time.time()),
                )
                self._space = int(cur.lastrowid or 0)
                return
            if active.model is None:
                db.execute("UPDATE spaces SET model = ? WHERE id = ?", (_model_json(identity), active.id))
                self._space = active.id
                return
            if active.model.same_weights(identity):
                self._space = active.id
                return
            shadow = db.execute("SELECT model FROM spaces WHERE state = 'shadow'").fetchone()
        have = active.model
        if shadow is not None and shadow[0] and _identity(shadow[0]).same_weights(identity):
            raise ModelMismatchError(
                f"the store at {self.path} is being re-embedded with model {identity.name} / {identity.pretrained} "
                f"(clipdex reembed), and answers with {have.name} / {have.pretrained} until the switch. Until "
                f"then, use {have.name} here (CLIPDEX_MODEL, CLIPDEX_PRETRAINED); after it, running processes "
                "follow the switch on their own."
            )
        raise ModelMismatchError(
            f"the store at {self.path} was built with model {have.name} / {have.pretrained} "
            f"(dim {have.dim}, weights {have.checksum[:12]}), but the configured model is "
            f"{identity.name} / {identity.pretrained} (dim {identity.dim}, weights {identity.checksum[:12]}). "
            "Embeddings of two models cannot be mixed: use another CLIPDEX_DATA_DIR, or the model "
            "the store was built with; `clipdex reembed --model ...` moves a store to another model "
            "without downtime."
        )

    def model_identity(self) -> ModelIdentity | None:
        """The model of the active space (the store's model)."""
        with self.locked() as db:
            active = self.active_space(db)
        return None if active is None else active.model

    def _space_for_writing(self, db: sqlite3.Connection) -> int:
        """The space a write goes to: the bound one, which must still be active; or the active one
        (created, with no model recorded yet, by the first write of an unbound store)."""
        active = self.active_space(db)
        if self._space is not None:
            if active is None or active.id != self._space:
                raise ModelSwitched(
                    "the store switched to model "
                    + (f"{active.model.name} / {active.model.pretrained}" if active and active.model else "?")
                    + " (clipdex reembed) while this process embeds with its previous model",
                    space=active.id if active else None,
                )
            return self._space
        if active is not None:
            return active.id
        now = time.time()
        cur = db.execute("INSERT INTO spaces(state, created_at, switched_at) VALUES ('active', ?, ?)", (now, now))
        return int(cur.lastrowid or 0)

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
        with self.write() as db:
            space = self._space_for_writing(db)
            seq = int(self._meta("seq"))
            touched: list[str] = []  # items this batch wrote: their older dead letters are not retried
            for chunk in _chunks([int(i) for i in retried], 500):
                db.execute(f"DELETE FROM dead_letters WHERE id IN ({_marks(chunk)})", chunk)
            for up in upserts:
                row = db.execute("SELECT sha256, version FROM items WHERE id = ?", (up.id,)).fetchone()
                if row is not None and _older(up.version, row[1]):
                    result.skipped += 1  # a newer version was written since the resolver read this item
                    continue
                version = up.version if up.version is not None else (row[1] if row else None)
                live = _live_vectors(db, up.id)
                if up.embedding is None and (space not in live.values() or row is None or row[0] != up.sha256):
                    result.conflicts.append(up.id)  # its content changed since the resolver read it
                    continue
                for vector_id in live:  # its filter tags are written again below, for the vectors it keeps
                    untag(db, vector_id)
                # Whatever the source says about an item ends a failed re-embed of it: it is tried again.
                db.execute("DELETE FROM reembed_failures WHERE item_id = ?", (up.id,))
                if up.embedding is None:
                    result.updated += 1
                else:
                    # New content: its vectors go in every space; a shadow space gets it from the re-embed.
                    for vector_id in live:
                        seq += 1
                        db.execute("UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?", (seq, vector_id))
                    seq += 1
                    cur = db.execute(
                        "INSERT INTO vectors(space, item_id, sha256, embedding, seq, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (space, up.id, up.sha256, self.blob(up.embedding), seq, now),
                    )
                    result.indexed += 1
                    result.vector_ids.append(int(cur.lastrowid or 0))
                    live = {int(cur.lastrowid or 0): space}
                for vector_id in live:  # metadata-only: every space's vector; new content: the new vector
                    tag(db, vector_id, up.source, up.metadata)
                db.execute(
                    """INSERT INTO items(id, source, uri, sha256, metadata, status, reason, version, created_at,
                                         updated_at, retriable)
                       VALUES (?, ?, ?, ?, ?, 'indexed', NULL, ?, ?, ?, 0)
                       ON CONFLICT(id) DO UPDATE SET source = excluded.source, uri = excluded.uri,
                           sha256 = excluded.sha256, metadata = excluded.metadata, status = 'indexed',
                           reason = NULL, version = excluded.version, updated_at = excluded.updated_at,
                           retriable = 0""",
                    (up.id, up.source, up.uri, up.sha256, json.dumps(up.metadata), version, now, now),
                )
                touched.append(up.id)
            for de in deletes:
                row = db.execute("SELECT version FROM items WHERE id = ?", (de.id,)).fetchone()
                if row is None:
                    touched.append(de.id)
                    continue
                if _older(de.version, row[0]):
                    result.skipped += 1
                    continue
                for vector_id in _live_vectors(db, de.id):
                    seq += 1
                    db.execute("UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?", (seq, vector_id))
                    untag(db, vector_id)
                db.execute("DELETE FROM items WHERE id = ?", (de.id,))
                db.execute("DELETE FROM reembed_failures WHERE item_id = ?", (de.id,))
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
                self._record_failure(db, fail, now, space)
                result.failed += 1
            self._set_meta("seq", str(seq))
        return result

    def _record_failure(self, db: sqlite3.Connection, fail: Failure, now: float, space: int) -> None:
        self.add_dead_letter(db, fail, now)
        if fail.id is None:
            return
        # A failed update keeps the item's older good vector live: nothing that was searchable is lost.
        db.execute(
            """INSERT INTO items(id, source, uri, status, reason, created_at, updated_at, retriable)
               VALUES (?, ?, ?, 'failed', ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET reason = excluded.reason, updated_at = excluded.updated_at,
                   retriable = excluded.retriable,
                   status = CASE WHEN EXISTS (SELECT 1 FROM vectors v WHERE v.item_id = items.id
                                              AND v.space = ? AND v.tombstoned = 0)
                                 THEN items.status ELSE 'failed' END""",
            (fail.id, fail.source, fail.uri or fail.payload, fail.reason, now, now, int(fail.retriable), space),
        )

    @staticmethod
    def add_dead_letter(db: sqlite3.Connection, fail: Failure, now: float) -> None:
        """A dead letter, with when it is retried by itself (if ever)."""
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

    # -- folders ------------------------------------------------------------------------------------------

    def register_folder(self, path: str) -> str:
        """The short name of the folder at `path` (absolute), registered on first use."""
        with self.write() as db:
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
        with self.locked() as db:
            return {str(r[0]): str(r[1]) for r in db.execute("SELECT name, path FROM folders ORDER BY name")}

    def rename_items(self, renames: Mapping[str, str]) -> int:
        """Give items new ids in place: their vectors in every space (and so their filter tags), their
        dead letters and failed re-embeds follow; nothing for a search index to reload."""
        renamed = 0
        with self.write() as db:
            seq = int(self._meta("seq"))
            for old, new in renames.items():
                if old == new or db.execute("SELECT 1 FROM items WHERE id = ?", (old,)).fetchone() is None:
                    continue
                if db.execute("SELECT 1 FROM items WHERE id = ?", (new,)).fetchone() is not None:
                    for vector_id in _live_vectors(db, old):  # the new id is already there: the old one goes
                        seq += 1
                        db.execute("UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?", (seq, vector_id))
                        untag(db, vector_id)
                    db.execute("DELETE FROM items WHERE id = ?", (old,))
                    db.execute("DELETE FROM reembed_failures WHERE item_id = ?", (old,))
                    continue
                db.execute("UPDATE items SET id = ? WHERE id = ?", (new, old))
                db.execute("UPDATE vectors SET item_id = ? WHERE item_id = ?", (new, old))
                db.execute("UPDATE reembed_failures SET item_id = ? WHERE item_id = ?", (new, old))
                db.execute("UPDATE dead_letters SET item_id = ? WHERE item_id = ?", (new, old))
                renamed += 1
            self._set_meta("seq", str(seq))
        return renamed

    # -- what the resolver asks --------------------------------------------------------------------------

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        out: dict[str, StoredState] = {}
        space = self.view_space()
        with self.read() as db:
            for chunk in _chunks(list(ids), 500):
                marks = ",".join("?" * len(chunk))
                for row in db.execute(
                    f"""SELECT i.id, i.sha256, i.version, i.status, v.vector_id FROM items i
                        LEFT JOIN vectors v ON v.item_id = i.id AND v.space = ? AND v.tombstoned = 0
                        WHERE i.id IN ({marks})""",
                    [space, *chunk],
                ):
                    out[row[0]] = StoredState(row[1], row[2], row[3], row[4] is not None)
        return out

    def product_images(self, products: Sequence[str]) -> dict[str, StoredState]:
        out: dict[str, StoredState] = {}
        space = self.view_space()
        with self.read() as db:
            for product in products:  # its images' ids start with "<product>#": a range of the primary key
                for row in db.execute(
                    """SELECT i.id, i.sha256, i.version, i.status, v.vector_id FROM items i
                       LEFT JOIN vectors v ON v.item_id = i.id AND v.space = ? AND v.tombstoned = 0
                       WHERE i.id >= ? AND i.id < ?""",
                    (space, f"{product}#", f"{product}#\U0010ffff"),
                ):
                    if parent_of(row[0]) == product:  # not another product's, whose id starts with "<product>#"
                        out[row[0]] = StoredState(row[1], row[2], row[3], row[4] is not None)
        return out

    def embeddings_by_sha(self, hashes: Sequence[str]) -> dict[str, Embedding]:
        """Stored embeddings of these contents (a renamed or copied file needs no model call)."""
        return self.embeddings_in(self.view_space(), hashes)

    def embeddings_in(self, space: int, hashes: Sequence[str]) -> dict[str, Embedding]:
        """Embeddings of these contents in one space, live ones first."""
        out: dict[str, Embedding] = {}
        with self.read() as db:
            for chunk in _chunks(list(set(hashes)), 500):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    # `+space`: by content hash (a handful of rows), never by space (all of them)
                    f"SELECT sha256, embedding FROM vectors WHERE sha256 IN ({marks}) AND +space = ? "
                    "ORDER BY tombstoned",
                    [*chunk, space],
                ).fetchall()
                for sha, blob in rows:
                    if sha not in out:
                        out[sha] = self.decode([blob])[0]
        return out

    # -- the change feed of the bound (or active) space: what a live index reads ---------------------------

    def index_meta(self) -> IndexMeta:
        return self.feed().index_meta()

    def changes_since(self, seq: int) -> Changes:
        return self.feed().changes_since(seq)

    def live_vectors(
        self, *, above: int = 0, upto: int | None = None, chunk: int = 50_000
    ) -> Iterator[tuple[VectorIds, Embedding]]:
        return self.feed().live_vectors(above=above, upto=upto, chunk=chunk)

    def tombstoned_ids(self, *, upto: int, after_seq: int = 0) -> VectorIds:
        return self.feed().tombstoned_ids(upto=upto, after_seq=after_seq)

    def snapshot_for_compaction(self) -> tuple[int, int]:
        return self.feed().snapshot_for_compaction()

    def record_generation(
        self, generation: int, high_water: int, main_seq: int, kind: str, checksum: str | None = None
    ) -> int:
        return self.feed().record_generation(generation, high_water, main_seq, kind, checksum)

    def item_vector(self, item_id: str) -> tuple[int, Embedding] | None:
        return self.feed().item_vector(item_id)

    def newest_indexed_at(self) -> datetime | None:
        return self.feed().newest_indexed_at()

    def tombstone_count(self, *, upto: int, after_seq: int) -> int:
        return self.feed().tombstone_count(upto=upto, after_seq=after_seq)

    def delta_size(self, high_water: int) -> int:
        return self.feed().delta_size(high_water)

    def oldest_uncompacted_age_s(self, high_water: int) -> float | None:
        return self.feed().oldest_uncompacted_age_s(high_water)

    @property
    def dim(self) -> int:
        return self.feed().dim

    @property
    def index_dir(self) -> Path:
        return self.feed().index_dir

    # -- items -------------------------------------------------------------------------------------------

    def get_item(self, item_id: str) -> Item | None:
        space = self.view_space()
        with self.locked() as db:
            row = db.execute(f"{_ITEMS_IN_SPACE} WHERE i.id = ?", (space, item_id)).fetchone()
        return None if row is None else item_of(row)

    def items_for_vectors(self, vector_ids: Sequence[int], filters: Filters | None = None) -> dict[int, Item]:
        """Live items by their current vector, in any space. A tombstoned vector has no item, so never
        shows up. With `filters`, only the items that may pass them (a superset, checked in SQL from the
        filter tags and, for `null`, the metadata JSON): the others are never parsed."""
        where, params = _filter_sql(filters) if filters is not None else ("", [])
        out: dict[int, Item] = {}
        for chunk in _chunks([int(v) for v in vector_ids], 500):  # the lock is free between chunks
            marks = ",".join("?" * len(chunk))
            with self.locked() as db:
                rows = db.execute(
                    f"SELECT {ITEM_COLUMNS} FROM vectors v JOIN items i ON i.id = v.item_id "
                    f"WHERE v.vector_id IN ({marks}) AND v.tombstoned = 0{where}",
                    [*chunk, *params],
                ).fetchall()
            for row in rows:  # parsed outside the lock
                item = item_of(row)
                assert item.vector_id is not None
                out[item.vector_id] = item
        return out

    def matching_vectors(self, filters: Filters, limit: int, space: int | None = None) -> VectorIds | None:
        """The vectors of `space` (default: the bound, else the active one) of the live items that may pass
        `filters` (a superset: the caller checks each item), looked up in the filter tags, when at most
        `limit` match; None when more do, or when no condition of the filter is indexed (only `null`
        values). Reads O(min(matches, limit)) index rows.
        The counts are of every space's vectors (twice the items while a re-embed fills a shadow space),
        the ids of `space`'s only."""
        wanted = sorted(set(tags.filter_tags(filters)))
        if not wanted:
            return None
        space = self.view_space() if space is None else space
        with self.locked() as db:
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
                "SELECT m.vector_id FROM (SELECT vector_id FROM item_tags WHERE tag = ?"
                + " INTERSECT SELECT vector_id FROM item_tags WHERE tag = ?" * len(others)
                + ") m JOIN vectors v ON v.vector_id = m.vector_id WHERE v.space = ?",
                (rarest, *others, space),
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def embeddings(self, vector_ids: Sequence[int]) -> dict[int, Embedding]:
        """Stored vectors by id, of any space (tombstoned ones too, until a compaction purges them)."""
        out: dict[int, Embedding] = {}
        for chunk in _chunks([int(v) for v in vector_ids], 500):  # the lock is free between chunks
            marks = ",".join("?" * len(chunk))
            with self.locked() as db:
                rows = db.execute(f"SELECT vector_id, embedding FROM vectors WHERE vector_id IN ({marks})", chunk)
                found = rows.fetchall()
            if found:
                vecs = self.decode([r[1] for r in found])
                out.update((int(r[0]), vecs[i]) for i, r in enumerate(found))
        return out

    def item_ids(self, source: str | None = None, prefix: str = "") -> dict[str, str | None]:
        """id → sha256 of stored items (for reconciling a folder against the store)."""
        with self.locked() as db:
            rows = db.execute(
                "SELECT id, sha256 FROM items WHERE (? IS NULL OR source = ?) AND id >= ? AND id < ?",
                (source, source, prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def items(self, source: str | None = None, prefix: str = "") -> list[Item]:
        """Every item (of one source, with ids starting with `prefix`), by id: what a folder reconciles."""
        space = self.view_space()
        with self.locked() as db:
            rows = db.execute(
                f"{_ITEMS_IN_SPACE} WHERE (? IS NULL OR i.source = ?) AND i.id >= ? AND i.id < ? ORDER BY i.id",
                (space, source, source, prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return [item_of(r) for r in rows]

    # -- migration --------------------------------------------------------------------------------------

    def export_items(self, chunk: int = 1000) -> Iterator[list[StoredItem]]:
        """Every item with its live vector in the bound (or active) space (failed ones without), by id, in
        chunks."""
        space = self.view_space()
        last = ""
        while True:
            with self.locked() as db:
                rows = db.execute(
                    f"SELECT {ITEM_COLUMNS}, v.embedding FROM items i LEFT JOIN vectors v ON v.item_id = i.id "
                    "AND v.space = ? AND v.tombstoned = 0 WHERE i.id > ? ORDER BY i.id LIMIT ?",
                    (space, last, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [StoredItem(item_of(r), None if r[-1] is None else self.decode([r[-1]])[0]) for r in rows]

    def import_items(self, items: Sequence[StoredItem]) -> None:
        """Write items as another store held them (ids, versions, statuses and times kept), in one
        transaction, into the bound (or active) space; an item already here is replaced, its old vectors
        tombstoned in every space."""
        with self.write() as db:
            space = self._space_for_writing(db)
            seq = int(self._meta("seq"))
            for stored in items:
                it = stored.item
                for vector_id in _live_vectors(db, it.id):
                    seq += 1
                    db.execute("UPDATE vectors SET tombstoned = 1, seq = ? WHERE vector_id = ?", (seq, vector_id))
                    untag(db, vector_id)
                if stored.embedding is not None:
                    seq += 1
                    cur = db.execute(
                        "INSERT INTO vectors(space, item_id, sha256, embedding, seq, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (space, it.id, it.sha256, self.blob(stored.embedding), seq, it.updated_at.timestamp()),
                    )
                    tag(db, int(cur.lastrowid or 0), it.source, it.metadata)  # filtered searches find it by these
                db.execute(
                    "INSERT OR REPLACE INTO items(id, source, uri, sha256, metadata, status, reason, version, "
                    "created_at, updated_at, retriable) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        it.id,
                        it.source,
                        it.uri,
                        it.sha256,
                        json.dumps(it.metadata),
                        it.status,
                        it.reason,
                        it.version,
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
        with self.write() as db:
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
        with self.locked() as db:
            rows = db.execute(
                f"SELECT {_LETTER_COLUMNS} FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_letter(r) for r in rows]

    def due_dead_letters(self, prefix: str, now: datetime, limit: int = 100) -> list[DeadLetter]:
        with self.locked() as db:
            rows = db.execute(
                f"SELECT {_LETTER_COLUMNS} FROM dead_letters WHERE retry_at IS NOT NULL AND retry_at <= ? "
                "AND item_id >= ? AND item_id < ? ORDER BY retry_at, id LIMIT ?",
                (now.timestamp(), prefix, prefix + "\U0010ffff", limit),
            ).fetchall()
        return [_letter(r) for r in rows]

    def schedule_dead_letters(self, ids: Sequence[int], at: datetime) -> int:
        with self.write() as db:
            total = 0
            for chunk in _chunks([int(i) for i in ids], 500):
                total += db.execute(
                    f"UPDATE dead_letters SET retry_at = ? WHERE id IN ({_marks(chunk)})", [at.timestamp(), *chunk]
                ).rowcount
            return total

    def delete_dead_letters(self, ids: Sequence[int]) -> int:
        with self.write() as db:
            total = 0
            for chunk in _chunks([int(i) for i in ids], 500):
                total += db.execute(f"DELETE FROM dead_letters WHERE id IN ({_marks(chunk)})", chunk).rowcount
            return total

    def stats(self) -> StoreStats:
        """Counts of the store, its vectors counted in the bound (or active) space."""
        space = self.view_space()
        feed = self.feed(space)
        with self.read() as db:
            # Counted on the vectors_space index: summing the table itself reads every embedding.
            vectors = db.execute("SELECT COUNT(*) FROM vectors WHERE space = ? AND tombstoned = 0", (space,)).fetchone()
            tombs = db.execute("SELECT COUNT(*) FROM vectors WHERE space = ? AND tombstoned = 1", (space,)).fetchone()
            failed = db.execute("SELECT COUNT(*) FROM items WHERE status = 'failed'").fetchone()[0]
            dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            retrying = db.execute("SELECT COUNT(*) FROM dead_letters WHERE retry_at IS NOT NULL").fetchone()[0]
            compacted = db.execute("SELECT last_compaction_at FROM spaces WHERE id = ?", (space,)).fetchone()
            newest = feed.newest_indexed_at()
            meta = feed.index_meta()
            delta = feed.delta_size(meta.high_water)
            delta_age = feed.oldest_uncompacted_age_s(meta.high_water)
        last_compaction = compacted[0] if compacted else None
        return StoreStats(
            items=int(vectors[0]),  # one live vector per searchable item and space
            failed=int(failed),
            vectors=int(vectors[0]),
            dead_letters=int(dead),
            tombstones=int(tombs[0]),
            newest_indexed_at=newest,
            last_compaction_at=_dt(float(last_compaction)) if last_compaction else None,
            generation=meta.generation,
            delta_size=delta,
            delta_age_s=delta_age,
            changes=meta.seq,
            retrying=int(retrying),
        )

    def coverage(self, space: int) -> Coverage:
        """Live items (vectors in the active space), and how many of them `space` holds or gave up on."""
        with self.read() as db:
            active = self.active_space(db)
            total = db.execute(
                "SELECT COUNT(*) FROM vectors WHERE space = ? AND tombstoned = 0", (active.id if active else 0,)
            ).fetchone()[0]
            done = db.execute("SELECT COUNT(*) FROM vectors WHERE space = ? AND tombstoned = 0", (space,)).fetchone()[0]
            failed = db.execute("SELECT COUNT(*) FROM reembed_failures WHERE space = ?", (space,)).fetchone()[0]
        return Coverage(total=int(total), done=int(done), failed=int(failed))


def _live_vectors(db: sqlite3.Connection, item_id: str) -> dict[int, int]:
    """vector id → space of an item's live vectors (one per space)."""
    rows = db.execute("SELECT vector_id, space FROM vectors WHERE item_id = ? AND tombstoned = 0", (item_id,))
    return {int(r[0]): int(r[1]) for r in rows}


def tag(db: sqlite3.Connection, vector_id: int, source: str, metadata: Metadata) -> None:
    """Index the facts a filter can ask about (shared.sqlite.tags) under one of the item's live vectors."""
    db.executemany(
        "INSERT OR IGNORE INTO item_tags(tag, vector_id) VALUES (?, ?)",
        [(t, vector_id) for t in tags.item_tags(source, metadata)],
    )


def untag(db: sqlite3.Connection, vector_id: int) -> None:
    """A vector tombstoned or deleted (or about to be tagged again) leaves the filter tags."""
    db.execute("DELETE FROM item_tags WHERE vector_id = ?", (vector_id,))


def _filter_sql(filters: Filters) -> tuple[str, list[Any]]:
    """SQL conditions on a vector `v` and its item `i` that every item passing `filters` meets (values and
    keys are parameters)."""
    where = ""
    params: list[Any] = []
    for t in tags.filter_tags(filters):
        where += " AND EXISTS (SELECT 1 FROM item_tags t WHERE t.tag = ? AND t.vector_id = v.vector_id)"
        params.append(t)
    for key, value in filters.metadata.items():
        if value is None:  # null or absent
            where += " AND NOT EXISTS (SELECT 1 FROM json_each(i.metadata) j WHERE j.key = ? AND j.type != 'null')"
            params.append(key)
    return where, params


ITEM_COLUMNS = (
    "i.id, i.source, i.uri, i.sha256, i.metadata, i.status, i.reason, i.version, v.vector_id, "
    "i.created_at, i.updated_at, i.retriable"
)
_ITEMS_IN_SPACE = (
    f"SELECT {ITEM_COLUMNS} FROM items i LEFT JOIN vectors v ON v.item_id = i.id AND v.space = ? AND v.tombstoned = 0"
)
_SPACE_COLUMNS = "id, model, model_configs, state, created_at, switched_at"
_LETTER_COLUMNS = "id, source, item_id, payload, reason, tries, created_at, retriable, attempts, retry_at"


def item_of(row: Sequence[Any]) -> Item:
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


def _space(row: Sequence[Any]) -> Space:
    return Space(
        id=int(row[0]),
        model=None if row[1] is None else _identity(row[1]),
        model_configs=row[2],
        state=row[3],
        created_at=_dt(row[4]),
        switched_at=None if row[5] is None else _dt(row[5]),
    )


def _identity(text: str) -> ModelIdentity:
    return ModelIdentity(**json.loads(text))


def _model_json(identity: ModelIdentity) -> str:
    return json.dumps(identity.__dict__)


def _letter_identity(d: DeadLetter) -> tuple[str, str | None, str, str, float]:
    """What makes two dead letters the same one, whichever store kept it."""
    return (d.source, d.item_id, d.payload, d.reason, round(d.created_at.timestamp(), 3))


def _older(version: int | None, stored: int | None) -> bool:
    """The rule of `indexer.resolve`, checked again inside the transaction: only two versions compare."""
    return version is not None and stored is not None and version < stored


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(float(ts), tz=UTC)


def _chunks(values: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
