"""Dead letters published to a Kafka topic, beside the ones kept in SQLite (best effort).

A dead letter is the original message (same key, same value) on the dead-letter topic, with headers that
say why and where it came from, as Kafka Connect does:

    clipdex.reason   why it could not be indexed
    clipdex.topic    the topic, partition and offset it was read from
    clipdex.partition
    clipdex.offset

The SQLite dead letters are the record that counts; a failure to publish here is logged, never raised,
so an unreachable dead-letter topic never holds up indexing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aiokafka import AIOKafkaProducer

from indexer.records import Record
from shared.types import namespaced_id

if TYPE_CHECKING:
    from indexer.sources.kafka import Message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    reason: str
    topic: str
    partition: int
    offset: int

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("clipdex.reason", self.reason.encode()),
            ("clipdex.topic", self.topic.encode()),
            ("clipdex.partition", str(self.partition).encode()),
            ("clipdex.offset", str(self.offset).encode()),
        ]


class DeadLetterPublisher(Protocol):
    async def publish(self, letters: Sequence[DeadLetter]) -> None:
        """Publish, or log why not. Never raises."""
        ...

    async def close(self) -> None: ...


def dead_letters_for(
    messages: Sequence[Message], records: Sequence[Record], failures: Sequence[tuple[str, str]]
) -> list[DeadLetter]:
    """The messages of a batch that became dead letters: invalid events, and the items the sink failed.

    The sink names a failed item by its id (bare or namespaced) or, when it had none, by its raw message.
    With several events for one id in a batch, the last one is the one that was tried.
    """
    by_name: dict[str, int] = {}
    for i, record in enumerate(records):
        by_name[record.raw] = i
        if record.event is not None:
            by_name[record.event.id] = i
            by_name[namespaced_id("kafka", record.event.id)] = i
    reasons: dict[int, str] = {i: r.error for i, r in enumerate(records) if r.error is not None}
    for name, reason in failures:
        match = by_name.get(name)
        if match is None:
            logger.debug("a failure of %r matches no message of the batch", name)
        else:
            reasons.setdefault(match, reason)
    letters = []
    for i in sorted(reasons):
        m = messages[i]
        letters.append(DeadLetter(m.key, m.value, reasons[i], m.topic, m.partition, m.offset))
    return letters


class KafkaDeadLetters:
    """Publishes dead letters to one topic; the producer starts on first use and again after a failure."""

    def __init__(self, bootstrap_servers: str, topic: str, *, timeout_s: float = 10.0) -> None:
        self.topic = topic
        self._bootstrap_servers = bootstrap_servers
        self._timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None

    async def publish(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        try:
            await asyncio.wait_for(self._send(letters), self._timeout_s)
        except Exception as exc:  # best effort: the SQLite dead letters are the record that counts
            logger.warning(
                "could not publish %d dead letters to %s (%s: %s); they are kept in the store",
                len(letters),
                self.topic,
                type(exc).__name__,
                exc,
            )
            await self.close()

    async def _send(self, letters: Sequence[DeadLetter]) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap_servers,
                client_id="clipdex-dlq",
                request_timeout_ms=int(self._timeout_s * 1000),
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        sent = [await self._producer.send(self.topic, value=m.value, key=m.key, headers=m.headers()) for m in letters]
        await asyncio.gather(*sent)
        logger.info("published %d dead letters to %s", len(letters), self.topic)

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                await producer.stop()
            except Exception:
                logger.debug("ignored an error while closing the dead-letter producer", exc_info=True)


class MemoryDeadLetters:
    """The fake: keeps what was published."""

    def __init__(self) -> None:
        self.published: list[DeadLetter] = []
        self.closed = False

    async def publish(self, letters: Sequence[DeadLetter]) -> None:
        self.published.extend(letters)

    async def close(self) -> None:
        self.closed = True
