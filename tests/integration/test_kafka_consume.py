"""The Kafka source for real, in this process: a real broker, the real pipeline with the tiny CLIP, SQLite and
FAISS in tmp_path. A reader with its own store connection and index (as a search server has) checks what
a user would see."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from indexer import pipeline as pipeline_module
from indexer import service as service_module
from indexer.formats import EventFormat
from indexer.pipeline import Pipeline
from indexer.records import BatchReport, Record
from indexer.service import consume
from indexer.sources.kafka import CLIPDEX_FORMAT, KafkaSource, SourceStats
from indexer.sources.kafka_client import AioKafkaConsumer, KafkaDeadLetters
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import FetchFailed, StoreError
from shared.search import SearchService
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.search import IndexSearch
from shared.sqlite.store import SqliteStore
from tests.brokers import (
    SESSION_TIMEOUT_MS,
    TansuBroker,
    committed_offsets,
    create_topic,
    ends_of,
    moto_available,
    publish,
    read_all,
)
from tests.conftest import tiny_settings_for

pytestmark = pytest.mark.integration

Messages = list[tuple[bytes | None, bytes | None]]


def write_image(path: Path, seed: int, size: int = 48) -> str:
    """A small PNG of random pixels; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def event(op: str, item_id: str | None = None, uri: Path | str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"op": op, **extra}
    if item_id is not None:
        body["id"] = item_id
    if uri is not None:
        body["uri"] = str(uri)
    return json.dumps(body).encode()


def settings_for(tmp_path: Path, bootstrap: str, topic: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "allowed_roots": [str(tmp_path / "images")],
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topic": topic,
        "kafka_group": f"{topic}-indexer",
        "kafka_session_timeout_ms": SESSION_TIMEOUT_MS,
        "batch_size": 16,
        "max_batch_wait_ms": 50,
        "fetch_retries": 0,
    }
    values.update(overrides)
    return tiny_settings_for(tmp_path / "data", **values)


@asynccontextmanager
async def running_source(
    settings: Settings, embedder: Embedder, event_format: EventFormat = CLIPDEX_FORMAT
) -> AsyncIterator[tuple[KafkaSource, asyncio.Task[SourceStats]]]:
    """The real source and pipeline on a SQLite store, running; stopped (its batch finished) and closed
    on the way out."""
    dlq = KafkaDeadLetters(settings.kafka_bootstrap_servers or "", settings.kafka_dlq_topic or "")
    store = SqliteStore(settings.db_path)
    store.bind_model(embedder.identity)
    pipeline = Pipeline.from_settings(store, embedder, settings)
    source = KafkaSource(
        AioKafkaConsumer.from_settings(settings),
        pipeline,
        batch_size=settings.batch_size,
        max_wait_ms=settings.max_batch_wait_ms,
        dead_letters=dlq if settings.kafka_dlq_topic else None,
        event_format=event_format,
    )
    task = asyncio.create_task(source.run())
    try:
        yield source, task
    finally:
        if not task.done():
            source.request_stop()
            await asyncio.wait_for(task, 30)
        pipeline.close()
        store.close()


async def consume_until(
    settings: Settings, embedder: Embedder, done: Callable[[SourceStats], bool], *, timeout_s: float = 60
) -> SourceStats:
    """Run the real source and pipeline until `done(stats)`, then stop it (finishing its batch)."""
    async with running_source(settings, embedder) as (source, task), asyncio.timeout(timeout_s):
        while not done(source.stats):
            if task.done():
                await task
            await asyncio.sleep(0.05)
        source.request_stop()
        return await task


def committed_all(total: int) -> Callable[[SourceStats], bool]:
    return lambda stats: sum(stats.committed.values()) >= total  # a fresh topic: offsets count messages


def live_vectors(db: Path) -> dict[str, int]:
    """item id -> number of live (untombstoned) vectors."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT item_id, COUNT(*) FROM vectors WHERE tombstoned = 0 GROUP BY item_id").fetchall()
    return {r[0]: r[1] for r in rows}


def searchable_ids(settings: Settings, embedder: Embedder) -> set[str]:
    """Every id a search can return: a reader with its own store connection and index, as a server has."""
    store = SqliteStore(settings.db_path)
    try:
        index = LiveIndex(store, embedder.identity.dim, IndexParams.from_settings(settings), store.index_dir)
        index.refresh()
        probe = np.ones(embedder.identity.dim, dtype=np.float32) / np.sqrt(embedder.identity.dim)
        hits = SearchService(IndexSearch(store, index), store, embedder).search_vector(probe, top_k=1000)
        return {h.id for h in hits}
    finally:
        store.close()


async def test_events_are_indexed_bad_ones_dead_lettered_and_offsets_committed(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, tiny_embedder: Embedder
) -> None:
    images = tmp_path / "images"
    sha = {f"a{i}": write_image(images / f"a{i}.png", i) for i in range(8)}
    new_a2 = write_image(images / "a2-v2.png", 100)
    write_image(images / "keyed.png", 101)
    write_image(tmp_path / "outside" / "x.png", 102)
    (images / "notes.jpg").write_text("this is not a picture")
    good: Messages = [(f"a{i}".encode(), event("upsert", f"a{i}", images / f"a{i}.png")) for i in range(8)]
    later: Messages = [
        (b"a1", event("upsert", "a1", images / "a1.png")),  # the same image again: no new vector
        (b"a2", event("upsert", "a2", images / "a2-v2.png")),  # a new image for an old id: replaced
        (b"a3", event("delete", "a3")),
        (b"a4", event("upsert", "a4", images / "a4.png", metadata={"colour": "red"})),  # metadata only
        (b"keyed", event("upsert", uri=images / "keyed.png")),  # no id: the key is the id
    ]
    bad: dict[str, tuple[bytes | None, bytes | None]] = {
        "not json": (b"x", b"{this is not json"),
        "missing op": (b"x", json.dumps({"id": "x", "uri": str(images / "a0.png")}).encode()),
        "bad version": (b"x", event("upsert", "x", images / "a0.png", version=-1)),
        "unknown op": (b"x", event("explode", "x", images / "a0.png")),
        "no id, no key": (None, event("delete")),
        "outside the roots": (b"out", event("upsert", "out", tmp_path / "outside" / "x.png")),
        "traversal": (b"trav", event("upsert", "trav", f"{images}/../outside/x.png")),
        "missing file": (b"gone", event("upsert", "gone", images / "gone.png")),
        "not an image": (b"txt", event("upsert", "txt", images / "notes.jpg")),
    }
    settings = settings_for(tmp_path, kafka_bootstrap, kafka_topic, kafka_dlq_topic=f"{kafka_topic}.dlq")
    positions = await publish(kafka_bootstrap, kafka_topic, good + list(bad.values()))
    positions += await publish(kafka_bootstrap, kafka_topic, later)
    total = len(good) + len(bad) + len(later)

    await consume_until(settings, tiny_embedder, committed_all(total))

    live = {"a0", "a1", "a2", "a4", "a5", "a6", "a7", "keyed"}
    assert searchable_ids(settings, tiny_embedder) == {f"kafka:{i}" for i in live}
    assert live_vectors(settings.db_path) == {f"kafka:{i}": 1 for i in live}  # one live vector each
    with SqliteStore(settings.db_path) as store:
        a1_vectors = store.item_ids()
        a2 = store.get_item("kafka:a2")
        a4 = store.get_item("kafka:a4")
        letters = store.dead_letters()
    assert "kafka:a3" not in a1_vectors
    assert a2 is not None and a2.sha256 == new_a2 and a2.sha256 != sha["a2"]
    assert a4 is not None and a4.metadata == {"colour": "red"}
    with sqlite3.connect(settings.db_path) as conn:
        (a1_ever,) = conn.execute("SELECT COUNT(*) FROM vectors WHERE item_id = 'kafka:a1'").fetchone()
    assert a1_ever == 1, "the same image sent twice made a second vector"

    # Every bad message is a dead letter with a reason, in SQLite and on the dead-letter topic.
    assert len(letters) == len(bad), [(d.payload, d.reason) for d in letters]
    reasons = {d.payload: d.reason.lower() for d in letters}
    for name, (_, value) in bad.items():
        assert (value or b"").decode() in reasons, f"no dead letter for the {name} event"
    assert "json" in reasons[bad["not json"][1].decode()]  # type: ignore[union-attr]
    assert "op" in reasons[bad["missing op"][1].decode()]  # type: ignore[union-attr]
    assert "version" in reasons[bad["bad version"][1].decode()]  # type: ignore[union-attr]
    published = await read_all(kafka_bootstrap, f"{kafka_topic}.dlq", expected=len(bad))
    assert sorted(r.value for r in published) == sorted(v for _, v in bad.values())  # type: ignore[attr-defined]
    for record in published:
        headers = dict(record.headers)  # type: ignore[attr-defined]
        assert headers["clipdex.topic"] == kafka_topic.encode() and headers["clipdex.reason"]

    # Offsets are committed: the group resumes after them, and a new event is the only one read.
    committed = await committed_offsets(kafka_bootstrap, kafka_topic, settings.kafka_group)
    assert committed == ends_of(positions)
    write_image(images / "late.png", 103)
    await publish(kafka_bootstrap, kafka_topic, [(b"late", event("upsert", "late", images / "late.png"))])
    stats = await consume_until(settings, tiny_embedder, committed_all(1))
    assert stats.records == 1
    assert "kafka:late" in searchable_ids(settings, tiny_embedder)


@asynccontextmanager
async def failing_store(settings: Settings) -> AsyncIterator[Any]:
    class Sink:
        async def write(self, records: Sequence[Record]) -> BatchReport:
            raise StoreError("database or disk is full")

    yield Sink()


async def test_a_store_failure_exits_non_zero_and_commits_nothing(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "images" / "a.png", 1)
    await publish(kafka_bootstrap, kafka_topic, [(b"a", event("upsert", "a", tmp_path / "images" / "a.png"))])
    settings = settings_for(tmp_path, kafka_bootstrap, kafka_topic)

    code = await asyncio.wait_for(consume(settings, failing_store), 60)

    assert code == 1
    err = capsys.readouterr().err
    assert "the store failed" in err and "replay" in err and "database or disk is full" in err
    assert await committed_offsets(kafka_bootstrap, kafka_topic, settings.kafka_group) == {0: 0, 1: 0, 2: 0}


@pytest.mark.skipif(not moto_available(), reason="needs moto[server] (a dev dependency) for tansu's storage")
async def test_a_broker_restart_mid_stream_loses_nothing(tmp_path: Path, tiny_embedder: Embedder) -> None:
    broker = TansuBroker.persistent(tmp_path)  # it keeps topics, messages and offsets across a restart
    try:
        topic = "catalog"
        await create_topic(broker.bootstrap, topic, partitions=3)
        ids = [f"r{i}" for i in range(60)]
        for i, item in enumerate(ids):
            write_image(tmp_path / "images" / f"{item}.png", 1000 + i)
        messages = [(i.encode(), event("upsert", i, tmp_path / "images" / f"{i}.png")) for i in ids]
        settings = settings_for(tmp_path, broker.bootstrap, topic)
        positions = await publish(broker.bootstrap, topic, messages[:45])
        restarted = asyncio.Event()

        def restart_then_finish(stats: SourceStats) -> bool:
            if not restarted.is_set() and stats.records > 0:
                restarted.set()
            return sum(stats.committed.values()) >= len(ids)

        async def restart_broker() -> None:
            await restarted.wait()
            broker.stop()  # mid-stream: the source is consuming the first half
            await asyncio.sleep(2)
            broker.start()
            positions.extend(await publish(broker.bootstrap, topic, messages[45:]))

        restarting = asyncio.create_task(restart_broker())
        await consume_until(settings, tiny_embedder, restart_then_finish, timeout_s=90)
        await restarting
        assert live_vectors(settings.db_path) == {f"kafka:{i}": 1 for i in ids}
        committed = await committed_offsets(broker.bootstrap, topic, settings.kafka_group)
        assert committed == ends_of(positions)
    finally:
        broker.close()


async def test_a_second_member_joining_mid_stream_takes_partitions_and_nothing_is_lost_or_doubled(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic: str,
    tiny_embedder: Embedder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="indexer.sources")  # the source and its aiokafka adapter
    ids = [f"m{i}" for i in range(120)]
    for i, item in enumerate(ids):
        write_image(tmp_path / "images" / f"{item}.png", 2000 + i, size=32)
    messages = [(i.encode(), event("upsert", i, tmp_path / "images" / f"{i}.png")) for i in ids]
    settings = settings_for(tmp_path, kafka_bootstrap, kafka_topic, batch_size=4)

    def all_indexed(stats: SourceStats) -> bool:
        return len(live_vectors(settings.db_path)) == len(ids)

    positions = await publish(kafka_bootstrap, kafka_topic, messages[:60])
    first = asyncio.create_task(consume_until(settings, tiny_embedder, all_indexed, timeout_s=90))
    await asyncio.sleep(2.0)  # the first member is consuming when the second joins
    second = asyncio.create_task(consume_until(settings, tiny_embedder, all_indexed, timeout_s=90))
    async with asyncio.timeout(30):  # both hold partitions: the first's initial assignment, then one each
        while caplog.text.count("assigned partitions") < 3:  # noqa: ASYNC110 (a log, not an event)
            await asyncio.sleep(0.05)
    positions += await publish(kafka_bootstrap, kafka_topic, messages[60:])
    stats = await asyncio.gather(first, second)

    assert "partitions revoked: the batch in flight is committed" in caplog.text  # the group rebalanced
    assert all(s.records > 0 for s in stats), "the second member got no partition"
    assert live_vectors(settings.db_path) == {f"kafka:{i}": 1 for i in ids}
    assert await committed_offsets(kafka_bootstrap, kafka_topic, settings.kafka_group) == ends_of(positions)


async def test_consume_retries_a_transient_failure_by_itself_and_commits_meanwhile(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CDN answers 503 for a while: the event is a dead letter at once (the offset moves on, nothing
    waits behind it), and `clipdex consume` indexes it by itself once the CDN is back."""
    images = tmp_path / "images"
    write_image(images / "cdn.png", 1)
    write_image(images / "ok.png", 2)
    failing = {"cdn.png"}
    real = pipeline_module.fetch_bytes

    def fetch(uri: str, policy: Any) -> bytes:
        if Path(uri).name in failing:
            raise FetchFailed(f"{uri}: HTTP 503")
        return real(uri, policy)

    monkeypatch.setattr(pipeline_module, "fetch_bytes", fetch)
    monkeypatch.setattr(service_module, "_REDELIVER_CHECK_S", 0.1)
    settings = settings_for(tmp_path, kafka_bootstrap, kafka_topic, dlq_retry_delay_s=0.5)
    positions = await publish(
        kafka_bootstrap,
        kafka_topic,
        [(b"cdn", event("upsert", "cdn", images / "cdn.png")), (b"ok", event("upsert", "ok", images / "ok.png"))],
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consume(settings, stop=stop))
    try:
        async with asyncio.timeout(60):
            while await committed_offsets(kafka_bootstrap, kafka_topic, settings.kafka_group) != ends_of(positions):  # noqa: ASYNC110 (polling the broker)
                await asyncio.sleep(0.1)
            assert set(live_vectors(settings.db_path)) == {"kafka:ok"}  # committed with cdn a dead letter
            failing.clear()
            while "kafka:cdn" not in live_vectors(settings.db_path):  # noqa: ASYNC110 (polling the store)
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
    with SqliteStore(settings.db_path) as store:
        assert store.dead_letters() == [] and store.get_item("kafka:cdn").status == "indexed"  # type: ignore[union-attr]
