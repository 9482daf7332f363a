"""The change feed and compaction ledger of one embedding space (`ChangeFeed`, `CompactionLedger`).

A search process's `LiveIndex` follows one space: its vectors, tombstones and main index generations.
Vector ids are unique across spaces, so a vector id found in one space's FAISS index resolves to its item
without naming the space. The change counter `seq` is the store's (every space's writes bump it), so a
reader of one space also steps over the other's changes; the `(space, seq)` index makes that free.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.errors import SpaceGone, StoreError
from shared.roles import Changes, IndexMeta, VectorIds
from shared.types import Embedding, Filters, Item

if TYPE_CHECKING:
    from shared.sqlite.store import SqliteStore


class SpaceFeed:
    def __init__(self, store: SqliteStore, space: int) -> None:
        self.store = store
        self.space = space

    @property
    def dim(self) -> int:
        """The space's dimension: its model's, or (no model recorded yet) that of a stored vector."""
        with self.store.locked() as db:
            row = db.execute("SELECT model FROM spaces WHERE id = ?", (self.space,)).fetchone()
            if row is not None and row[0] is not None:
                return int(_json_dim(row[0]))
            blob = db.execute("SELECT embedding FROM vectors WHERE space = ? LIMIT 1", (self.space,)).fetchone()
        return 0 if blob is None else len(blob[0]) // self.store.vector_dtype.itemsize

    @property
    def index_dir(self) -> Path:
        return self.store.space_dir(self.space)

    def index_meta(self) -> IndexMeta:
        # one statement, one snapshot: never one generation's number with another's mark
        with self.store.locked() as db:
            row = db.execute(
                "SELECT s.generation, s.high_water, s.main_seq, m.value, s.main_sha256 FROM meta m "
                "LEFT JOIN spaces s ON s.id = ? WHERE m.key = 'seq'",
                (self.space,),
            ).fetchone()
        if row is None:
            raise StoreError("store meta key 'seq' missing")
        if row[0] is None:
            if self.space == 0:  # no space yet: nothing was written
                return IndexMeta(0, 0, 0, int(row[3]))
            raise SpaceGone(f"embedding space {self.space} no longer exists (dropped after a re-embed)")
        return IndexMeta(int(row[0]), int(row[1]), int(row[2]), int(row[3]), checksum=row[4] or None)

    def changes_since(self, seq: int) -> Changes:
        """Vectors of this space added and tombstoned after `seq`, read in one snapshot."""
        with self.store.read() as db:
            now_seq = int(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
            rows = db.execute(
                "SELECT vector_id, tombstoned, CASE WHEN tombstoned THEN NULL ELSE embedding END "
                "FROM vectors WHERE space = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (self.space, seq, now_seq),
            ).fetchall()
        added = [(r[0], r[2]) for r in rows if not r[1]]
        dead = [r[0] for r in rows if r[1]]
        return Changes(
            seq=now_seq,
            added_ids=np.array([a[0] for a in added], dtype=np.int64),
            added=self.store.decode([a[1] for a in added]),
            tombstoned_ids=np.array(dead, dtype=np.int64),
        )

    def live_vectors(
        self, *, above: int = 0, upto: int | None = None, chunk: int = 50_000
    ) -> Iterator[tuple[VectorIds, Embedding]]:
        """(ids, embeddings) of live vectors with above < vector_id <= upto, in chunks, by id."""
        limit = upto if upto is not None else 2**62
        last = above
        while True:
            with self.store.locked() as db:
                rows = db.execute(
                    "SELECT vector_id, embedding FROM vectors WHERE space = ? AND tombstoned = 0 AND vector_id > ? "
                    "AND vector_id <= ? ORDER BY vector_id LIMIT ?",
                    (self.space, last, limit, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield np.array([r[0] for r in rows], dtype=np.int64), self.store.decode([r[1] for r in rows])

    def tombstoned_ids(self, *, upto: int, after_seq: int = 0) -> VectorIds:
        with self.store.locked() as db:
            rows = db.execute(
                # `+seq`: by tombstone state and id (tombstones are few), not by the change counter
                "SELECT vector_id FROM vectors WHERE space = ? AND tombstoned = 1 AND vector_id <= ? AND +seq > ?",
                (self.space, upto, after_seq),
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def snapshot(self) -> AbstractContextManager[None]:
        return self.store.snapshot()

    def items_for_vectors(self, vector_ids: Sequence[int], filters: Filters | None = None) -> dict[int, Item]:
        return self.store.items_for_vectors(vector_ids, filters)

    def matching_vectors(self, filters: Filters, limit: int) -> VectorIds | None:
        return self.store.matching_vectors(filters, limit, self.space)

    def embeddings(self, vector_ids: Sequence[int]) -> dict[int, Embedding]:
        return self.store.embeddings(vector_ids)

    def item_vector(self, item_id: str) -> tuple[int, Embedding] | None:
        with self.store.locked() as db:
            row = db.execute(
                "SELECT vector_id, embedding FROM vectors WHERE item_id = ? AND space = ? AND tombstoned = 0",
                (item_id, self.space),
            ).fetchone()
        return None if row is None else (int(row[0]), self.store.decode([row[1]])[0])

    def newest_indexed_at(self) -> datetime | None:
        """When the newest vector of this space was written: two index seeks, cheap at any size."""
        with self.store.locked() as db:
            row = db.execute(
                "SELECT created_at FROM vectors WHERE vector_id = (SELECT MAX(x) FROM ("
                "SELECT MAX(vector_id) AS x FROM vectors WHERE space = ?1 AND tombstoned = 0 UNION ALL "
                "SELECT MAX(vector_id) FROM vectors WHERE space = ?1 AND tombstoned = 1))",
                (self.space,),
            ).fetchone()
        return None if row is None else datetime.fromtimestamp(float(row[0]), tz=UTC)

    # -- the compaction ledger --------------------------------------------------------------------------

    def delta_size(self, high_water: int) -> int:
        with self.store.locked() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM vectors WHERE space = ? AND tombstoned = 0 AND vector_id > ?",
                (self.space, high_water),
            ).fetchone()
        return int(row[0])

    def tombstone_count(self, *, upto: int, after_seq: int) -> int:
        """Vectors up to `upto` tombstoned after `after_seq`: the deleted vectors a main index still holds."""
        with self.store.locked() as db:
            row = db.execute(
                # `+vector_id`: look rows up by the change counter (the few changed since main was built),
                # not by the id range (every vector in main)
                "SELECT COUNT(*) FROM vectors WHERE space = ? AND seq > ? AND tombstoned = 1 AND +vector_id <= ?",
                (self.space, after_seq, upto),
            ).fetchone()
        return int(row[0])

    def oldest_uncompacted_age_s(self, high_water: int) -> float | None:
        with self.store.locked() as db:
            # vector ids grow with time: the oldest is the lowest id above the mark (an index seek for each
            # tombstone state; a scan by id would read the other space's rows too)
            row = db.execute(
                "SELECT created_at FROM vectors WHERE vector_id = (SELECT MIN(x) FROM ("
                "SELECT MIN(vector_id) AS x FROM vectors WHERE space = ?1 AND tombstoned = 0 AND vector_id > ?2 "
                "UNION ALL "
                "SELECT MIN(vector_id) FROM vectors WHERE space = ?1 AND tombstoned = 1 AND vector_id > ?2))",
                (self.space, high_water),
            ).fetchone()
        if row is None:
            return None
        return max(0.0, datetime.now(tz=UTC).timestamp() - float(row[0]))

    def snapshot_for_compaction(self) -> tuple[int, int]:
        """(highest vector id of any space, change counter) at one instant. Ids only grow, so every vector
        of this space written later is above it."""
        with self.store.read() as db:
            max_id = db.execute("SELECT COALESCE(MAX(vector_id), 0) FROM vectors").fetchone()[0]
            seq = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]
        return int(max_id), int(seq)

    def record_generation(
        self, generation: int, high_water: int, main_seq: int, kind: str, checksum: str | None = None
    ) -> int:
        """Point readers at a new main index of this space (its file's sha256: `checksum`); purge the
        tombstones it no longer contains."""
        with self.store.write() as db:
            updated = db.execute(
                "UPDATE spaces SET generation = ?, high_water = ?, main_seq = ?, main_kind = ?, main_sha256 = ?, "
                "last_compaction_at = ? WHERE id = ?",
                (generation, high_water, main_seq, kind, checksum, datetime.now(tz=UTC).timestamp(), self.space),
            ).rowcount
            if not updated:
                raise SpaceGone(f"embedding space {self.space} no longer exists (dropped after a re-embed)")
            cur = db.execute(
                "DELETE FROM vectors WHERE space = ? AND tombstoned = 1 AND vector_id <= ? AND +seq <= ?",
                (self.space, high_water, main_seq),
            )
            return int(cur.rowcount)


def _json_dim(model_json: str) -> int:
    return int(json.loads(model_json)["dim"])
