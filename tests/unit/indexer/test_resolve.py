"""Resolve's rules as pure functions: what a micro-batch asks of the store, before and after reading."""

from __future__ import annotations

import numpy as np

from indexer.events import Event
from indexer.records import Record
from indexer.resolve import Fetched, Work, classify, pending_ids, plan
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
