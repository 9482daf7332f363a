"""The SQLite store's tables, and the migration of a store written by an older clipdex.

    meta              key → value: schema version, vector dtype, the change counter `seq`
    spaces            one row per embedding space (a model identity): active | shadow | retired | dropping,
                      with its own main index generation, high-water mark and last compaction
    items             one row per live or failed item (space-neutral: id, uri, hash, metadata, status)
    vectors           embeddings; each belongs to one space and one item; tombstoned when replaced or
                      deleted; `seq` bumped on insert and on tombstone. At most one live vector per
                      (item, space): `vectors_live`.
    reembed_failures  items a shadow space could not get (their source is gone): the re-embed's dead letters
    dead_letters      what could not be indexed, with the raw event or path and the reason

Schema 1 (one model per store) had the main index's state in `meta` and the item's vector in
`items.vector_id`; `migrate_from_1` turns such a store into one active space, in one transaction.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2

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
    updated_at REAL NOT NULL
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
CREATE TABLE IF NOT EXISTS reembed_failures (
    space INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (space, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    item_id TEXT,
    payload TEXT NOT NULL,
    reason TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL
);
"""

# Every vector query names its space. Index entries end with the rowid (vector_id), so `vectors_space`
# also answers "live vectors of a space above a high-water mark" and "the newest vector of a space" by range.
INDEXES = """
CREATE INDEX IF NOT EXISTS vectors_space ON vectors(space, tombstoned);
CREATE INDEX IF NOT EXISTS vectors_space_seq ON vectors(space, seq);
CREATE INDEX IF NOT EXISTS vectors_sha256 ON vectors(sha256);
CREATE UNIQUE INDEX IF NOT EXISTS vectors_live ON vectors(item_id, space) WHERE tombstoned = 0;
"""

_SPACE_KEYS = ("model", "generation", "high_water", "main_seq", "main_kind", "last_compaction_at")


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


def migrate_from_1(db: sqlite3.Connection, now: float) -> None:
    """A schema-1 store becomes one active space (id 1) holding every vector, in the caller's transaction.

    Live vectors that no item points to (none should exist) are tombstoned, so that "one live vector per
    item and space" holds from here on."""
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    db.execute("ALTER TABLE vectors ADD COLUMN space INTEGER NOT NULL DEFAULT 1")
    execute_script(db, TABLES)
    has_vectors = db.execute("SELECT 1 FROM vectors LIMIT 1").fetchone() is not None
    if "model" in meta or has_vectors:
        db.execute(
            """INSERT INTO spaces(id, model, state, created_at, switched_at, generation, high_water, main_seq,
                                  main_kind, last_compaction_at)
               VALUES (1, ?, 'active', ?, ?, ?, ?, ?, ?, ?)""",
            (
                meta.get("model"),
                now,
                now,
                int(meta.get("generation", 0)),
                int(meta.get("high_water", 0)),
                int(meta.get("main_seq", 0)),
                meta.get("main_kind"),
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
    db.execute("DROP INDEX IF EXISTS items_vector_id")
    db.execute("ALTER TABLE items DROP COLUMN vector_id")
    db.execute("DROP INDEX IF EXISTS vectors_tombstoned")
    db.execute("DROP INDEX IF EXISTS vectors_seq")
    execute_script(db, INDEXES)
    db.execute(f"DELETE FROM meta WHERE key IN ({','.join('?' * len(_SPACE_KEYS))})", _SPACE_KEYS)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    if "model" in meta:
        name = json.loads(meta["model"]).get("name")
        logger.info("migrated the store to schema %d: model %s is its active space", SCHEMA_VERSION, name)


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
