"""Resolve's rules as pure functions: what a micro-batch asks of the store, before and after reading."""

from __future__ import annotations

import numpy as np

from indexer.events import Event
from indexer.products import image_id, product
from indexer.records import Record
from indexer.resolve import Fetched, Work, classify, images_by_product, pending_ids, pending_products, plan
from shared.roles import StoredState


def rec(item_id: str, op: str = "upsert", version: int | None = None, source: str = "kafka") -> Record:
    event = Event(op=op, id=item_id, uri=None if op == "delete" else f"{item_id}.jpg", version=version)  # type: ignore[arg-type]
    return Record(source, event.model_dump_json(), event)


def test_ids_are_namespaced_by_source() -> None:
    assert pending_ids([rec("a"), rec("a", source="folder"), Record("kafka", "junk", None, "bad")]) == [
        "folder:a",
        "kafka:a",
    ]


def test_plan_sorts_a_batch() -> None:
    stored = {"kafka:old": StoredState("h", 9, "indexed", True)}
    batch = plan(
        [rec("a"), rec("gone", "delete"), rec("old", version=3), Record("kafka", "junk", None, "not JSON"), rec("a")],
        stored,
    )
    assert [w.item_id for w in batch.upserts] == ["kafka:a"]
    assert [w.item_id for w in batch.deletes] == ["kafka:gone"]
    assert batch.skipped == ["kafka:old"]
    assert batch.superseded == 1
    assert [f.reason for f in batch.invalid] == ["InvalidEvent: not JSON"]
    assert batch.invalid[0].record.raw == "junk" and batch.invalid[0].dead_letter().payload == "junk"


def test_an_equal_version_is_not_older() -> None:
    stored = {"kafka:a": StoredState("h", 3, "indexed", True)}
    assert [w.item_id for w in plan([rec("a", version=3)], stored).upserts] == ["kafka:a"]
    assert plan([rec("a", version=None)], stored).upserts  # no version: never older


def _fetched(item_id: str, sha: str, stored: StoredState | None = None) -> Fetched:
    record = rec(item_id)
    assert record.event is not None
    return Fetched(Work(f"kafka:{item_id}", record, record.event, stored), b"", sha)


def test_classify_by_content_hash() -> None:
    vec = np.ones(4, np.float32)
    out = classify(
        [
            _fetched("same", "h1", StoredState("h1", None, "indexed", True)),
            _fetched("failed-before", "h2", StoredState("h2", None, "failed", False)),
            _fetched("renamed", "h3"),
            _fetched("new", "h4"),
            _fetched("copy-of-new", "h4"),
        ],
        known={"h3": vec},
    )
    assert [f.work.item_id for f in out.unchanged] == ["kafka:same"]
    assert [f.work.item_id for f, _ in out.reused] == ["kafka:renamed"]
    assert [f.work.item_id for f in out.to_embed] == ["kafka:failed-before", "kafka:new"]
    assert [f.work.item_id for f in out.copies] == ["kafka:copy-of-new"]


# -- products with several images -----------------------------------------------------------------------------


def prod(pid: str, uris: list[str], *, op: str = "upsert", version: int | None = None) -> Record:
    p = product(op, pid, uris, {"title": pid}, version)  # type: ignore[arg-type]
    return Record("kafka", f"product {pid}", p)


def image(pid: str, uri: str) -> str:
    return f"kafka:{image_id(pid, uri)}"


def test_a_product_upserts_the_images_it_names_and_deletes_the_stored_ones_it_does_not() -> None:
    stored = {
        image("p", "a.jpg"): StoredState("h", 1, "indexed", True),
        image("p", "gone.jpg"): StoredState("h", 1, "indexed", True),
        image("p#x", "a.jpg"): StoredState("h", 1, "indexed", True),  # another product's, under the same prefix
    }
    batch = plan([prod("p", ["a.jpg", "b.jpg", "ftp://bad/c.jpg"], version=2)], stored)
    assert [w.item_id for w in batch.upserts] == [image("p", "a.jpg"), image("p", "b.jpg")]
    assert batch.upserts[0].stored == stored[image("p", "a.jpg")] and batch.upserts[1].stored is None
    assert [w.item_id for w in batch.deletes] == [image("p", "gone.jpg")]
    assert [(f.item_id, f.uri) for f in batch.invalid] == [(image("p", "ftp://bad/c.jpg"), "ftp://bad/c.jpg")]
    assert batch.invalid[0].reason.startswith("InvalidEvent: invalid event: uri:")


def test_a_product_delete_removes_every_stored_image_and_only_its_own() -> None:
    stored = {
        image("p", "a.jpg"): StoredState("h", 1, "indexed", True),
        image("p", "b.jpg"): StoredState(None, None, "failed", False),
        image("p#x", "a.jpg"): StoredState("h", 1, "indexed", True),
    }
    batch = plan([prod("p", [], op="delete")], stored)
    assert sorted(w.item_id for w in batch.deletes) == sorted([image("p", "a.jpg"), image("p", "b.jpg")])
    assert not batch.upserts


def test_an_older_product_changes_none_of_its_images() -> None:
    stored = {
        image("p", "a.jpg"): StoredState("h", 7, "indexed", True),
        image("p", "b.jpg"): StoredState("h", 3, "indexed", True),
    }
    older = plan([prod("p", ["c.jpg"], version=5)], stored)  # older than the newest image (7)
    assert older.skipped == ["kafka:p"] and not older.upserts and not older.deletes
    assert plan([prod("p", [], op="delete", version=5)], stored).skipped == ["kafka:p"]
    assert plan([prod("p", ["c.jpg"], version=7)], stored).upserts  # an equal version is not older
    assert plan([prod("p", ["c.jpg"])], stored).upserts  # no version: never older


def test_the_last_event_of_a_product_in_a_batch_wins_unless_an_earlier_one_is_newer() -> None:
    batch = plan([prod("p", ["a.jpg", "b.jpg"], version=1), prod("p", ["a.jpg"], version=2)], {})
    assert [w.item_id for w in batch.upserts] == [image("p", "a.jpg")] and batch.superseded == 1
    batch = plan([prod("p", ["a.jpg"], version=3), prod("p", ["b.jpg"], version=2)], {})
    assert [w.item_id for w in batch.upserts] == [image("p", "a.jpg")]
    batch = plan(
        [prod("p", ["a.jpg"]), prod("p", [], op="delete")],
        {image("p", "a.jpg"): StoredState("h", None, "indexed", True)},
    )
    assert not batch.upserts and [w.item_id for w in batch.deletes] == [image("p", "a.jpg")]


def test_a_product_and_an_item_of_the_same_id_are_not_the_same_thing() -> None:
    batch = plan([rec("p"), prod("p", ["a.jpg"])], {})
    assert sorted(w.item_id for w in batch.upserts) == sorted(["kafka:p", image("p", "a.jpg")])
    assert batch.superseded == 0
    assert pending_ids([rec("p"), prod("q", ["a.jpg"])]) == ["kafka:p"]
    assert pending_products([rec("p"), prod("q", ["a.jpg"])]) == ["kafka:q"]
    assert images_by_product(
        {image("q", "a.jpg"): StoredState("h", 1, "indexed", True), "kafka:p": StoredState("h", 1, "indexed", True)}
    ) == {"kafka:q": {image("q", "a.jpg"): StoredState("h", 1, "indexed", True)}}
