"""The store contract, run against every backend (`store_settings`: SQLite in tmp_path, then Milvus on the
session's milvus-lite server): the same writes must leave the same items, vectors and dead letters.

What only one backend has (SQLite's one-transaction rollback, its change feed and compaction) is tested
beside that backend (tests/unit/shared/sqlite/); Milvus's own parts in tests/unit/shared/milvus/.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from shared.config import Settings
from shared.errors import ModelMismatchError
from shared.roles import Coverage, Delete, Failure, Upsert
from shared.search import MAX_CANDIDATES
from shared.stores import ReadSide, WriteSide, open_catalog, open_reader, open_writer
from shared.types import Filters, Hit, ModelIdentity, image_id

DIM = 8
MODEL = ModelIdentity("clipdex-contract", "none", DIM, "c0ffee" + "0" * 58)
OTHER = ModelIdentity("ViT-B-32", "laion2b_s34b_b79k", DIM, "fedcba9876543210")


def vec(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return x / np.linalg.norm(x)


def up(item_id: str, sha: str, embedding: np.ndarray | None, version: int | None = None, **metadata: object) -> Upsert:
    return Upsert(item_id, "kafka", f"https://img.example/{item_id}.jpg", sha, dict(metadata), embedding, version)


@pytest.fixture
def store(store_settings: Settings) -> Iterator[WriteSide]:
    with open_writer(store_settings, MODEL) as side:
        yield side


@pytest.fixture
def reader(store: WriteSide, store_settings: Settings) -> Iterator[ReadSide]:
    with open_reader(store_settings, MODEL) as side:
        yield side


def search(reader: ReadSide, query: np.ndarray, top_k: int = 10) -> list[Hit]:
    """After the writes: a reader follows the writers when it refreshes (the server does so every 250 ms)."""
    reader.vectors.refresh()
    return reader.vectors.search(query, top_k).hits


def search_ids(reader: ReadSide, query: np.ndarray, top_k: int = 10) -> list[str]:
    return [h.id for h in search(reader, query, top_k)]


# -- upserts ------------------------------------------------------------------------------------------------


def test_an_upsert_applied_twice_is_one_item_with_one_vector(store: WriteSide, reader: ReadSide) -> None:
    for _ in range(2):
        store.writer.apply(upserts=[up("a", "sha-a", vec(1), colour="red"), up("b", "sha-b", vec(2))])
    item = store.catalog.get_item("a")
    assert item is not None and (item.status, item.sha256, item.metadata) == ("indexed", "sha-a", {"colour": "red"})
    assert store.writer.states(["a", "b", "nope"]).keys() == {"a", "b"}
    assert search_ids(reader, vec(1)) == ["a", "b"]
    stats = store.catalog.stats()
    assert (stats.items, stats.vectors, stats.failed, stats.dead_letters) == (2, 2, 0, 0)


def test_new_content_replaces_the_vector_and_the_old_one_is_never_found(store: WriteSide, reader: ReadSide) -> None:
    store.writer.apply(upserts=[up("a", "sha-a", vec(1)), up("b", "sha-b", vec(2))])
    store.writer.apply(upserts=[up("a", "sha-a2", vec(3))])
    assert search_ids(reader, vec(1)).count("a") == 1
    hits = search(reader, vec(3), 1)
    assert [h.id for h in hits] == ["a"] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(reader.vectors.item_vector("a"), vec(3), atol=1e-6)  # type: ignore[arg-type]
    assert store.writer.states(["a"])["a"].sha256 == "sha-a2"


def test_the_same_hash_is_a_metadata_only_update_that_keeps_the_vector(store: WriteSide, reader: ReadSide) -> None:
    store.writer.apply(upserts=[up("a", "sha-a", vec(1), colour="red")])
    result = store.writer.apply(upserts=[up("a", "sha-a", None, colour="blue")])
    assert (result.indexed, result.updated) == (0, 1)
    assert store.catalog.get_item("a").metadata == {"colour": "blue"}  # type: ignore[union-attr]
    np.testing.assert_allclose(reader.vectors.item_vector("a"), vec(1), atol=1e-6)  # type: ignore[arg-type]
    assert search(reader, vec(1), 1)[0].metadata == {"colour": "blue"}


def test_a_metadata_only_update_of_changed_content_is_a_conflict_and_the_rest_of_the_batch_is_written(
    store: WriteSide,
) -> None:
    """Another writer replaced the image after the resolver read it: the metadata-only update is not
    written (it would pair the new metadata with the other image); the caller embeds it again."""
    store.writer.apply(upserts=[up("a", "sha-a", vec(1), colour="red")])
    result = store.writer.apply(upserts=[up("b", "sha-b", vec(2)), up("a", "sha-other", None, colour="blue")])
    assert result.conflicts == ["a"] and (result.indexed, result.updated) == (1, 0)
    item = store.catalog.get_item("a")
    assert item is not None and (item.sha256, item.metadata) == ("sha-a", {"colour": "red"})
    assert store.catalog.get_item("b") is not None
    assert store.writer.apply(upserts=[up("never-stored", "sha-n", None)]).conflicts == ["never-stored"]


def test_a_known_hash_under_another_id_is_found_without_a_model(store: WriteSide) -> None:
    store.writer.apply(upserts=[up("old-name", "sha-x", vec(1))])
    found = store.writer.embeddings_by_sha(["sha-x", "sha-unknown"])
    assert found.keys() == {"sha-x"}
    np.testing.assert_allclose(found["sha-x"], vec(1), atol=1e-6)


# -- deletes ------------------------------------------------------------------------------------------------


def test_a_delete_removes_the_item_from_the_catalog_and_from_search(store: WriteSide, reader: ReadSide) -> None:
    store.writer.apply(upserts=[up("a", "sha-a", vec(1)), up("b", "sha-b", vec(2))])
    result = store.writer.apply(deletes=[Delete("a"), Delete("never-seen")])
    assert result.deleted == 1
    assert store.catalog.get_item("a") is None and reader.vectors.item_vector("a") is None
    assert search_ids(reader, vec(1)) == ["b"]
    assert store.writer.states(["a"]) == {}


# -- versions -------------------------------------------------------------------------------------------------


def test_an_older_version_is_skipped_in_the_write_itself(store: WriteSide) -> None:
    """The resolver skips older events too; this is the write's own check, for two writers that read the
    same state before either wrote."""
    store.writer.apply(upserts=[up("a", "sha-5", vec(5), version=5)])
    result = store.writer.apply(upserts=[up("a", "sha-3", vec(3), version=3)], deletes=[Delete("a", version=4)])
    assert (result.indexed, result.deleted, result.skipped) == (0, 0, 2)
    item = store.catalog.get_item("a")
    assert item is not None and (item.version, item.sha256) == (5, "sha-5")
    assert store.writer.apply(upserts=[up("a", "sha-5b", vec(6), version=5)]).indexed == 1  # equal: applies


def test_an_upsert_without_a_version_keeps_the_stored_one(store: WriteSide) -> None:
    store.writer.apply(upserts=[up("a", "sha-5", vec(5), version=5)])
    store.writer.apply(upserts=[up("a", "sha-x", vec(1))])
    item = store.catalog.get_item("a")
    assert item is not None and (item.version, item.sha256) == (5, "sha-x")
    assert store.writer.apply(upserts=[up("a", "sha-4", vec(4), version=4)]).skipped == 1
    store.writer.apply(upserts=[up("b", "sha-b", vec(2)), up("b", "sha-b2", vec(3))])
    assert store.catalog.get_item("b").version is None  # type: ignore[union-attr]


def test_a_versioned_delete_removes_no_newer_version(store: WriteSide) -> None:
    store.writer.apply(upserts=[up("a", "sha-a", vec(1), version=7), up("b", "sha-b", vec(2), version=2)])
    store.writer.apply(deletes=[Delete("a", version=6), Delete("b", version=2)])
    assert store.catalog.get_item("a") is not None and store.catalog.get_item("b") is None


def test_concurrent_writers_never_regress_an_item(store_settings: Settings, store: WriteSide) -> None:
    """Two writers (two connections, as two indexers) race on the same items with shuffled versions:
    each item ends at its highest version, once."""
    ids = [f"item-{i}" for i in range(6)]
    rounds = 12
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with open_writer(store_settings, MODEL) as mine:
                for version in rng.permutation(rounds):
                    v = int(version)
                    mine.writer.apply(upserts=[up(i, f"sha-{i}-{v}", vec(100 * v + n), v) for n, i in enumerate(ids)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    states = store.writer.states(ids)
    last = rounds - 1
    assert {i: (s.version, s.sha256) for i, s in states.items()} == {i: (last, f"sha-{i}-{last}") for i in ids}
    assert store.catalog.stats().items == len(ids)
    with open_reader(store_settings, MODEL) as reader:
        top = search(reader, vec(100 * (rounds - 1)))
        assert sorted(h.id for h in top) == ids  # each item once


# -- search -------------------------------------------------------------------------------------------------


def test_a_search_returns_up_to_max_candidates_hits_with_their_hashes_and_vectors_when_asked(
    store: WriteSide, reader: ReadSide
) -> None:
    """What SearchService asks of every backend (`VectorSearch.search`): up to MAX_CANDIDATES hits at once,
    the best ones, best first, each with its content hash; filters, exclusions and min_score exact; the
    hits' vectors row by row when asked for (collapse=near compares them)."""
    n = MAX_CANDIDATES + 50
    vectors = np.random.default_rng(7).standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{k:05d}" for k in range(n)]
    for lo in range(0, n, 1000):
        batch = range(lo, min(n, lo + 1000))
        store.writer.apply(upserts=[up(ids[k], f"sha-{k}", vectors[k], half=k % 2) for k in batch])
    reader.vectors.refresh()
    query = vectors[0]
    truth = vectors @ query  # every item's score, by brute force
    best = np.sort(truth)[::-1]

    found = reader.vectors.search(query, MAX_CANDIDATES)
    assert len(found.hits) == MAX_CANDIDATES == len({h.id for h in found.hits})
    assert not found.partial and found.vectors is None
    scores = np.array([h.score for h in found.hits])
    np.testing.assert_allclose(scores, [truth[int(h.id[1:])] for h in found.hits], atol=1e-5)
    np.testing.assert_allclose(scores, best[:MAX_CANDIDATES], atol=1e-5)  # the best ones, best first
    assert all(h.sha256 == f"sha-{int(h.id[1:])}" for h in found.hits)

    odd = reader.vectors.search(query, 100, Filters({"half": 1}), exclude={ids[1]}, with_vectors=True)
    assert all(int(h.id[1:]) % 2 == 1 and h.id != ids[1] for h in odd.hits)
    mask = (np.arange(n) % 2 == 1) & (np.arange(n) != 1)
    np.testing.assert_allclose([h.score for h in odd.hits], np.sort(truth[mask])[::-1][:100], atol=1e-5)
    assert odd.vectors is not None and odd.vectors.shape == (100, DIM)
    np.testing.assert_allclose(odd.vectors, vectors[[int(h.id[1:]) for h in odd.hits]], atol=1e-6)

    threshold = float(best[300] + best[301]) / 2
    above = reader.vectors.search(query, MAX_CANDIDATES, min_score=threshold)
    assert len(above.hits) == 301 and not above.partial


# -- failures and dead letters ------------------------------------------------------------------------------------


def test_a_failure_of_a_new_item_marks_it_failed_and_writes_a_dead_letter(store: WriteSide, reader: ReadSide) -> None:
    why = "ImageRejected: truncated"
    store.writer.apply(failures=[Failure("kafka", '{"id": "a"}', why, id="a", uri="u", tries=3)])
    item = store.catalog.get_item("a")
    assert item is not None and (item.status, item.reason, item.vector_id) == ("failed", why, None)
    [letter] = store.catalog.dead_letters()
    assert (letter.item_id, letter.payload, letter.reason, letter.tries) == ("a", '{"id": "a"}', why, 3)
    stats = store.catalog.stats()
    assert (stats.failed, stats.items, stats.dead_letters) == (1, 0, 1)
    assert reader.vectors.item_vector("a") is None and search_ids(reader, vec(1)) == []
    assert store.writer.states(["a"])["a"].has_vector is False


def test_a_failed_update_keeps_the_older_good_vector_and_a_good_one_clears_it(
    store: WriteSide, reader: ReadSide
) -> None:
    store.writer.apply(upserts=[up("a", "sha-a", vec(1), version=2)])
    store.writer.apply(failures=[Failure("kafka", "raw", "FetchFailed: HTTP 503", id="a")])
    item = store.catalog.get_item("a")
    assert item is not None and (item.status, item.reason, item.version) == ("indexed", "FetchFailed: HTTP 503", 2)
    assert search_ids(reader, vec(1)) == ["a"]
    store.writer.apply(upserts=[up("a", "sha-a2", vec(2))])
    assert store.catalog.get_item("a").reason is None  # type: ignore[union-attr]


def test_dead_letters_are_listed_newest_first_and_can_be_deleted(store: WriteSide) -> None:
    for i in range(5):
        store.writer.apply(failures=[Failure("folder", f"p{i}", f"r{i}")])
    letters = store.catalog.dead_letters(limit=3)
    assert [d.payload for d in letters] == ["p4", "p3", "p2"]
    assert store.catalog.delete_dead_letters([d.id for d in letters] + [10**9]) == 3
    assert [d.payload for d in store.catalog.dead_letters()] == ["p1", "p0"]
    assert store.catalog.stats().dead_letters == 2


def test_every_process_sees_the_dead_letters(store: WriteSide, store_settings: Settings) -> None:
    store.writer.apply(failures=[Failure("kafka", "not json", "InvalidEvent: not JSON")])
    with open_catalog(store_settings) as other:
        assert other is not None and [d.reason for d in other.dead_letters()] == ["InvalidEvent: not JSON"]
        assert other.model_identity() == MODEL


def _at(seconds_from_now: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds_from_now)


def test_a_transient_failure_is_kept_with_its_attempts_and_when_it_is_retried(store: WriteSide) -> None:
    soon = _at(60)
    store.writer.apply(
        failures=[
            Failure("kafka", "{}", "FetchFailed: HTTP 503", id="kafka:a", retriable=True, attempts=2, retry_at=soon),
            Failure("kafka", "{}", "SourceNotFound: HTTP 404", id="kafka:b"),
        ]
    )
    letters = {d.item_id: d for d in store.catalog.dead_letters()}
    a, b = letters["kafka:a"], letters["kafka:b"]
    assert (a.retriable, a.attempts) == (True, 2) and a.retry_at is not None
    assert abs((a.retry_at - soon).total_seconds()) < 0.01
    assert (b.retriable, b.attempts, b.retry_at) == (False, 1, None)
    item_a, item_b = store.catalog.get_item("kafka:a"), store.catalog.get_item("kafka:b")
    assert item_a is not None and item_a.retriable and item_b is not None and not item_b.retriable
    assert store.catalog.stats().retrying == 1


def test_due_dead_letters_are_those_of_a_prefix_whose_time_has_come(store: WriteSide) -> None:
    store.writer.apply(
        failures=[
            Failure("kafka", "{}", "r", id="kafka:late", retriable=True, retry_at=_at(3600)),
            Failure("kafka", "{}", "r", id="kafka:due", retriable=True, retry_at=_at(-5)),
            Failure("kafka", "{}", "r", id="kafka:older", retriable=True, retry_at=_at(-50)),
            Failure("folder", "{}", "r", id="folder:images/x.jpg", retriable=True, retry_at=_at(-5)),
            Failure("kafka", "{}", "r", id="kafka:permanent"),
            Failure("kafka", "not json", "InvalidEvent: not JSON"),
        ]
    )
    now = datetime.now(UTC)
    due = store.catalog.due_dead_letters
    assert [d.item_id for d in due("kafka:", now)] == ["kafka:older", "kafka:due"]
    assert [d.item_id for d in due("folder:images/", now)] == ["folder:images/x.jpg"]
    assert due("folder:other/", now) == []
    assert [d.item_id for d in due("kafka:", now, limit=1)] == ["kafka:older"]


def test_a_retried_dead_letter_is_removed_in_the_same_write_as_its_outcome(store: WriteSide) -> None:
    failed = Failure("kafka", "{}", "FetchFailed: HTTP 503", id="a", retriable=True, retry_at=_at(-1))
    store.writer.apply(failures=[failed])
    (letter,) = store.catalog.dead_letters()
    result = store.writer.apply(upserts=[up("a", "sha-a", vec(1))], retried=[letter.id])
    assert result.indexed == 1 and store.catalog.dead_letters() == []
    item = store.catalog.get_item("a")
    assert item is not None and (item.status, item.reason, item.retriable) == ("indexed", None, False)

    store.writer.apply(failures=[Failure("kafka", "{}", "FetchFailed: 503", id="b", retriable=True, retry_at=_at(-1))])
    (first,) = store.catalog.dead_letters()
    again = Failure("kafka", "{}", "FetchFailed: timed out", id="b", retriable=True, attempts=2, retry_at=_at(60))
    store.writer.apply(failures=[again], retried=[first.id])
    (second,) = store.catalog.dead_letters()
    assert (second.id != first.id, second.attempts, second.reason) == (True, 2, "FetchFailed: timed out")


def test_a_later_event_for_the_item_ends_the_automatic_retry_of_its_older_dead_letters(store: WriteSide) -> None:
    """A retry must never bring back what a later event replaced or deleted."""
    for item_id in ("up", "gone", "failed-again", "other"):
        failure = Failure("kafka", item_id, "FetchFailed", id=item_id, retriable=True, retry_at=_at(-1))
        store.writer.apply(failures=[failure])
    store.writer.apply(
        upserts=[up("up", "sha-up", vec(1))],
        deletes=[Delete("gone")],
        failures=[
            Failure("kafka", "failed-again v2", "FetchFailed", id="failed-again", retriable=True, retry_at=_at(-1))
        ],
    )
    due = store.catalog.due_dead_letters("", datetime.now(UTC))
    assert sorted(d.payload for d in due) == ["failed-again v2", "other"]  # the newest failure only
    assert len(store.catalog.dead_letters()) == 5  # nothing is forgotten: the older ones are listed, not retried
    assert store.catalog.stats().retrying == 2


def test_dead_letters_can_be_scheduled_for_a_retry_now_and_keep_their_ids(store: WriteSide) -> None:
    store.writer.apply(failures=[Failure("kafka", "p", "SourceNotFound: HTTP 404", id="kafka:a")])
    (letter,) = store.catalog.dead_letters()
    assert store.catalog.due_dead_letters("kafka:", datetime.now(UTC)) == []
    assert store.catalog.schedule_dead_letters([letter.id, 99], datetime.now(UTC)) == 1
    assert [d.id for d in store.catalog.due_dead_letters("kafka:", datetime.now(UTC))] == [letter.id]


# -- folders ------------------------------------------------------------------------------------------------------


def test_each_folder_gets_a_name_of_its_own_and_keeps_it(store: WriteSide, store_settings: Settings) -> None:
    first = store.writer.register_folder("/srv/a/images")
    second = store.writer.register_folder("/srv/b/images")
    odd = store.writer.register_folder("/srv/My Photos (2024)")
    assert (first, second, odd) == ("images", "images-2", "My_Photos_2024")
    assert store.writer.register_folder("/srv/a/images") == "images"
    assert store.writer.register_folder("/") == "folder"
    with open_writer(store_settings, MODEL) as reopened:
        assert reopened.writer.register_folder("/srv/b/images") == "images-2"
        assert reopened.catalog.folders()["images"] == "/srv/a/images"
        assert set(reopened.catalog.folders()) == {"images", "images-2", "My_Photos_2024", "folder"}


def test_renamed_items_keep_their_vectors_and_dead_letters(store: WriteSide, reader: ReadSide) -> None:
    store.writer.apply(upserts=[Upsert("folder:a.jpg", "folder", "/r/a.jpg", "sha-a", {"k": 1}, vec(1), version=3)])
    store.writer.apply(failures=[Failure("folder", "{}", "FetchFailed: EIO", id="folder:b.jpg", retriable=True)])
    store.writer.apply(upserts=[Upsert("folder:r/c.jpg", "folder", "/r/c.jpg", "sha-c", {}, vec(3))])
    store.writer.apply(upserts=[Upsert("folder:c.jpg", "folder", "/r/c.jpg", "sha-c", {}, vec(3))])
    renames = {"folder:a.jpg": "folder:r/a.jpg", "folder:b.jpg": "folder:r/b.jpg", "folder:c.jpg": "folder:r/c.jpg"}
    assert store.writer.rename_items(renames) == 2
    item = store.catalog.get_item("folder:r/a.jpg")
    assert item is not None and (item.version, item.metadata, item.sha256) == (3, {"k": 1}, "sha-a")
    assert store.catalog.get_item("folder:a.jpg") is None
    failed = store.catalog.get_item("folder:r/b.jpg")
    assert failed is not None and (failed.status, failed.retriable) == ("failed", True)
    assert [d.item_id for d in store.catalog.dead_letters()] == ["folder:r/b.jpg"]
    assert store.catalog.get_item("folder:c.jpg") is None  # its new id was taken: the old one is deleted
    assert sorted(search_ids(reader, vec(1))) == ["folder:r/a.jpg", "folder:r/c.jpg"]
    np.testing.assert_allclose(reader.vectors.item_vector("folder:r/a.jpg"), vec(1), atol=1e-6)  # type: ignore[arg-type]
    assert len(store.catalog.item_ids()) == 3


# -- the catalog ------------------------------------------------------------------------------------------------


def test_items_and_item_ids_by_source_and_prefix(store: WriteSide) -> None:
    store.writer.apply(
        upserts=[
            Upsert("folder:cats/a.jpg", "folder", "/x/cats/a.jpg", "s1", {}, vec(1)),
            Upsert("folder:cats/b.jpg", "folder", "/x/cats/b.jpg", "s2", {}, vec(2)),
            Upsert("folder:dogs/c.jpg", "folder", "/x/dogs/c.jpg", "s3", {}, vec(3)),
            Upsert("kafka:cats/d", "kafka", "https://x/d", "s4", {}, vec(4)),
        ],
        failures=[Failure("folder", "/x/cats/e.jpg", "broken", id="folder:cats/e.jpg")],
    )
    assert store.catalog.item_ids("folder", "folder:cats/") == {
        "folder:cats/a.jpg": "s1",
        "folder:cats/b.jpg": "s2",
        "folder:cats/e.jpg": None,
    }
    assert set(store.catalog.item_ids("kafka")) == {"kafka:cats/d"}
    assert len(store.catalog.item_ids()) == 5
    assert [i.id for i in store.catalog.items("folder", "folder:cats/")] == [
        "folder:cats/a.jpg",
        "folder:cats/b.jpg",
        "folder:cats/e.jpg",
    ]


def test_a_store_refuses_a_second_model_even_after_reopening(store: WriteSide, store_settings: Settings) -> None:
    store.writer.apply(upserts=[up("a", "sha-a", vec(1))])
    with open_writer(store_settings, MODEL) as again:
        assert again.catalog.model_identity() == MODEL
    with pytest.raises(ModelMismatchError) as err:
        open_writer(store_settings, OTHER)
    assert "clipdex-contract" in str(err.value) and "ViT-B-32" in str(err.value)


# -- embedding spaces -----------------------------------------------------------------------------------------


def test_the_active_space_holds_the_model_that_answers(
    store: WriteSide, reader: ReadSide, store_settings: Settings
) -> None:
    store.writer.apply(upserts=[up("a", "sha-a", vec(1)), up("b", "sha-b", vec(2))])
    with open_catalog(store_settings) as catalog:  # a status process: bound to nothing
        assert catalog is not None
        (active,) = [s for s in catalog.spaces() if s.state == "active"]
        assert active.model == MODEL
        assert catalog.coverage(active.id) == Coverage(total=2, done=2, failed=0)
    reader.vectors.refresh()
    assert reader.model == reader.vectors.info().model == reader.vectors.state().model == MODEL


# -- a product's images --------------------------------------------------------------------------------------


def test_a_products_images_are_found_failed_ones_too_and_no_other_products(store: WriteSide) -> None:
    a, b = image_id("kafka:p", "https://img.example/a.jpg"), image_id("kafka:p", "https://img.example/b.jpg")
    bad = image_id("kafka:p", "ftp://x/c.jpg")
    other = image_id("kafka:p#x", "https://img.example/a.jpg")  # another product, whose id starts with "p#"
    store.writer.apply(
        upserts=[
            up(a, "s1", vec(1), 4, parent="p"),
            up(b, "s2", vec(2), 4),
            up(other, "s3", vec(3)),
            up("kafka:p", "s4", vec(4)),
        ],
        failures=[Failure("kafka", "{}", "refused", id=bad, uri="ftp://x/c.jpg")],
    )
    found = store.writer.product_images(["kafka:p", "kafka:none"])
    assert sorted(found) == sorted([a, b, bad])
    assert found[a].version == 4 and found[a].has_vector and found[a].sha256 == "s1"
    assert found[bad].status == "failed" and not found[bad].has_vector
    assert store.writer.product_images(["kafka:p#x"]).keys() == {other}
    assert store.writer.product_images([]) == {}
    store.writer.apply(deletes=[Delete(a), Delete(bad)])
    assert store.writer.product_images(["kafka:p"]).keys() == {b}
