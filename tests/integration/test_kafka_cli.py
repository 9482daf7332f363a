"""`clipdex consume` as a process: started before its broker, stopped by SIGTERM, killed with -9 mid-stream.

After all of it, every event's effect is in the store exactly once, and the committed offsets say so."""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from indexer.events import raw_text
from shared.embedder import Embedder
from tests.brokers import (
    SESSION_TIMEOUT_MS,
    Position,
    TansuBroker,
    committed_offsets,
    create_topic,
    ends_of,
    free_port,
    publish,
)
from tests.conftest import tiny_env, tiny_settings_for
from tests.integration.test_kafka_consume import event, live_vectors, searchable_ids, write_image
from tests.unit.indexer.test_pipeline_hostile import POISON

pytestmark = pytest.mark.integration


@dataclass
class Consumer:
    """`clipdex consume` in a subprocess, its log in a file."""

    args: list[str]
    env: dict[str, str]
    log: Path
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "clipdex", "consume", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.runs.append(proc)
        return proc

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def consumer_for(tmp_path: Path) -> Iterator[Callable[..., Consumer]]:
    made: list[Consumer] = []

    def make(bootstrap: str, topic: str, **env: str) -> Consumer:
        environ = tiny_env(tmp_path / "data")
        environ.update(
            CLIPDEX_ALLOWED_ROOTS=str(tmp_path / "images"),
            CLIPDEX_KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
            CLIPDEX_BATCH_SIZE="8",
            CLIPDEX_MAX_BATCH_WAIT_MS="50",
            CLIPDEX_DECODE_WORKERS="1",
            **env,
        )
        args = ["--bootstrap-servers", bootstrap, "--topic", topic, "--group", f"{topic}-indexer"]
        consumer = Consumer(args, environ, tmp_path / f"consume-{len(made)}.log")
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        for proc in consumer.runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stored_ids(db: Path) -> set[str]:
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return {r[0] for r in conn.execute("SELECT id FROM items")}
    except sqlite3.OperationalError:  # the schema is not created yet
        return set()


async def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def test_started_before_its_broker_it_waits_then_sigterm_commits_the_batch_in_flight_and_exits_0(
    tmp_path: Path, consumer_for: Callable[..., Consumer]
) -> None:
    port = free_port()
    topic = "catalog"
    consumer = consumer_for(f"127.0.0.1:{port}", topic)
    proc = consumer.start()
    await wait_for(lambda: "unreachable" in consumer.text(), 60, "a log line about the unreachable broker")
    assert "retrying in" in consumer.text() and f"127.0.0.1:{port}" in consumer.text()
    assert proc.poll() is None, "it crashed instead of waiting for the broker"

    broker = TansuBroker(port=port)
    try:
        await create_topic(broker.bootstrap, topic, partitions=3)
        ids = [f"s{i}" for i in range(150)]
        for i, item in enumerate(ids):
            write_image(tmp_path / "images" / f"{item}.png", i, size=32)
        messages = [(i.encode(), event("upsert", i, tmp_path / "images" / f"{i}.png")) for i in ids]
        positions: list[Position] = []

        async def stream() -> None:  # 100 events/s: still flowing when the signal comes
            for start in range(0, len(messages), 10):
                positions.extend(await publish(broker.bootstrap, topic, messages[start : start + 10]))
                await asyncio.sleep(0.1)

        streaming = asyncio.create_task(stream())
        db = tmp_path / "data" / "clipdex.sqlite3"
        await wait_for(lambda: len(stored_ids(db)) >= 20, 60, "the first batches to be indexed")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        await streaming
        committed = await committed_offsets(broker.bootstrap, topic, f"{topic}-indexer")
    finally:
        broker.close()

    assert code == 0, consumer.text()[-3000:]
    assert "SIGTERM: finishing the batch in flight" in consumer.text()
    assert "stopped after" in consumer.text()
    where = dict(zip(ids, positions, strict=True))
    done = {i for i, p in where.items() if p.offset < committed[p.partition]}
    assert 20 <= len(done) < len(ids), "the signal did not land mid-stream"
    assert stored_ids(db) == {f"kafka:{i}" for i in done}  # every durable event committed, and only those


@dataclass
class Expected:
    """What the store must hold once every event is applied once, in order, per id."""

    sha: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    def upsert(self, item: str, sha: str, metadata: dict[str, Any]) -> None:
        self.sha[item] = sha
        self.metadata[item] = metadata

    def delete(self, item: str) -> None:
        self.sha.pop(item, None)
        self.metadata.pop(item, None)


def crash_stream(images: Path, rng: random.Random) -> tuple[list[tuple[bytes | None, bytes | None]], Expected]:
    """Several hundred events: new items, new images for old ids, deletes, the same image again,
    metadata changes, and a delete followed by a re-add."""
    expected = Expected()
    messages: list[tuple[bytes | None, bytes | None]] = []
    uri: dict[str, Path] = {}
    sha: dict[Path, str] = {}
    seed = 0

    def upsert(item: str, new_image: bool, metadata: dict[str, Any]) -> None:
        nonlocal seed
        if new_image or item not in uri:
            seed += 1
            uri[item] = images / f"{item}-{seed}.png"
            sha[uri[item]] = write_image(uri[item], seed, size=32)
        messages.append((item.encode(), event("upsert", item, uri[item], metadata=metadata)))
        expected.upsert(f"kafka:{item}", sha[uri[item]], metadata)

    ids = [f"c{i}" for i in range(200)]
    for item in ids:
        upsert(item, True, {"n": 0})
    for _ in range(160):
        item = rng.choice(ids)
        action = rng.random()
        if action < 0.35:
            upsert(item, True, {"n": 1})  # a new image for an old id
        elif action < 0.55:
            upsert(item, False, {"n": 2})  # same image: metadata only
        elif action < 0.65:
            upsert(item, False, expected.metadata.get(f"kafka:{item}", {"n": 3}))  # exactly the same again
        else:
            messages.append((item.encode(), event("delete", item)))
            expected.delete(f"kafka:{item}")
    return messages, expected


async def test_killed_with_sigkill_again_and_again_every_event_takes_effect_exactly_once(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic: str,
    consumer_for: Callable[..., Consumer],
    tiny_embedder: Embedder,
) -> None:
    rng = random.Random(int(os.environ.get("CLIPDEX_TEST_SEED", "7")))
    messages, expected = crash_stream(tmp_path / "images", rng)
    chunks = [messages[i : i + 90] for i in range(0, len(messages), 90)]  # 4 chunks: 3 kills, then a clean stop
    consumer = consumer_for(
        kafka_bootstrap, kafka_topic, CLIPDEX_COMPACT_DELTA_SIZE="100", CLIPDEX_COMPACT_MAX_AGE_S="3"
    )
    db = tmp_path / "data" / "clipdex.sqlite3"
    positions: list[Position] = []
    group = f"{kafka_topic}-indexer"

    def batches() -> int:
        return consumer.text().count("batch source=kafka")

    for n, chunk in enumerate(chunks):
        positions += await publish(kafka_bootstrap, kafka_topic, chunk)
        proc = consumer.start()
        if n < len(chunks) - 1:
            # Kill a few batches in, a moment after a batch line: most likely in the middle of the next
            # batch (fetched, embedding or writing, not committed), so that it replays on restart.
            target = batches() + rng.randint(1, 6)
            await wait_for(lambda: batches() >= target or proc.poll() is not None, 60, "a few batches")  # noqa: B023
            assert proc.poll() is None, consumer.text()[-3000:]
            await asyncio.sleep(rng.uniform(0, 0.03))
            proc.kill()  # SIGKILL: no flush, no commit
            proc.wait()
            committed = await committed_offsets(kafka_bootstrap, kafka_topic, group)
            assert committed != ends_of(positions), "the kill came after the stream was consumed"
            continue
        ends = ends_of(positions)
        deadline = time.monotonic() + 90
        while await committed_offsets(kafka_bootstrap, kafka_topic, group) != ends:
            assert time.monotonic() < deadline, "the last run did not catch up"
            assert proc.poll() is None, consumer.text()[-3000:]
            await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0

    assert consumer.text().count("consuming from") == len(chunks)
    live = set(expected.sha)
    assert live_vectors(db) == dict.fromkeys(live, 1)  # one live vector per live id, none for deleted ids
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, sha256, metadata, status FROM items").fetchall()
        (dead_letters,) = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
    assert {r[0]: r[1] for r in rows} == expected.sha
    assert {r[0]: json.loads(r[2]) for r in rows} == expected.metadata
    assert {r[3] for r in rows} == {"indexed"} and dead_letters == 0
    settings = tiny_settings_for(tmp_path / "data")
    assert searchable_ids(settings, tiny_embedder) == live  # none missing, no deleted id, main + delta


async def test_poison_events_between_good_ones_never_stop_it_and_a_kill_over_them_loses_nothing(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_topic: str,
    consumer_for: Callable[..., Consumer],
    tiny_embedder: Embedder,
) -> None:
    """Issue 9: one event of 100,000 nested arrays (or a bad IPv6 uri, a NUL in a path, a version of 10^30,
    a 5,000-digit number) made `consume` exit, and crash-loop on the uncommitted batch after each restart."""
    messages: list[tuple[bytes | None, bytes | None]] = []
    good: set[str] = set()
    for n, (name, poison) in enumerate(POISON.items()):
        for i in (2 * n, 2 * n + 1):
            write_image(tmp_path / "images" / f"g{i}.png", i, size=32)
            messages.append((f"g{i}".encode(), event("upsert", f"g{i}", tmp_path / "images" / f"g{i}.png")))
            good.add(f"kafka:g{i}")
        messages.append((f"poison-{name}".encode(), poison))
    positions = await publish(kafka_bootstrap, kafka_topic, messages)
    consumer = consumer_for(kafka_bootstrap, kafka_topic)
    db = tmp_path / "data" / "clipdex.sqlite3"

    proc = consumer.start()
    await wait_for(lambda: "batch source=kafka" in consumer.text() or proc.poll() is not None, 60, "a first batch")
    assert proc.poll() is None, consumer.text()[-3000:]  # it did not stop itself on a poison event
    proc.kill()  # SIGKILL over the batches with the poison events: some replay on restart
    proc.wait()

    proc = consumer.start()
    ends = ends_of(positions)
    deadline = time.monotonic() + 60
    while await committed_offsets(kafka_bootstrap, kafka_topic, f"{kafka_topic}-indexer") != ends:
        assert proc.poll() is None, consumer.text()[-3000:]
        assert time.monotonic() < deadline, "the restarted consumer did not catch up"
        await asyncio.sleep(0.2)
    assert proc.poll() is None, "it stays up after the poison events"
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0, consumer.text()[-3000:]

    assert live_vectors(db) == dict.fromkeys(good, 1)  # every good event once, none twice
    assert searchable_ids(tiny_settings_for(tmp_path / "data"), tiny_embedder) == good
    with sqlite3.connect(db) as conn:
        letters = conn.execute("SELECT payload, reason FROM dead_letters").fetchall()
    assert {payload for payload, _ in letters} == {raw_text(p) for p in POISON.values()}  # a replay may repeat one
    assert all(reason.startswith("InvalidEvent: ") for _, reason in letters)
    assert "Traceback" not in consumer.text()
