"""The pipeline against a real SQLite store in tmp_path and the tiny CLIP: resolve rules, dead letters, retries,
and a store failure that loses nothing."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import sqlite3
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.events import Event
from indexer.pipeline import Pipeline, PipelineOptions, embed_batch_for
from indexer.products import image_id, product
from indexer.records import Record
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import FetchFailed, SourceNotFound, StoreError
from shared.fetch import FetchPolicy, fetch_bytes
from shared.sqlite.store import SqliteStore
from shared.stores import open_writer

MAX_PIXELS = 10_000_000


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


def bomb_png(side: int = 5000) -> bytes:
    """A real decompression bomb: a few KB of PNG that decode to side*side pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + one bit per pixel
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def record(item_id: str, uri: str | None = None, *, op: str = "upsert", source: str = "kafka", **fields: Any) -> Record:
    event = Event.model_validate({"op": op, "id": item_id, "uri": uri, **fields})
    return Record(source, event.model_dump_json(exclude_none=True), event)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "data" / "clipdex.sqlite3") as s:
        yield s


def make_pipeline(store: SqliteStore, embedder: Any, root: Path, fetch: Any = None, **options: Any) -> Pipeline:
    policy = FetchPolicy(roots=(Path(os.path.realpath(root)),), hosts=frozenset(), max_bytes=5_000_000)
    opts = PipelineOptions(max_pixels=MAX_PIXELS, decode_workers=2, embed_batch=4, retry_backoff_s=0.01)
    opts = PipelineOptions(**{**opts.__dict__, **options})
    return Pipeline(store, embedder, fetch or functools.partial(fetch_bytes, policy=policy), opts)


@pytest.fixture
def pipeline(store: SqliteStore, tiny_embedder: Embedder, root: Path) -> Iterator[Pipeline]:
    p = make_pipeline(store, tiny_embedder, root)
    yield p
    p.close()


def put(root: Path, name: str, data: bytes) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_the_cpu_embeds_whole_micro_batches_and_a_gpu_overlaps_quarters() -> None:
    assert embed_batch_for(64, "cpu") == 64  # a CPU model is much slower in small batches
    assert embed_batch_for(256, "cuda") == 64  # the GPU encodes a quarter while the CPU decodes the next
    assert embed_batch_for(64, "cuda") == 32
    assert embed_batch_for(8, "cuda") == 8


# -- indexing and the resolve rules -------------------------------------------------------------------------


async def test_new_images_are_embedded_and_stored_in_one_batch(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    records = [record(f"sku-{i}", put(root, f"{i}.jpg", jpeg(i)), metadata={"n": i}) for i in range(6)]
    report = await pipeline.write(records)
    assert (report.records, report.indexed, report.failed) == (6, 6, 0)
    assert pipeline.images_embedded == 6
    item = store.get_item("kafka:sku-3")
    assert item is not None and item.status == "indexed" and item.metadata == {"n": 3}
    stored = store.item_vector("kafka:sku-3")
    assert stored is not None and np.isclose(np.linalg.norm(stored[1]), 1.0)


async def test_the_same_image_again_is_a_metadata_only_update(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    uri = put(root, "a.jpg", jpeg(1))
    await pipeline.write([record("a", uri, metadata={"v": 1})])
    before = store.item_vector("kafka:a")
    calls = pipeline.model_calls
    report = await pipeline.write([record("a", uri, metadata={"v": 2})])
    assert (report.unchanged, report.indexed) == (1, 0)
    assert pipeline.model_calls == calls
    item = store.get_item("kafka:a")
    assert item is not None and item.metadata == {"v": 2}
    after = store.item_vector("kafka:a")
    assert before is not None and after is not None and before[0] == after[0]  # the same vector, not a new one
    assert store.stats().vectors == 1


async def test_a_new_image_for_an_old_id_replaces_its_vector(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    await pipeline.write([record("a", put(root, "a.jpg", jpeg(1)))])
    await pipeline.write([record("a", put(root, "a2.jpg", jpeg(2)))])
    stats = store.stats()
    assert (stats.items, stats.vectors, stats.tombstones) == (1, 1, 1)


async def test_in_a_batch_the_last_event_for_an_id_wins(pipeline: Pipeline, store: SqliteStore, root: Path) -> None:
    first, last = put(root, "1.jpg", jpeg(1)), put(root, "2.jpg", jpeg(2))
    report = await pipeline.write([record("a", first), record("a", last), record("b", first), record("b", op="delete")])
    assert report.superseded == 2
    item = store.get_item("kafka:a")
    assert item is not None and item.uri == last
    assert store.get_item("kafka:b") is None
    assert pipeline.images_embedded == 1


async def test_an_event_older_than_the_stored_version_is_skipped(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    await pipeline.write([record("a", put(root, "new.jpg", jpeg(1)), version=5)])
    report = await pipeline.write(
        [record("a", put(root, "old.jpg", jpeg(2)), version=3), record("a", op="delete", version=4)]
    )
    assert report.skipped == 1 and report.deleted == 0
    item = store.get_item("kafka:a")
    assert item is not None and item.version == 5 and item.uri.endswith("new.jpg")
    # within one batch, too: a higher version wins over a later but older event
    await pipeline.write(
        [record("b", put(root, "b6.jpg", jpeg(6)), version=6), record("b", put(root, "b2.jpg", jpeg(7)), version=2)]
    )
    b = store.get_item("kafka:b")
    assert b is not None and b.version == 6


async def test_a_copy_or_rename_reuses_the_stored_vector(pipeline: Pipeline, store: SqliteStore, root: Path) -> None:
    data = jpeg(1)
    await pipeline.write([record("a", put(root, "a.jpg", data))])
    calls = pipeline.model_calls
    report = await pipeline.write([record("b", put(root, "b.jpg", data)), record("a", op="delete")])
    assert (report.reused, report.indexed, report.deleted) == (1, 0, 1)
    assert pipeline.model_calls == calls
    b = store.item_vector("kafka:b")
    assert b is not None and store.get_item("kafka:a") is None
    assert store.stats().vectors == 1


async def test_the_same_new_content_twice_in_a_batch_is_embedded_once(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    data = jpeg(9)
    report = await pipeline.write([record("a", put(root, "a.jpg", data)), record("b", put(root, "b.jpg", data))])
    assert report.indexed == 2 and pipeline.images_embedded == 1
    a, b = store.item_vector("kafka:a"), store.item_vector("kafka:b")
    assert a is not None and b is not None and np.array_equal(a[1], b[1])


async def test_an_empty_batch_writes_nothing(pipeline: Pipeline, store: SqliteStore) -> None:
    report = await pipeline.write([])
    assert report.records == 0 and store.index_meta().seq == 0


# -- dead letters -------------------------------------------------------------------------------------------------


async def test_bad_items_become_dead_letters_and_the_good_ones_are_indexed(
    pipeline: Pipeline, store: SqliteStore, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(jpeg(99))
    (root / "escape.jpg").symlink_to(secret)
    good = jpeg(1)
    bad = {
        "notes": (put(root, "notes.txt", b"shopping list: eggs"), "not an image"),
        "truncated": (put(root, "truncated.jpg", good[: len(good) // 2]), "truncated|corrupt"),
        "text-jpg": (put(root, "text.jpg", b"hello, I am not a picture"), "not an image"),
        "bomb": (put(root, "bomb.png", bomb_png()), "over the limit|too large"),
        "traversal": (str(root / ".." / "outside" / "secret.jpg"), "outside the allowed roots"),
        "relative-traversal": ("../outside/secret.jpg", "outside the allowed roots"),
        "absolute": (str(secret), "outside the allowed roots"),
        "symlink": (str(root / "escape.jpg"), "outside the allowed roots"),
        "missing": (str(root / "nope.jpg"), "no such file"),
    }
    records = [record("good-1", put(root, "g1.jpg", good))]
    records += [record(name, uri) for name, (uri, _) in bad.items()]
    records += [record("good-2", put(root, "sub/g2.png", _png(2))), Record("kafka", "{oops", None, "not JSON")]
    report = await pipeline.write(records)

    assert (report.indexed, report.failed) == (2, len(bad) + 1)
    reasons = {f.name: f.reason for f in report.failures}
    for name, (_, why) in bad.items():
        assert reasons[f"kafka:{name}"]
        assert any(w in reasons[f"kafka:{name}"] for w in why.split("|")), reasons[f"kafka:{name}"]
    assert "not JSON" in reasons["{oops"]
    letters = {d.item_id or d.payload: d for d in store.dead_letters()}
    assert set(letters) == {f"kafka:{n}" for n in bad} | {"{oops"}
    assert json.loads(letters["kafka:bomb"].payload)["uri"].endswith("bomb.png")  # the raw event, for a retry
    for name in ("good-1", "good-2"):
        item = store.get_item(f"kafka:{name}")
        assert item is not None and item.status == "indexed"
    failed = store.get_item("kafka:truncated")
    assert failed is not None and failed.status == "failed" and failed.reason


async def test_a_failed_update_keeps_the_older_good_vector(pipeline: Pipeline, store: SqliteStore, root: Path) -> None:
    await pipeline.write([record("a", put(root, "a.jpg", jpeg(1)))])
    report = await pipeline.write([record("a", put(root, "broken.jpg", b"garbage"))])
    assert report.failed == 1
    assert store.item_vector("kafka:a") is not None
    assert store.stats().dead_letters == 1


async def test_transient_fetch_failures_are_retried_then_dead_lettered(
    store: SqliteStore, tiny_embedder: Embedder, root: Path
) -> None:
    data = jpeg(3)
    calls: dict[str, int] = {}

    def flaky(uri: str) -> bytes:
        calls[uri] = calls.get(uri, 0) + 1
        if uri == "http://img/flaky" and calls[uri] <= 2:
            raise FetchFailed(f"{uri}: HTTP 503")
        if uri == "http://img/down":
            raise FetchFailed(f"{uri}: timed out")
        if uri == "http://img/gone":
            raise SourceNotFound(f"{uri}: HTTP 404")
        return data

    p = make_pipeline(store, tiny_embedder, root, fetch=flaky, fetch_retries=3)
    try:
        report = await p.write(
            [record("flaky", "http://img/flaky"), record("down", "http://img/down"), record("gone", "http://img/gone")]
        )
    finally:
        p.close()
    assert report.indexed == 1 and report.failed == 2
    assert calls == {"http://img/flaky": 3, "http://img/down": 4, "http://img/gone": 1}  # permanent: no retry
    tries = {d.item_id: d.tries for d in store.dead_letters()}
    assert tries == {"kafka:down": 4, "kafka:gone": 1}


# -- the store fails: nothing is half-written, and the replay succeeds -----------------------------------------


async def test_with_several_events_for_one_id_the_failure_names_the_last_one(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    records = [record("same", str(root / f"missing-{i}.jpg")) for i in range(3)]
    records = [Record(r.source, r.raw, r.event, position=(0, i)) for i, r in enumerate(records)]
    report = await pipeline.write(records)
    assert [(f.name, f.record.position) for f in report.failures] == [("kafka:same", (0, 2))]
    assert "missing-2.jpg" in report.failures[0].reason
    (letter,) = store.dead_letters()
    assert json.loads(letter.payload)["uri"].endswith("missing-2.jpg")


async def test_a_store_failure_raises_and_writes_nothing(pipeline: Pipeline, store: SqliteStore, root: Path) -> None:
    records = [record(f"s{i}", put(root, f"{i}.jpg", jpeg(i))) for i in range(3)] + [record("bad", str(root / "x.jpg"))]
    with sqlite3.connect(store.path) as db:  # the disk "fills up" after the vectors are written
        db.execute(
            "CREATE TRIGGER full BEFORE INSERT ON items BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    with pytest.raises(StoreError, match="disk is full"):
        await pipeline.write(records)
    stats = store.stats()
    assert (stats.items, stats.vectors, stats.dead_letters, stats.changes) == (0, 0, 0, 0)

    with sqlite3.connect(store.path) as db:
        db.execute("DROP TRIGGER full")
    report = await pipeline.write(records)  # the source replays the batch it did not commit
    assert (report.indexed, report.failed) == (3, 1)
    assert store.stats().vectors == 3


# -- the model runs off the event loop, overlapped with decoding -------------------------------------------------


class SlowModel:
    """The tiny model, taking `delay` seconds per call, like a big one."""

    def __init__(self, inner: Embedder, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.device = inner.device
        self.image_size = inner.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.inner.preprocess(image)

    def encode_images(self, batch: torch.Tensor) -> Any:
        time.sleep(self.delay)
        return self.inner.encode_images(batch)


async def test_the_event_loop_keeps_running_while_the_model_works(
    store: SqliteStore, tiny_embedder: Embedder, root: Path
) -> None:
    p = make_pipeline(store, SlowModel(tiny_embedder, 0.3), root, embed_batch=8)
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    ticker = asyncio.create_task(heartbeat())
    try:
        started = time.monotonic()
        await p.write([record(f"x{i}", put(root, f"{i}.jpg", jpeg(i))) for i in range(8)])
        assert time.monotonic() - started >= 0.3
    finally:
        done.set()
        await ticker
        p.close()
    assert max(gaps) < 0.2  # a model call on the loop would stall it for 0.3 s


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed))).save(out, format="PNG")
    return out.getvalue()


# -- products with several images -----------------------------------------------------------------------------


def product_record(pid: str, uris: list[str], *, op: str = "upsert", version: int | None = None, **meta: Any) -> Record:
    return Record("kafka", f"product {pid} v{version}", product(op, pid, uris, meta, version))  # type: ignore[arg-type]


def images_of(store: SqliteStore, pid: str) -> dict[str, Any]:
    """The product's stored images: item id -> (uri, metadata, version)."""
    return {i.id: (i.uri, i.metadata, i.version) for i in store.items("kafka", f"kafka:{pid}#")}


async def test_a_product_with_three_images_then_two_then_deleted(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    uris = [put(root, f"p{i}.jpg", jpeg(i)) for i in range(3)]
    report = await pipeline.write([product_record("p", uris, version=1, title="Shoe")])
    assert (report.indexed, report.deleted) == (3, 0)
    stored = images_of(store, "p")
    assert stored == {f"kafka:{image_id('p', u)}": (u, {"title": "Shoe", "parent": "p"}, 1) for u in uris}
    vector_of_first = store.item_vector(f"kafka:{image_id('p', uris[0])}")

    calls = pipeline.model_calls
    report = await pipeline.write([product_record("p", uris[:2], version=2, title="Trail shoe")])
    assert (report.unchanged, report.indexed, report.deleted) == (2, 0, 1)
    assert pipeline.model_calls == calls, "a title change is no new embedding"
    assert images_of(store, "p") == {
        f"kafka:{image_id('p', u)}": (u, {"title": "Trail shoe", "parent": "p"}, 2) for u in uris[:2]
    }
    first_now = store.item_vector(f"kafka:{image_id('p', uris[0])}")
    assert first_now is not None and vector_of_first is not None and first_now[0] == vector_of_first[0]

    replay = await pipeline.write([product_record("p", uris, version=1, title="Shoe")])  # the first event again
    assert (replay.skipped, replay.indexed, replay.deleted) == (1, 0, 0)
    assert len(images_of(store, "p")) == 2

    report = await pipeline.write([product_record("p", [], op="delete", version=3)])
    assert report.deleted == 2 and images_of(store, "p") == {}
    assert store.stats().vectors == 0


async def test_a_refused_image_is_its_own_dead_letter_and_the_others_are_indexed(
    pipeline: Pipeline, store: SqliteStore, root: Path
) -> None:
    good = put(root, "good.jpg", jpeg(1))
    missing = str(root / "missing.jpg")
    report = await pipeline.write([product_record("p", [good, "http://[::1/x.jpg", missing], version=1)])
    assert (report.indexed, report.failed) == (1, 2)
    letters = {d.item_id: d.reason for d in store.dead_letters()}
    assert set(letters) == {f"kafka:{image_id('p', 'http://[::1/x.jpg')}", f"kafka:{image_id('p', missing)}"}
    assert all(d.payload == "product p v1" for d in store.dead_letters())
    item = store.get_item(f"kafka:{image_id('p', missing)}")
    assert item is not None and item.status == "failed" and item.uri == missing

    # Once the product no longer names them, the failed images go too.
    report = await pipeline.write([product_record("p", [good], version=2)])
    assert report.deleted == 2 and set(images_of(store, "p")) == {f"kafka:{image_id('p', good)}"}


async def test_two_products_sharing_an_image_embed_it_once(pipeline: Pipeline, store: SqliteStore, root: Path) -> None:
    shared_uri = put(root, "shared.jpg", jpeg(5))
    report = await pipeline.write([product_record("p", [shared_uri]), product_record("q", [shared_uri])])
    assert report.indexed == 2 and pipeline.images_embedded == 1
    assert {i.metadata["parent"] for i in store.items("kafka")} == {"p", "q"}


async def test_a_product_of_three_images_then_two_then_deleted_on_every_backend(
    store_settings: Settings, tiny_embedder: Embedder, root: Path
) -> None:
    uris = [put(root, f"p{i}.jpg", jpeg(i)) for i in range(3)]
    with open_writer(store_settings, tiny_embedder.identity) as side:
        pipeline = make_pipeline(side.writer, tiny_embedder, root)  # type: ignore[arg-type]
        try:
            await pipeline.write([product_record("p", uris, version=1, title="Shoe")])
            assert {i.id for i in side.catalog.items("kafka")} == {f"kafka:{image_id('p', u)}" for u in uris}
            report = await pipeline.write([product_record("p", uris[:2], version=2, title="Trail shoe")])
            assert (report.unchanged, report.indexed, report.deleted) == (2, 0, 1)
            items = side.catalog.items("kafka")
            assert {i.id for i in items} == {f"kafka:{image_id('p', u)}" for u in uris[:2]}
            assert {i.metadata["title"] for i in items} == {"Trail shoe"} and {i.version for i in items} == {2}
            stale = await pipeline.write([product_record("p", uris, version=1, title="Shoe")])
            assert stale.skipped == 1 and len(side.catalog.items("kafka")) == 2
            await pipeline.write([product_record("p", [], op="delete", version=3)])
            assert side.catalog.items("kafka") == []
        finally:
            pipeline.close()
