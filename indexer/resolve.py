"""Resolve: what a micro-batch asks of the store, before and after its images are read.

Before reading (`plan`):
- a record that is not a valid event is a dead letter with the parse error (made fit for SQLite);
- item ids are namespaced by source (`kafka:sku-1`, `folder:cats/tom.jpg`);
- several events for one id: the last wins, unless an earlier one carries a higher version;
- an event older than the stored version is skipped.

After reading and hashing (`classify`):
- same id, same content hash as stored: a metadata-only update, no model call;
- a content hash already stored under any id (a rename, a copy): its vector is reused, no model call;
- the same new content twice in the batch: embedded once;
- otherwise: decode and embed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from indexer.events import Event
from indexer.records import FailedRecord, Record
from shared.roles import Delete, StoredState
from shared.types import Embedding, namespaced_id


@dataclass(frozen=True)
class Work:
    """One event that survived the plan, with what the store holds for its id."""

    item_id: str
    record: Record
    event: Event
    stored: StoredState | None

    @property
    def uri(self) -> str:
        assert self.event.uri is not None, "an upsert always has a uri (the schema says so)"
        return self.event.uri


@dataclass
class Plan:
    upserts: list[Work] = field(default_factory=list)
    deletes: list[Work] = field(default_factory=list)
    invalid: list[FailedRecord] = field(default_factory=list)
    skipped: list[Work] = field(default_factory=list)  # older than the stored version
    superseded: int = 0  # a later event for the same id in the batch won

    @property
    def store_deletes(self) -> list[Delete]:
        return [Delete(w.item_id, w.event.version) for w in self.deletes]


def item_id_of(record: Record) -> str | None:
    return None if record.event is None else namespaced_id(record.source, record.event.id)


def plan(records: Sequence[Record], stored: Mapping[str, StoredState]) -> Plan:
    """Split a batch into upserts, deletes, invalid records and skipped events.

    `stored` holds the store's state of (at least) every item id in the batch: `pending_ids(records)`."""
    out = Plan()
    winners: dict[str, Record] = {}
    for record in records:
        item_id = item_id_of(record)
        if record.event is None or item_id is None:
            reason = record.error or "not a valid event"
            out.invalid.append(FailedRecord(record, f"InvalidEvent: {reason}"))
            continue
        previous = winners.get(item_id)
        if previous is not None:
            out.superseded += 1
            if _older(record.event, previous.event):
                continue
        winners[item_id] = record
    for item_id, record in winners.items():
        assert record.event is not None
        work = Work(item_id, record, record.event, stored.get(item_id))
        if _older(record.event, work.stored):
            out.skipped.append(work)
        elif record.event.op == "delete":
            out.deletes.append(work)
        else:
            out.upserts.append(work)
    return out


def pending_ids(records: Sequence[Record]) -> list[str]:
    return sorted({i for r in records if (i := item_id_of(r)) is not None})


def _older(event: Event, than: Event | StoredState | None) -> bool:
    """Is `event` older than `than`? Events without versions are never older."""
    if than is None or event.version is None or than.version is None:
        return False
    return event.version < than.version


@dataclass(frozen=True)
class Fetched:
    work: Work
    data: bytes
    sha256: str
    tries: int = 1


@dataclass
class Classified:
    unchanged: list[Fetched] = field(default_factory=list)  # metadata-only update
    reused: list[tuple[Fetched, Embedding]] = field(default_factory=list)  # a stored vector of that content
    to_embed: list[Fetched] = field(default_factory=list)  # one per distinct new content
    copies: list[Fetched] = field(default_factory=list)  # same new content as one in to_embed


def classify(fetched: Sequence[Fetched], known: Mapping[str, Embedding]) -> Classified:
    """Sort fetched items by what their content hash says; `known` is `store.embeddings_by_sha`."""
    out = Classified()
    first_of: set[str] = set()
    for item in fetched:
        stored = item.work.stored
        if stored is not None and stored.has_vector and stored.sha256 == item.sha256:
            out.unchanged.append(item)
        elif item.sha256 in known:
            out.reused.append((item, known[item.sha256]))
        elif item.sha256 in first_of:
            out.copies.append(item)
        else:
            first_of.add(item.sha256)
            out.to_embed.append(item)
    return out
