"""Catalog events as catalogs publish them, on a real broker (tansu): Debezium change events of a `products`
table (with and without the JSON converter's schema), CloudEvents in both modes with their headers, a
product with several images, malformed and mismatched events as dead letters, and `clipdex consume`
killed with -9 over a Debezium stream: every effect exactly once.

The real source, pipeline (tiny CLIP), SQLite and FAISS; a reader with its own connection checks what a
search would return."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from indexer.formats import EventFormat, event_format
from indexer.products import image_id
from indexer.sources.kafka import SourceStats
from shared.config import Settings
from shared.embedder import Embedder
from shared.sqlite.store import SqliteStore
from tests.brokers import Outgoing, Position, committed_offsets, ends_of, publish, read_all
from tests.catalog_events import GALLERY_MAP, PRODUCTS_MAP, cloudevent, debezium, debezium_key, product_row
from tests.conftest import tiny_settings_for
from tests.integration.test_kafka_cli import Consumer, consumer_for, wait_for  # noqa: F401  (a fixture)
from tests.integration.test_kafka_consume import (
    live_vectors,
    running_source,
    searchable_ids,
    settings_for,
    write_image,
)

pytestmark = pytest.mark.integration

Phase = list[Outgoing]


async def consume_phases(
    settings: Settings,
    embedder: Embedder,
    fmt: EventFormat,
    bootstrap: str,
    topic: str,
    phases: list[Phase],
    after_each: Callable[[int], Any] = lambda n: None,
    timeout_s: float = 90,
) -> SourceStats:
    """Publish each phase once the previous one is committed (so it is durable before the next starts),
    with the real source and pipeline consuming throughout; `after_each(n)` checks the store after phase n."""
    published = 0
    async with running_source(settings, embedder, fmt) as (source, task), asyncio.timeout(timeout_s):
        for n, phase in enumerate(phases):
            await publish(bootstrap, topic, phase)
            published += len(phase)
            while sum(source.stats.committed.values()) < published:  # a fresh topic: offsets count messages
                if task.done():
                    await task
                await asyncio.sleep(0.05)
            result = after_each(n)
            if isinstance(result, Awaitable):
                await result
        source.request_stop()
        return await task


def vectors_ever(db: Path, item_id: str) -> list[tuple[int, int]]:
    """(vector id, tombstoned) of every vector an item ever had: one per embedding."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT vector_id, tombstoned FROM vectors WHERE item_id = ? ORDER BY vector_id", (item_id,)
        )
        return [(int(v), int(t)) for v, t in rows]


def letters(db: Path) -> dict[str, str]:
    """Dead letters: payload -> reason."""
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT payload, reason FROM dead_letters").fetchall())


# -- Debezium ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [False, True], ids=["plain-json", "with-schema"])
async def test_debezium_products_snapshot_title_update_image_change_delete_and_tombstone(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, tiny_embedder: Embedder, schema: bool
) -> None:
    images = tmp_path / "images"
    sha = {
        name: write_image(images / f"{name}.png", seed) for seed, name in enumerate(["a1", "a2", "a2-v2", "a3", "a4"])
    }
    rows = {
        i: product_row(i, f"A-{i}", title, str(images / f"a{i - 1000}.png"))
        for i, title in [(1001, "Red trail shoe"), (1002, "Blue rain jacket"), (1003, "Green mug"), (1004, "Tent")]
    }

    def change(op: str, row_id: int, lsn: int, before: Any = None, after: Any = None) -> Outgoing:
        return (debezium_key(row_id, schema=schema), debezium(op, before, after, lsn=lsn, schema=schema))

    snapshot: Phase = [change("r", i, 100, after=rows[i]) for i in (1001, 1002, 1003)]
    snapshot.append(change("c", 1004, 200, after=rows[1004]))
    retitled = {**rows[1001], "title": "Red trail running shoe"}
    new_image = {**rows[1002], "image_url": str(images / "a2-v2.png")}
    bad: dict[str, Outgoing] = {
        "not json": (b"x", b'{"op": "c", "after": {'),
        "truncate": (b"x", debezium("t", None, None, lsn=240, schema=schema)),
        "null sku": change("c", 9001, 241, after={**rows[1004], "id": 9001, "sku": None}),
        "numeric image": change("c", 9002, 242, after={**rows[1004], "id": 9002, "sku": "A-9002", "image_url": 42}),
        "missing file": change(
            "c", 9003, 243, after={**rows[1004], "id": 9003, "sku": "A-9003", "image_url": str(images / "nope.png")}
        ),
    }
    changes: Phase = [
        change("u", 1001, 210, before=rows[1001], after=retitled),  # the title only: no new embedding
        change("u", 1002, 220, before=rows[1002], after=new_image),  # a new image: a new vector
        change("d", 1003, 230, before=rows[1003]),
        (debezium_key(1003, schema=schema), None),  # its tombstone: skipped, not a dead letter
        change("u", 1004, 235, before=rows[1004], after={**rows[1004], "sku": "A-1004-B"}),  # the SKU renamed
        *bad.values(),
    ]
    settings = settings_for(tmp_path, kafka_bootstrap, kafka_topic)
    db = settings.db_path
    first: dict[str, list[tuple[int, int]]] = {}

    def after(phase: int) -> None:
        if phase == 0:
            first.update({f"kafka:A-{i}": vectors_ever(db, f"kafka:A-{i}") for i in (1001, 1002)})
            assert searchable_ids(settings, tiny_embedder) == {f"kafka:A-{i}" for i in (1001, 1002, 1003, 1004)}

    await consume_phases(
        settings, tiny_embedder, debezium_format(), kafka_bootstrap, kafka_topic, [snapshot, changes], after
    )

    live = {"kafka:A-1001", "kafka:A-1002", "kafka:A-1004-B"}  # the old SKU's item is gone
    assert searchable_ids(settings, tiny_embedder) == live and live_vectors(db) == dict.fromkeys(live, 1)
    assert vectors_ever(db, "kafka:A-1001") == first["kafka:A-1001"], "a title change made a new embedding"
    (old, new) = vectors_ever(db, "kafka:A-1002")
    assert old == (first["kafka:A-1002"][0][0], 1) and new[1] == 0, "a new image replaces the vector"
    with SqliteStore(db) as store:
        shoe, jacket = store.get_item("kafka:A-1001"), store.get_item("kafka:A-1002")
        assert store.get_item("kafka:A-1003") is None
    assert shoe is not None and shoe.metadata == {
        "title": "Red trail running shoe",
        "brand": "Acme",
        "price_cents": 4999,
    }
    assert shoe.version == 210  # the log position of the update
    assert jacket is not None and jacket.sha256 == sha["a2-v2"]
    reasons = letters(db)
    assert len(reasons) == len(bad), reasons  # the tombstone is not among them
    by_case = {name: reasons[raw.decode()] for name, (_, raw) in bad.items() if raw is not None}
    assert by_case["not json"].startswith("InvalidEvent: not JSON")
    assert "truncate (op t) is not applied" in by_case["truncate"]
    assert "the map's id (/sku): found null, not a string or an integer" in by_case["null sku"]
    assert "the map's uri (/image_url): found a number (42), not a string" in by_case["numeric image"]
    assert by_case["missing file"].startswith("SourceNotFound")


def debezium_format(mapping: dict[str, Any] = PRODUCTS_MAP) -> EventFormat:
    return event_format("debezium", json.dumps(mapping))


# -- CloudEvents ------------------------------------------------------------------------------------------------

CE_MAP = {
    "id": "/sku",
    "uri": "/image",
    "metadata": {"title": "/title"},
    "version": {"pointer": "/time", "from": "envelope"},
    "upsert_types": ["com.shop.product.created", "com.shop.product.updated"],
    "delete_types": ["com.shop.product.deleted"],
}


async def test_cloudevents_in_structured_and_binary_mode_with_their_headers(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, tiny_embedder: Embedder
) -> None:
    images = tmp_path / "images"
    for seed, name in enumerate(["b1", "b2", "b3"]):
        write_image(images / f"{name}.png", 10 + seed)

    def ce(event_type: str, data: Any, n: int, *, binary: bool, minute: int = 0) -> Outgoing:
        value, headers = cloudevent(
            event_type, data, event_id=f"evt-{n}", binary=binary, time=f"2024-05-01T10:{minute:02d}:00Z"
        )
        sku = data["sku"] if isinstance(data, dict) and "sku" in data else "x"
        return (sku.encode(), value, headers)

    def product(sku: str, name: str, title: str) -> dict[str, str]:
        return {"sku": sku, "image": str(images / f"{name}.png"), "title": title}

    good: Phase = [
        ce("com.shop.product.created", product("B-1", "b1", "Lamp"), 1, binary=False),
        ce("com.shop.product.created", product("B-2", "b2", "Chair"), 2, binary=True),
        ce("com.shop.product.created", product("B-3", "b3", "Desk"), 3, binary=True),
        ce("com.shop.product.updated", product("B-2", "b2", "Oak chair"), 4, binary=False, minute=1),
        ce("com.shop.product.deleted", {"sku": "B-1"}, 5, binary=True, minute=2),
        ce("com.shop.product.deleted", {"sku": "B-3"}, 6, binary=False, minute=2),
    ]
    wrong_type = ce("com.shop.order.created", product("B-9", "b1", "?"), 7, binary=True)
    old_spec = (
        b"B-8",
        json.dumps(product("B-8", "b1", "?")).encode(),
        [("ce_specversion", b"0.3"), ("ce_id", b"e"), ("ce_source", b"/s"), ("ce_type", b"com.shop.product.created")],
    )
    no_type_value, no_type_headers = cloudevent("x", product("B-7", "b1", "?"), event_id="evt-8")
    no_type = (
        b"B-7",
        json.dumps({k: v for k, v in json.loads(no_type_value or b"").items() if k != "type"}).encode(),
        no_type_headers,
    )
    xml = (
        b"B-6",
        b"<product/>",
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"e"),
            ("ce_source", b"/s"),
            ("ce_type", b"com.shop.product.created"),
            ("content-type", b"application/xml"),
        ],
    )
    settings = settings_for(tmp_path, kafka_bootstrap, kafka_topic, kafka_dlq_topic=f"{kafka_topic}.dlq")
    fmt = event_format("cloudevents", json.dumps(CE_MAP))

    await consume_phases(
        settings, tiny_embedder, fmt, kafka_bootstrap, kafka_topic, [[*good, wrong_type, old_spec, no_type, xml]]
    )

    assert searchable_ids(settings, tiny_embedder) == {"kafka:B-2"}
    with SqliteStore(settings.db_path) as store:
        chair = store.get_item("kafka:B-2")
    assert chair is not None and chair.metadata == {"title": "Oak chair"}
    assert chair.version == 1_714_557_660_000_000  # the event's time, because the map says so
    reasons = sorted(letters(settings.db_path).values())
    assert len(reasons) == 4
    assert any('type "com.shop.order.created" is in neither upsert_types nor delete_types' in r for r in reasons)
    assert any('specversion is a string ("0.3"), not "1.0"' in r for r in reasons)
    assert any("type is missing" in r for r in reasons)
    assert any('data is "application/xml", not JSON' in r for r in reasons)
    # On the dead-letter topic, a binary-mode event keeps its ce_* headers: it is still a CloudEvent.
    published = await read_all(kafka_bootstrap, f"{kafka_topic}.dlq", expected=4)
    wrong = next(r for r in published if r.key == b"B-9")  # type: ignore[attr-defined]
    headers = dict(wrong.headers)  # type: ignore[attr-defined]
    assert headers["ce_type"] == b"com.shop.order.created" and headers["ce_specversion"] == b"1.0"
    assert b"upsert_types" in headers["clipdex.reason"]


# -- a product with several images -------------------------------------------------------------------------------


async def test_a_product_with_three_images_then_two_then_deleted(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, tiny_embedder: Embedder
) -> None:
    images = tmp_path / "images"
    urls = {name: str(images / f"{name}.png") for name in ("front", "side", "back", "other-1", "other-2")}
    for seed, path in enumerate(urls.values()):
        write_image(Path(path), 20 + seed)
    three = [urls["front"], urls["side"], urls["back"]]
    shoe = product_row(2001, "C-2001", "Trail shoe", images=three)
    other = product_row(2002, "C-2002", "Sock", images=[urls["other-1"], urls["other-2"]])
    two = {**shoe, "title": "Trail shoe, red", "images": json.dumps([{"url": u} for u in three[:2]])}

    def change(op: str, row_id: int, lsn: int, before: Any = None, after: Any = None) -> Outgoing:
        return (debezium_key(row_id), debezium(op, before, after, lsn=lsn, schema=True))

    phases: list[Phase] = [
        [change("c", 2001, 300, after=shoe), change("c", 2002, 301, after=other)],
        [change("u", 2001, 310, before=shoe, after=two)],
        [change("d", 2001, 320, before=two), (debezium_key(2001), None)],
    ]
    settings = settings_for(tmp_path, kafka_bootstrap, kafka_topic)
    db = settings.db_path
    ids = {
        name: f"kafka:{image_id(sku, url)}"
        for sku, name, url in [("C-2001", n, urls[n]) for n in ("front", "side", "back")]
    }
    others = {f"kafka:{image_id('C-2002', urls[n])}" for n in ("other-1", "other-2")}
    seen: dict[str, list[tuple[int, int]]] = {}

    def after(phase: int) -> None:
        with SqliteStore(db) as store:
            items = {i.id: i for i in store.items("kafka")}
        if phase == 0:
            assert set(items) == set(ids.values()) | others
            assert {i.metadata["parent"] for i in items.values()} == {"C-2001", "C-2002"}
            assert items[ids["front"]].metadata == {"title": "Trail shoe", "brand": "Acme", "parent": "C-2001"}
            seen.update({i: vectors_ever(db, i) for i in ids.values()})
        elif phase == 1:
            assert set(items) == {ids["front"], ids["side"]} | others  # the back image is gone
            assert items[ids["front"]].metadata["title"] == "Trail shoe, red"
            for name in ("front", "side"):
                assert vectors_ever(db, ids[name]) == seen[ids[name]], "a kept image got a new embedding"
            assert vectors_ever(db, ids["back"]) == [(seen[ids["back"]][0][0], 1)]  # tombstoned
        else:
            assert set(items) == others  # every image of the deleted product, and only its images

    await consume_phases(
        settings, tiny_embedder, debezium_format(GALLERY_MAP), kafka_bootstrap, kafka_topic, phases, after
    )
    assert searchable_ids(settings, tiny_embedder) == others and letters(db) == {}


# -- kill -9 mid-stream ---------------------------------------------------------------------------------------------


@dataclass
class Catalog:
    """The products table as the test changes it, and what the store must hold at the end."""

    images: dict[int, list[str]]  # row id -> its pool of image paths
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    lsn: int = 1000
    messages: list[Outgoing] = field(default_factory=list)

    def emit(self, op: str, row_id: int, before: Any, after: Any) -> None:
        self.lsn += 10
        self.messages.append(
            (debezium_key(row_id), debezium(op, before, after, lsn=self.lsn, schema=self.lsn % 20 == 0))
        )

    def upsert(self, row_id: int, rng: random.Random, op: str) -> None:
        urls = rng.sample(self.images[row_id], rng.randint(0, 3))
        row = product_row(row_id, f"D-{row_id}", f"title {rng.randint(0, 9)}", images=urls)
        self.emit(op, row_id, self.rows.get(row_id), row)
        self.rows[row_id] = row

    def delete(self, row_id: int) -> None:
        self.emit("d", row_id, self.rows.pop(row_id), None)
        self.messages.append((debezium_key(row_id), None))

    def expected(self) -> dict[str, dict[str, Any]]:
        """Item id -> metadata of every image the store must hold."""
        out = {}
        for row in self.rows.values():
            for url in [i["url"] for i in json.loads(row["images"])]:
                out[f"kafka:{image_id(row['sku'], url)}"] = {
                    "title": row["title"],
                    "brand": "Acme",
                    "parent": row["sku"],
                }
        return out


def catalog_stream(images: Path, rng: random.Random) -> Catalog:
    pool = {}
    seed = 0
    for row_id in range(3000, 3030):
        pool[row_id] = []
        for _ in range(4):
            seed += 1
            path = images / f"{row_id}-{seed}.png"
            write_image(path, 500 + seed, size=32)
            pool[row_id].append(str(path))
    catalog = Catalog(pool)
    for row_id in pool:
        catalog.upsert(row_id, rng, "r")  # the snapshot
    for _ in range(150):
        row_id = rng.choice(list(pool))
        if row_id not in catalog.rows:
            catalog.upsert(row_id, rng, "c")
        elif rng.random() < 0.2:
            catalog.delete(row_id)
        else:
            catalog.upsert(row_id, rng, "u")
    return catalog


async def test_consume_killed_with_sigkill_over_a_debezium_stream_of_products_applies_every_change_exactly_once(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic: str,
    consumer_for: Callable[..., Consumer],  # noqa: F811
    tiny_embedder: Embedder,
) -> None:
    rng = random.Random(int(os.environ.get("CLIPDEX_TEST_SEED", "16")))
    catalog = catalog_stream(tmp_path / "images", rng)
    map_file = tmp_path / "products.map.json"
    map_file.write_text(json.dumps(GALLERY_MAP))
    consumer = consumer_for(
        kafka_bootstrap, kafka_topic, CLIPDEX_EVENT_FORMAT="debezium", CLIPDEX_EVENT_MAP=str(map_file)
    )
    # Two runs (a process start costs seconds): killed a few batches into the first, the rest in the second.
    chunks = [catalog.messages[:150], catalog.messages[150:]]
    db = tmp_path / "data" / "clipdex.sqlite3"
    positions: list[Position] = []
    group = f"{kafka_topic}-indexer"

    def batches() -> int:
        return consumer.text().count("batch source=kafka")

    for n, chunk in enumerate(chunks):
        positions += await publish(kafka_bootstrap, kafka_topic, chunk)
        proc = consumer.start()
        if n < len(chunks) - 1:
            target = batches() + rng.randint(1, 4)
            await wait_for(lambda: batches() >= target or proc.poll() is not None, 60, "a few batches")  # noqa: B023
            assert proc.poll() is None, consumer.text()[-3000:]
            await asyncio.sleep(rng.uniform(0, 0.03))
            proc.kill()  # SIGKILL: no flush, no commit
            proc.wait()
            continue
        ends = ends_of(positions)
        deadline = time.monotonic() + 90
        while await committed_offsets(kafka_bootstrap, kafka_topic, group) != ends:
            assert time.monotonic() < deadline, "the last run did not catch up"
            assert proc.poll() is None, consumer.text()[-3000:]
            await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0

    assert "debezium events" in consumer.text() and "Traceback" not in consumer.text()
    expected = catalog.expected()
    assert len(expected) > 20
    assert live_vectors(db) == dict.fromkeys(expected, 1)  # one live vector per image, none for gone ones
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, metadata, status FROM items").fetchall()
        (dead_letters,) = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
    assert {r[0]: json.loads(r[1]) for r in rows} == expected
    assert {r[2] for r in rows} == {"indexed"} and dead_letters == 0
    assert searchable_ids(tiny_settings_for(tmp_path / "data"), tiny_embedder) == set(expected)


async def test_dlq_retry_hands_a_debezium_products_dead_letter_to_the_running_consume_which_reads_it_again(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic: str,
    consumer_for: Callable[..., Consumer],  # noqa: F811
) -> None:
    """One image of a product is missing: its dead letter holds the Debezium change. Once the file is
    there, `clipdex dlq retry --all` hands the letter to the running `clipdex consume` (the Kafka writer),
    which reads it again as a Debezium change of the product: the missing image is indexed, the other two
    keep their vectors."""
    images = tmp_path / "images"
    paths = [images / f"g{i}.png" for i in range(3)]
    for seed, path in enumerate(paths[:2]):
        write_image(path, 60 + seed)
    uris = [str(p) for p in paths]
    ids = [f"kafka:{image_id('G-1', u)}" for u in uris]
    map_file = tmp_path / "gallery.map.json"
    map_file.write_text(json.dumps(GALLERY_MAP))
    consumer = consumer_for(
        kafka_bootstrap, kafka_topic, CLIPDEX_EVENT_FORMAT="debezium", CLIPDEX_EVENT_MAP=str(map_file)
    )
    proc = consumer.start()
    db = tmp_path / "data" / "clipdex.sqlite3"
    change = debezium("c", None, product_row(1, "G-1", "Gallery", images=uris), lsn=500)
    await publish(kafka_bootstrap, kafka_topic, [(debezium_key(1), change)])
    await wait_for(lambda: db.exists() and ids[2] in letters_by_item(db), 90, "the missing image's dead letter")
    assert set(live_vectors(db)) == set(ids[:2])
    before = vectors_ever(db, ids[0])

    write_image(paths[2], 62)
    retry = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "clipdex", "dlq", "retry", "--all"],
        env=consumer.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "retried within a few seconds by the indexer" in retry.stdout, retry.stdout
    await wait_for(lambda: not letters_by_item(db), 30, "the consumer to retry the letter")
    assert live_vectors(db) == dict.fromkeys(ids, 1)
    assert vectors_ever(db, ids[0]) == before  # the images it had were not embedded again
    assert "retried 1 dead letters: 1 indexed, 0 failed again" in consumer.text()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert "Traceback" not in consumer.text()


def letters_by_item(db: Path) -> dict[str | None, str]:
    """Dead letters: item id -> reason (an empty store, one being created: none)."""
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return dict(conn.execute("SELECT item_id, reason FROM dead_letters").fetchall())
    except sqlite3.OperationalError:
        return {}
