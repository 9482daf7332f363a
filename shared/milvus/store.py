"""The Milvus store: the `Writer`, `Catalog` and `Portable` roles over three collections (`collections`).

Milvus has no transactions and no conditional write, and several indexers write to it at once (one Kafka
consumer group). So a micro-batch is written in steps that a replay of the same batch makes whole, and
versions are kept in the rows themselves:

    read the batch's items (Strong) ─▶ check versions, build rows ─▶ upsert rows ─▶ delete deleted items
      ─▶ delete the versions each written item superseded ─▶ writer counters ─▶ dead letters (last)

Version ordering without a read-then-write race: a row's primary key is `<item key>:<version>`, so two
writers with two versions of one item write two rows instead of overwriting each other; the highest
version is the item (readers take it), and each writer, after its upsert, reads the item's rows again
(Strong) and deletes those below the highest it sees. Deletes only ever remove rows below a version that
exists, so the newest row is never removed; and of two racing writers the later one always sees both
rows, so the older row goes. A delete event removes the rows up to its own version (`version <= v` in
the expression), never a newer one. Without versions, every write of an item is one row (`:-1`), upserted
in place: the last write wins, as in Kafka's order within a partition (events keyed by item id keep one
item on one partition, so one consumer at a time). An upsert without a version keeps the stored one.

Dead letters: the batch's new letters are written after everything else, and the letters it retried
(`apply(retried=...)`) are deleted after those, so a crash between leaves a letter twice (retried again),
never none. Every item the batch writes ends the automatic retry of its earlier letters (their `retry_at`
is written again as -1, before the new letters). Several consumers of one group may retry the same due
letter at once (nothing in Milvus claims it for one): the item ends the same, versions are checked as for
any write, and a failure again may leave two letters.

Folders (`register_folder`) are rows of the meta collection: `folder:<path>` → its name and
`folder-name:<name>` → its path, the second read back after it is written, so of two processes that
register two folders of one name at once, one moves on to the next name.

What a crash between the steps leaves (an extra row of an older version; a dead letter written twice if
its acknowledgement was lost) is put right by the replay of the uncommitted batch, which writes the same
rows and deletes the superseded ones again; searches meanwhile show each item once (by id).

Reads after writes: the write path reads with Strong consistency (it must see what other indexers wrote
the moment before, in a rebalance most of all); searches use Bounded (see `shared.milvus.search`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from shared.errors import ModelMismatchError, SpaceGone
from shared.milvus import expr as ex
from shared.milvus.client import Milvus
from shared.milvus.collections import MAX_TAGS, MAX_TEXT, Names
from shared.roles import (
    ApplyResult,
    Coverage,
    DeadLetter,
    Delete,
    Failure,
    Space,
    StoredItem,
    StoredState,
    StoreStats,
    Upsert,
    folder_name,
)
from shared.types import Embedding, Item, ModelIdentity, parent_of

logger = logging.getLogger(__name__)

NO_VERSION = -1
STRONG = "Strong"
MAX_METADATA_BYTES = 65_536  # Milvus's limit for a JSON value
_STATE_FIELDS = ["pk", "key", "item_id", "sha256", "status", "version"]
_ITEM_FIELDS = [*_STATE_FIELDS, "source", "uri", "metadata", "reason", "created_at", "updated_at", "retriable"]
_LETTER_FIELDS = ["id", "source", "item_id", "key", "payload", "reason", "tries", "created_at"]
_LETTER_FIELDS += ["retriable", "attempts", "retry_at"]
_ALL_LETTER_FIELDS = [*_LETTER_FIELDS, "vector"]  # what an upsert of a letter writes again
NEVER = -1  # retry_at of a letter that is not retried by itself
_PLACEHOLDER = [1.0, 0.0]
_META_ROWS = 16_384  # the model and one row per writer (host and scratch directory)


class MilvusStore:
    """One store (three collections) on one Milvus connection; safe to share between threads."""

    def __init__(self, milvus: Milvus, names: Names, *, dim: int, slot: str) -> None:
        self.milvus = milvus
        self.names = names
        self.dim = dim
        self._slot = f"writer:{slot}"  # this writer's counters in the meta collection
        self._writes: int | None = None  # loaded on the first write
        self._newest: float | None = None
        self.bound_model: ModelIdentity | None = None  # one collection set holds one model, for good

    def close(self) -> None:
        self.milvus.close()

    @property
    def where(self) -> str:
        return f"{self.milvus.where}, collection {self.names.items}"

    # -- model identity -------------------------------------------------------------------------------

    def bind_model(self, identity: ModelIdentity) -> None:
        """Record the model on first use; refuse any other model afterwards."""
        have = self.model_identity()
        if have is None:
            self._put_meta("model", identity.__dict__)
            self.bound_model = identity
            return
        if (have.name, have.dim, have.checksum) != (identity.name, identity.dim, identity.checksum):
            raise ModelMismatchError(
                f"collection {self.names.items} in {self.milvus.where} holds vectors of model {have.name} / "
                f"{have.pretrained} (dim {have.dim}, weights {have.checksum[:12]}), but the configured model is "
                f"{identity.name} / {identity.pretrained} (dim {identity.dim}, weights {identity.checksum[:12]}). "
                "Embeddings of two models cannot be mixed: leave CLIPDEX_MILVUS_COLLECTION unset (one "
                "collection per model), or name another collection."
            )
        self.bound_model = have

    def model_identity(self) -> ModelIdentity | None:
        stored = self._get_meta("model")
        return None if stored is None else ModelIdentity(**stored)

    # -- embedding spaces: one, for good (`clipdex reembed` needs the SQLite store) -------------------------

    ONLY_SPACE = 1

    def spaces(self) -> list[Space]:
        """This model's collections, the only space, always active (a refresh asks every tick: no call to
        Milvus once the model is known, since it never changes)."""
        model = self.bound_model or self.model_identity()
        if model is None:
            return []
        self.bound_model = model
        only = Space(self.ONLY_SPACE, model, model_configs=None, state="active", created_at=None, switched_at=None)
        return [only]

    def coverage(self, space: int) -> Coverage:
        """The only space covers every live item (there is never a shadow to fill)."""
        if space != self.ONLY_SPACE:
            raise SpaceGone(f"embedding space {space} does not exist: a Milvus store has one space per collection")
        live = self.stats().vectors
        return Coverage(total=live, done=live, failed=0)

    # -- the write path -------------------------------------------------------------------------------------

    def apply(
        self,
        upserts: Sequence[Upsert] = (),
        deletes: Sequence[Delete] = (),
        failures: Sequence[Failure] = (),
        retried: Sequence[int] = (),
    ) -> ApplyResult:
        """Write one micro-batch (see the module's docstring for the steps and what a replay makes whole).
        Everything is checked before the first write: a refused batch writes nothing."""
        result = ApplyResult()
        now = time.time()
        ids = [u.id for u in upserts] + [d.id for d in deletes] + [f.id for f in failures if f.id is not None]
        current = self._current(ids, vectors=True)
        rows: dict[str, dict[str, Any]] = {}  # by item id: the row this batch writes for it
        refused: list[Failure] = []
        touched: list[str] = []  # items this batch wrote: their older dead letters are not retried

        for up in upserts:
            cur = current.get(up.id)
            if cur is not None and _older(up.version, _version(cur)):
                result.skipped += 1  # a newer version was written since the resolver read this item
                continue
            version = up.version if up.version is not None else (cur["version"] if cur else NO_VERSION)
            if up.embedding is None:
                if cur is None or cur["status"] != "indexed" or cur["sha256"] != up.sha256:
                    result.conflicts.append(up.id)  # its content changed since the resolver read it
                    continue
                vector = cur["vector"]
            else:
                vector = np.asarray(up.embedding, dtype=np.float32).tolist()
            too_big = _too_big(up)
            if too_big is not None:
                refused.append(Failure(up.source, up.uri, too_big, id=up.id, uri=up.uri))
                continue
            row = _row(up, version, vector, created_at=cur["created_at"] if cur else now, now=now)
            rows[up.id] = current[up.id] = row
            touched.append(up.id)
            if up.embedding is None:
                result.updated += 1
            else:
                result.indexed += 1

        gone: list[tuple[str, int | None]] = []
        for de in deletes:
            cur = current.get(de.id)
            if cur is not None and _older(de.version, _version(cur)):
                result.skipped += 1
                continue
            current.pop(de.id, None)
            rows.pop(de.id, None)
            touched.append(de.id)
            if cur is None:
                continue
            gone.append((ex.item_key(de.id), de.version))
            result.deleted += 1

        letters = [*failures, *refused]
        for fail in letters:
            result.failed += 1
            if fail.id is None:
                continue
            cur = current.get(fail.id)
            touched.append(fail.id)
            if cur is not None:  # a failed update keeps the older good vector (and its version) live
                row = {**cur, "reason": _text(fail.reason), "updated_at": now, "retriable": fail.retriable}
            else:
                row = _failed_row(fail, now, self.dim)
            rows[fail.id] = current[fail.id] = row

        self.milvus.upsert(self.names.items, list(rows.values()))
        if gone:
            self.milvus.delete(self.names.items, ex.deletes_expr(gone))
        self._drop_superseded([ex.item_key(i) for i in rows])
        self._count_writes(len(rows) + len(gone), indexed=result.indexed > 0, now=now)
        self._end_retries(touched)
        self._insert_letters(letters, now)  # a replay of everything before writes nothing twice
        if retried:  # after the new letters: a crash between leaves a letter twice, never none
            self.milvus.delete(self.names.dead_letters, ex.ints_in("id", [int(i) for i in retried]))
        return result

    def _end_retries(self, item_ids: Sequence[str]) -> None:
        """No automatic retry of these items' dead letters any more: a later event of the item wins."""
        keys = sorted({ex.item_key(i) for i in item_ids})
        waiting = [
            r
            for r in self.milvus.query_many(self.names.dead_letters, "key", keys, _ALL_LETTER_FIELDS)
            if int(r["retry_at"]) != NEVER
        ]
        self.milvus.upsert(self.names.dead_letters, [{**r, "retry_at": NEVER} for r in waiting])

    def _drop_superseded(self, keys: Sequence[str]) -> None:
        """Delete the rows below the newest version of each item (written by this batch or a racing one)."""
        if not keys:
            return
        found = self.milvus.query_many(self.names.items, "key", list(keys), ["pk", "item_id", "version"])
        newest: dict[str, int] = {}
        for row in found:
            newest[row["item_id"]] = max(newest.get(row["item_id"], NO_VERSION), int(row["version"]))
        stale = [row["pk"] for row in found if int(row["version"]) < newest[row["item_id"]]]
        if stale:
            logger.debug("deleting %d superseded versions", len(stale))
            self.milvus.delete(self.names.items, ex.keys_in("pk", stale))

    def _count_writes(self, rows: int, *, indexed: bool, now: float) -> None:
        """This writer's counters (rows written, when it last wrote a vector), which `stats` and searches
        sum up over writers: Milvus keeps no "newest row" or change counter of its own."""
        if rows == 0:
            return
        if self._writes is None:
            state = self._get_meta(self._slot) or {}
            self._writes, self._newest = int(state.get("writes", 0)), state.get("newest")
        self._writes += rows
        if indexed:
            self._newest = max(now, self._newest or 0.0)
        self._put_meta(self._slot, {"writes": self._writes, "newest": self._newest, "host": socket.gethostname()})

    def _insert_letters(self, letters: Sequence[Failure], now: float) -> None:
        self.milvus.insert(
            self.names.dead_letters,
            [
                _letter_row(
                    letter_id,
                    f.source,
                    f.id,
                    f.payload,
                    f.reason,
                    tries=f.tries,
                    created_at=now,
                    retriable=f.retriable,
                    attempts=f.attempts,
                    retry_at=f.retry_at,
                )
                for letter_id, f in zip(_letter_ids(len(letters), now), letters, strict=True)
            ],
        )

    # -- what the resolver asks --------------------------------------------------------------------------

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        return {
            item_id: StoredState(row["sha256"] or None, _version(row), row["status"], row["status"] == "indexed")
            for item_id, row in self._current(ids, vectors=False).items()
        }

    def product_images(self, products: Sequence[str]) -> dict[str, StoredState]:
        """The rows tagged with each product (`expr.row_tags`), a few products to a query."""
        rows: list[dict[str, Any]] = []
        wanted = sorted(set(products))
        for start in range(0, len(wanted), 64):
            chunk = wanted[start : start + 64]
            rows += self.milvus.rows(self.names.items, ex.any_tag(ex.product_tag(p) for p in chunk), _STATE_FIELDS)
        mine = set(wanted)
        return {
            item_id: StoredState(row["sha256"] or None, _version(row), row["status"], row["status"] == "indexed")
            for item_id, row in newest_rows(rows).items()
            if parent_of(item_id) in mine
        }

    def embeddings_by_sha(self, hashes: Sequence[str]) -> dict[str, Embedding]:
        """Stored vectors of these contents, under any id (a renamed or copied image needs no model call)."""
        wanted = set(hashes)
        keys = sorted({ex.content_key(h) for h in wanted})
        out: dict[str, Embedding] = {}
        for row in self.milvus.query_many(self.names.items, "content", keys, ["sha256", "status", "vector"]):
            if row["status"] == "indexed" and row["sha256"] in wanted and row["sha256"] not in out:
                out[row["sha256"]] = np.asarray(row["vector"], dtype=np.float32)
        return out

    def _current(
        self, ids: Iterable[str], *, vectors: bool, fields: list[str] = _STATE_FIELDS
    ) -> dict[str, dict[str, Any]]:
        """The newest row of each of these items (Strong: what every writer wrote up to now)."""
        wanted = set(ids)
        if not wanted:
            return {}
        fields = [*_ITEM_FIELDS, "tags", "content", "vector"] if vectors else fields
        found = self.milvus.query_many(self.names.items, "key", sorted({ex.item_key(i) for i in wanted}), fields)
        return newest_rows(row for row in found if row["item_id"] in wanted)

    # -- items -------------------------------------------------------------------------------------------

    def get_item(self, item_id: str) -> Item | None:
        row = self._current([item_id], vectors=False, fields=_ITEM_FIELDS).get(item_id)
        return None if row is None else _item(row)

    def items(self, source: str | None = None, prefix: str = "") -> list[Item]:
        rows = self._scan(source, _ITEM_FIELDS)
        return sorted((_item(r) for r in rows.values() if r["item_id"].startswith(prefix)), key=lambda i: i.id)

    def item_ids(self, source: str | None = None, prefix: str = "") -> dict[str, str | None]:
        rows = self._scan(source, ["item_id", "version", "sha256"])
        return {i: (r["sha256"] or None) for i, r in rows.items() if i.startswith(prefix)}

    def _scan(self, source: str | None, fields: list[str]) -> dict[str, dict[str, Any]]:
        expr = f"array_contains(tags, {ex.source_tag(source)})" if source is not None else ""
        need = sorted({*fields, "item_id", "version", "source"})
        rows = self.milvus.rows(self.names.items, expr, need)
        return newest_rows(r for r in rows if source is None or r["source"] == source)

    # -- dead letters and stats -------------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest first. Milvus cannot sort: the ids and times of all letters are read, then the newest
        `limit` letters whole (fine for thousands of letters; purge them when they are understood)."""
        rows = self.milvus.rows(self.names.dead_letters, "", ["id", "created_at"])
        stamps = [(float(r["created_at"]), int(r["id"])) for r in rows]
        newest = [i for _, i in sorted(stamps, reverse=True)[:limit]]
        if not newest:
            return []
        letters = self.milvus.query(self.names.dead_letters, ex.ints_in("id", newest), _LETTER_FIELDS)
        found = {int(r["id"]): r for r in letters}
        return [_letter(found[i]) for i in newest if i in found]

    def delete_dead_letters(self, ids: Sequence[int]) -> int:
        total = 0
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            present = self.milvus.query(self.names.dead_letters, ex.ints_in("id", chunk), ["id"])
            if present:
                self.milvus.delete(self.names.dead_letters, ex.ints_in("id", [int(r["id"]) for r in present]))
            total += len(present)
        return total

    def due_dead_letters(self, prefix: str, now: datetime, limit: int = 100) -> list[DeadLetter]:
        """Letters due for a retry whose item ids start with `prefix`, the longest waiting first (the prefix
        is checked here: expressions hold no strings)."""
        due = f"retry_at >= 0 and retry_at <= {_ms(now)}"
        rows = [r for r in self.milvus.rows(self.names.dead_letters, due, _LETTER_FIELDS) if r["item_id"]]
        mine = sorted((r for r in rows if r["item_id"].startswith(prefix)), key=lambda r: (r["retry_at"], r["id"]))
        return [_letter(r) for r in mine[:limit]]

    def schedule_dead_letters(self, ids: Sequence[int], at: datetime) -> int:
        total = 0
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            found = self.milvus.query(self.names.dead_letters, ex.ints_in("id", chunk), _ALL_LETTER_FIELDS)
            self.milvus.upsert(self.names.dead_letters, [{**r, "retry_at": _ms(at)} for r in found])
            total += len(found)
        return total

    def stats(self) -> StoreStats:
        items = self.milvus.count(self.names.items, 'status == "indexed"')
        failed = self.milvus.count(self.names.items, 'status == "failed"')
        dead = self.milvus.count(self.names.dead_letters)
        retrying = self.milvus.count(self.names.dead_letters, "retry_at >= 0")
        writes, newest = self.writer_counters()
        return StoreStats(
            items=items,
            failed=failed,
            vectors=items,
            dead_letters=dead,
            tombstones=0,
            newest_indexed_at=None if newest is None else _dt(newest),
            last_compaction_at=None,
            generation=0,
            delta_size=0,
            delta_age_s=None,
            changes=writes,
            retrying=retrying,
        )

    def writer_counters(self, consistency: str = STRONG) -> tuple[int, float | None]:
        """(rows written by every writer so far, when the newest vector was written)."""
        rows = self.milvus.query(self.names.meta, "", ["value"], consistency=consistency, limit=_META_ROWS)
        meta = [json.loads(r["value"]) for r in rows]
        writers = [m["value"] for m in meta if str(m.get("meta", "")).startswith("writer:")]
        newest = [float(w["newest"]) for w in writers if w.get("newest") is not None]
        return sum(int(w.get("writes", 0)) for w in writers), (max(newest) if newest else None)

    # -- migration ----------------------------------------------------------------------------------------

    def export_items(self, chunk: int = 1000) -> Iterator[list[StoredItem]]:
        rows = newest_rows(self.milvus.rows(self.names.items, "", [*_ITEM_FIELDS, "vector"]))
        batch: list[StoredItem] = []
        for item_id in sorted(rows):
            row = rows[item_id]
            vector = np.asarray(row["vector"], dtype=np.float32) if row["status"] == "indexed" else None
            batch.append(StoredItem(_item(row), vector))
            if len(batch) == chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    def import_items(self, items: Sequence[StoredItem]) -> None:
        rows = []
        for stored in items:
            it = stored.item
            version = it.version if it.version is not None else NO_VERSION
            up = Upsert(it.id, it.source, it.uri, it.sha256 or "", it.metadata, stored.embedding, it.version)
            if stored.embedding is None:
                failure = Failure(it.source, it.uri, it.reason or "", id=it.id, uri=it.uri)
                row = {**_failed_row(failure, 0.0, self.dim), "version": version}
            else:
                row = _row(up, version, np.asarray(stored.embedding, np.float32).tolist(), created_at=0.0, now=0.0)
            rows.append(row)
            row.update(
                status=it.status,
                reason=_text(it.reason or ""),
                retriable=it.retriable,
                created_at=it.created_at.timestamp(),
                updated_at=it.updated_at.timestamp(),
                pk=ex.row_pk(ex.item_key(it.id), version),
            )
        self.milvus.upsert(self.names.items, rows)
        self._drop_superseded([ex.item_key(s.item.id) for s in items])
        newest = max((s.item.updated_at.timestamp() for s in items if s.embedding is not None), default=None)
        if newest is not None:
            self._count_writes(len(rows), indexed=True, now=newest)

    def export_dead_letters(self) -> list[DeadLetter]:
        return [_letter(r) for r in self.milvus.rows(self.names.dead_letters, "", _LETTER_FIELDS)]

    def import_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        have = {_letter_identity(d) for d in self.export_dead_letters()}
        new = [d for d in letters if _letter_identity(d) not in have]
        ids = _letter_ids(len(new), time.time())
        self.milvus.insert(
            self.names.dead_letters,
            [
                _letter_row(
                    letter_id,
                    d.source,
                    d.item_id,
                    d.payload,
                    d.reason,
                    tries=d.tries,
                    created_at=d.created_at.timestamp(),
                    retriable=d.retriable,
                    attempts=d.attempts,
                    retry_at=d.retry_at,
                )
                for letter_id, d in zip(ids, new, strict=True)
            ],
        )
        return len(new)

    # -- folders ------------------------------------------------------------------------------------------

    def register_folder(self, path: str) -> str:
        """The short name of the folder at `path` (absolute), registered on first use (see the module's
        docstring for two processes registering at once)."""
        have = self._get_meta(f"folder:{path}")
        if have is not None:
            return str(have["name"])
        base = folder_name(path)
        taken = set(self.folders())
        for n in itertools.count(1):
            name = base if n == 1 else f"{base}-{n}"
            if name in taken:
                continue
            self._put_meta(f"folder-name:{name}", {"path": path, "created_at": time.time()})
            owner = self._get_meta(f"folder-name:{name}")
            if owner is None or owner["path"] != path:
                taken.add(name)  # another process took this name the moment before
                continue
            self._put_meta(f"folder:{path}", {"name": name})
            logger.info("folder %s is %r in this store (its item ids are folder:%s/...)", path, name, name)
            return name
        raise AssertionError("unreachable")

    def folders(self) -> dict[str, str]:
        rows = self.milvus.query(self.names.meta, "", ["value"], limit=_META_ROWS)
        out: dict[str, str] = {}
        for row in rows:
            meta = json.loads(row["value"])
            name = str(meta.get("meta", ""))
            if name.startswith("folder-name:"):
                out[name.removeprefix("folder-name:")] = str(meta["value"]["path"])
        return dict(sorted(out.items()))

    def rename_items(self, renames: Mapping[str, str]) -> int:
        """Copy each item's newest row under its new id, then delete the old rows; its dead letters follow.
        A replay after a crash finds the copy and finishes the deletes."""
        renamed = 0
        pairs = [(old, new) for old, new in renames.items() if old != new]
        for start in range(0, len(pairs), 500):
            chunk = dict(pairs[start : start + 500])
            current = self._current(chunk, vectors=True)
            taken = self._current([chunk[old] for old in current], vectors=False)
            rows = []
            for old, row in current.items():
                new = chunk[old]
                if new in taken:
                    continue  # the new id is already stored: the old one goes
                key = ex.item_key(new)
                rows.append({**row, "pk": ex.row_pk(key, int(row["version"])), "key": key, "item_id": new})
                renamed += 1
            self.milvus.upsert(self.names.items, rows)
            if current:
                self.milvus.delete(self.names.items, ex.keys_in("key", sorted(ex.item_key(o) for o in current)))
            keys = sorted({ex.item_key(o) for o in chunk})
            by_key = {ex.item_key(o): n for o, n in chunk.items()}
            letters = self.milvus.query_many(self.names.dead_letters, "key", keys, _ALL_LETTER_FIELDS)
            moved = [
                {**r, "item_id": _text(by_key[r["key"]]), "key": ex.item_key(by_key[r["key"]])}
                for r in letters
                if r["key"] in by_key
            ]
            self.milvus.upsert(self.names.dead_letters, moved)
        return renamed

    # -- meta ---------------------------------------------------------------------------------------------

    def _get_meta(self, name: str) -> dict[str, Any] | None:
        found = self.milvus.query(self.names.meta, ex.keys_in("name", [ex.item_key(name)]), ["value"])
        value = json.loads(found[0]["value"])["value"] if found else None
        return value if isinstance(value, dict) else None

    def _put_meta(self, name: str, value: dict[str, Any]) -> None:
        """Meta rows are keyed by their name's hash (expressions hold hashes only); the name is kept inside."""
        row = {"name": ex.item_key(name), "value": json.dumps({"meta": name, "value": value}), "vector": _PLACEHOLDER}
        self.milvus.upsert(self.names.meta, [row])


# -- rows ----------------------------------------------------------------------------------------------------


def newest_rows(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The row of the highest version of each item id: what the item is."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        have = out.get(row["item_id"])
        if have is None or int(row["version"]) > int(have["version"]):
            out[row["item_id"]] = row
    return out


def _row(up: Upsert, version: int, vector: list[float], *, created_at: float, now: float) -> dict[str, Any]:
    key = ex.item_key(up.id)
    return {
        "pk": ex.row_pk(key, version),
        "key": key,
        "item_id": up.id,
        "source": up.source,
        "uri": up.uri,
        "sha256": up.sha256,
        "content": ex.content_key(up.sha256),
        "metadata": up.metadata,
        "tags": ex.row_tags(up.id, up.source, up.metadata),
        "status": "indexed",
        "reason": "",
        "version": version,
        "retriable": False,
        "created_at": created_at,
        "updated_at": now,
        "vector": vector,
    }


def _failed_row(fail: Failure, now: float, dim: int) -> dict[str, Any]:
    """A failed item without a good vector: kept for status and lookups, never searched (`status`); Milvus
    wants a vector in every row, so it holds a unit placeholder."""
    assert fail.id is not None
    key = ex.item_key(fail.id)
    return {
        "pk": ex.row_pk(key, NO_VERSION),
        "key": key,
        "item_id": fail.id,
        "source": fail.source,
        "uri": _text(fail.uri or fail.payload),
        "sha256": "",
        "content": "",
        "metadata": {},
        "tags": ex.row_tags(fail.id, fail.source, {}),
        "status": "failed",
        "reason": _text(fail.reason),
        "version": NO_VERSION,
        "retriable": fail.retriable,
        "created_at": now,
        "updated_at": now,
        "vector": [1.0] + [0.0] * (dim - 1),
    }


def _too_big(up: Upsert) -> str | None:
    """Why Milvus would refuse this row (the whole batch with it), or None."""
    size = len(json.dumps(up.metadata, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        return f"metadata of {size:,} bytes: the Milvus store keeps at most {MAX_METADATA_BYTES:,}"
    if len(ex.row_tags(up.id, up.source, up.metadata)) > MAX_TAGS:
        return f"{len(up.metadata):,} metadata keys: the Milvus store filters on at most {(MAX_TAGS - 1) // 2:,}"
    for name, value in (("id", up.id), ("uri", up.uri)):
        if len(value.encode("utf-8", "surrogatepass")) > MAX_TEXT:
            return f"an {name} of more than {MAX_TEXT:,} bytes: the Milvus store keeps at most that"
    return None


def _item(row: dict[str, Any]) -> Item:
    indexed = row["status"] == "indexed"
    return Item(
        id=row["item_id"],
        source=row["source"],
        uri=row["uri"],
        sha256=row["sha256"] or None,
        metadata=dict(row.get("metadata") or {}),
        status="indexed" if indexed else "failed",
        reason=row["reason"] or None,
        version=_version(row),
        vector_id=int(row["key"][:15], 16) if indexed else None,  # no vector ids in Milvus: a stable stand-in
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        retriable=bool(row.get("retriable")),
    )


def _letter(row: dict[str, Any]) -> DeadLetter:
    return DeadLetter(
        id=int(row["id"]),
        source=row["source"],
        item_id=row["item_id"] or None,
        payload=row["payload"],
        reason=row["reason"],
        tries=int(row["tries"]),
        created_at=_dt(row["created_at"]),
        retriable=bool(row["retriable"]),
        attempts=int(row["attempts"]),
        retry_at=None if int(row["retry_at"]) == NEVER else datetime.fromtimestamp(int(row["retry_at"]) / 1000, UTC),
    )


def _letter_row(
    letter_id: int,
    source: str,
    item_id: str | None,
    payload: str,
    reason: str,
    *,
    tries: int,
    created_at: float,
    retriable: bool,
    attempts: int,
    retry_at: datetime | None,
) -> dict[str, Any]:
    return {
        "id": letter_id,
        "source": source[:64],
        "item_id": _text(item_id or ""),
        "key": ex.item_key(item_id) if item_id else "",
        "payload": _text(payload),
        "reason": _text(reason),
        "tries": int(tries),
        "retriable": bool(retriable),
        "attempts": int(attempts),
        "retry_at": NEVER if retry_at is None else _ms(retry_at),
        "created_at": created_at,
        "vector": _PLACEHOLDER,
    }


_LETTER_COUNTER = itertools.count()


def _letter_ids(n: int, now: float) -> list[int]:
    """Ids for new dead letters, growing with time (newest last, as SQLite's): milliseconds times 1,024 plus
    a counter that starts at a random place per process, so two writers in one millisecond rarely meet.
    Below 2**53 (until the year 2248): exact in JavaScript too (the web UI)."""
    base = int(now * 1000) * 1024
    return [base + (_LETTER_OFFSET + next(_LETTER_COUNTER)) % 1024 for _ in range(n)]


_LETTER_OFFSET = int.from_bytes(os.urandom(2), "big") % 1024


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _letter_identity(d: DeadLetter) -> tuple[str, str | None, str, str, float]:
    return (d.source, d.item_id, d.payload, d.reason, round(d.created_at.timestamp(), 3))


def _version(row: dict[str, Any]) -> int | None:
    version = int(row["version"])
    return None if version == NO_VERSION else version


def _older(version: int | None, stored: int | None) -> bool:
    return version is not None and stored is not None and version < stored


def _text(value: str) -> str:
    """What a VARCHAR can hold: valid UTF-8 (surrogates escaped), at most MAX_TEXT bytes."""
    data = value.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_TEXT:
        return data.decode("utf-8")
    marker = " …(cut)"
    return data[: MAX_TEXT - len(marker.encode())].decode("utf-8", "ignore") + marker


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(float(ts), tz=UTC)
