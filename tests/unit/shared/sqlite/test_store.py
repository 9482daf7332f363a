"""The SQLite store: one transaction per batch, idempotent updates, tombstones, dead letters, model binding."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ModelMismatchError, StoreError
from shared.roles import Delete, Failure, Upsert
from shared.sqlite.store import SqliteStore
from shared.types import ModelIdentity

DIM = 8


def vec(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return x / np.linalg.norm(x)


def up(item_id: str, sha: str, embedding: np.ndarray | None, **metadata: object) -> Upsert:
    return Upsert(item_id, "kafka", f"https://img.example/{item_id}.jpg", sha, dict(metadata), embedding)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "db.sqlite3") as s:
        yield s


def counts(store: SqliteStore) -> tuple[int, int, int, int]:
    """(items, live vectors, tombstones, dead letters), read with a second connection."""
    db = sqlite3.connect(store.path)
    try:
        items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        live, dead = db.execute(
            "SELECT COALESCE(SUM(1 - tombstoned), 0), COALESCE(SUM(tombstoned), 0) FROM vectors"
        ).fetchone()
        letters = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    finally:
        db.close()
    return int(items), int(live), int(dead), int(letters)


# -- one transaction per batch ---------------------------------------------------------------------------


def test_a_batch_that_fails_midway_leaves_nothing_behind(store: SqliteStore) -> None:
    store.apply(upserts=[up("a", "sha-a", vec(1))])
    before = (counts(store), store.index_meta())
    with pytest.raises(StoreError, match="metadata-only update of 'nope'"):
        store.apply(
            upserts=[up("b", "sha-b", vec(2)), up("a", "sha-a2", vec(3)), up("nope", "sha-x", None)],
            deletes=[Delete("a")],
            failures=[Failure("kafka", '{"id": "c"}', "bad event", id="c")],
        )
    assert (counts(store), store.index_meta()) == before
    assert store.get_item("b") is None
    assert store.item_vector("a") is not None and store.get_item("a").sha256 == "sha-a"  # type: ignore[union-attr]


def test_a_crash_inside_the_transaction_rolls_everything_back(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(store, "_record_failure", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        store.apply(upserts=[up("a", "sha-a", vec(1))], failures=[Failure("kafka", "raw", "why", id="z")])
    assert counts(store) == (0, 0, 0, 0)
    assert store.index_meta().seq == 0
    monkeypatch.undo()
    store.apply(upserts=[up("a", "sha-a", vec(1))])  # the store is still usable
    assert counts(store) == (1, 1, 0, 0)


def test_a_committed_batch_is_visible_to_another_connection(store: SqliteStore, tmp_path: Path) -> None:
    store.apply(upserts=[up("a", "sha-a", vec(1)), up("b", "sha-b", vec(2))])
    with SqliteStore(tmp_path / "db.sqlite3") as other:
        assert sorted(other.item_ids()) == ["a", "b"]
        np.testing.assert_allclose(other.item_vector("a")[1], vec(1))  # type: ignore[index]


# -- updates, replacements, deletes ---------------------------------------------------------------------------


def test_same_id_and_hash_is_a_metadata_only_update_without_a_new_vector(store: SqliteStore) -> None:
    first = store.apply(upserts=[up("a", "sha-a", vec(1), colour="red")])
    seq = store.index_meta().seq
    result = store.apply(upserts=[up("a", "sha-a", None, colour="blue")])
    assert (result.indexed, result.updated, result.vector_ids) == (0, 1, [])
    item = store.get_item("a")
    assert item is not None and item.metadata == {"colour": "blue"} and item.vector_id == first.vector_ids[0]
    assert counts(store) == (1, 1, 0, 0)
    assert store.index_meta().seq == seq  # nothing for readers to pick up
    assert store.changes_since(seq).added_ids.size == 0


def test_a_metadata_only_update_of_changed_content_is_refused(store: SqliteStore) -> None:
    store.apply(upserts=[up("a", "sha-a", vec(1))])
    with pytest.raises(StoreError, match="no vector for that hash"):
        store.apply(upserts=[up("a", "sha-other", None)])


def test_a_replacement_tombstones_the_old_vector(store: SqliteStore) -> None:
    old = store.apply(upserts=[up("a", "sha-a", vec(1))]).vector_ids[0]
    seq = store.index_meta().seq
    new = store.apply(upserts=[up("a", "sha-a2", vec(2))]).vector_ids[0]
    assert new > old
    vid, stored = store.item_vector("a")  # type: ignore[misc]
    assert vid == new
    np.testing.assert_allclose(stored, vec(2))
    changes = store.changes_since(seq)
    assert changes.added_ids.tolist() == [new] and changes.tombstoned_ids.tolist() == [old]
    assert counts(store) == (1, 1, 1, 0)
    assert store.items_for_vectors([old, new]).keys() == {new}
    assert store.states(["a"])["a"].sha256 == "sha-a2"


def test_a_delete_tombstones_the_vector_and_removes_the_item(store: SqliteStore) -> None:
    vid = store.apply(upserts=[up("a", "sha-a", vec(1)), up("b", "sha-b", vec(2))]).vector_ids[0]
    seq = store.index_meta().seq
    result = store.apply(deletes=[Delete("a"), Delete("never-seen")])
    assert result.deleted == 1
    assert store.get_item("a") is None and store.item_vector("a") is None
    assert store.changes_since(seq).tombstoned_ids.tolist() == [vid]
    assert store.items_for_vectors([vid]) == {}
    assert counts(store) == (1, 1, 1, 0)


def test_embeddings_by_sha_prefers_a_live_vector_and_survives_a_delete(store: SqliteStore) -> None:
    """A renamed file (delete + new id, same bytes) reuses the stored vector without a model call."""
    store.apply(upserts=[up("old-name", "sha-x", vec(1))])
    store.apply(deletes=[Delete("old-name")])
    found = store.embeddings_by_sha(["sha-x", "sha-unknown"])
    assert found.keys() == {"sha-x"}
    np.testing.assert_allclose(found["sha-x"], vec(1))


# -- failures and dead letters ----------------------------------------------------------------------------------


def test_a_failure_of_a_new_item_marks_it_failed_and_writes_a_dead_letter(store: SqliteStore) -> None:
    store.apply(failures=[Failure("kafka", '{"id": "a"}', "ImageRejected: truncated", id="a", uri="u", tries=3)])
    item = store.get_item("a")
    assert item is not None and (item.status, item.reason, item.vector_id) == (
        "failed",
        "ImageRejected: truncated",
        None,
    )
    [letter] = store.dead_letters()
    assert (letter.item_id, letter.payload, letter.reason, letter.tries) == (
        "a",
        '{"id": "a"}',
        "ImageRejected: truncated",
        3,
    )
    assert store.stats().failed == 1 and store.stats().items == 0


def test_a_failed_update_keeps_the_older_good_vector(store: SqliteStore) -> None:
    vid = store.apply(upserts=[up("a", "sha-a", vec(1))]).vector_ids[0]
    store.apply(failures=[Failure("kafka", "raw", "FetchFailed: HTTP 503", id="a")])
    item = store.get_item("a")
    assert item is not None and item.status == "indexed" and item.vector_id == vid
    assert store.item_vector("a") is not None and store.items_for_vectors([vid]).keys() == {vid}
    assert store.dead_letters()[0].reason == "FetchFailed: HTTP 503"
    # A later good upsert clears the failure.
    store.apply(upserts=[up("a", "sha-a2", vec(2))])
    assert store.get_item("a").reason is None  # type: ignore[union-attr]


def test_an_unparseable_event_is_a_dead_letter_without_an_item(store: SqliteStore) -> None:
    store.apply(failures=[Failure("kafka", "not json", "InvalidEvent: not JSON")])
    assert counts(store) == (0, 0, 0, 1)


def test_dead_letters_are_listed_newest_first_and_can_be_deleted(store: SqliteStore) -> None:
    store.apply(failures=[Failure("folder", f"p{i}", f"r{i}") for i in range(5)])
    letters = store.dead_letters(limit=3)
    assert [d.payload for d in letters] == ["p4", "p3", "p2"]
    assert store.delete_dead_letters([d.id for d in letters]) == 3
    assert [d.payload for d in store.dead_letters()] == ["p1", "p0"]


# -- model binding ------------------------------------------------------------------------------------------------

TINY = ModelIdentity("clipdex-tiny", "none", 32, "abc123def4567890")
OTHER = ModelIdentity("ViT-B-32", "laion2b_s34b_b79k", 512, "fedcba9876543210")


def test_a_store_refuses_a_second_model_even_after_reopening(store: SqliteStore, tmp_path: Path) -> None:
    store.bind_model(TINY)
    store.bind_model(TINY)  # the same model again is fine
    store.close()
    with SqliteStore(tmp_path / "db.sqlite3") as reopened:
        assert reopened.model_identity() == TINY
        with pytest.raises(ModelMismatchError) as err:
            reopened.bind_model(OTHER)
    message = str(err.value)
    for part in ("clipdex-tiny", "ViT-B-32", "laion2b_s34b_b79k", "dim 32", "dim 512", "CLIPDEX_DATA_DIR"):
        assert part in message


def test_the_same_weights_from_another_path_are_the_same_model(store: SqliteStore) -> None:
    store.bind_model(ModelIdentity("ViT-B-32", "/models/vit-b-32.safetensors", 512, "fedcba9876543210"))
    store.bind_model(ModelIdentity("ViT-B-32", "/mnt/weights/vit-b-32.safetensors", 512, "fedcba9876543210"))
    assert store.model_identity() == ModelIdentity("ViT-B-32", "/models/vit-b-32.safetensors", 512, "fedcba9876543210")


def test_the_same_architecture_with_other_weights_is_refused(store: SqliteStore) -> None:
    store.bind_model(TINY)
    with pytest.raises(ModelMismatchError, match=r"weights abc123def456.*weights 000000000000"):
        store.bind_model(ModelIdentity("clipdex-tiny", "none", 32, "0000000000000000"))


# -- storage details ---------------------------------------------------------------------------------------------


def test_float16_vectors_take_half_the_bytes_and_round_trip_closely(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "f16.sqlite3", vector_dtype="float16") as s:
        s.apply(upserts=[up("a", "sha-a", vec(1))])
        np.testing.assert_allclose(s.item_vector("a")[1], vec(1), atol=1e-3)  # type: ignore[index]
        assert s.item_vector("a")[1].dtype == np.float32  # type: ignore[index]
    db = sqlite3.connect(tmp_path / "f16.sqlite3")
    assert db.execute("SELECT length(embedding) FROM vectors").fetchone()[0] == DIM * 2
    db.close()
    with SqliteStore(tmp_path / "f16.sqlite3", vector_dtype="float32") as reopened:  # the stored dtype wins
        assert reopened.vector_dtype == np.float16


def test_item_ids_filter_by_source_and_prefix(store: SqliteStore) -> None:
    store.apply(
        upserts=[
            Upsert("folder:cats/a.jpg", "folder", "/x/cats/a.jpg", "s1", {}, vec(1)),
            Upsert("folder:cats/b.jpg", "folder", "/x/cats/b.jpg", "s2", {}, vec(2)),
            Upsert("folder:dogs/c.jpg", "folder", "/x/dogs/c.jpg", "s3", {}, vec(3)),
            Upsert("kafka:cats/d", "kafka", "https://x/d", "s4", {}, vec(4)),
        ]
    )
    assert store.item_ids("folder", "folder:cats/") == {"folder:cats/a.jpg": "s1", "folder:cats/b.jpg": "s2"}
    assert set(store.item_ids("kafka")) == {"kafka:cats/d"}
    assert len(store.item_ids()) == 4


def test_record_generation_purges_only_the_tombstones_main_no_longer_holds(store: SqliteStore) -> None:
    ids = store.apply(upserts=[up(f"i{n}", f"s{n}", vec(n)) for n in range(4)]).vector_ids
    store.apply(deletes=[Delete("i0")])
    upto, seq = store.snapshot_for_compaction()
    store.apply(deletes=[Delete("i1")])  # after the snapshot: main still holds it, readers must filter it
    assert store.record_generation(1, upto, seq, "flat") == 1
    assert store.tombstoned_ids(upto=upto).tolist() == [ids[1]]
    meta = store.index_meta()
    assert (meta.generation, meta.high_water, meta.main_seq) == (1, upto, seq)
    assert store.stats().last_compaction_at is not None


def test_an_unopenable_path_is_a_store_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(StoreError, match="taken"):
        SqliteStore(tmp_path / "taken")


def test_a_512_d_float32_vector_costs_well_under_two_pages_on_disk(tmp_path: Path) -> None:
    """A 2 KiB embedding row must not fill a page alone (4.2 KiB per vector with 4 KiB pages)."""
    rng = np.random.default_rng(0)
    n = 1000
    with SqliteStore(tmp_path / "db.sqlite3") as s:
        for lo in range(0, n, 500):
            s.apply(
                upserts=[
                    Upsert(f"kafka:item-{i:08d}", "kafka", f"https://img.example/{i:08d}.jpg", f"{i:064x}", {"k": 1}, v)
                    for i, v in zip(
                        range(lo, lo + 500), rng.standard_normal((500, 512)).astype(np.float32), strict=True
                    )
                ]
            )
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    per_vector = (tmp_path / "db.sqlite3").stat().st_size / n
    assert per_vector < 3000, per_vector


def test_an_existing_store_keeps_its_page_size(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    db.execute("CREATE TABLE t (x)")  # a database made with the default 4 KiB pages
    db.close()
    with SqliteStore(tmp_path / "old.sqlite3") as s:
        s.apply(upserts=[up("a", "sha-a", vec(1))])
        assert s.item_vector("a") is not None
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
    db.close()
