"""The Kafka source against an in-memory broker and a fake sink: what is committed, when, and what is not."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clipdex.cli import main
from indexer.formats import event_format
from indexer.products import product
from indexer.records import FailedRecord, Record
from indexer.sources.kafka import (
    Backoff,
    KafkaSource,
    Message,
    dead_letters_for,
    micro_batches,
    next_offsets,
    to_record,
    to_records,
)
from indexer.testing import FakeSink, MemoryBroker, MemoryConsumer, MemoryDeadLetters
from shared.errors import StoreError
from shared.heartbeat import Heartbeat, read_heartbeats

FAST = Backoff(initial_s=0.001, max_s=0.005)


def upsert(item_id: str, uri: str = "/img/a.jpg", **extra: object) -> bytes:
    return json.dumps({"op": "upsert", "id": item_id, "uri": uri, **extra}).encode()


def source_for(
    broker: MemoryBroker,
    sink: FakeSink,
    *,
    batch_size: int = 64,
    backoff: Backoff = FAST,
    dead_letters: MemoryDeadLetters | None = None,
    describe: str = "the Kafka broker",
) -> tuple[KafkaSource, MemoryConsumer]:
    consumer = MemoryConsumer(broker)
    source = KafkaSource(
        consumer,
        sink,
        batch_size=batch_size,
        max_wait_ms=5,
        backoff=backoff,
        dead_letters=dead_letters,
        describe=describe,
    )
    return source, consumer


async def run_until(source: KafkaSource, done: Callable[[], bool]) -> None:
    """Run the source until `done()` holds, then stop it and wait for it to return."""
    task = asyncio.create_task(source.run())
    async with asyncio.timeout(5):
        while not done():
            if task.done():
                await task  # raise what it raised
            await asyncio.sleep(0.001)
        source.request_stop()
        await task


def test_the_message_key_is_the_id_when_the_event_has_none() -> None:
    (record,) = to_record(Message("t", 0, 7, b"sku-1", b'{"op": "delete"}'))
    assert record is not None and record.event is not None and record.event.id == "sku-1"
    assert record.position == (0, 7) and record.source == "kafka"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json{", "not JSON"),
        (b'{"id": "a", "uri": "/x.jpg"}', "op"),
        (b'{"op": "upsert", "id": "a", "uri": "/x.jpg", "version": -1}', "version"),
        (b'{"op": "upsert", "id": "a"}', "uri"),
        (None, "empty message"),
    ],
)
def test_a_bad_message_becomes_a_record_with_its_reason(value: bytes | None, reason: str) -> None:
    (record,) = to_record(Message("t", 0, 3, None, value))
    assert record is not None and record.event is None
    assert record.error is not None and reason in record.error


def test_the_next_offsets_are_one_past_the_last_message_of_each_partition() -> None:
    messages = [Message("t", p, o, None, b"") for p, o in [(0, 4), (1, 9), (0, 5), (1, 10), (0, 6)]]
    assert next_offsets(messages) == {("t", 0): 7, ("t", 1): 11}


async def test_each_batch_is_committed_after_the_sink_wrote_it() -> None:
    broker = MemoryBroker(partitions=3)
    for i in range(10):
        broker.produce(upsert(f"id{i}"), key=f"id{i}".encode())
    sink = FakeSink()
    source, _ = source_for(broker, sink, batch_size=4)
    await run_until(source, lambda: sum(map(len, sink.batches)) == 10)
    assert sorted(sink.ids) == sorted(f"id{i}" for i in range(10))
    assert all(len(b) <= 4 for b in sink.batches)
    assert broker.committed == {("events", p): len(log) for p, log in enumerate(broker.partitions) if log}
    assert len(broker.commits) == len(sink.batches)  # one commit per batch, none before its write


async def test_a_second_member_of_the_group_starts_after_the_committed_offsets() -> None:
    broker = MemoryBroker()
    for i in range(5):
        broker.produce(upsert(f"a{i}"))
    first = FakeSink()
    source, _ = source_for(broker, first)
    await run_until(source, lambda: len(first.ids) == 5)
    for i in range(3):
        broker.produce(upsert(f"b{i}"))
    second = FakeSink()
    source, _ = source_for(broker, second)
    await run_until(source, lambda: len(second.ids) == 3)
    assert second.ids == ["b0", "b1", "b2"]


async def test_a_store_error_stops_without_committing_and_the_events_replay() -> None:
    broker = MemoryBroker()
    for i in range(6):
        broker.produce(upsert(f"id{i}"))
    sink = FakeSink()
    sink.store_error_on = 1  # the second batch fails
    source, consumer = source_for(broker, sink, batch_size=3)
    with pytest.raises(StoreError):
        await run_until(source, lambda: False)
    assert broker.committed == {("events", 0): 3}  # the first batch only
    assert consumer.stopped
    replay = FakeSink()
    source, _ = source_for(broker, replay, batch_size=3)
    await run_until(source, lambda: len(replay.ids) == 3)
    assert replay.ids == ["id3", "id4", "id5"]


async def test_invalid_events_are_handed_on_and_their_offsets_still_move_on() -> None:
    broker = MemoryBroker()
    broker.produce(b"{oops")
    broker.produce(upsert("good"))
    broker.produce(b'{"op": "explode", "id": "x"}')
    sink = FakeSink()
    letters = MemoryDeadLetters()
    source, _ = source_for(broker, sink, dead_letters=letters)
    await run_until(source, lambda: broker.committed.get(("events", 0)) == 3)
    assert [r.error is None for r in sink.batches[0]] == [False, True, False]
    assert [(m.offset, m.value) for m in letters.published] == [(0, b"{oops"), (2, b'{"op": "explode", "id": "x"}')]
    assert "not JSON" in letters.published[0].reason
    assert letters.closed


async def test_items_the_sink_failed_are_published_as_dead_letters_with_the_sinks_reason() -> None:
    broker = MemoryBroker()
    broker.produce(upsert("ok"), key=b"ok")
    broker.produce(upsert("missing", uri="/nope.jpg"), key=b"missing")
    sink = FakeSink()
    sink.fail_ids = {"missing": "file not found: /nope.jpg"}
    letters = MemoryDeadLetters()
    source, _ = source_for(broker, sink, dead_letters=letters)
    await run_until(source, lambda: bool(broker.committed))
    assert [(m.key, m.reason) for m in letters.published] == [(b"missing", "file not found: /nope.jpg")]
    headers = dict(letters.published[0].headers())
    assert headers["clipdex.offset"] == b"1" and headers["clipdex.topic"] == b"events"


def test_dead_letters_are_the_failed_records_messages_found_by_position() -> None:
    messages = [Message("t", p, o, None, upsert("same", uri=f"/{p}-{o}.jpg")) for p in (0, 1) for o in range(3)]
    records = to_records(messages)
    tried = records[4]  # partition 1, offset 1: the same id as the others, and the same raw value as none
    letters = dead_letters_for(messages, [FailedRecord(tried, "not an image", "kafka:same")])
    assert [(m.partition, m.offset, m.reason) for m in letters] == [(1, 1, "not an image")]
    elsewhere = Record("kafka", "{}", None, "not JSON", (7, 7))  # a position that is not in the batch
    assert dead_letters_for(messages, [FailedRecord(elsewhere, "not JSON")]) == []


async def test_an_unreachable_broker_at_start_is_retried_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    broker.fail_starts = 3
    broker.produce(upsert("a"))
    sink = FakeSink()
    source, _ = source_for(broker, sink, describe="Kafka broker memory:9092")
    await run_until(source, lambda: bool(broker.committed))
    assert sink.ids == ["a"]
    retries = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(retries) == 3 and "Kafka broker memory:9092" in retries[0] and "retrying in" in retries[0]


async def test_a_stop_while_waiting_for_the_broker_returns_without_consuming() -> None:
    broker = MemoryBroker()
    broker.fail_starts = 10**9
    source, consumer = source_for(broker, FakeSink(), backoff=Backoff(initial_s=60))
    task = asyncio.create_task(source.run())
    await asyncio.sleep(0.01)
    source.request_stop()
    async with asyncio.timeout(1):  # the 60 s backoff is cut short
        await task
    assert not consumer.started


async def test_a_stop_while_joining_a_group_that_does_not_settle_returns() -> None:
    """aiokafka's start waits for the first assignment: a SIGTERM then must not wait for the group."""
    broker = MemoryBroker()
    broker.hang_starts = True
    source, consumer = source_for(broker, FakeSink())
    task = asyncio.create_task(source.run())
    await asyncio.sleep(0.01)
    source.request_stop()
    async with asyncio.timeout(1):
        await task
    assert not consumer.started


async def test_lost_connections_while_fetching_and_committing_are_retried() -> None:
    broker = MemoryBroker()
    for i in range(4):
        broker.produce(upsert(f"id{i}"))
    broker.fail_fetches = 2
    broker.fail_commits = 2
    sink = FakeSink()
    source, _ = source_for(broker, sink, batch_size=2)
    await run_until(source, lambda: broker.committed.get(("events", 0)) == 4)
    assert sink.ids == ["id0", "id1", "id2", "id3"]  # each written once: a failed commit is retried, not the write


async def test_a_commit_lost_to_a_rebalance_is_logged_and_consumption_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker()
    broker.produce(upsert("a"))
    broker.produce(upsert("b"))
    broker.lose_commits = 1
    sink = FakeSink()
    source, _ = source_for(broker, sink, batch_size=1)
    await run_until(source, lambda: broker.committed.get(("events", 0)) == 2)
    assert sink.ids == ["a", "b"]
    assert broker.commits == [{("events", 0): 2}]
    assert "new owner replays" in caplog.text


async def test_a_rebalance_waits_for_the_batch_in_flight_to_be_committed() -> None:
    broker = MemoryBroker()
    broker.produce(upsert("a"))
    sink = FakeSink()
    sink.gate = asyncio.Event()
    source, consumer = source_for(broker, sink)
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(sink.entered.wait(), 1)
    revoke = asyncio.create_task(consumer.revoke())
    await asyncio.sleep(0.01)
    assert not revoke.done()  # held until the batch is durable and committed
    sink.gate.set()
    await asyncio.wait_for(revoke, 1)
    assert broker.committed == {("events", 0): 1}
    source.request_stop()
    await asyncio.wait_for(task, 1)
    assert sink.ids == ["a"]  # resumed after the committed offset: not written twice


async def test_a_stop_request_finishes_and_commits_the_batch_in_flight() -> None:
    broker = MemoryBroker()
    for i in range(3):
        broker.produce(upsert(f"id{i}"))
    sink = FakeSink()
    sink.gate = asyncio.Event()
    source, consumer = source_for(broker, sink, batch_size=2)
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(sink.entered.wait(), 1)
    source.request_stop()
    sink.gate.set()
    stats = await asyncio.wait_for(task, 1)
    assert sink.ids == ["id0", "id1"]  # no new batch after the stop request
    assert broker.committed == {("events", 0): 2}
    assert stats.committed == {("events", 0): 2} and consumer.stopped


async def test_every_batch_logs_one_line_with_its_timings_and_lag(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="indexer.sources.kafka")
    broker = MemoryBroker()
    for i in range(5):
        broker.produce(upsert(f"id{i}"))
    sink = FakeSink()
    source, _ = source_for(broker, sink, batch_size=2)
    await run_until(source, lambda: broker.committed.get(("events", 0)) == 5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
    assert len(lines) == 3
    assert "source=kafka size=2" in lines[0] and "pending=3" in lines[0]
    assert all(f in lines[0] for f in ("decode_ms=", "embed_ms=", "write_ms=", "lag_ms="))


@pytest.fixture
def _keep_logging() -> Iterator[None]:
    """`main` configures the root logger onto pytest's captured stderr, closed after the test: undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_keep_logging")
def test_consume_without_a_broker_or_a_topic_says_which_flag_to_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["consume", "--topic", "t"]) == 2
    assert "--bootstrap-servers" in capsys.readouterr().err
    assert main(["consume", "--bootstrap-servers", "127.0.0.1:9"]) == 2
    assert "CLIPDEX_KAFKA_TOPIC" in capsys.readouterr().err


@pytest.mark.usefixtures("_keep_logging")
def test_consume_with_a_wrong_or_missing_map_stops_at_start_naming_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = ["consume", "--bootstrap-servers", "127.0.0.1:9", "--topic", "t"]
    assert main([*broker, "--format", "debezium"]) == 2
    assert "CLIPDEX_EVENT_FORMAT=debezium needs CLIPDEX_EVENT_MAP" in capsys.readouterr().err
    assert main([*broker, "--format", "cloudevents", "--map", '{"id": "sku", "uri": "/image"}']) == 2
    assert "invalid CLIPDEX_EVENT_MAP: 'sku' is not a JSON Pointer" in capsys.readouterr().err


async def test_clipdex_status_hears_from_the_consumer_through_its_heartbeat(tmp_path: Path) -> None:
    broker = MemoryBroker()
    for i in range(3):
        broker.produce(upsert(f"id{i}"))
    sink = FakeSink()
    sink.fail_ids = {"id1": "not an image"}
    consumer = MemoryConsumer(broker)
    heartbeat = Heartbeat(tmp_path, "kafka", topic="events")
    source = KafkaSource(consumer, sink, batch_size=64, max_wait_ms=5, backoff=FAST, heartbeat=heartbeat)
    await run_until(source, lambda: bool(broker.committed))
    (state,) = read_heartbeats(tmp_path)
    assert state["source"] == "kafka" and state["topic"] == "events" and state["state"] == "stopped"
    assert state["last_batch"]["failed"] == 1 and state["pending"] == 0


# -- event formats ---------------------------------------------------------------------------------------------


def debezium_source(broker: MemoryBroker, sink: FakeSink, **options: object) -> KafkaSource:
    mapping = json.dumps({"id": "/sku", "uri": "/image_url"})
    return KafkaSource(
        MemoryConsumer(broker),
        sink,
        max_wait_ms=5,
        backoff=FAST,
        event_format=event_format("debezium", mapping),
        **options,  # type: ignore[arg-type]
    )


async def test_a_debezium_tombstone_is_skipped_and_committed_not_a_dead_letter() -> None:
    broker = MemoryBroker()
    row = {"sku": "A-1", "image_url": "/img/a.jpg"}
    broker.produce(json.dumps({"op": "c", "after": row, "source": {"lsn": 10}}).encode(), key=b'{"id": 1}')
    broker.produce(json.dumps({"op": "d", "before": row, "source": {"lsn": 11}}).encode(), key=b'{"id": 1}')
    broker.produce(None, key=b'{"id": 1}')  # the tombstone
    sink = FakeSink()
    letters = MemoryDeadLetters()
    source = debezium_source(broker, sink, batch_size=64, dead_letters=letters)
    await run_until(source, lambda: broker.committed.get(("events", 0)) == 3)
    assert [(r.event.op, r.event.id, r.event.version) for r in sink.batches[0] if r.event is not None] == [
        ("upsert", "A-1", 10),
        ("delete", "A-1", 11),
    ]
    assert len(sink.batches[0]) == 2 and letters.published == [] and source.stats.records == 2


async def test_headers_reach_the_format_and_stay_on_the_dead_letter() -> None:
    broker = MemoryBroker()
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"e-1"), ("ce_source", b"/shop"), ("ce_type", b"t")]
    broker.produce(json.dumps({"op": "upsert", "id": "a", "uri": "/img/a.jpg"}).encode(), headers=headers)
    broker.produce(b'{"op": "upsert"}', headers=headers)  # no id: a dead letter
    sink = FakeSink()
    letters = MemoryDeadLetters()
    source = KafkaSource(
        MemoryConsumer(broker),
        sink,
        batch_size=64,
        max_wait_ms=5,
        backoff=FAST,
        dead_letters=letters,
        event_format=event_format("cloudevents"),
    )
    await run_until(source, lambda: broker.committed.get(("events", 0)) == 2)
    assert sink.ids == ["a"]
    (letter,) = letters.published
    assert letter.headers()[: len(headers)] == headers and dict(letter.headers())["clipdex.offset"] == b"1"
    assert json.loads(sink.batches[0][1].raw)["id"] == "e-1"  # the dead letter's text: the structured event


def test_micro_batches_count_a_products_images() -> None:
    def rec(n: int) -> Record:
        return Record("kafka", "", product("upsert", f"p{n}", [f"{i}.jpg" for i in range(n)]))

    records = [rec(3), rec(3), Record("kafka", "", None, "bad"), rec(5), rec(1)]
    assert [[len(r.event.images) if r.event else 0 for r in b] for b in micro_batches(records, 6)] == [
        [3, 3],
        [0, 5],
        [1],
    ]
    assert [len(b) for b in micro_batches([rec(9)], 4)] == [1]  # one product is never split


async def test_a_fetch_of_products_is_written_in_batches_of_about_batch_size_images_then_committed_once() -> None:
    broker = MemoryBroker()
    mapping = json.dumps({"id": "/sku", "uris": "/images"})
    for n in range(4):
        broker.produce(json.dumps({"sku": f"p{n}", "images": [f"/img/{n}-{i}.jpg" for i in range(3)]}).encode())
    sink = FakeSink()
    source = KafkaSource(
        MemoryConsumer(broker),
        sink,
        batch_size=6,
        max_wait_ms=5,
        backoff=FAST,
        event_format=event_format("clipdex", mapping),
    )
    await run_until(source, lambda: broker.committed.get(("events", 0)) == 4)
    assert [len(b) for b in sink.batches] == [2, 2] and broker.commits == [{("events", 0): 4}]
