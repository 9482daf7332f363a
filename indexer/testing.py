"""The indexer's fakes, for unit tests: an in-memory Kafka broker and group member, a dead-letter
publisher that keeps what it is given, and a sink that stands in for the pipeline.

    broker = MemoryBroker("events", partitions=2)
    broker.produce(b'{"op": "delete", "id": "a"}', key=b"a")
    source = KafkaSource(MemoryConsumer(broker), FakeSink(), batch_size=64, max_wait_ms=10)

Faults are scripted: `broker.fail_starts = 2` makes the next two joins fail as an unreachable broker would,
`fail_fetches` and `fail_commits` likewise; `await consumer.revoke()` runs a rebalance. Integration tests
use the real things (a tansu broker, the pipeline over a real store).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence

from indexer.records import BatchReport, FailedRecord, Record
from indexer.sources.kafka import BrokerError, CommitLost, DeadLetterMessage, Message, Offsets, RevokeHandler
from shared.errors import StoreError
from shared.types import namespaced_id


class MemoryBroker:
    """One topic's partitions and one group's committed offsets."""

    def __init__(self, topic: str = "events", partitions: int = 1) -> None:
        self.topic = topic
        self.partitions: list[list[Message]] = [[] for _ in range(partitions)]
        self.committed: dict[tuple[str, int], int] = {}
        self.commits: list[dict[tuple[str, int], int]] = []
        self.fail_starts = 0
        self.hang_starts = False  # joins that never get an assignment (a group that does not settle)
        self.fail_fetches = 0
        self.fail_commits = 0
        self.lose_commits = 0  # commits refused because the group rebalanced

    def produce(
        self,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Message:
        if partition is None:
            partition = zlib.crc32(key) % len(self.partitions) if key is not None else 0
        log = self.partitions[partition]
        message = Message(self.topic, partition, len(log), key, value, int(time.time() * 1000), tuple(headers))
        log.append(message)
        return message


class MemoryConsumer:
    """A group member that owns every partition of the broker's topic."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.started = False
        self.stopped = False
        self._positions: dict[int, int] = {}
        self._on_revoked: RevokeHandler | None = None

    async def start(self, on_revoked: RevokeHandler) -> None:
        if self.broker.hang_starts:
            await asyncio.Event().wait()
        if self.broker.fail_starts > 0:
            self.broker.fail_starts -= 1
            raise BrokerError("Unable to bootstrap from memory://", retriable=True)
        self._on_revoked = on_revoked
        self._seek_committed()
        self.started = True

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Message]:
        assert self.started and not self.stopped, "fetch on a consumer that is not running"
        if self.broker.fail_fetches > 0:
            self.broker.fail_fetches -= 1
            raise BrokerError("KafkaConnectionError: connection lost", retriable=True)
        out: list[Message] = []
        for p, log in enumerate(self.broker.partitions):
            take = log[self._positions[p] : self._positions[p] + max_records - len(out)]
            out.extend(take)
            self._positions[p] += len(take)
        if not out:
            await asyncio.sleep(min(timeout_ms, 5) / 1000)
        return out

    async def commit(self, offsets: Offsets) -> None:
        if self.broker.fail_commits > 0:
            self.broker.fail_commits -= 1
            raise BrokerError("RequestTimedOutError: commit timed out", retriable=True)
        if self.broker.lose_commits > 0:
            self.broker.lose_commits -= 1
            raise CommitLost("the group has already rebalanced")
        self.broker.committed.update(offsets)
        self.broker.commits.append(dict(offsets))

    def lag(self) -> int:
        return sum(len(log) - self._positions.get(p, 0) for p, log in enumerate(self.broker.partitions))

    async def stop(self) -> None:
        self.stopped = True

    async def revoke(self) -> None:
        """A rebalance: wait for the source to flush, then resume from the committed offsets."""
        assert self._on_revoked is not None
        await self._on_revoked()
        self._seek_committed()

    def _seek_committed(self) -> None:
        topic = self.broker.topic
        self._positions = {p: self.broker.committed.get((topic, p), 0) for p in range(len(self.broker.partitions))}


class MemoryDeadLetters:
    """A `DeadLetterPublisher` that keeps what was published."""

    def __init__(self) -> None:
        self.published: list[DeadLetterMessage] = []
        self.closed = False

    async def publish(self, letters: Sequence[DeadLetterMessage]) -> None:
        self.published.extend(letters)

    async def close(self) -> None:
        self.closed = True


class FakeSink:
    """A `Sink` that records what it was given; it can fail the store, fail chosen ids as the pipeline
    would (invalid records always fail), or hold a batch in flight."""

    def __init__(self) -> None:
        self.batches: list[list[Record]] = []
        self.store_error_on: int | None = None  # the batch number that raises StoreError
        self.fail_ids: dict[str, str] = {}  # event id -> reason
        self.gate: asyncio.Event | None = None  # when set: write waits for it
        self.entered = asyncio.Event()

    async def write(self, records: Sequence[Record]) -> BatchReport:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.store_error_on is not None and len(self.batches) == self.store_error_on:
            raise StoreError("database or disk is full")
        self.batches.append(list(records))
        report = BatchReport(records=len(records))
        for r in records:
            if r.event is None:
                report.failures.append(FailedRecord(r, r.error or "?"))
            elif r.event.id in self.fail_ids:
                item_id = namespaced_id(r.source, r.event.id)
                report.failures.append(
                    FailedRecord(r, self.fail_ids[r.event.id], item_id, uri=getattr(r.event, "uri", None))
                )
            else:
                report.indexed += 1
        report.failed = len(report.failures)
        return report

    @property
    def ids(self) -> list[str]:
        return [r.event.id for batch in self.batches for r in batch if r.event is not None]
