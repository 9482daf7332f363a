"""Hostile input against the real pipeline (real SQLite in tmp_path, the tiny CLIP): whatever one record
holds, and whatever goes wrong while fetching, decoding or embedding one item, that item becomes a dead
letter with a reason and the good items of the same batch are stored. Only a store failure raises."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from indexer.decode import sha256_of
from indexer.events import Event
from indexer.formats import event_format
from indexer.products import image_id
from indexer.records import BatchReport, Record
from indexer.sources.folder import FileStat, Folder, upsert_record
from indexer.sources.kafka import Message, to_record, to_records
from shared.embedder import Embedder
from shared.fetch import FetchPolicy, fetch_bytes
from shared.sqlite.store import SqliteStore
from tests.unit.indexer.formats.test_hostile import hostile_documents
from tests.unit.indexer.test_events import EVENTS, JSON_VALUES, MALFORMED, nested
from tests.unit.indexer.test_pipeline import jpeg, make_pipeline, put, record

# The findings of issue 9: each of these stopped `clipdex consume` (the batch raised, was not committed,
# replayed on restart and raised again).
POISON = {
    "deep": ("[" * 100_000 + "]" * 100_000).encode(),
    "deep-metadata": f'{{"op": "upsert", "id": "p1", "uri": "a.jpg", "metadata": {{"x": {nested(100_000)}}}}}'.encode(),
    "ipv6": json.dumps({"op": "upsert", "id": "p2", "uri": "http://[::1/x.jpg"}).encode(),
    "nul": json.dumps({"op": "upsert", "id": "p3", "uri": "/images/a\x00b.jpg"}).encode(),
    "version": json.dumps({"op": "upsert", "id": "p4", "uri": "a.jpg", "version": 10**30}).encode(),
    "digits": b'{"op": "upsert", "id": "p5", "uri": "a.jpg", "metadata": {"n": ' + b"9" * 5000 + b"}}",
    "surrogate": b'{"op": "upsert", "id": "p6", "uri": "a.jpg", "metadata": {"s": "\\udc80"}}',
    "not-json": b"\xff\xfe{",
    "null": b"null",
}


def kafka_record(offset: int, value: bytes | None, key: bytes | None = None) -> Record:
    (record,) = to_record(Message("catalog", 0, offset, key, value))
    return record


def good_event(root: Path, name: str, seed: int) -> tuple[bytes, str]:
    """An upsert of a new JPEG under `root`, and the image's sha256."""
    data = jpeg(seed)
    uri = put(root, f"{name}.jpg", data)
    return json.dumps({"op": "upsert", "id": name, "uri": uri, "metadata": {"seed": seed}}).encode(), sha256_of(data)


def assert_stored(store: SqliteStore, expected: dict[str, str]) -> None:
    for item_id, sha in expected.items():
        item = store.get_item(f"kafka:{item_id}")
        assert item is not None and item.status == "indexed" and item.sha256 == sha, (item_id, item)
        assert store.item_vector(f"kafka:{item_id}") is not None


def smuggled(item_id: str, uri: str) -> Record:
    """An event whose uri slipped past the schema (a bug there, or an older stored dead letter)."""
    event = Event.model_construct(op="upsert", id=item_id, uri=uri, metadata={}, version=None)
    return Record("kafka", json.dumps({"op": "upsert", "id": item_id, "uri": uri}), event)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "data" / "clipdex.sqlite3") as s:
        yield s


# -- poison events between good ones ------------------------------------------------------------------------


async def test_the_poison_events_of_issue_9_are_dead_letters_and_the_good_events_around_them_are_stored(
    store: SqliteStore, tiny_embedder: Embedder, root: Path
) -> None:
    records: list[Record] = []
    expected: dict[str, str] = {}
    for i, (name, value) in enumerate(POISON.items()):
        event, sha = good_event(root, f"good-{i}", i)
        records += [kafka_record(2 * i, event), kafka_record(2 * i + 1, value, key=name.encode())]
        expected[f"good-{i}"] = sha
    pipeline = make_pipeline(store, tiny_embedder, root)
    try:
        report = await pipeline.write(records)
    finally:
        pipeline.close()
    assert (report.indexed, report.failed) == (len(POISON), len(POISON))
    assert_stored(store, expected)
    reasons = [d.reason for d in store.dead_letters()]
    assert len(reasons) == len(POISON) and all(r.startswith("InvalidEvent: ") for r in reasons), reasons


@pytest.fixture
def idna_policy(root: Path) -> FetchPolicy:
    """Paths under `root`, and URLs on the host `xn--`, which Python's idna codec passes and httpx's refuses."""
    return FetchPolicy(roots=(root.resolve(),), hosts=frozenset({"xn--"}), max_bytes=5_000_000)


async def test_an_unexpected_error_fetching_one_item_is_its_dead_letter(
    store: SqliteStore, tiny_embedder: Embedder, root: Path, idna_policy: FetchPolicy
) -> None:
    real = functools.partial(fetch_bytes, policy=idna_policy)

    def fetch(uri: str) -> bytes:
        if uri.endswith("boom.jpg"):
            raise RuntimeError("a bug in a fetcher")
        return real(uri)

    pipeline = make_pipeline(store, tiny_embedder, root, fetch=fetch)
    good = put(root, "good.jpg", jpeg(1))
    records = [
        record("good", good),
        smuggled("ipv6", "http://[::1/x.jpg"),  # urlsplit raises ValueError
        smuggled("nul", str(root / "a\x00b.jpg")),  # os.stat raises ValueError
        record("idna", "http://xn--/x.jpg"),  # httpx raises idna.IDNAError, a UnicodeError
        record("boom", put(root, "boom.jpg", jpeg(2))),
    ]
    try:
        report = await pipeline.write(records)
    finally:
        pipeline.close()
    assert (report.indexed, report.failed) == (1, 4)
    reasons = {d.item_id: d.reason for d in store.dead_letters()}
    assert set(reasons) == {"kafka:ipv6", "kafka:nul", "kafka:idna", "kafka:boom"}
    assert "RuntimeError: a bug in a fetcher" in reasons["kafka:boom"]
    assert_stored(store, {"good": sha256_of(jpeg(1))})


class PoisonedModel:
    """The tiny model, except that a 13-pixel-wide image preprocesses to a tensor of the wrong shape (so
    torch.stack fails for its whole sub-batch) and a 17-pixel-wide one makes the model itself raise."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.device = inner.device
        self.image_size = inner.image_size
        self.calls: list[int] = []

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if image.width == 13:
            return torch.zeros(3, 5, 5)
        tensor = self.inner.preprocess(image)
        return torch.full_like(tensor, float("nan")) if image.width == 17 else tensor

    def encode_images(self, batch: torch.Tensor) -> Any:
        self.calls.append(len(batch))
        if torch.isnan(batch).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.encode_images(batch)


async def test_an_item_the_model_fails_on_is_its_dead_letter_and_its_sub_batch_is_still_embedded(
    store: SqliteStore, tiny_embedder: Embedder, root: Path
) -> None:
    model = PoisonedModel(tiny_embedder)
    pipeline = make_pipeline(store, model, root, embed_batch=4)
    goods = {f"good-{i}": put(root, f"g{i}.jpg", jpeg(i)) for i in range(6)}
    records = [record(name, uri) for name, uri in goods.items()]
    records.insert(1, record("wrong-shape", put(root, "shape.jpg", jpeg(10, (13, 20)))))
    records.insert(5, record("model-fails", put(root, "nan.jpg", jpeg(11, (17, 20)))))
    try:
        report = await pipeline.write(records)
    finally:
        pipeline.close()
    assert (report.indexed, report.failed) == (6, 2)
    reasons = {d.item_id: d.reason for d in store.dead_letters()}
    assert set(reasons) == {"kafka:wrong-shape", "kafka:model-fails"}
    assert "illegal memory access" in reasons["kafka:model-fails"]
    assert_stored(store, {name: sha256_of(jpeg(i)) for i, name in enumerate(goods)})
    # [g0 shape g1 g2]: torch.stack fails before the model, so each alone; [g3 nan g4 g5]: the model fails
    assert model.calls == [1, 1, 1, 1, 4, 1, 1, 1, 1], "a failed sub-batch is retried one image at a time"


async def test_a_folder_file_whose_name_is_not_utf8_is_a_dead_letter(
    store: SqliteStore, tiny_embedder: Embedder, root: Path
) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes on a Linux disk: a lone surrogate in Python
    pipeline = make_pipeline(store, tiny_embedder, root)
    good = put(root, "good.jpg", jpeg(1))
    records = [
        upsert_record(Folder(root, "images"), name, FileStat(10, 1), 0.0),
        upsert_record(Folder(root, "images"), "good.jpg", FileStat(len(jpeg(1)), 1), 0.0),
    ]
    try:
        report = await pipeline.write(records)
    finally:
        pipeline.close()
    assert (report.indexed, report.failed) == (1, 1)
    (letter,) = store.dead_letters()
    assert "caf\\udce9.jpg" in letter.payload  # kept, escaped: SQLite stores UTF-8 only
    item = store.get_item("folder:images/good.jpg")
    assert item is not None and item.uri == good


# -- property-based: random records between good ones ---------------------------------------------------------

RANDOM_MESSAGES = st.one_of(
    st.binary(max_size=512),
    (JSON_VALUES | EVENTS | MALFORMED).map(lambda v: json.dumps(v).encode()),
    st.sampled_from(list(POISON.values())),
)


def test_random_messages_between_good_events_never_raise_and_the_good_events_are_stored(
    tmp_path: Path, tiny_embedder: Embedder
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    goods = [good_event(root, f"good-{i}", i) for i in range(4)]
    with SqliteStore(tmp_path / "data" / "clipdex.sqlite3") as store:
        pipeline = make_pipeline(store, tiny_embedder, root)

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(RANDOM_MESSAGES, max_size=8), st.randoms(use_true_random=False))
        def run(hostile: list[bytes], rng: random.Random) -> None:
            values = [value for value, _ in goods] + hostile
            rng.shuffle(values)
            records = [kafka_record(offset, value) for offset, value in enumerate(values)]
            for r in records:  # the good ids are ours alone: a random event may not overwrite them
                if r.event is not None and r.event.id.startswith("good-"):
                    return
            report: BatchReport = asyncio.run(pipeline.write(records))
            assert report.records == len(records)
            assert_stored(store, {f"good-{i}": sha for i, (_, sha) in enumerate(goods)})

        try:
            run()
        finally:
            pipeline.close()


def good_product_messages(
    root: Path, n: int
) -> tuple[list[tuple[bytes, tuple[tuple[str, bytes], ...]]], dict[str, str]]:
    """`n` Debezium-shaped, CloudEvent-shaped and flat product messages of two images each; their image ids."""
    messages: list[tuple[bytes, tuple[tuple[str, bytes], ...]]] = []
    expected: dict[str, str] = {}
    for i in range(n):
        sku = f"good-{i}"
        images = []
        for side in range(2):
            data = jpeg(10 * i + side)
            images.append(put(root, f"{sku}-{side}.jpg", data))
            expected[image_id(sku, images[-1])] = sha256_of(data)
        row = {"sku": sku, "images": json.dumps([{"url": u} for u in images]), "title": "t", "rev": i}
        messages.append((json.dumps({"op": "c", "after": row, "source": {"lsn": 5}}).encode(), ()))
        messages.append((json.dumps(row).encode(), CE_HEADERS))
        messages.append((json.dumps({"sku": sku, "images": [{"url": u} for u in images], "title": "t"}).encode(), ()))
    return messages, expected


CE_HEADERS = (("ce_specversion", b"1.0"), ("ce_id", b"e"), ("ce_source", b"/shop"), ("ce_type", b"product.updated"))
PRODUCT_FORMATS = {
    "debezium": event_format("debezium", json.dumps({"id": "/sku", "uris": "/images/*/url", "version": "/rev"})),
    "cloudevents": event_format("cloudevents", json.dumps({"id": "/sku", "uris": "/images/*/url"})),
    "clipdex": event_format(
        "clipdex", json.dumps({"id": "/sku", "uris": "/images/*/url", "op": {"pointer": "/op", "default": "upsert"}})
    ),
}
HOSTILE_ENVELOPES = st.one_of(
    st.binary(max_size=256),
    hostile_documents().map(lambda d: json.dumps({"op": "c", "after": d, "source": {"lsn": 1}}).encode()),
    hostile_documents().map(lambda d: json.dumps(d).encode()),
    st.sampled_from(list(POISON.values())),
    st.just(None),
)


@pytest.mark.parametrize("name", sorted(PRODUCT_FORMATS))
def test_random_messages_of_every_format_between_good_products_never_raise_and_the_good_images_are_stored(
    tmp_path: Path, tiny_embedder: Embedder, name: str
) -> None:
    fmt = PRODUCT_FORMATS[name]
    root = tmp_path / "images"
    root.mkdir()
    goods, expected = good_product_messages(root, 2)
    with SqliteStore(tmp_path / "data" / "clipdex.sqlite3") as store:
        pipeline = make_pipeline(store, tiny_embedder, root)

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(st.tuples(HOSTILE_ENVELOPES, st.sampled_from([(), CE_HEADERS])), max_size=6), st.randoms())
        def run(hostile: list[tuple[bytes | None, tuple[tuple[str, bytes], ...]]], rng: random.Random) -> None:
            messages = goods + hostile
            rng.shuffle(messages)
            records = to_records(
                [
                    Message("catalog", 0, offset, None, value, None, headers)
                    for offset, (value, headers) in enumerate(messages)
                ],
                fmt,
            )
            for r in records:  # the good products are ours alone: a random event may not change them
                if (
                    r.event is not None
                    and r.event.id.startswith("good-")
                    and r.raw not in {g.decode() for g, _ in goods}
                ):
                    return
            asyncio.run(pipeline.write(records))
            stored = {i.id.removeprefix("kafka:"): i.sha256 for i in store.items("kafka", "kafka:good-")}
            assert {k: v for k, v in stored.items() if k in expected} == expected
            for k in expected:
                assert store.item_vector(f"kafka:{k}") is not None

        try:
            run()
        finally:
            pipeline.close()
