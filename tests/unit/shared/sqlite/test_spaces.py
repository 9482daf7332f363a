"""Embedding spaces in the SQLite store: a shadow space filled beside the active one, writers keeping both
right, the switch in one transaction, abort and drop, and the migration of a store of schema 1, 2 or 3."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ModelMismatchError, ModelSwitched, SpaceGone, StoreError
from shared.roles import Delete, Failure, Pending, SpaceFailure, SpaceVector, Upsert
from shared.sqlite import tags
from shared.sqlite.spaces import SqliteSpaces
from shared.sqlite.store import SqliteStore
from shared.types import Filters, ModelIdentity
from tests.unit.shared.sqlite import old_schemas

OLD = ModelIdentity("old-model", "none", 8, "0123456789abcdef")
NEW = ModelIdentity("new-model", "none", 4, "fedcba9876543210")  # another dimension
OTHER = ModelIdentity("other-model", "none", 16, "aaaaaaaaaaaaaaaa")


def vec(seed: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return x / np.linalg.norm(x)


def up(item_id: str, sha: str, dim: int | None = 8, seed: int = 0) -> Upsert:
    embedding = None if dim is None else vec(seed, dim)
    return Upsert(item_id, "kafka", f"https://img.example/{item_id}.jpg", sha, {"n": seed}, embedding, version=seed)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "db.sqlite3") as s:
        s.bind_model(OLD)
        s.apply([up(f"kafka:{i}", f"sha-{i}", seed=i) for i in range(5)])
        yield s


def fill(spaces: SqliteSpaces, space: int, items: list[Pending], seed: int = 100) -> int:
    return spaces.add_vectors(space, [SpaceVector(p, p.sha256 or "", vec(seed + i, 4)) for i, p in enumerate(items)])


def test_a_shadow_space_fills_item_by_item_and_counts_its_coverage(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, "/configs")
    assert (shadow.state, shadow.model, shadow.model_configs) == ("shadow", NEW, "/configs")
    pending = spaces.pending(shadow.id, limit=3)
    assert [p.id for p in pending] == ["kafka:0", "kafka:1", "kafka:2"]
    assert pending[0].uri == "https://img.example/kafka:0.jpg" and pending[0].metadata == {"n": 0}
    assert fill(spaces, shadow.id, pending) == 3
    assert [p.id for p in spaces.pending(shadow.id)] == ["kafka:3", "kafka:4"]
    assert [p.id for p in spaces.pending(shadow.id, after="kafka:3")] == ["kafka:4"]
    cov = store.coverage(shadow.id)
    assert (cov.total, cov.done, cov.failed, cov.remaining) == (5, 3, 0, 2)
    # the shadow space's vectors, of its own dimension, are invisible to the active space's readers
    assert store.item_vector("kafka:0")[1].shape == (8,)  # type: ignore[index]
    assert store.feed(shadow.id).item_vector("kafka:0")[1].shape == (4,)  # type: ignore[index]
    assert store.stats().vectors == 5 and store.changes_since(0).added.shape == (5, 8)


def test_a_second_run_resumes_the_same_shadow_space_and_another_model_is_refused(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    first = spaces.create_shadow(NEW, None)
    fill(spaces, first.id, spaces.pending(first.id, limit=2))
    again = spaces.create_shadow(NEW, None)
    assert again.id == first.id and len(spaces.pending(again.id)) == 3
    with pytest.raises(StoreError, match=r"re-embed with new-model / none is in progress.*--abort"):
        spaces.create_shadow(OTHER, None)
    with pytest.raises(StoreError, match="already answers with old-model"):
        spaces.create_shadow(OLD, None)


def test_nothing_to_re_embed_without_a_model(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite3") as s, pytest.raises(StoreError, match="nothing to re-embed"):
        SqliteSpaces(s).create_shadow(NEW, None)


def test_an_item_replaced_after_it_was_read_is_not_written_and_is_pending_again(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    pending = spaces.pending(shadow.id, limit=2)
    store.apply([up("kafka:0", "sha-0-new", seed=50)])  # new content while the re-embed embeds the old
    assert fill(spaces, shadow.id, pending) == 1
    again = spaces.pending(shadow.id)
    assert [p.id for p in again][:1] == ["kafka:0"] and again[0].sha256 == "sha-0-new"


def test_new_content_and_deletes_reach_every_space_and_metadata_updates_keep_vectors(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    fill(spaces, shadow.id, spaces.pending(shadow.id))
    shadow_feed = store.feed(shadow.id)
    store.apply([up("kafka:1", "sha-1", dim=None, seed=9)])  # metadata only: both vectors stay
    store.apply([up("kafka:2", "sha-2-new", seed=2)], deletes=[Delete("kafka:3")])
    assert shadow_feed.item_vector("kafka:1") is not None
    assert shadow_feed.item_vector("kafka:2") is None  # its new content waits for the re-embed
    assert shadow_feed.item_vector("kafka:3") is None and store.item_vector("kafka:3") is None
    assert [p.id for p in spaces.pending(shadow.id)] == ["kafka:2"]
    store.apply([up("kafka:9", "sha-9", seed=9)])  # a new item: queued for the shadow space
    assert [p.id for p in spaces.pending(shadow.id)] == ["kafka:2", "kafka:9"]
    assert store.coverage(shadow.id).total == 5  # 0, 1, 2, 4, 9
    changes = shadow_feed.changes_since(0)
    assert len(changes.tombstoned_ids) == 2 and len(changes.added_ids) == 3  # a reader of it sees them go


def test_a_failure_is_a_dead_letter_that_counts_as_covered_until_the_source_speaks_again(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    gone = spaces.pending(shadow.id)[0]
    spaces.add_vectors(shadow.id, [], [SpaceFailure(gone, "SourceNotFound: no such file", tries=2)])
    [letter] = store.dead_letters()
    assert (letter.item_id, letter.source, letter.tries) == ("kafka:0", "kafka", 2)
    assert "re-embedding with new-model: SourceNotFound" in letter.reason
    event = json.loads(letter.payload)  # what `clipdex dlq retry` sends through the pipeline again
    assert event == {"op": "upsert", "id": "0", "uri": gone.uri, "metadata": {"n": 0}, "version": 0}
    assert store.coverage(shadow.id).failed == 1 and spaces.pending(shadow.id)[0].id == "kafka:1"
    store.apply([up("kafka:0", "sha-0", dim=None)])  # the source sends it again: it is tried again
    assert store.coverage(shadow.id).failed == 0 and spaces.pending(shadow.id)[0].id == "kafka:0"


def test_the_switch_waits_for_every_item_then_flips_both_spaces_in_one_transaction(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, "/configs")
    *good, gone = spaces.pending(shadow.id)
    fill(spaces, shadow.id, good[:-1])
    assert spaces.switch(shadow.id) is False  # kafka:3 and kafka:4 are pending
    fill(spaces, shadow.id, good[-1:])
    spaces.add_vectors(shadow.id, [], [SpaceFailure(gone, "SourceNotFound: gone")])
    assert spaces.switch(shadow.id) is True
    states = {s.id: s.state for s in store.spaces()}
    assert states == {1: "retired", shadow.id: "active"}
    assert store.model_identity() == NEW
    with SqliteStore(store.path) as unbound:  # reads the active space
        failed = unbound.get_item("kafka:4")
        assert failed is not None and failed.status == "failed" and failed.vector_id is None
        assert failed.reason is not None and "SourceNotFound: gone" in failed.reason
        assert unbound.stats().items == 4
    assert store.get_item("kafka:0").vector_id == 1  # type: ignore[union-attr]  # bound: its own space
    # the old model's writer is told; nothing of its batch is written
    with pytest.raises(ModelSwitched, match="switched to model new-model") as err:
        store.apply([up("kafka:7", "sha-7")])
    assert err.value.space == shadow.id and store.get_item("kafka:7") is None
    # a fresh writer of the new model writes the new space; the old model is refused
    with SqliteStore(store.path) as writer:
        writer.bind_model(NEW)
        writer.apply([Upsert("kafka:7", "kafka", "u", "sha-7", {}, vec(7, 4))])
        assert writer.stats().items == 5 and writer.item_vector("kafka:7")[1].shape == (4,)  # type: ignore[index]
        with pytest.raises(ModelMismatchError, match="built with model new-model"):
            writer.bind_model(OLD)
    with pytest.raises(SpaceGone):
        spaces.switch(shadow.id)


def test_the_shadow_model_is_refused_to_writers_and_readers_until_the_switch(store: SqliteStore) -> None:
    SqliteSpaces(store).create_shadow(NEW, None)
    with SqliteStore(store.path) as other, pytest.raises(ModelMismatchError, match="being re-embedded"):
        other.bind_model(NEW)


def test_abort_drops_the_shadow_space_and_stops_its_writer(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    pending = spaces.pending(shadow.id)
    fill(spaces, shadow.id, pending[:2])
    store.space_dir(shadow.id).mkdir(parents=True)
    (store.space_dir(shadow.id) / "main-1.faiss").write_bytes(b"x")
    aborted = spaces.abort()
    assert aborted is not None and aborted.id == shadow.id
    with pytest.raises(SpaceGone):
        fill(spaces, shadow.id, pending[2:])
    assert spaces.drop_spaces(grace_s=3600) == [shadow.id]
    assert [s.id for s in store.spaces()] == [1] and not store.space_dir(shadow.id).exists()
    assert store.feed(shadow.id).delta_size(0) == 0 and spaces.abort() is None


def test_a_retired_space_is_kept_for_its_grace_period_then_dropped(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    fill(spaces, shadow.id, spaces.pending(shadow.id))
    assert spaces.switch(shadow.id)
    assert spaces.drop_spaces(grace_s=3600) == []
    assert store.feed(1).item_vector("kafka:0") is not None  # servers still on the old model answer
    assert spaces.drop_spaces(grace_s=0) == [1]
    assert [s.state for s in store.spaces()] == ["active"]
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM vectors WHERE space = 1").fetchone()[0] == 0
    db.close()


def test_a_dead_letter_of_a_failed_item_keeps_its_vector_in_the_bound_space(store: SqliteStore) -> None:
    SqliteSpaces(store).create_shadow(NEW, None)
    store.apply(failures=[Failure("kafka", "{}", "FetchFailed: timeout", id="kafka:0")])
    item = store.get_item("kafka:0")
    assert item is not None and item.status == "indexed" and item.vector_id is not None


def test_each_space_records_the_checksum_of_its_own_main_file(store: SqliteStore) -> None:
    shadow = SqliteSpaces(store).create_shadow(NEW, None)
    store.feed(shadow.id).record_generation(1, 0, 0, "flat", "cd" * 32)
    assert store.index_meta().checksum is None  # the active space's main: not written yet
    store.record_generation(2, 0, 0, "flat", "ab" * 32)
    assert (store.index_meta().checksum, store.feed(shadow.id).index_meta().checksum) == ("ab" * 32, "cd" * 32)
    assert store.index_dir != store.feed(shadow.id).index_dir


def test_retries_versions_and_conflicts_of_a_writer_keep_both_spaces_right(store: SqliteStore) -> None:
    """Issue 9's writes (retried dead letters, versions checked in the write, conflicts) with a shadow space."""
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    fill(spaces, shadow.id, spaces.pending(shadow.id))
    shadow_feed = store.feed(shadow.id)
    later = datetime.now(UTC) + timedelta(hours=1)
    store.apply(failures=[Failure("kafka", "{}", "FetchFailed: 503", id="kafka:0", retriable=True, retry_at=later)])
    [letter] = store.dead_letters()
    result = store.apply([up("kafka:0", "sha-0-new", seed=3)], retried=[letter.id])  # the retry succeeds
    assert result.indexed == 1 and store.dead_letters() == []
    assert shadow_feed.item_vector("kafka:0") is None  # new content: pending for the shadow space again
    assert [p.id for p in spaces.pending(shadow.id)] == ["kafka:0"]
    older = store.apply([up("kafka:1", "sha-1-old", seed=0)], deletes=[Delete("kafka:2", version=1)])
    assert older.skipped == 2  # versions 1 and 2 are stored: neither space loses its vector
    assert shadow_feed.item_vector("kafka:1") is not None and shadow_feed.item_vector("kafka:2") is not None
    changed = store.apply([up("kafka:3", "sha-3-other", dim=None, seed=3)])  # metadata-only of other content
    assert changed.conflicts == ["kafka:3"] and shadow_feed.item_vector("kafka:3") is not None


def test_a_re_embed_dead_letter_says_transient_or_permanent_and_is_never_retried_by_itself(
    store: SqliteStore,
) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    slow, gone, *_ = spaces.pending(shadow.id)
    spaces.add_vectors(
        shadow.id,
        [],
        [SpaceFailure(slow, "FetchFailed: HTTP 503", tries=3, retriable=True), SpaceFailure(gone, "SourceNotFound")],
    )
    letters = {d.item_id: d for d in store.dead_letters()}
    assert (letters["kafka:0"].retriable, letters["kafka:0"].attempts, letters["kafka:0"].retry_at) == (True, 1, None)
    assert (letters["kafka:1"].retriable, letters["kafka:1"].retry_at) == (False, None)
    assert store.due_dead_letters("kafka:", datetime.now(UTC) + timedelta(days=365)) == []
    fill(spaces, shadow.id, spaces.pending(shadow.id))
    assert spaces.switch(shadow.id)
    failed = store.get_item("kafka:0")  # failed in the new space: a folder's next start tries it again
    assert failed is not None and failed.status == "failed" and failed.retriable
    assert not store.get_item("kafka:1").retriable  # type: ignore[union-attr]


def test_renamed_items_keep_their_vectors_and_tags_in_every_space(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    *done, gone = spaces.pending(shadow.id)
    fill(spaces, shadow.id, done)
    spaces.add_vectors(shadow.id, [], [SpaceFailure(gone, "SourceNotFound")])
    active = store.view_space()
    before = {s: store.feed(s).item_vector("kafka:0") for s in (active, shadow.id)}
    seq = store.index_meta().seq
    assert store.rename_items({"kafka:0": "kafka:r/0", "kafka:4": "kafka:r/4", "kafka:1": "kafka:2"}) == 2
    for space, (vector_id, _) in before.items():  # type: ignore[misc]
        assert store.feed(space).item_vector("kafka:r/0")[0] == vector_id  # type: ignore[index]
        assert tagged(store, space, n=0) == {"kafka:r/0"}
    assert store.changes_since(seq).added_ids.size == 0  # nothing for a search index to load
    assert store.coverage(shadow.id).failed == 1 and spaces.pending(shadow.id) == []  # its failure followed
    assert [d.item_id for d in store.dead_letters()] == ["kafka:r/4"]
    assert store.get_item("kafka:1") is None  # its new id was taken: it goes, from both spaces
    assert tagged(store, active, n=1) == tagged(store, shadow.id, n=1) == set()


def tagged(store: SqliteStore, space: int, **wanted: object) -> set[str]:
    """The items whose vector in `space` the filter tags list for `wanted`."""
    vids = store.matching_vectors(Filters(dict(wanted)), 100, space)
    assert vids is not None
    return {item.id for item in store.items_for_vectors([int(v) for v in vids]).values()}


def test_filter_tags_are_per_space_follow_every_write_and_go_with_a_dropped_space(store: SqliteStore) -> None:
    spaces = SqliteSpaces(store)
    shadow = spaces.create_shadow(NEW, None)
    active = store.view_space()
    pending = spaces.pending(shadow.id, limit=2)  # kafka:0 and kafka:1, read with {"n": 0} and {"n": 1}
    store.apply([up("kafka:1", "sha-1", dim=None, seed=7)])  # metadata only, after `pending` read it
    fill(spaces, shadow.id, pending)
    assert tagged(store, shadow.id, n=0) == {"kafka:0"}  # the shadow's own vectors, not the active ones
    assert tagged(store, shadow.id, n=7) == {"kafka:1"} and tagged(store, shadow.id, n=1) == set()
    assert tagged(store, active, n=7) == {"kafka:1"} and tagged(store, active, n=2) == {"kafka:2"}
    assert tagged(store, shadow.id, n=2) == set()  # not re-embedded yet
    store.apply([up("kafka:0", "sha-0", dim=None, seed=5)])  # metadata only: both spaces' vectors
    assert tagged(store, shadow.id, n=5) == tagged(store, active, n=5) == {"kafka:0"}
    store.apply([up("kafka:0", "sha-0-new", seed=6)])  # new content: the shadow's vector goes, untagged
    assert tagged(store, shadow.id, n=6) == set() and tagged(store, active, n=6) == {"kafka:0"}
    shadow_vectors = [int(v) for ids, _ in store.feed(shadow.id).live_vectors() for v in ids]
    assert shadow_vectors
    spaces.abort()
    spaces.drop_spaces(grace_s=0)
    with store.locked() as db:
        marks = ",".join("?" * len(shadow_vectors))
        assert db.execute(
            f"SELECT COUNT(*) FROM item_tags WHERE vector_id IN ({marks})", shadow_vectors
        ).fetchone() == (0,)
        live = db.execute("SELECT COUNT(*) FROM vectors WHERE tombstoned = 0").fetchone()[0]
        assert db.execute("SELECT COUNT(DISTINCT vector_id) FROM item_tags").fetchone()[0] == live == 5


# -- older schemas --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_store_migrates_step_by_step_to_one_active_space_with_its_filter_tags(
    tmp_path: Path, version: int
) -> None:
    """Version 1 (one model), 2 (+ the filter tags of issue 14), 3 (+ retried dead letters and folders of
    issue 9) → 4 (embedding spaces), in one transaction."""
    path = tmp_path / "clipdex.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(old_schemas.SCHEMA_1 if version == 1 else old_schemas.SCHEMA_2)
    meta = {"schema_version": str(version), "vector_dtype": "float32", "seq": "4", "generation": "3", "high_water": "2",
            "main_seq": "2", "main_kind": "flat", "model": json.dumps(OLD.__dict__)}  # fmt: skip
    db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    for vid, item in ((1, "kafka:a"), (2, "kafka:b"), (3, "kafka:orphan"), (4, "kafka:b")):
        db.execute(
            "INSERT INTO vectors(vector_id, item_id, sha256, embedding, tombstoned, seq, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 1.0)",
            (vid, item, f"sha-{vid}", vec(vid, 8).tobytes(), 1 if vid == 2 else 0, vid),
        )
    for item, vid, colour in (("kafka:a", 1, "red"), ("kafka:b", 4, "blue")):
        db.execute(
            "INSERT INTO items VALUES (?, 'kafka', 'u', ?, ?, 'indexed', NULL, NULL, ?, 1.0, 1.0)",
            (item, f"sha-{vid}", json.dumps({"colour": colour}), vid),
        )
        if version >= 2:  # what issue 14's store wrote: the tags of the items' vectors
            db.executemany(
                "INSERT INTO item_tags VALUES (?, ?)", [(t, vid) for t in tags.item_tags("kafka", {"colour": colour})]
            )
    if version >= 3:  # issue 9's: a transient failure retried later, a folder, the main file's checksum
        db.executescript(old_schemas.UPGRADE_3 + old_schemas.ROWS_3)
        db.execute(
            "INSERT INTO dead_letters(source, item_id, payload, reason, tries, created_at, retriable, attempts, "
            "retry_at) VALUES ('kafka', 'kafka:a', '{}', 'FetchFailed: HTTP 503', 3, 1.0, 1, 2, 5.0)"
        )
        db.execute("UPDATE items SET retriable = 1 WHERE id = 'kafka:a'")
    db.commit()
    db.close()
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "main-3.faiss").write_bytes(b"faiss")

    with SqliteStore(path) as store:
        [space] = store.spaces()
        assert (space.id, space.state, space.model) == (1, "active", OLD)
        meta_now = store.index_meta()
        assert (meta_now.generation, meta_now.high_water, meta_now.main_seq, meta_now.seq) == (3, 2, 2, 5)
        assert store.get_item("kafka:b").vector_id == 4  # type: ignore[union-attr]
        assert store.stats().items == 2  # the orphan vector 3 was tombstoned
        assert 3 in set(store.changes_since(4).tombstoned_ids.tolist())
        assert (tmp_path / "index" / "space-1" / "main-3.faiss").read_bytes() == b"faiss"
        assert store.matching_vectors(Filters({"colour": "red"}), 100).tolist() == [1]  # type: ignore[union-attr]
        assert store.matching_vectors(Filters({"colour": "blue"}), 100).tolist() == [4]  # type: ignore[union-attr]
        assert store.matching_vectors(Filters({"colour": "green"}), 100).tolist() == []  # type: ignore[union-attr]
        assert meta_now.checksum == (old_schemas.MAIN_SHA256 if version == 3 else None)  # the space's now
        if version == 3:
            assert store.folders() == {"r": "/r"}
            [letter] = store.dead_letters()
            assert (letter.item_id, letter.retriable, letter.attempts) == ("kafka:a", True, 2)
            assert letter.retry_at is not None and letter.retry_at.timestamp() == 5.0
            assert store.get_item("kafka:a").retriable  # type: ignore[union-attr]
        with store.locked() as conn:
            assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "4"
            assert conn.execute("SELECT 1 FROM meta WHERE key = 'main_sha256'").fetchone() is None
        store.bind_model(OLD)
        store.apply([Upsert("kafka:c", "kafka", "u", "sha-c", {}, vec(9, 8))])
    with SqliteStore(path) as reopened:  # opening again changes nothing
        assert reopened.stats().items == 3 and [s.id for s in reopened.spaces()] == [1]
