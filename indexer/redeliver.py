"""Redelivery: dead letters of transient failures, tried again by the running indexer, a bounded number
of times, each wait twice the one before.

    a record fails transiently (timeout, HTTP 408/429/5xx, reset, EIO, ESTALE, the model on one image),
    after the pipeline's own quick retries ─▶ dead letter, retriable, retry_at = now + delay·2^(attempt-1)
                                               (none after CLIPDEX_DLQ_RETRIES automatic retries)
    Redeliverer, every check_s, under the pipeline's write lock:
        catalog.due_dead_letters(prefix, now) ─▶ records again (attempt + 1) ─▶ one store transaction that
        writes the outcome (indexed, or a new dead letter) and removes the letters tried

Each indexer retries the dead letters of its own items (`prefix`: `kafka:`, or `folder:<name>/` for a
watched folder). Reading the due letters and writing them happen under the pipeline's lock, so no other
write of this process comes between; any later event of an item ends its older letters' retries in the
store (`Writer.apply`), so a retry never brings back what a later event replaced or deleted.
`clipdex dlq retry` beside a running indexer makes the chosen letters due now, and this loop picks them up.

A Kafka letter holds the message as the consumer read it and is read again in the consumer's event format
(`retry_records`): a Debezium or CloudEvents letter is that change again, and the letter of one image of a
product is the whole product again (its other images are unchanged: no model call, no new vector).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from indexer.events import Event
from indexer.formats import EventFormat, Incoming
from indexer.records import BatchReport, Record, Redelivery
from indexer.sources.kafka import CLIPDEX_FORMAT
from indexer.sources.kafka import SOURCE as KAFKA_SOURCE
from shared.config import Settings
from shared.errors import ClipdexError, InvalidEvent, StoreUnavailable
from shared.roles import Catalog, DeadLetter

logger = logging.getLogger(__name__)

MAX_DELAY_S = 6 * 3600  # no wait between two automatic retries is longer


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # automatic retries after the first delivery; 0: none
    first_delay_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.dlq_retries, settings.dlq_retry_delay_s)

    def next_retry(self, attempt: int, now: datetime) -> datetime | None:
        """When a record whose delivery `attempt` failed transiently is tried again; None once its
        automatic retries are used up (a person may still `clipdex dlq retry` it)."""
        if attempt > self.retries:
            return None
        return now + timedelta(seconds=min(MAX_DELAY_S, self.first_delay_s * 2 ** (attempt - 1)))


def retry_records(letter: DeadLetter, event_format: EventFormat | None = None) -> list[Record]:
    """A dead letter as records again, as its source first sent it, as its next delivery: a Kafka
    message read by the consumer's event format (CLIPDEX_EVENT_FORMAT; a Debezium rename is two
    records, a product one record for all its images), a folder's file as clipdex's own event. A
    clipdex event keeps the item id it was recorded with (a folder rename moves a letter along)."""
    position = Redelivery(letter.id, letter.attempts + 1)
    key = letter.item_id.removeprefix(f"{letter.source}:") if letter.item_id else None
    reader = event_format if event_format is not None and letter.source == KAFKA_SOURCE else CLIPDEX_FORMAT
    try:
        events = reader.parse(Incoming(letter.payload.encode("utf-8", "surrogatepass"), _key(key, reader)))
    except InvalidEvent as exc:
        return [Record(letter.source, letter.payload, None, str(exc), position)]
    (first, *rest) = events or (None,)
    if key is not None and reader.mapping is None and not rest and isinstance(first, Event) and first.id != key:
        events = (first.model_copy(update={"id": key}),)
    return [Record(letter.source, letter.payload, event, None, position) for event in events]


def _key(item_id: str | None, reader: EventFormat) -> bytes | None:
    """The message key a retried event is read with: the item id, for clipdex's own events (whose id may
    be the key); a mapped format reads its ids from the event."""
    if item_id is None or reader.mapping is not None:
        return None
    return item_id.encode("utf-8", "surrogatepass")


class DueWriter(Protocol):
    """The pipeline, as redelivery needs it."""

    async def write_due(self, read: Callable[[], Sequence[Record]]) -> BatchReport | None:
        """Call `read` (blocking) and write what it returns, both under the write lock; None: nothing."""
        ...


class Redeliverer:
    """Tries the due dead letters of items whose ids start with one of `prefixes` again, every `check_s`."""

    def __init__(
        self,
        catalog: Catalog,
        writer: DueWriter,
        prefixes: Sequence[str],
        *,
        event_format: EventFormat | None = None,
        check_s: float = 2.0,
        batch: int = 64,
    ) -> None:
        self.catalog = catalog
        self.writer = writer
        self.prefixes = tuple(prefixes)
        self.event_format = event_format  # how the Kafka messages of the letters read (None: clipdex's own)
        self.check_s = check_s
        self.batch = batch
        self.retried = 0  # totals, for tests and logs
        self.recovered = 0

    def due(self) -> list[Record]:
        """Blocking: the due letters (at most `batch`), as records."""
        now = datetime.now(UTC)
        letters: list[DeadLetter] = []
        for prefix in self.prefixes:
            letters += self.catalog.due_dead_letters(prefix, now, limit=self.batch - len(letters))
            if len(letters) >= self.batch:
                break
        return [record for d in letters for record in retry_records(d, self.event_format)]

    async def redeliver_due(self) -> BatchReport | None:
        """Try the due letters once; the report of their write, or None when none was due."""
        report = await self.writer.write_due(self.due)
        if report is not None:
            self.retried += report.records
            self.recovered += report.records - report.failed
            logger.info(
                "retried %d dead letters: %d indexed, %d failed again%s",
                report.records,
                report.records - report.failed,
                report.failed,
                "".join(f"; {f.name}: {f.reason}" for f in report.failures[:3]),
            )
        return report

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set. A store failure is logged and tried again at the next check: the letters
        stay due (the source's own writes report the store's state to the operator)."""
        while not stop.is_set():
            try:
                for _ in range(100):  # a backlog goes through at the pipeline's pace, a few thousand a check
                    if await self.redeliver_due() is None or stop.is_set():
                        break
            except StoreUnavailable as exc:  # the source's own writes wait it out and say so
                logger.warning("retrying dead letters: %s; trying again in %.0f s", exc, self.check_s)
            except ClipdexError:
                logger.exception("retrying dead letters failed; trying again in %.0f s", self.check_s)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_s)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Redeliverer]:
        """Run in the background for the duration of the block."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.run(stop), name="clipdex-redeliver")
        try:
            yield self
        finally:
            stop.set()
            await task
