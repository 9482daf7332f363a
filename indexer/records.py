"""What a source hands the pipeline, and what the pipeline promises back.

A source (Kafka, a folder) reads records, calls `await sink.write(records)`, and only after it returns
commits its position: `write` returns once the batch is durable in the store. An invalid record is not
an error of `write`: it becomes a dead letter and its position still moves on. The report names each
failed record itself (and so its position), so a source knows which of its messages failed without
matching names. A dead letter tried again (`indexer.redeliver`) is a record too, whose position is the
letter itself (`Redelivery`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from indexer.events import Event
from indexer.products import Product
from shared.roles import Failure

if TYPE_CHECKING:
    from indexer.resolve import Work


@dataclass(frozen=True)
class Record:
    source: str  # "kafka" | "folder"
    raw: str  # the raw message or path, kept in the dead letter if this record fails
    event: Event | Product | None  # None when the message could not be parsed; a Product: one item per image
    error: str | None = None  # why it could not be parsed
    position: object = None  # the source's own position (a Kafka (partition, offset), a file mtime, ...)


@dataclass(frozen=True)
class Redelivery:
    """The position of a record that is a dead letter tried again: the letter, and which delivery of
    the record this is (the first delivery is 1)."""

    dead_letter: int
    attempt: int


def attempt_of(record: Record) -> int:
    """Which delivery of the record this is: 1, or more for a dead letter tried again."""
    return record.position.attempt if isinstance(record.position, Redelivery) else 1


@dataclass(frozen=True)
class FailedRecord:
    """A record that could not be indexed, and why: it becomes a dead letter."""

    record: Record
    reason: str
    item_id: str | None = None  # None when the record is not a valid event
    tries: int = 1
    uri: str | None = None  # the image that failed, when there was one
    retriable: bool = False  # the failure was transient: trying again later may succeed

    @property
    def name(self) -> str:
        """How people know it: the item id, or the raw message or path."""
        return self.item_id or self.record.raw

    def dead_letter(self, retry_at: datetime | None = None) -> Failure:
        """The dead letter to store; `retry_at`: when the indexer tries a retriable one again."""
        return Failure(
            source=self.record.source,
            payload=storable(self.record.raw),
            reason=storable(self.reason),
            id=self.item_id,
            uri=None if self.uri is None or self.item_id is None else storable(self.uri),
            tries=self.tries,
            retriable=self.retriable,
            attempts=attempt_of(self.record),
            retry_at=retry_at if self.retriable else None,
        )


def storable(text: str) -> str:
    """`text` as SQLite can store it (UTF-8): a lone surrogate, which is what Python makes of a file name
    that is not UTF-8, is escaped as `\\udcXX` instead of failing the batch's transaction."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass
class BatchReport:
    records: int = 0
    indexed: int = 0  # new or changed images, embedded
    unchanged: int = 0  # same content hash: metadata-only update, no model call
    reused: int = 0  # content already embedded under another id (a rename): no model call
    deleted: int = 0
    skipped: int = 0  # older version than the stored one
    superseded: int = 0  # a later event for the same id in the same batch won
    failed: int = 0
    failures: list[FailedRecord] = field(default_factory=list)
    decode_ms: float = 0.0
    embed_ms: float = 0.0
    write_ms: float = 0.0
    total_ms: float = 0.0
    # Items another writer changed while this batch read them: their records are written again (the pipeline)
    conflicted: list[Work] = field(default_factory=list)

    def merge(self, again: BatchReport) -> None:
        """Fold in the report of this batch's conflicted records, written again."""
        for name in ("indexed", "unchanged", "reused", "deleted", "skipped", "failed"):
            setattr(self, name, getattr(self, name) + getattr(again, name))
        for name in ("decode_ms", "embed_ms", "write_ms", "total_ms"):
            setattr(self, name, getattr(self, name) + getattr(again, name))
        self.failures += again.failures
        self.conflicted = again.conflicted

    def add(self, other: BatchReport) -> None:
        """Count `other` (a later write of the same fetched batch) into this report."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)  # counts and timings add up, lists join

    def log_fields(self) -> str:
        """The counts and stage timings as key=value pairs, for the one log line of each batch."""
        return (
            f"indexed={self.indexed} unchanged={self.unchanged} reused={self.reused} deleted={self.deleted} "
            f"skipped={self.skipped} failed={self.failed} decode_ms={self.decode_ms:.0f} "
            f"embed_ms={self.embed_ms:.0f} write_ms={self.write_ms:.0f}"
        )

    def summary(self, max_failures: int = 10) -> dict[str, Any]:
        """Plain data for a heartbeat file: the counts, timings and the first few failures."""
        out: dict[str, Any] = {k: v for k, v in vars(self).items() if k not in ("failures", "conflicted")}
        out["failures"] = [(f.name, f.reason) for f in self.failures[:max_failures]]
        return out


class Sink(Protocol):
    async def write(self, records: Sequence[Record]) -> BatchReport:
        """Make the records durable (one store transaction per micro-batch); return when they are."""
        ...
