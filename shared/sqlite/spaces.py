"""`Spaces` on the SQLite backend: a shadow space for another model, filled, switched to, dropped.

    create_shadow ─▶ spaces row (state shadow) ─▶ pending / add_vectors, batch after batch (resumable: the
    store is the position) ─▶ switch: one transaction, shadow → active, active → retired ─▶ drop_spaces
    after the grace period: its vectors (in chunks, each its own transaction) and index files, then its row

Coverage: a live item is one with a vector in the active space. The shadow space covers it once it holds
a vector of the item, or a failure (its source could not be read again: a re-embed dead letter). Writers
keep this true under concurrency: new content tombstones an item's vectors in every space and clears its
failure (so the item is pending again), and `add_vectors` writes a vector only if the item still has the
active vector that `pending` saw.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Sequence, Set

from shared.errors import SpaceGone, StoreError
from shared.roles import CompactionLedger, Failure, Pending, Space, SpaceFailure, SpaceState, SpaceVector
from shared.sqlite.store import SqliteStore, tag
from shared.types import Embedding, ModelIdentity

logger = logging.getLogger(__name__)

_DROP_CHUNK = 5_000  # vectors deleted per transaction: a writer waits at most a few ms for one

# Live items (a vector in the active space) with neither a vector nor a failure in the shadow space, by id.
# `INDEXED BY`: walked in id order from the cursor, so a micro-batch reads about its own rows (left to
# itself, SQLite picked vectors_space and sorted every live item: 46 ms a call at 20k items, and growing).
_PENDING = """
    FROM vectors a INDEXED BY vectors_live JOIN items i ON i.id = a.item_id
    WHERE a.space = :active AND a.tombstoned = 0 AND a.item_id > :after
      AND NOT EXISTS (SELECT 1 FROM vectors s WHERE s.item_id = a.item_id AND s.space = :shadow AND s.tombstoned = 0)
      AND NOT EXISTS (SELECT 1 FROM reembed_failures f WHERE f.space = :shadow AND f.item_id = a.item_id)
"""


class SqliteSpaces:
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    def create_shadow(self, identity: ModelIdentity, model_configs: str | None) -> Space:
        with self.store.write() as db:
            active = self.store.active_space(db)
            if active is None or active.model is None:
                raise StoreError("nothing to re-embed: no model has indexed this store yet (set CLIPDEX_MODEL, index)")
            if active.model.same_weights(identity):
                raise StoreError(f"the store already answers with {identity.name} / {identity.pretrained}")
            shadow = _shadow(self.store, db)
            if shadow is not None:
                assert shadow.model is not None, "a shadow space is created with its model"
                if shadow.model.same_weights(identity):
                    return shadow
                raise StoreError(
                    f"a re-embed with {shadow.model.name} / {shadow.model.pretrained} is in progress: resume it "
                    f"(`clipdex reembed --model {shadow.model.name} --pretrained {shadow.model.pretrained}`), "
                    "or drop it first (`clipdex reembed --abort`)"
                )
            cur = db.execute(
                "INSERT INTO spaces(model, model_configs, state, created_at) VALUES (?, ?, 'shadow', ?)",
                (json.dumps(identity.__dict__), model_configs, time.time()),
            )
            space_id = int(cur.lastrowid or 0)
        created = self.store.space(space_id)
        assert created is not None
        logger.info("created shadow space %d for %s / %s", space_id, identity.name, identity.pretrained)
        return created

    def pending(self, space: int, *, after: str = "", limit: int = 64) -> list[Pending]:
        with self.store.read() as db:
            active = _active_id(self.store, db)
            rows = db.execute(
                f"SELECT i.id, i.source, i.uri, i.sha256, i.metadata, i.version, a.vector_id {_PENDING} "
                "ORDER BY a.item_id LIMIT :limit",
                {"active": active, "shadow": space, "after": after, "limit": limit},
            ).fetchall()
        return [Pending(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else {}, r[5], int(r[6])) for r in rows]

    def embeddings_in(self, space: int, hashes: Sequence[str]) -> dict[str, Embedding]:
        return self.store.embeddings_in(space, hashes)

    def add_vectors(self, space: int, vectors: Sequence[SpaceVector], failures: Sequence[SpaceFailure] = ()) -> int:
        written = 0
        now = time.time()
        with self.store.write() as db:
            shadow = _the_shadow(self.store, db, space)
            active = _active_id(self.store, db)
            seq = self.store.seq()
            for vec in vectors:
                if not _unchanged(db, vec.item, active, space):
                    continue  # replaced or deleted since it was read: it is pending again, or gone
                seq += 1
                cur = db.execute(
                    "INSERT INTO vectors(space, item_id, sha256, embedding, seq, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (space, vec.item.id, vec.sha256, self.store.blob(vec.embedding), seq, now),
                )
                # tagged with the item as it is now (a metadata-only update since `pending` keeps its vector)
                item = db.execute("SELECT source, metadata FROM items WHERE id = ?", (vec.item.id,)).fetchone()
                tag(db, int(cur.lastrowid or 0), item[0], json.loads(item[1]))
                written += 1
            model = shadow.model
            for fail in failures:
                if not _unchanged(db, fail.item, active, space):
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO reembed_failures(space, item_id, reason, created_at, retriable) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (space, fail.item.id, fail.reason, now, int(fail.retriable)),
                )
                # Not retried by itself (retry_at None): an indexer's retry would embed it with the model
                # it runs, the active space's; `clipdex dlq retry` after the switch embeds it with the new one.
                letter = Failure(
                    fail.item.source,
                    _event(fail.item),
                    f"re-embedding with {model.name if model else '?'}: {fail.reason}",
                    id=fail.item.id,
                    uri=fail.item.uri,
                    tries=fail.tries,
                    retriable=fail.retriable,
                )
                self.store.add_dead_letter(db, letter, now)
            self.store.set_seq(seq)
        return written

    def switch(self, space: int) -> bool:
        now = time.time()
        with self.store.write() as db:
            shadow = _the_shadow(self.store, db, space)
            active = _active_id(self.store, db)
            remaining = db.execute(
                f"SELECT COUNT(*) {_PENDING}", {"active": active, "shadow": space, "after": ""}
            ).fetchone()[0]
            if remaining:
                return False
            # Items whose source is gone have no vector in the new space: failed, with the reason (their
            # dead letters were written when they failed; `clipdex dlq retry` indexes them with the new model).
            db.execute(
                """UPDATE items SET status = 'failed', updated_at = :now,
                       reason = (SELECT 're-embedding failed: ' || f.reason FROM reembed_failures f
                                 WHERE f.space = :space AND f.item_id = items.id),
                       retriable = (SELECT f.retriable FROM reembed_failures f
                                    WHERE f.space = :space AND f.item_id = items.id)
                   WHERE id IN (SELECT item_id FROM reembed_failures WHERE space = :space)""",
                {"now": now, "space": space},
            )
            db.execute("DELETE FROM reembed_failures WHERE space = ?", (space,))
            db.execute("UPDATE spaces SET state = 'retired', switched_at = ? WHERE id = ?", (now, active))
            db.execute("UPDATE spaces SET state = 'active', switched_at = ? WHERE id = ?", (now, space))
        model = shadow.model
        logger.info("switched to space %d (%s)", space, f"{model.name} / {model.pretrained}" if model else "?")
        return True

    def abort(self) -> Space | None:
        with self.store.write() as db:
            shadow = _shadow(self.store, db)
            if shadow is None:
                return None
            db.execute("UPDATE spaces SET state = 'dropping', switched_at = ? WHERE id = ?", (time.time(), shadow.id))
        return shadow

    def drop_spaces(self, grace_s: float) -> list[int]:
        with self.store.write() as db:
            db.execute(
                "UPDATE spaces SET state = 'dropping' WHERE state = 'retired' AND switched_at <= ?",
                (time.time() - grace_s,),
            )
            doomed = [int(r[0]) for r in db.execute("SELECT id FROM spaces WHERE state = 'dropping' ORDER BY id")]
        for space in doomed:
            self._drop(space)
        return doomed

    def _drop(self, space: int) -> None:
        """Idempotent, in steps that each commit: a kill at any point leaves the row, and the next call
        finishes the job."""
        deleted = 0
        while True:
            with self.store.write() as db:
                ids = db.execute("SELECT vector_id FROM vectors WHERE space = ? LIMIT ?", (space, _DROP_CHUNK))
                doomed = [(int(r[0]),) for r in ids.fetchall()]
                db.executemany("DELETE FROM item_tags WHERE vector_id = ?", doomed)
                n = db.executemany("DELETE FROM vectors WHERE vector_id = ?", doomed).rowcount
            deleted += n
            if n < _DROP_CHUNK:
                break
        shutil.rmtree(self.store.space_dir(space), ignore_errors=True)
        with self.store.write() as db:
            db.execute("DELETE FROM reembed_failures WHERE space = ?", (space,))
            db.execute("DELETE FROM spaces WHERE id = ?", (space,))
        logger.info("dropped embedding space %d (%d vectors)", space, deleted)


class SpaceLedgers:
    """`CompactionLedgers`: the active space and the shadow space, each compacted on its own."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    def ledgers(self, states: Set[SpaceState] = frozenset({"active", "shadow"})) -> list[CompactionLedger]:
        return [self.store.feed(s.id) for s in self.store.spaces() if s.state in states]


def _shadow(store: SqliteStore, db: sqlite3.Connection) -> Space | None:
    row = db.execute("SELECT id FROM spaces WHERE state = 'shadow'").fetchone()
    return None if row is None else store.space_in(db, int(row[0]))


def _the_shadow(store: SqliteStore, db: sqlite3.Connection, space: int) -> Space:
    """The shadow space `space`; SpaceGone when it no longer is one."""
    shadow = _shadow(store, db)
    if shadow is None or shadow.id != space:
        raise SpaceGone(f"embedding space {space} is no longer being re-embedded (aborted, or switched to)")
    return shadow


def _active_id(store: SqliteStore, db: sqlite3.Connection) -> int:
    active = store.active_space(db)
    if active is None:
        raise StoreError("the store has no active embedding space")
    return active.id


def _unchanged(db: sqlite3.Connection, item: Pending, active: int, space: int) -> bool:
    """Does the item still have the active vector it was read with, and nothing in `space` yet?"""
    still = db.execute(
        "SELECT 1 FROM vectors WHERE vector_id = ? AND space = ? AND tombstoned = 0", (item.active_vector, active)
    ).fetchone()
    if still is None:
        return False
    taken = db.execute(
        "SELECT 1 FROM vectors WHERE item_id = ? AND space = ? AND tombstoned = 0 "
        "UNION ALL SELECT 1 FROM reembed_failures WHERE space = ? AND item_id = ?",
        (item.id, space, space, item.id),
    ).fetchone()
    return taken is None


def _event(item: Pending) -> str:
    """The item as an upsert event of its source, so `clipdex dlq retry` can index it again."""
    raw_id = item.id.removeprefix(f"{item.source}:")
    event: dict[str, object] = {"op": "upsert", "id": raw_id, "uri": item.uri, "metadata": item.metadata}
    if item.version is not None:
        event["version"] = item.version
    return json.dumps(event)
