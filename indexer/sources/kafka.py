"""The Kafka source: catalog events from a topic, in a consumer group, committed only once durable.

    broker ─fetch (≤ batch_size records, ≤ max_batch_wait_ms)─▶ Records ─sink.write()─▶ one store transaction
       ▲                                                                   │ dead letters ─▶ <topic>.dlq
       └──────────── commit offset+1 of each partition's last record ◀─────┘   (optional, best effort)

At least once, never lost: auto commit is off, and offsets are committed only after `sink.write` returns,
so a crash anywhere replays the events that were not yet durable (the store makes a replay idempotent).
- A rebalance waits for the batch in flight to be written and committed (`on_partitions_revoked`).
- SIGTERM / SIGINT: the batch in flight is finished and committed, then the consumer leaves the group.
- The broker unreachable at start, or gone for a while mid-stream: retried with backoff, logged, no crash.
- The store unreachable for a while (StoreUnavailable: a Milvus server restarting): the batch in flight is
  written again with backoff, still uncommitted, until the store answers (or a stop: it replays on restart).
- Any other StoreError from the sink: consumption stops WITHOUT committing; the events replay on restart.

`Consumer` is the few verbs the source needs from a broker client, `DeadLetterPublisher` the one it needs
from a producer: `indexer.sources.kafka_client` adapts aiokafka to both, `indexer.testing` has the fakes.
Records carry their (partition, offset), and the sink reports failed records themselves, so a failed
record's message is known by its position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from indexer.formats import EventFormat, Headers, Incoming
from indexer.formats.clipdex import ClipdexFormat
from indexer.products import Product
from indexer.records import BatchReport, FailedRecord, Record, Sink
from shared.errors import ClipdexError, InvalidEvent, StoreError
from shared.heartbeat import Heartbeat

logger = logging.getLogger(__name__)

SOURCE = "kafka"
Offsets = Mapping[tuple[str, int], int]  # (topic, partition) -> the next offset to read
RevokeHandler = Callable[[], Awaitable[None]]
_IDLE_BEAT_S = 2.0  # how often an idle consumer tells `clipdex status` it is alive


class BrokerError(ClipdexError):
    """The broker could not be reached, or refused a request. Wraps aiokafka's errors at the boundary."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class CommitLost(BrokerError):
    """The group rebalanced before a commit: the partition's new owner replays these events (idempotent)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: Headers = ()


class Consumer(Protocol):
    """A member of a consumer group, subscribed to one topic, with auto commit off."""

    async def start(self, on_revoked: RevokeHandler) -> None:
        """Join the group. `on_revoked` is awaited before partitions move to another member."""
        ...

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Message]:
        """Up to `max_records` messages, waiting at most `timeout_ms` for the first; in order per partition."""
        ...

    async def commit(self, offsets: Offsets) -> None: ...

    def lag(self) -> int | None:
        """Messages behind the partitions' high-water marks, when known."""
        ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class DeadLetterMessage:
    """A message that could not be indexed, as published to the dead-letter topic: the original key and
    value, with headers that say why and where it came from (as Kafka Connect does)."""

    key: bytes | None
    value: bytes | None
    reason: str
    topic: str
    partition: int
    offset: int
    original_headers: Headers = ()  # kept: a binary-mode CloudEvent is still one on the dead-letter topic

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            *((name, value or b"") for name, value in self.original_headers if not name.startswith("clipdex.")),
            ("clipdex.reason", self.reason.encode()),
            ("clipdex.topic", self.topic.encode()),
            ("clipdex.partition", str(self.partition).encode()),
            ("clipdex.offset", str(self.offset).encode()),
        ]


class DeadLetterPublisher(Protocol):
    """Best effort, beside the dead letters kept in the store (the record that counts)."""

    async def publish(self, letters: Sequence[DeadLetterMessage]) -> None:
        """Publish, or log why not. Never raises."""
        ...

    async def close(self) -> None: ...


def dead_letters_for(messages: Sequence[Message], failures: Sequence[FailedRecord]) -> list[DeadLetterMessage]:
    """The messages of a batch that became dead letters, found by the failed records' positions."""
    by_position = {(m.partition, m.offset): m for m in messages}
    letters: dict[tuple[int, int], DeadLetterMessage] = {}
    for failed in failures:
        position = _position(failed.record)
        m = None if position is None else by_position.get(position)
        if position is None or m is None:
            logger.debug("a failure of %r has no message in the batch (position %r)", failed.name, position)
        elif position not in letters:
            letters[position] = DeadLetterMessage(
                m.key, m.value, failed.reason, m.topic, m.partition, m.offset, m.headers
            )
    return [letters[p] for p in sorted(letters)]


def _position(record: Record) -> tuple[int, int] | None:
    """A Kafka record's (partition, offset)."""
    p = record.position
    return (p[0], p[1]) if isinstance(p, tuple) and len(p) == 2 else None


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(self.max_s, delay * self.factor)


@dataclass
class SourceStats:
    batches: int = 0
    records: int = 0
    failed: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


CLIPDEX_FORMAT = ClipdexFormat()


def to_record(message: Message, event_format: EventFormat = CLIPDEX_FORMAT) -> list[Record]:
    """A message becomes a record per event it carries (usually one; none for a message the format
    skips, such as Debezium's tombstone after a delete); a message that is not a valid event becomes one
    record with its reason. Each has the message's position."""
    incoming = Incoming(message.value, message.key, message.headers)
    raw = event_format.raw(incoming)
    position = (message.partition, message.offset)
    try:
        events = event_format.parse(incoming)
    except InvalidEvent as exc:
        return [Record(SOURCE, raw, None, str(exc), position)]
    return [Record(SOURCE, raw, event, None, position) for event in events]


def to_records(messages: Sequence[Message], event_format: EventFormat = CLIPDEX_FORMAT) -> list[Record]:
    return [record for m in messages for record in to_record(m, event_format)]


def micro_batches(records: Sequence[Record], images: int) -> Iterator[list[Record]]:
    """Consecutive runs of records holding about `images` items each (a product counts its images), so
    a batch of products holds no more images than CLIPDEX_BATCH_SIZE allows, give or take one product."""
    batch: list[Record] = []
    weight = 0
    for record in records:
        size = len(record.event.images) if isinstance(record.event, Product) else 1
        if batch and weight + size > images:
            yield batch
            batch, weight = [], 0
        batch.append(record)
        weight += size
    if batch:
        yield batch


def next_offsets(messages: Sequence[Message]) -> dict[tuple[str, int], int]:
    """offset+1 of the last message of each partition: where the group resumes."""
    offsets: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        offsets[key] = max(offsets.get(key, 0), m.offset + 1)
    return offsets


class KafkaSource:
    """Fetch a micro-batch, make it durable through the sink, then commit its offsets; until stopped."""

    def __init__(
        self,
        consumer: Consumer,
        sink: Sink,
        *,
        batch_size: int,
        max_wait_ms: int,
        dead_letters: DeadLetterPublisher | None = None,
        backoff: Backoff = Backoff(),
        store_backoff: Backoff = Backoff(max_s=5.0),
        commit_attempt_s: float = 10.0,
        stop_grace_s: float = 30.0,
        heartbeat: Heartbeat | None = None,
        stop: asyncio.Event | None = None,
        describe: str = "the Kafka broker",
        event_format: EventFormat = CLIPDEX_FORMAT,
    ) -> None:
        self._consumer = consumer
        self._format = event_format
        self._sink = sink
        self._batch_size = batch_size
        self._max_wait_ms = max_wait_ms
        self._dead_letters = dead_letters
        self._backoff = backoff
        self._store_backoff = store_backoff
        self._commit_attempt_s = commit_attempt_s
        self._stop_grace_s = stop_grace_s
        self._describe = describe
        self._heartbeat = heartbeat
        self._last_beat = 0.0
        self._stopping = stop or asyncio.Event()  # set: finish the batch in flight, commit, return
        self._batch_lock = asyncio.Lock()  # held from fetch to commit: a rebalance waits for it
        self.stats = SourceStats()

    def request_stop(self) -> None:
        """Finish the batch in flight, commit it, and return from `run` (safe from a signal handler)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> SourceStats:
        """Consume until `request_stop`. A StoreError (or any error of the sink) propagates uncommitted."""
        if not await self._start():
            self._beat("stopped")
            return self.stats
        state = "stopped"
        try:
            while not self._stopping.is_set():
                async with self._batch_lock:
                    messages = await self._fetch()
                    if messages:
                        await self._process(messages)
                    elif time.monotonic() - self._last_beat > _IDLE_BEAT_S:
                        self._beat("running")
        except StoreError:
            state = "failed"
            logger.error(
                "the store failed: stopping WITHOUT committing the batch in flight; it replays on restart "
                "(offsets committed by this run: %s)",
                self._resume_points(),
            )
            raise
        finally:
            await self._consumer.stop()
            if self._dead_letters is not None:
                await self._dead_letters.close()
            self._beat(state)
        logger.info("stopped after %d batches, %d records; committed %s", *self._summary())
        return self.stats

    # -- the steps ----------------------------------------------------------------------------------------

    async def _start(self) -> bool:
        delays = self._backoff.delays()
        while not self._stopping.is_set():
            self._beat("connecting")
            try:
                if not await self._until_stopped(self._consumer.start(self._on_revoked)):
                    logger.info("stopped while joining the group")
                    return False
                logger.info("consuming from %s", self._describe)
                return True
            except BrokerError as exc:
                if not exc.retriable:
                    raise
                delay = next(delays)
                logger.warning("%s is unreachable (%s); retrying in %.1f s", self._describe, exc, delay)
                await self._sleep(delay)
        return False

    async def _fetch(self) -> list[Message]:
        try:
            return await self._consumer.fetch(self._batch_size, self._max_wait_ms)
        except BrokerError as exc:
            if not exc.retriable:
                raise
            delay = self._backoff.initial_s
            logger.warning("fetching from %s failed (%s); retrying in %.1f s", self._describe, exc, delay)
            await self._sleep(delay)
            return []

    async def _process(self, messages: list[Message]) -> None:
        # Parsed in a thread: a batch of big envelopes costs tens of milliseconds that heartbeats need.
        records = await asyncio.to_thread(to_records, messages, self._format)
        report = BatchReport()
        for batch in micro_batches(records, self._batch_size):
            written = await self._write(batch)  # durable when it returns; a StoreError propagates
            if written is None:
                return  # stopped while the store was away: not committed, the batch replays on restart
            report.add(written)
        if self._dead_letters is not None:
            letters = dead_letters_for(messages, report.failures)
            if letters:
                await self._dead_letters.publish(letters)
        offsets = next_offsets(messages)
        committed = await self._commit(offsets)
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.failed += report.failed
        if committed:
            self.stats.committed.update(offsets)
        self._report(messages, report)

    async def _write(self, records: list[Record]) -> BatchReport | None:
        """Make the batch durable; while the store is unreachable, wait and write it again (the events are
        not committed meanwhile, so nothing is lost). None: a stop came while waiting."""
        delays = self._store_backoff.delays()
        while True:
            try:
                return await self._sink.write(records)
            except StoreError as exc:
                if not exc.retriable:
                    raise
                if self._stopping.is_set():
                    logger.warning("stopping while the store is unreachable: the batch in flight replays on restart")
                    return None
                delay = next(delays)
                logger.warning("%s; the batch waits, uncommitted, and is written again in %.1f s", exc, delay)
                self._beat("waiting for the store", store_error=str(exc))
                await self._sleep(delay)

    async def _commit(self, offsets: Offsets) -> bool:
        """Commit, retrying while the broker is away. False when the group moved on (the events replay)."""
        delays = self._backoff.delays()
        give_up_at: float | None = None
        while True:
            try:
                await asyncio.wait_for(self._consumer.commit(offsets), self._commit_attempt_s)
                return True
            except CommitLost as exc:
                logger.warning("offsets %s not committed (%s); their new owner replays them", dict(offsets), exc)
                return False
            except (BrokerError, TimeoutError) as exc:
                if isinstance(exc, BrokerError) and not exc.retriable:
                    raise
                reason = str(exc) or "timed out"
            now = time.monotonic()
            if self._stopping.is_set():
                give_up_at = give_up_at or now + self._stop_grace_s
                if now >= give_up_at:
                    logger.error("gave up committing %s while stopping (%s): they replay on restart", offsets, reason)
                    return False
            delay = next(delays)
            logger.warning("commit to %s failed (%s); retrying in %.1f s", self._describe, reason, delay)
            await asyncio.sleep(delay)

    async def _on_revoked(self) -> None:
        # Each batch is committed before the lock is released, so waiting for it is the flush.
        async with self._batch_lock:
            logger.info("partitions revoked: the batch in flight is committed")

    async def _until_stopped(self, joining: Awaitable[None]) -> bool:
        """Await `joining` unless a stop comes first (then cancel it and say False): joining a group
        waits for its first assignment, however long the group takes to settle."""
        join = asyncio.ensure_future(joining)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({join, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not join.done():
            join.cancel()
            await asyncio.gather(join, return_exceptions=True)
            return False
        join.result()  # a BrokerError, if joining failed
        return True

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on `request_stop`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- reporting ----------------------------------------------------------------------------------------

    def _report(self, messages: Sequence[Message], report: BatchReport) -> None:
        """One log line per batch, a warning per dead letter, and the heartbeat that `clipdex status` reads."""
        stamps = [m.timestamp_ms for m in messages if m.timestamp_ms]
        lag_ms = max(0.0, time.time() * 1000 - min(stamps)) if stamps else 0.0  # produce -> durable
        pending = self._consumer.lag()
        logger.info(
            "batch source=kafka size=%d %s lag_ms=%.0f pending=%s",
            len(messages),
            report.log_fields(),
            lag_ms,
            "?" if pending is None else pending,
        )
        for failed in report.failures:
            logger.warning("dead letter: %s: %s", failed.name[:200], failed.reason)
        self._beat("running", last_batch=report.summary(), lag_s=lag_ms / 1000, store_error=None)

    def _beat(self, state: str, **fields: Any) -> None:
        if self._heartbeat is not None:
            self._last_beat = time.monotonic()
            self._heartbeat.beat(state=state, pending=self._consumer.lag() or 0, **fields)

    def _resume_points(self) -> dict[str, int]:
        return {f"{t}[{p}]": o for (t, p), o in sorted(self.stats.committed.items())}

    def _summary(self) -> tuple[int, int, dict[str, int]]:
        return self.stats.batches, self.stats.records, self._resume_points()
