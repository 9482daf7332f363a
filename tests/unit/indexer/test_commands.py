"""The indexer's commands: a dead letter is read back as its source first sent it, in its event format."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from indexer.commands import retry_records
from indexer.events import Event
from indexer.formats import Incoming, event_format
from indexer.products import Product
from shared.roles import DeadLetter
from tests.catalog_events import GALLERY_MAP, PRODUCTS_MAP, cloudevent, debezium, product_row


def letter(payload: str, item_id: str | None = None, source: str = "kafka") -> DeadLetter:
    return DeadLetter(1, source, item_id, payload, "reason", 1, datetime.now(UTC))


def test_a_debezium_dead_letter_is_read_again_as_a_debezium_change() -> None:
    fmt = event_format("debezium", json.dumps(PRODUCTS_MAP))
    row = product_row(1, "A-1", "Shoe", "https://cdn.shop.example/a.jpg")
    (record,) = retry_records(letter(debezium("u", None, row, lsn=42).decode(), "kafka:A-1"), fmt)
    assert isinstance(record.event, Event)
    assert (record.event.id, record.event.version) == ("A-1", 42)
    gallery = event_format("debezium", json.dumps(GALLERY_MAP))
    row = product_row(1, "A-1", "Shoe", images=["https://cdn.shop.example/a.jpg"])
    (record,) = retry_records(letter(debezium("c", None, row, lsn=43).decode(), "kafka:A-1#0123456789abcdef"), gallery)
    assert isinstance(record.event, Product) and record.event.id == "A-1"


def test_a_binary_cloudevent_dead_letter_is_kept_structured_and_read_back() -> None:
    fmt = event_format("cloudevents", json.dumps({"id": "/sku", "uri": "/image"}))
    value, headers = cloudevent("t", {"sku": "B-1", "image": "b.jpg"}, event_id="e", binary=True)
    payload = fmt.raw(Incoming(value, None, tuple(headers)))
    (record,) = retry_records(letter(payload, "kafka:B-1"), fmt)
    assert record.event == Event(op="upsert", id="B-1", uri="b.jpg")


def test_clipdex_events_keep_the_key_as_id_and_folder_letters_are_clipdex_events() -> None:
    (record,) = retry_records(letter('{"op": "delete"}', "kafka:sku-1"), event_format("clipdex"))
    assert record.event == Event(op="delete", id="sku-1")
    folder = json.dumps({"op": "upsert", "id": "a.jpg", "uri": "/photos/a.jpg"})
    (record,) = retry_records(
        letter(folder, "folder:a.jpg", "folder"), event_format("debezium", json.dumps(PRODUCTS_MAP))
    )
    assert record.event == Event(op="upsert", id="a.jpg", uri="/photos/a.jpg")
    (bad,) = retry_records(letter("{not json", "kafka:x"), event_format("cloudevents"))
    assert bad.event is None and "not JSON" in (bad.error or "")
