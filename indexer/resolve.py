"""Resolve: what a micro-batch asks of the store, before and after its images are read.

Before reading (`plan`):
- a record that is not a valid event is a dead letter with the parse error (made fit for SQLite);
- item ids are namespaced by source (`kafka:sku-1`, `folder:cats/tom.jpg`);
- several events for one id: the last wins, unless an earlier one carries a higher version;
- an event older than the stored version is skipped;
- a product (`indexer.products`): each image it names is upserted, each stored image it no longer names
  is deleted (a delete: all of them); it is older when older than the newest of its stored images.

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
from indexer.products import Product, parent_of
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
    skipped: list[str] = field(default_factory=list)  # item (or product) ids whose event is older than stored
    superseded: int = 0  # a later event for the same id in the batch won

    @property
    def store_deletes(self) -> list[Delete]:
        return [Delete(w.item_id, w.event.version) for w in self.deletes]


def plan(records: Sequence[Record], stored: Mapping[str, StoredState]) -> Plan:
    """Split a batch into upserts, deletes, invalid records and skipped events.

    `stored` holds the store's state of (at least) every item id in the batch (`pending_ids(records)`)
    and of every stored image of its products (`pending_products(records)`)."""
    out = Plan()
    winners: dict[tuple[bool, str], Record] = {}  # (a product?, namespaced id): the event that counts
    for record in records:
        if record.event is None:
            reason = record.error or "not a valid event"
            out.invalid.append(FailedRecord(record, f"InvalidEvent: {reason}"))
            continue
        key = (isinstance(record.event, Product), namespaced_id(record.source, record.event.id))
        previous = winners.get(key)
        if previous is not None:
            out.superseded += 1
            if _older(record.event, previous.event):
                continue
        winners[key] = record
    images = images_by_product(stored)
    for (is_product, item_id), record in winners.items():
        event = record.event
        if isinstance(event, Product):
            _plan_product(out, item_id, record, event, images.get(item_id, {}))
            continue
        assert event is not None and not is_product
        work = Work(item_id, record, event, stored.get(item_id))
        if _older(event, work.stored):
            out.skipped.append(item_id)
        elif event.op == "delete":
            out.deletes.append(work)
        else:
            out.upserts.append(work)
    return out


def _plan_product(
    out: Plan, product_id: str, record: Record, product: Product, stored: Mapping[str, StoredState]
) -> None:
    """A product's images: upsert the ones it names, delete the stored ones it no longer names (all of
    them for a delete). Its version is checked against the newest of its stored images: every image is
    written with its product's version, so an older event for the product changes none of them."""
    newest = max((s.version for s in stored.values() if s.version is not None), default=None)
    if product.version is not None and newest is not None and product.version < newest:
        out.skipped.append(product_id)
        return
    named = set()
    for image in product.images:
        image_id = namespaced_id(record.source, image.id)
        named.add(image_id)
        out.upserts.append(Work(image_id, record, image, stored.get(image_id)))
    for refused in product.refused:
        image_id = namespaced_id(record.source, refused.id)
        named.add(image_id)
        out.invalid.append(FailedRecord(record, f"InvalidEvent: {refused.reason}", image_id, uri=refused.uri))
    for image_id in sorted(set(stored) - named):
        raw_id = image_id.removeprefix(f"{record.source}:")
        gone = Event.model_construct(op="delete", id=raw_id, uri=None, metadata={}, version=product.version)
        out.deletes.append(Work(image_id, record, gone, stored[image_id]))


def images_by_product(stored: Mapping[str, StoredState]) -> dict[str, dict[str, StoredState]]:
    """The stored images among `stored`, by their (namespaced) product id."""
    out: dict[str, dict[str, StoredState]] = {}
    for item_id, state in stored.items():
        product_id = parent_of(item_id)
        if product_id is not None:
            out.setdefault(product_id, {})[item_id] = state
    return out


def pending_ids(records: Sequence[Record]) -> list[str]:
    """The item ids whose stored state the plan needs (a product's images are found by prefix)."""
    return sorted(
        {
            namespaced_id(r.source, r.event.id)
            for r in records
            if r.event is not None and not isinstance(r.event, Product)
        }
    )


def pending_products(records: Sequence[Record]) -> list[str]:
    """The batch's products, whose stored images the plan needs (`Writer.product_images`)."""
    return sorted({namespaced_id(r.source, r.event.id) for r in records if isinstance(r.event, Product)})


def _older(event: Event | Product, than: Event | Product | StoredState | None) -> bool:
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
