"""The SQLite store: one transaction per batch, idempotent updates, tombstones, dead letters, model binding."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ModelMismatchError, StoreError
from shared.roles import Delete, Failure, Upsert
from shared.sqlite.store import SCHEMA_VERSION, SqliteStore
from shared.types import Filters, ModelIdentity
from tests.sample_store import damage_store_file
from tests.unit.shared.sqlite.old_schemas import make_store

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
    with sqlite3.connect(store.path) as db:  # the disk fills up at the third item
        db.execute(
            "CREATE TRIGGER full BEFORE INSERT ON items WHEN NEW.id = 'nope' "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    with pytest.raises(StoreError, match="disk is full"):
        store.apply(
            upserts=[up("b", "sha-b", vec(2)), up("a", "sha-a2", vec(3)), up("nope", "sha-x", vec(4))],
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


def test_a_metadata_only_update_of_content_that_changed_meanwhile_is_a_conflict_not_a_failure(
    store: SqliteStore,
) -> None:
    """Another writer replaced the image after the resolver read it: the metadata-only update is not
    written (it would pair the new metadata with the other image), and the batch goes on."""
    store.apply(upserts=[up("a", "sha-a", vec(1), colour="red")])
    result = store.apply(upserts=[up("a", "sha-other", None, colour="blue"), up("b", "sha-b", vec(2))])
    assert result.conflicts == ["a"] and (result.updated, result.indexed) == (0, 1)
    item = store.get_item("a")
    assert item is not None and (item.sha256, item.metadata) == ("sha-a", {"colour": "red"})
    assert store.apply(upserts=[up("never-stored", "sha-n", None)]).conflicts == ["never-stored"]


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
    SqliteStore(tmp_path / "db.sqlite3").close()  # the last connection's close checkpoints the WAL
    empty = (tmp_path / "db.sqlite3").stat().st_size  # a page per table and index, whatever they hold
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
    per_vector = ((tmp_path / "db.sqlite3").stat().st_size - empty) / n
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


# -- versions are checked inside the write, so two racing writers cannot regress an item -------------------------


def test_an_older_version_never_overwrites_a_newer_one_even_when_two_writers_race(store: SqliteStore) -> None:
    """Both writers read the item before either writes (as their resolvers do); the one that writes
    last carries the older version: the store keeps the newer one."""
    with SqliteStore(store.path) as other:
        assert store.states(["a"]) == other.states(["a"]) == {}  # both resolvers saw nothing stored
        store.apply(upserts=[Upsert("a", "kafka", "u5", "sha-5", {"v": 5}, vec(5), version=5)])
        late = other.apply(upserts=[Upsert("a", "kafka", "u3", "sha-3", {"v": 3}, vec(3), version=3)])
        assert (late.skipped, late.indexed) == (1, 0)
        stale_delete = other.apply(deletes=[Delete("a", version=4)])
        assert (stale_delete.skipped, stale_delete.deleted) == (1, 0)
    item = store.get_item("a")
    assert item is not None and (item.version, item.sha256, item.metadata) == (5, "sha-5", {"v": 5})
    assert counts(store) == (1, 1, 0, 0)  # no vector of version 3 was ever written
    store.apply(upserts=[Upsert("a", "kafka", "u", "sha-x", {}, vec(6))])  # no version: keeps 5
    assert store.states(["a"])["a"].version == 5
    assert store.apply(deletes=[Delete("a", version=5)]).deleted == 1


# -- retriable dead letters ---------------------------------------------------------------------------------------


def _at(seconds_from_now: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds_from_now)


def test_a_transient_failure_is_kept_with_its_attempts_and_when_it_is_retried(store: SqliteStore) -> None:
    soon = _at(60)
    store.apply(
        failures=[
            Failure("kafka", "{}", "FetchFailed: HTTP 503", id="kafka:a", retriable=True, attempts=2, retry_at=soon),
            Failure("kafka", "{}", "SourceNotFound: HTTP 404", id="kafka:b"),
        ]
    )
    letters = {d.item_id: d for d in store.dead_letters()}
    a, b = letters["kafka:a"], letters["kafka:b"]
    assert (a.retriable, a.attempts) == (True, 2) and a.retry_at is not None
    assert abs((a.retry_at - soon).total_seconds()) < 0.01
    assert (b.retriable, b.attempts, b.retry_at) == (False, 1, None)
    item_a, item_b = store.get_item("kafka:a"), store.get_item("kafka:b")
    assert item_a is not None and item_a.retriable and item_b is not None and not item_b.retriable
    assert store.stats().retrying == 1


def test_due_dead_letters_are_those_of_a_prefix_whose_time_has_come(store: SqliteStore) -> None:
    store.apply(
        failures=[
            Failure("kafka", "{}", "r", id="kafka:late", retriable=True, retry_at=_at(3600)),
            Failure("kafka", "{}", "r", id="kafka:due", retriable=True, retry_at=_at(-5)),
            Failure("kafka", "{}", "r", id="kafka:older", retriable=True, retry_at=_at(-50)),
            Failure("folder", "{}", "r", id="folder:images/x.jpg", retriable=True, retry_at=_at(-5)),
            Failure("kafka", "{}", "r", id="kafka:permanent"),
        ]
    )
    now = datetime.now(UTC)
    assert [d.item_id for d in store.due_dead_letters("kafka:", now)] == ["kafka:older", "kafka:due"]
    assert [d.item_id for d in store.due_dead_letters("folder:images/", now)] == ["folder:images/x.jpg"]
    assert store.due_dead_letters("folder:other/", now) == []
    assert [d.item_id for d in store.due_dead_letters("kafka:", now, limit=1)] == ["kafka:older"]


def test_a_retried_dead_letter_is_removed_in_the_same_write_as_its_outcome(store: SqliteStore) -> None:
    store.apply(failures=[Failure("kafka", "{}", "FetchFailed: HTTP 503", id="a", retriable=True, retry_at=_at(-1))])
    (letter,) = store.dead_letters()
    result = store.apply(upserts=[up("a", "sha-a", vec(1))], retried=[letter.id])
    assert result.indexed == 1 and store.dead_letters() == []
    item = store.get_item("a")
    assert item is not None and (item.status, item.reason, item.retriable) == ("indexed", None, False)

    store.apply(failures=[Failure("kafka", "{}", "FetchFailed: HTTP 503", id="b", retriable=True, retry_at=_at(-1))])
    (first,) = store.dead_letters()
    again = Failure("kafka", "{}", "FetchFailed: timed out", id="b", retriable=True, attempts=2, retry_at=_at(60))
    store.apply(failures=[again], retried=[first.id])
    (second,) = store.dead_letters()
    assert (second.id != first.id, second.attempts, second.reason) == (True, 2, "FetchFailed: timed out")


def test_a_later_event_for_the_item_ends_the_automatic_retry_of_its_older_dead_letters(store: SqliteStore) -> None:
    """A retry must never bring back what a later event replaced or deleted."""
    for item_id in ("up", "gone", "failed-again"):
        store.apply(failures=[Failure("kafka", item_id, "FetchFailed", id=item_id, retriable=True, retry_at=_at(-1))])
    store.apply(failures=[Failure("kafka", "other", "FetchFailed", id="other", retriable=True, retry_at=_at(-1))])
    store.apply(
        upserts=[up("up", "sha-up", vec(1))],
        deletes=[Delete("gone")],
        failures=[
            Failure("kafka", "failed-again v2", "FetchFailed", id="failed-again", retriable=True, retry_at=_at(-1))
        ],
    )
    due = store.due_dead_letters("", datetime.now(UTC))
    assert sorted(d.payload for d in due) == ["failed-again v2", "other"]  # the newest failure only
    assert len(store.dead_letters()) == 5  # nothing is forgotten: the older ones are listed, not retried


def test_dead_letters_can_be_scheduled_for_a_retry_now(store: SqliteStore) -> None:
    store.apply(failures=[Failure("kafka", "p", "SourceNotFound: HTTP 404", id="kafka:a")])
    (letter,) = store.dead_letters()
    assert store.due_dead_letters("kafka:", datetime.now(UTC)) == []
    assert store.schedule_dead_letters([letter.id, 99], datetime.now(UTC)) == 1
    assert [d.id for d in store.due_dead_letters("kafka:", datetime.now(UTC))] == [letter.id]


# -- the folder namespace and renaming ----------------------------------------------------------------------------


def test_each_folder_gets_a_name_of_its_own_and_keeps_it(store: SqliteStore, tmp_path: Path) -> None:
    first = store.register_folder("/srv/a/images")
    second = store.register_folder("/srv/b/images")
    odd = store.register_folder("/srv/My Photos (2024)")
    assert (first, second, odd) == ("images", "images-2", "My_Photos_2024")
    assert store.register_folder("/srv/a/images") == "images"
    assert store.register_folder("/") == "folder"
    store.close()
    with SqliteStore(tmp_path / "db.sqlite3") as reopened:
        assert reopened.register_folder("/srv/b/images") == "images-2"
        assert reopened.folders()["images"] == "/srv/a/images"


def test_renamed_items_keep_their_vectors_and_dead_letters(store: SqliteStore) -> None:
    vid = store.apply(upserts=[Upsert("folder:a.jpg", "folder", "/r/a.jpg", "sha-a", {}, vec(1))]).vector_ids[0]
    store.apply(failures=[Failure("folder", "{}", "FetchFailed: EIO", id="folder:b.jpg", retriable=True)])
    store.apply(upserts=[Upsert("folder:r/c.jpg", "folder", "/r/c.jpg", "sha-c", {}, vec(3))])
    old_c = store.apply(upserts=[Upsert("folder:c.jpg", "folder", "/r/c.jpg", "sha-c", {}, vec(3))]).vector_ids[0]
    seq = store.index_meta().seq
    renamed = store.rename_items(
        {"folder:a.jpg": "folder:r/a.jpg", "folder:b.jpg": "folder:r/b.jpg", "folder:c.jpg": "folder:r/c.jpg"}
    )
    assert renamed == 2
    item = store.get_item("folder:r/a.jpg")
    assert item is not None and item.vector_id == vid and store.get_item("folder:a.jpg") is None
    assert store.changes_since(seq).added_ids.size == 0  # nothing new for a search index to load
    assert [d.item_id for d in store.dead_letters()] == ["folder:r/b.jpg"]
    assert store.get_item("folder:c.jpg") is None  # its new id was taken: the old one is deleted
    assert store.changes_since(seq).tombstoned_ids.tolist() == [old_c]


# -- schema versions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_store_is_migrated_to_the_current_schema_when_opened_and_keeps_everything(
    version: int, tmp_path: Path
) -> None:
    """Version 1 → 2 → 3 and 2 → 3, each in the opening transaction."""
    path = make_store(tmp_path / f"v{version}.sqlite3", version)
    with SqliteStore(path) as s:
        assert s.get_item("folder:a.jpg") is not None and s.item_vector("folder:a.jpg") is not None
        item = s.get_item("kafka:b")
        assert item is not None and (item.status, item.retriable) == ("failed", False)
        (letter,) = s.dead_letters()
        assert (letter.reason, letter.tries, letter.retriable, letter.attempts, letter.retry_at) == (
            "FetchFailed: HTTP 503",
            4,
            False,
            1,
            None,
        )
        s.apply(failures=[Failure("kafka", "{}", "r", id="kafka:c", retriable=True, retry_at=_at(-1))])
        assert [d.item_id for d in s.due_dead_letters("kafka:", datetime.now(UTC))] == ["kafka:c"]
        assert s.register_folder("/r") == "r"
        assert s.matching_vectors(Filters({"colour": "red"}), 10).tolist() == [1]  # version 2's filter tags
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()
    with SqliteStore(path) as again:  # and opens as it is from then on
        assert len(again.dead_letters()) == 2


def test_a_store_of_a_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "db.sqlite3"):
        pass
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this clipdex"):
        SqliteStore(tmp_path / "db.sqlite3")


def test_the_main_index_checksum_is_recorded_with_its_generation(store: SqliteStore) -> None:
    assert store.index_meta().checksum is None
    store.record_generation(1, 0, 0, "flat", "ab" * 32)
    assert store.index_meta().checksum == "ab" * 32


# -- every read is a StoreError when SQLite fails -------------------------------------------------------------------

READS = {
    "model_identity": lambda s: s.model_identity(),
    "get_item": lambda s: s.get_item("a"),
    "items": lambda s: s.items(),
    "item_ids": lambda s: s.item_ids(),
    "items_for_vectors": lambda s: s.items_for_vectors([1]),
    "item_vector": lambda s: s.item_vector("a"),
    "dead_letters": lambda s: s.dead_letters(),
    "due_dead_letters": lambda s: s.due_dead_letters("", datetime.now(UTC)),
    "stats": lambda s: s.stats(),
    "states": lambda s: s.states(["a"]),
    "embeddings_by_sha": lambda s: s.embeddings_by_sha(["sha-a"]),
    "index_meta": lambda s: s.index_meta(),
    "changes_since": lambda s: s.changes_since(0),
    "live_vectors": lambda s: list(s.live_vectors()),
    "tombstoned_ids": lambda s: s.tombstoned_ids(upto=10),
    "newest_indexed_at": lambda s: s.newest_indexed_at(),
    "tombstone_count": lambda s: s.tombstone_count(upto=10, after_seq=0),
    "delta_size": lambda s: s.delta_size(0),
    "oldest_uncompacted_age_s": lambda s: s.oldest_uncompacted_age_s(0),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_every_read_turns_a_sqlite_failure_into_a_store_error(read: str, tmp_path: Path) -> None:
    """A server answers a StoreError with a 503 that says the store is unavailable; any other error
    would be a 500. A damaged database file is what a failing disk gives."""
    path = tmp_path / "db.sqlite3"
    with SqliteStore(path) as s:
        s.apply(upserts=[up("a", "sha-a", vec(1))])
    s = SqliteStore(path)
    try:
        damage_store_file(path)
        with pytest.raises(StoreError, match="store read failed"):
            READS[read](s)
    finally:
        s.close()
