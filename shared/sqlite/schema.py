"""The SQLite store's tables, and the migration of a store written by an older clipdex.

    meta              key → value: schema version, vector dtype, the change counter `seq`
    spaces            one row per embedding space (a model identity): active | shadow | retired | dropping,
                      with its own main index generation, high-water mark and last compaction
    items             one row per live or failed item (space-neutral: id, uri, hash, metadata, status)
    vectors           embeddings; each belongs to one space and one item; tombstoned when replaced or
                      deleted; `seq` bumped on insert and on tombstone. At most one live vector per
                      (item, space): `vectors_live`.
    item_tags         (tag, vector_id): the facts a filter can ask about (`shared.sqlite.tags`), per live
                      vector, so of every space the item has a vector in
    reembed_failures  items a shadow space could not get (their source is gone): the re-embed's dead letters
    dead_letters      what could not be indexed, with the raw event or path, the reason, and when it is
                      retried by itself, if ever (`retry_at`)
    folders           the short name of each watched folder, which namespaces its item ids

Versions, each reached from the one before by its own step (`MIGRATIONS`), all in the opening transaction:
    1  one model per store: the main index's state in `meta`, the item's vector in `items.vector_id`
    2  `add_item_tags`: the filter tags (issue 14)
    3  `add_retries_and_folders`: dead letters retried by themselves, items.retriable, folders (issue 9)
    4  `add_spaces`: embedding spaces (issue 15): one active space holding every vector (and the tags
       of a metadata value -0.0 made those of 0, which equals it)
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from shared.sqlite.tags import item_tags

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spaces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT,
    model_configs TEXT,
    state TEXT NOT NULL CHECK (state IN ('active', 'shadow', 'retired', 'dropping')),
    created_at REAL NOT NULL,
    switched_at REAL,
    generation INTEGER NOT NULL DEFAULT 0,
    high_water INTEGER NOT NULL DEFAULT 0,
    main_seq INTEGER NOT NULL DEFAULT 0,
    main_kind TEXT,
    main_sha256 TEXT,
    last_compaction_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS spaces_one_active ON spaces(state) WHERE state = 'active';
CREATE UNIQUE INDEX IF NOT EXISTS spaces_one_shadow ON spaces(state) WHERE state = 'shadow';
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    uri TEXT NOT NULL,
    sha256 TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('indexed', 'failed')),
    reason TEXT,
    version INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    retriable INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS vectors (
    vector_id INTEGER PRIMARY KEY AUTOINCREMENT,
    space INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    sha256 TEXT,
    embedding BLOB NOT NULL,
    tombstoned INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS item_tags (
    tag INTEGER NOT NULL,
    vector_id INTEGER NOT NULL,
    PRIMARY KEY (tag, vector_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reembed_failures (
    space INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    retriable INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (space, item_id)
) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS folders (name TEXT PRIMARY KEY, path TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
"""

# Every vector query names its space. Index entries end with the rowid (vector_id), so `vectors_space`
# also answers "live vectors of a space above a high-water mark" and "the newest vector of a space" by range.
INDEXES = """
CREATE INDEX IF NOT EXISTS vectors_space ON vectors(space, tombstoned);
CREATE INDEX IF NOT EXISTS vectors_space_seq ON vectors(space, seq);
CREATE INDEX IF NOT EXISTS vectors_sha256 ON vectors(sha256);
CREATE UNIQUE INDEX IF NOT EXISTS vectors_live ON vectors(item_id, space) WHERE tombstoned = 0;
CREATE INDEX IF NOT EXISTS item_tags_vector ON item_tags(vector_id);
CREATE INDEX IF NOT EXISTS dead_letters_due ON dead_letters(retry_at) WHERE retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_retrying ON dead_letters(item_id) WHERE retry_at IS NOT NULL;
"""

_SPACE_KEYS = ("model", "generation", "high_water", "main_seq", "main_kind", "main_sha256", "last_compaction_at")


def execute_script(db: sqlite3.Connection, script: str) -> None:
    """Statement by statement (executescript would commit the caller's transaction)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def schema_version(db: sqlite3.Connection) -> int | None:
    """The version of an existing store; None for an empty database."""
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if not has_meta:
        return None
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else int(row[0])


def create(db: sqlite3.Connection) -> None:
    execute_script(db, TABLES)
    execute_script(db, INDEXES)


def migrate(db: sqlite3.Connection, version: int, now: float, path: Path) -> bool:
    """Bring a store of an older `version` to SCHEMA_VERSION, one `MIGRATIONS` step per version, in the
    caller's transaction (two processes opening one old store migrate it once). True when the FAISS files
    must move to the first space's folder (`move_index_files`, after commit)."""
    for to in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[to](db, now)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(to),))
        logger.info("store %s: migrated from schema version %d to %d", path, to - 1, to)
    return version < 4


def add_item_tags(db: sqlite3.Connection, now: float) -> None:
    """1 → 2: the filter tags of every item's vector (schema 1 points items at their vector)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS item_tags (tag INTEGER NOT NULL, vector_id INTEGER NOT NULL, "
        "PRIMARY KEY (tag, vector_id)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX IF NOT EXISTS item_tags_vector ON item_tags(vector_id)")
    rows = db.execute("SELECT vector_id, source, metadata FROM items WHERE vector_id IS NOT NULL").fetchall()
    for vector_id, source, metadata in rows:
        db.executemany(
            "INSERT OR IGNORE INTO item_tags(tag, vector_id) VALUES (?, ?)",
            [(t, vector_id) for t in item_tags(source, json.loads(metadata) if metadata else {})],
        )


def add_retries_and_folders(db: sqlite3.Connection, now: float) -> None:
    """2 → 3: dead letters that are retried by themselves (`retriable`, `attempts`, `retry_at`), whether an
    item's last failure was transient (`items.retriable`), and the `folders` table."""
    execute_script(
        db,
        """
ALTER TABLE items ADD COLUMN retriable INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN retriable INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
ALTER TABLE dead_letters ADD COLUMN retry_at REAL;
CREATE TABLE IF NOT EXISTS folders (name TEXT PRIMARY KEY, path TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_due ON dead_letters(retry_at) WHERE retry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_retrying ON dead_letters(item_id) WHERE retry_at IS NOT NULL;
""",
    )


def add_spaces(db: sqlite3.Connection, now: float) -> None:
    """3 → 4: one active space (id 1) holding every vector, the main index's state moved from `meta` to it,
    and `items.vector_id` dropped (an item's vector is found per space).

    Live vectors that no item points to (none should exist) are tombstoned, so that "one live vector per
    item and space" holds from here on."""
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    _retag_negative_zero(db)
    db.execute("ALTER TABLE vectors ADD COLUMN space INTEGER NOT NULL DEFAULT 1")
    execute_script(db, TABLES)
    has_vectors = db.execute("SELECT 1 FROM vectors LIMIT 1").fetchone() is not None
    if "model" in meta or has_vectors:
        db.execute(
            """INSERT INTO spaces(id, model, state, created_at, switched_at, generation, high_water, main_seq,
                                  main_kind, main_sha256, last_compaction_at)
               VALUES (1, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                meta.get("model"),
                now,
                now,
                int(meta.get("generation", 0)),
                int(meta.get("high_water", 0)),
                int(meta.get("main_seq", 0)),
                meta.get("main_kind"),
                meta.get("main_sha256") or None,  # the main file's checksum (version 3 kept it in meta)
                float(meta["last_compaction_at"]) if "last_compaction_at" in meta else None,
            ),
        )
    seq = int(meta.get("seq", 0)) + 1
    orphans = db.execute(
        "UPDATE vectors SET tombstoned = 1, seq = ? WHERE tombstoned = 0 "
        "AND vector_id NOT IN (SELECT vector_id FROM items WHERE vector_id IS NOT NULL)",
        (seq,),
    ).rowcount
    if orphans:
        logger.warning("migration: %d vectors that no item pointed to were tombstoned", orphans)
        db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(seq),))
    db.execute("DELETE FROM item_tags WHERE vector_id NOT IN (SELECT vector_id FROM vectors WHERE tombstoned = 0)")
    db.execute("DROP INDEX IF EXISTS items_vector_id")
    db.execute("ALTER TABLE items DROP COLUMN vector_id")
    db.execute("DROP INDEX IF EXISTS vectors_tombstoned")
    db.execute("DROP INDEX IF EXISTS vectors_seq")
    execute_script(db, INDEXES)
    db.execute(f"DELETE FROM meta WHERE key IN ({','.join('?' * len(_SPACE_KEYS))})", _SPACE_KEYS)
    if "model" in meta:
        name = json.loads(meta["model"]).get("name")
        logger.info("embedding spaces: model %s is the store's active space", name)


# One step per schema version: MIGRATIONS[n] takes a store of version n - 1 to version n.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection, float], None]] = {
    2: add_item_tags,
    3: add_retries_and_folders,
    4: add_spaces,
}


def _retag_negative_zero(db: sqlite3.Connection) -> None:
    """Versions 2 and 3 tagged a metadata value -0.0 apart from 0, which equals it (a filter on 0 missed
    the item): tag again the few items whose metadata holds -0.0 (a superset: LIKE on the JSON text)."""
    rows = db.execute(
        "SELECT vector_id, source, metadata FROM items WHERE vector_id IS NOT NULL AND metadata LIKE '%-0.0%'"
    ).fetchall()
    for vector_id, source, metadata in rows:
        db.execute("DELETE FROM item_tags WHERE vector_id = ?", (vector_id,))
        db.executemany(
            "INSERT OR IGNORE INTO item_tags(tag, vector_id) VALUES (?, ?)",
            [(t, vector_id) for t in item_tags(source, json.loads(metadata))],
        )


def move_index_files(index_dir: Path, space_dir: Path) -> None:
    """Schema 1 kept its FAISS files in the index folder itself; each space has a folder of its own now.
    Best effort: a reader that misses a file rebuilds it from the store."""
    moved = 0
    for path in sorted(index_dir.glob("main-*.faiss")):
        try:
            space_dir.mkdir(parents=True, exist_ok=True)
            os.replace(path, space_dir / path.name)
            moved += 1
        except OSError as exc:
            logger.warning("cannot move %s to %s (%s); it will be rebuilt from the store", path, space_dir, exc)
    if moved:
        logger.info("moved %d main index files to %s", moved, space_dir)
