"""Stores as older clipdex versions wrote them (for the migration tests): the DDL of each schema version,
with a few rows, made with sqlite3 alone (no clipdex code writes an old version)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from shared.sqlite import tags

# Version 1: the first.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (id TEXT PRIMARY KEY, source TEXT NOT NULL, uri TEXT NOT NULL, sha256 TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL CHECK (status IN ('indexed', 'failed')), reason TEXT,
    version INTEGER, vector_id INTEGER, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX items_vector_id ON items(vector_id);
CREATE TABLE vectors (vector_id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL, sha256 TEXT,
    embedding BLOB NOT NULL, tombstoned INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE INDEX vectors_seq ON vectors(seq);
CREATE INDEX vectors_sha256 ON vectors(sha256);
CREATE INDEX vectors_tombstoned ON vectors(tombstoned);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, item_id TEXT,
    payload TEXT NOT NULL, reason TEXT NOT NULL, tries INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL);
"""

# Version 2 (issue 14): the filter tags.
SCHEMA_2 = (
    SCHEMA_1
    + """
CREATE TABLE item_tags (tag INTEGER NOT NULL, vector_id INTEGER NOT NULL, PRIMARY KEY (tag, vector_id)) WITHOUT ROWID;
CREATE INDEX item_tags_vector ON item_tags(vector_id);
"""
)

# Rows both versions hold: an indexed folder item with metadata (a 8-d float32 zero vector), a failed Kafka
# item, and its dead letter.
ROWS = """
INSERT INTO meta VALUES ('vector_dtype', 'float32'), ('seq', '1'), ('generation', '0'), ('high_water', '0'),
    ('main_seq', '0');
INSERT INTO items VALUES ('folder:a.jpg', 'folder', '/r/a.jpg', 'sha-a', '{"colour": "red"}', 'indexed', NULL, NULL, 1,
    1.0, 1.0);
INSERT INTO items VALUES ('kafka:b', 'kafka', 'https://x/b', NULL, '{}', 'failed', 'FetchFailed: HTTP 503', NULL, NULL,
    2.0, 2.0);
INSERT INTO vectors VALUES (1, 'folder:a.jpg', 'sha-a', zeroblob(32), 0, 1, 1.0);
INSERT INTO dead_letters VALUES (1, 'kafka', 'kafka:b', '{}', 'FetchFailed: HTTP 503', 4, 2.0);
"""


def make_store(path: Path, version: int, extra_sql: str = "") -> Path:
    """A store file of schema `version` (1 or 2) holding ROWS (and `extra_sql`)."""
    ddl = {1: SCHEMA_1, 2: SCHEMA_2}[version]
    if version == 2:  # version 2 tags each vector as it writes it
        extra_sql += "".join(
            f"INSERT INTO item_tags VALUES ({t}, 1);" for t in tags.item_tags("folder", {"colour": "red"})
        )
    db = sqlite3.connect(path)
    try:
        db.executescript(ddl + ROWS + f"INSERT INTO meta VALUES ('schema_version', '{version}');" + extra_sql)
    finally:
        db.close()
    return path
