"""Redelivery against a real SQLite store and the tiny CLIP: a transient failure becomes a dead letter that
the running indexer tries again, a bounded number of times with growing waits, and that a later event of
the same item cancels; a permanent failure is never retried on its own."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from indexer import service
from indexer.formats import event_format
from indexer.pipeline import Pipeline
from indexer.products import image_id
from indexer.records import Record, Redelivery
from indexer.redeliver import MAX_DELAY_S, Redeliverer, RetryPolicy, retry_records
from indexer.sources.kafka import Message, to_records
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import FetchFailed, SourceNotFound, WriterBusy
from shared.roles import DeadLetter, Failure, Upsert
from shared.sqlite.store import SqliteStore
from shared.stores import open_writer
from tests.catalog_events import GALLERY_MAP, debezium, debezium_key, product_row
from tests.conftest import tiny_settings_for
from tests.unit.indexer.test_pipeline import jpeg, make_pipeline, record

REPO = Path(__file__).resolve().parents[3]


def test_waits_double_up_to_a_cap_and_end_after_the_allowed_retries() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    policy = RetryPolicy(retries=3, first_delay_s=60)
    waits = [policy.next_retry(attempt, now) for attempt in (1, 2, 3, 4)]
    assert [(w - now).total_seconds() if w else None for w in waits] == [60, 120, 240, None]
    assert RetryPolicy(retries=0).next_retry(1, now) is None  # turned off
    far = RetryPolicy(retries=50, first_delay_s=60).next_retry(40, now)
    assert far is not None and (far - now).total_seconds() == MAX_DELAY_S


class Flaky:
    """A fetcher whose uris fail as scripted: `down` uris fail transiently until `up()`, `gone` ones for good."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.gone: set[str] = set()
        self.calls: dict[str, int] = {}

    def __call__(self, uri: str) -> bytes:
        self.calls[uri] = self.calls.get(uri, 0) + 1
        if uri in self.down:
            raise FetchFailed(f"{uri}: HTTP 503")
        if uri in self.gone:
            raise SourceNotFound(f"{uri}: HTTP 404")
        return jpeg(int(uri.rsplit("/", 1)[-1]))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "clipdex.sqlite3") as s:
        yield s


@pytest.fixture
def flaky() -> Flaky:
    return Flaky()


@pytest.fixture
def pipeline(store: SqliteStore, tiny_embedder: Embedder, tmp_path: Path, flaky: Flaky) -> Iterator[Pipeline]:
    p = make_pipeline(
        store, tiny_embedder, tmp_path, fetch=flaky, fetch_retries=0, redelivery=RetryPolicy(3, first_delay_s=60)
    )
    yield p
    p.close()


def due_now(store: SqliteStore) -> None:
    """Skip the wait: make every scheduled letter due (what time passing would do)."""
    with store.write() as db:  # the test reaches in: no role has a clock to turn
        db.execute("UPDATE dead_letters SET retry_at = ? WHERE retry_at IS NOT NULL", (time.time() - 1,))


async def test_a_transient_failure_is_a_dead_letter_retried_later_and_a_permanent_one_is_not(
    pipeline: Pipeline, store: SqliteStore, flaky: Flaky
) -> None:
    flaky.down.add("http://cdn/1")
    flaky.gone.add("http://cdn/2")
    before = datetime.now(UTC)
    await pipeline.write([record("slow", "http://cdn/1"), record("missing", "http://cdn/2")])
    letters = {d.item_id: d for d in store.dead_letters()}
    slow, missing = letters["kafka:slow"], letters["kafka:missing"]
    assert (slow.retriable, slow.attempts) == (True, 1) and slow.retry_at is not None
    assert 59 <= (slow.retry_at - before).total_seconds() <= 62
    assert (missing.retriable, missing.retry_at) == (False, None)
    assert store.stats().retrying == 1

    redeliverer = Redeliverer(store, pipeline, ["kafka:"])
    assert await redeliverer.redeliver_due() is None  # not due yet
    flaky.down.clear()  # the CDN is back
    due_now(store)
    report = await redeliverer.redeliver_due()
    assert report is not None and (report.records, report.indexed, report.failed) == (1, 1, 0)
    item = store.get_item("kafka:slow")
    assert item is not None and item.status == "indexed" and item.reason is None and not item.retriable
    assert [d.item_id for d in store.dead_letters()] == ["kafka:missing"]  # the retried letter is gone
    assert flaky.calls["http://cdn/2"] == 1  # the permanent failure was never tried again


async def test_retries_are_bounded_and_each_waits_longer(pipeline: Pipeline, store: SqliteStore, flaky: Flaky) -> None:
    flaky.down.add("http://cdn/3")
    await pipeline.write([record("down", "http://cdn/3")])
    redeliverer = Redeliverer(store, pipeline, ["kafka:"])
    waits = []
    for attempt in (2, 3, 4):
        due_now(store)
        started = datetime.now(UTC)
        assert await redeliverer.redeliver_due() is not None
        (letter,) = store.dead_letters()
        assert letter.attempts == attempt
        waits.append(None if letter.retry_at is None else round((letter.retry_at - started).total_seconds()))
    assert waits == [120, 240, None]  # 3 retries allowed: the 4th delivery's failure is the last
    due_now(store)
    assert await redeliverer.redeliver_due() is None
    assert flaky.calls["http://cdn/3"] == 4
    (letter,) = store.dead_letters()
    assert letter.retriable and letter.retry_at is None


async def test_a_later_event_of_the_item_is_never_undone_by_a_retry(
    pipeline: Pipeline, store: SqliteStore, flaky: Flaky
) -> None:
    """An upsert failed transiently, then the catalog deleted the item (or sent a newer image): the
    waiting retry must not bring the old one back."""
    flaky.down.update({"http://cdn/4", "http://cdn/5"})
    await pipeline.write([record("deleted", "http://cdn/4"), record("replaced", "http://cdn/5")])
    await pipeline.write([record("deleted", op="delete"), record("replaced", "http://cdn/6")])
    flaky.down.clear()
    due_now(store)
    assert await Redeliverer(store, pipeline, ["kafka:"]).redeliver_due() is None
    assert store.get_item("kafka:deleted") is None
    replaced = store.get_item("kafka:replaced")
    assert replaced is not None and replaced.uri == "http://cdn/6"
    assert flaky.calls.get("http://cdn/4") == 1 and flaky.calls.get("http://cdn/5") == 1


async def test_each_indexer_retries_its_own_items_only(pipeline: Pipeline, store: SqliteStore, flaky: Flaky) -> None:
    flaky.down.add("http://cdn/7")
    await pipeline.write([record("k", "http://cdn/7"), record("images/f.jpg", "http://cdn/7", source="folder")])
    flaky.down.clear()
    due_now(store)
    report = await Redeliverer(store, pipeline, ["folder:images/"]).redeliver_due()
    assert report is not None and report.records == 1
    assert [d.item_id for d in store.dead_letters()] == ["kafka:k"]


async def test_the_running_loop_picks_up_letters_as_they_fall_due(
    store: SqliteStore, tiny_embedder: Embedder, tmp_path: Path, flaky: Flaky
) -> None:
    fast = RetryPolicy(retries=3, first_delay_s=0.2)
    pipeline = make_pipeline(store, tiny_embedder, tmp_path, fetch=flaky, fetch_retries=0, redelivery=fast)
    try:
        flaky.down.add("http://cdn/8")
        async with Redeliverer(store, pipeline, ["kafka:"], check_s=0.05).running() as redeliverer:
            await pipeline.write([record("later", "http://cdn/8")])
            flaky.down.clear()
            await until(lambda: (item := store.get_item("kafka:later")) is not None and item.reason is None)
        assert redeliverer.recovered == 1 and store.dead_letters() == []
    finally:
        pipeline.close()


async def test_the_model_failing_on_one_image_is_a_transient_failure(
    store: SqliteStore, tiny_embedder: Embedder, tmp_path: Path, flaky: Flaky, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that runs out of memory once must not lose the image for good."""
    broken = {"on": True}
    real = tiny_embedder.encode_images

    def encode(batch: Any) -> Any:
        if broken["on"]:
            raise RuntimeError("CUDA out of memory")
        return real(batch)

    monkeypatch.setattr(tiny_embedder, "encode_images", encode)
    pipeline = make_pipeline(store, tiny_embedder, tmp_path, fetch=flaky)
    try:
        await pipeline.write([record("img", "http://cdn/9")])
        (letter,) = store.dead_letters()
        assert letter.retriable and letter.retry_at is not None and "EmbedFailed" in letter.reason
        broken["on"] = False
        due_now(store)
        await Redeliverer(store, pipeline, ["kafka:"]).redeliver_due()
        assert store.item_vector("kafka:img") is not None and store.dead_letters() == []
    finally:
        pipeline.close()


def test_a_letter_is_retried_under_the_item_id_it_was_recorded_with() -> None:
    """A rename (folder ids from before folder names) moves a letter to the new id; its payload still
    names the old one."""
    payload = json.dumps({"op": "upsert", "id": "a.jpg", "uri": "/photos/a.jpg", "metadata": {"path": "a.jpg"}})
    letter = DeadLetter(
        7, "folder", "folder:photos/a.jpg", payload, "FetchFailed: EIO", 1, datetime.now(UTC), attempts=2
    )
    (again,) = retry_records(letter)
    assert again.event is not None and again.event.id == "photos/a.jpg"
    assert again.position == Redelivery(7, 3)
    (junk,) = retry_records(DeadLetter(8, "kafka", None, "{not json", "InvalidEvent", 1, datetime.now(UTC)))
    assert junk.event is None and junk.position == Redelivery(8, 2)


async def test_a_metadata_update_of_an_item_changed_by_another_writer_meanwhile_is_embedded_again(
    store: SqliteStore, tiny_embedder: Embedder, tmp_path: Path, flaky: Flaky
) -> None:
    """The resolver read the item, another writer replaced its image, then this batch writes: the batch
    is not stopped (it was a StoreError); the record is read again and written whole."""
    pipeline = make_pipeline(store, tiny_embedder, tmp_path, fetch=flaky)
    try:
        await pipeline.write([record("a", "http://cdn/10", metadata={"v": 1})])
        real_states = store.states

        def states_then_another_writer(ids: Any) -> Any:
            seen = real_states(ids)
            with SqliteStore(store.path) as other:  # writes between this batch's read and its write
                vector = tiny_embedder.encode_images(pipeline._decode(jpeg(11)).unsqueeze(0))[0]
                other.apply(upserts=[Upsert("kafka:a", "kafka", "http://cdn/11", "sha-11", {"v": 0}, vector)])
            store.states = real_states  # type: ignore[method-assign]
            return seen

        store.states = states_then_another_writer  # type: ignore[method-assign]
        report = await pipeline.write([record("a", "http://cdn/10", metadata={"v": 2})])
        assert report.failed == 0 and report.conflicted == []
        item = store.get_item("kafka:a")
        assert item is not None and item.metadata == {"v": 2} and item.sha256 != "sha-11"
        assert item.uri == "http://cdn/10"
    finally:
        pipeline.close()


async def until(check: Callable[[], object], within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


KAFKA_HOLDER = """
    import sys, time
    from shared import lockfile
    from pathlib import Path
    with lockfile.hold(Path(sys.argv[1]), what="Kafka events", command="clipdex consume"):
        print("holding", flush=True)
        time.sleep(120)
"""


@pytest.fixture
def kafka_holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store's Kafka writer lock, as a running `clipdex consume` does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KAFKA_HOLDER), str(tmp_path / "data" / "writer-kafka.lock")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    yield holder
    holder.kill()
    holder.wait(timeout=10)
    holder.stdout.close()


class Borrowed:
    """The session's model, lent to code that closes what it loads."""

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)

    def close(self) -> None:
        pass


async def test_dlq_retry_beside_a_running_consumer_retries_invalid_events_but_not_its_items(
    tmp_path: Path, tiny_embedder: Embedder, kafka_holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid event's letter writes no item, so it needs no lock; a Kafka item's letter belongs to the
    running consumer (which `clipdex dlq retry` hands it to) and is refused here."""
    monkeypatch.setattr(Embedder, "from_settings", classmethod(lambda cls, settings: Borrowed(tiny_embedder)))
    settings = tiny_settings_for(tmp_path / "data", fetch_retries=0)
    with SqliteStore(settings.db_path) as s:
        s.bind_model(tiny_embedder.identity)
        s.apply(
            failures=[
                Failure("kafka", "{not json", "InvalidEvent: not JSON"),
                Failure("kafka", json.dumps({"op": "delete", "id": "x"}), "FetchFailed", id="kafka:x", retriable=True),
            ]
        )
        junk, item = sorted(s.dead_letters(), key=lambda d: d.item_id is not None)
    with pytest.raises(WriterBusy, match=f"already indexing Kafka events .*pid {kafka_holder.pid}"):
        await service.retry(settings, [item])
    report = await service.retry(settings, [junk])
    assert report.failed == 1  # still not JSON: a new letter replaces the old one


# -- products with several images, on every backend ---------------------------------------------------------------


def gallery_change(sku: str, uris: list[str], lsn: int, *, offset: int = 0) -> list[Record]:
    """A Debezium change of a product with these images, as the consumer reads it (GALLERY_MAP)."""
    value = debezium("c", None, product_row(1, sku, "Shoe", images=uris), lsn=lsn)
    return to_records([Message("shop.public.products", 0, offset, debezium_key(1), value)], GALLERY)


GALLERY = event_format("debezium", json.dumps(GALLERY_MAP))


async def test_a_products_image_that_failed_transiently_is_retried_as_its_debezium_change_on_every_backend(
    store_settings: Settings, tiny_embedder: Embedder, tmp_path: Path, flaky: Flaky
) -> None:
    """The letter of one image holds the whole change: the redeliverer reads it in the consumer's format,
    the product's other images are unchanged (no model call), the failed one is indexed, the letter goes.
    A later change of the product ends the retries; a letter retried after it changes nothing."""
    uris = [f"http://cdn/{i}" for i in (21, 22, 23)]
    ids = [f"kafka:{image_id('A-1', u)}" for u in uris]
    flaky.down.add(uris[2])
    with open_writer(store_settings, tiny_embedder.identity) as side:
        pipeline = make_pipeline(
            side.writer, tiny_embedder, tmp_path, fetch=flaky, fetch_retries=0, redelivery=RetryPolicy(3, 60)
        )
        catalog = side.catalog
        redeliverer = Redeliverer(catalog, pipeline, ["kafka:"], event_format=GALLERY, batch=8)
        try:
            report = await pipeline.write(gallery_change("A-1", uris, lsn=100))
            assert (report.indexed, report.failed) == (2, 1)
            (letter,) = catalog.dead_letters()
            assert (letter.item_id, letter.retriable, letter.attempts) == (ids[2], True, 1)
            assert letter.retry_at is not None and json.loads(letter.payload)["op"] == "c"

            flaky.down.clear()  # the CDN is back
            catalog.schedule_dead_letters([letter.id], datetime.now(UTC))  # what time passing does
            embedded = pipeline.images_embedded
            report = await redeliverer.redeliver_due()
            assert report is not None and (report.records, report.indexed, report.unchanged) == (1, 1, 2)
            assert report.failed == 0 and pipeline.images_embedded == embedded + 1
            assert catalog.dead_letters() == []
            items = {i.id: (i.status, i.version) for i in catalog.items("kafka")}
            assert items == dict.fromkeys(ids, ("indexed", 100))

            flaky.down.add(uris[2])  # fails again on an update...
            await pipeline.write(gallery_change("A-1", uris, lsn=110, offset=1))
            (stale,) = catalog.dead_letters()
            assert stale.retry_at is not None
            await pipeline.write(gallery_change("A-1", uris[:2], lsn=120, offset=2))  # ...that a later one drops
            (stale,) = catalog.dead_letters()
            assert stale.retry_at is None  # the later change ended its retries
            assert catalog.due_dead_letters("kafka:", datetime.now(UTC) + timedelta(days=1)) == []
            flaky.down.clear()
            catalog.schedule_dead_letters([stale.id], datetime.now(UTC))  # `clipdex dlq retry` all the same
            report = await redeliverer.redeliver_due()
            assert report is not None and report.skipped == 1  # the change at 110 is older than the one at 120
            assert catalog.dead_letters() == []
            assert {i.id: i.version for i in catalog.items("kafka")} == dict.fromkeys(ids[:2], 120)
        finally:
            pipeline.close()


async def test_a_products_image_changed_by_another_writer_meanwhile_is_written_again_on_every_backend(
    store_settings: Settings, tiny_embedder: Embedder, tmp_path: Path, flaky: Flaky
) -> None:
    """Versions in the write: the resolver read the product's images, another writer replaced one of them,
    then this batch writes a metadata-only update of it: a conflict, so the product is read again and that
    image embedded again; nothing is stopped, nothing is a dead letter."""
    uris = [f"http://cdn/{i}" for i in (31, 32)]
    ids = [f"kafka:{image_id('B-1', u)}" for u in uris]
    with open_writer(store_settings, tiny_embedder.identity) as side:
        pipeline = make_pipeline(side.writer, tiny_embedder, tmp_path, fetch=flaky, fetch_retries=0)
        writer = side.writer
        try:
            await pipeline.write(gallery_change("B-1", uris, lsn=200))
            real = writer.product_images
            interleaved: list[str] = []

            def read_then_another_writer(products: Any) -> Any:
                seen = real(products)
                interleaved.extend(products)
                vector = tiny_embedder.encode_images(pipeline._decode(jpeg(39)).unsqueeze(0))[0]
                writer.apply(upserts=[Upsert(ids[0], "kafka", "http://cdn/39", "sha-39", {}, vector)])
                writer.product_images = real  # type: ignore[method-assign]
                return seen

            writer.product_images = read_then_another_writer  # type: ignore[method-assign]
            report = await pipeline.write(gallery_change("B-1", uris, lsn=210, offset=1))
            assert interleaved == ["kafka:B-1"] and report.failed == 0 and report.conflicted == []
            assert side.catalog.dead_letters() == []
            items = {i.id: i for i in side.catalog.items("kafka")}
            assert {i: (items[i].uri, items[i].version) for i in ids} == {
                i: (u, 210) for i, u in zip(ids, uris, strict=True)
            }
            assert items[ids[0]].sha256 != "sha-39"
        finally:
            pipeline.close()
