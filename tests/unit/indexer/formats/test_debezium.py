"""Debezium change events of a products table, with and without the JSON converter's schema."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from indexer.events import Event
from indexer.formats import Incoming, event_format
from indexer.formats.debezium import DebeziumFormat, position
from indexer.products import Product, image_id
from shared.errors import InvalidEvent
from tests.catalog_events import GALLERY_MAP, PRODUCTS_MAP, debezium, debezium_key, product_row
from tests.unit.indexer.formats.test_hostile import FUZZ, assert_parsed_or_refused, hostile_documents

ROW = product_row(1001, "A-1001", "Red trail shoe", "https://cdn.shop.com/a-1001.jpg")
FORMAT = event_format("debezium", json.dumps(PRODUCTS_MAP))
GALLERY = event_format("debezium", json.dumps(GALLERY_MAP))


def parse(value: bytes | None, key: bytes | None = None, fmt: DebeziumFormat = FORMAT) -> object:  # type: ignore[assignment]
    """The one event a message carries, None for none, or all of them."""
    events = fmt.parse(Incoming(value, key))
    return None if not events else events[0] if len(events) == 1 else events


@pytest.mark.parametrize("schema", [False, True], ids=["plain", "with-schema"])
@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_inserts_updates_and_snapshot_reads_upsert_the_row_after(op: str, schema: bool) -> None:
    before = None if op != "u" else {**ROW, "title": "Old title"}
    event = parse(debezium(op, before, ROW, lsn=24023128, schema=schema), debezium_key(1001, schema=schema))
    assert event == Event(
        op="upsert",
        id="A-1001",
        uri="https://cdn.shop.com/a-1001.jpg",
        metadata={"title": "Red trail shoe", "brand": "Acme", "price_cents": 4999},
        version=24023128,  # the source's log position
    )


@pytest.mark.parametrize("schema", [False, True], ids=["plain", "with-schema"])
def test_a_delete_takes_the_id_from_before_and_its_tombstone_is_skipped(schema: bool) -> None:
    key = debezium_key(1001, schema=schema)
    assert parse(debezium("d", ROW, None, lsn=24023200, schema=schema), key) == Event(
        op="delete", id="A-1001", version=24023200
    )
    assert parse(None, key) is None  # the tombstone: nothing to do, not a dead letter


def test_a_delete_without_before_takes_the_id_from_the_key() -> None:
    by_id = event_format("debezium", json.dumps({"id": "/id", "uri": "/image_url"}))
    for schema in (False, True):
        event = parse(debezium("d", None, None, lsn=9, schema=schema), debezium_key(1001, schema=schema), by_id)
        assert event == Event(op="delete", id="1001", version=9)
    with pytest.raises(
        InvalidEvent, match=r"whose before is null: the map's id \(/sku\): not found in the message key"
    ):
        parse(debezium("d", None, None, lsn=9), debezium_key(1001))
    with pytest.raises(InvalidEvent, match="whose before is null and with no message key"):
        parse(debezium("d", None, None, lsn=9))


def test_the_version_is_the_log_position_else_the_source_time_else_the_event_time() -> None:
    assert position({"source": {"lsn": 5, "ts_ms": 7}, "ts_ms": 9}) == 5
    assert position({"source": {"lsn": None, "ts_ms": 7}, "ts_ms": 9}) == 7  # MySQL: no lsn
    assert position({"source": "?", "ts_ms": 9}) == 9
    assert position({"source": {"lsn": True}}) is None
    mapped = event_format("debezium", json.dumps({**PRODUCTS_MAP, "version": "/updated_at"}))
    event = parse(debezium("u", ROW, {**ROW, "updated_at": 1_714_557_601_000_000}, lsn=5), None, mapped)
    assert isinstance(event, Event) and event.version == 1_714_557_601_000_000  # the map's version wins


def test_an_update_that_changes_the_mapped_id_deletes_the_old_one_first() -> None:
    renamed = {**ROW, "sku": "A-1001-RED"}
    events = parse(debezium("u", ROW, renamed, lsn=300))
    assert events == (
        Event(op="delete", id="A-1001", version=300),
        Event(
            op="upsert",
            id="A-1001-RED",
            uri=ROW["image_url"],
            metadata={"title": "Red trail shoe", "brand": "Acme", "price_cents": 4999},
            version=300,
        ),
    )
    key_only = {"id": 1001, **dict.fromkeys(k for k in ROW if k != "id")}  # REPLICA IDENTITY DEFAULT: the key only
    assert isinstance(parse(debezium("u", key_only, renamed, lsn=301)), Event)  # nothing to compare: the upsert
    assert isinstance(parse(debezium("u", ROW, {**ROW, "title": "x"}, lsn=302)), Event)  # the same id: one event
    gallery = product_row(1, "P-1", "t", images=["https://cdn.shop.example/1.jpg"])
    events = parse(debezium("u", gallery, {**gallery, "sku": "P-2"}, lsn=303), None, GALLERY)
    assert isinstance(events, tuple) and [(e.op, e.id) for e in events] == [("delete", "P-1"), ("upsert", "P-2")]


def test_a_row_with_several_images_is_one_product() -> None:
    urls = [f"https://cdn.shop.com/a-1001-{side}.jpg" for side in ("front", "side", "back")]
    row = product_row(1001, "A-1001", "Red trail shoe", images=urls)
    product = parse(debezium("c", None, row, lsn=77, schema=True), None, GALLERY)
    assert isinstance(product, Product) and product.id == "A-1001" and product.version == 77
    assert [e.id for e in product.images] == [image_id("A-1001", u) for u in urls]
    assert all(e.metadata == {"title": "Red trail shoe", "brand": "Acme", "parent": "A-1001"} for e in product.images)
    assert parse(debezium("d", row, None, lsn=78), None, GALLERY) == Product("delete", "A-1001", version=78)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (debezium("t", None, None, lsn=1), "truncate"),
        (debezium("m", None, None, lsn=1), r'op is a string \("m"\), not c, u, r or d'),
        (debezium("c", None, None, lsn=1), r"an insert \(op c\) whose after is null, not a row"),
        (debezium("u", ROW, None, lsn=1), r"an update \(op u\) whose after is null"),
        (json.dumps({**ROW}).encode(), "ExtractNewRecordState"),  # a flattened row: not an envelope
        (b"[1, 2]", "got a list of 2"),
        (b"{not json", "not JSON"),
        (debezium("c", None, {**ROW, "sku": None}, lsn=1), r"the map's id \(/sku\): found null"),
        (debezium("c", None, {**ROW, "image_url": None}, lsn=1), r"the map's uri \(/image_url\): found null"),
        (debezium("c", None, {k: v for k, v in ROW.items() if k != "brand"}, lsn=1), r"metadata.brand \(/brand\)"),
    ],
)
def test_malformed_and_mismatched_change_events_are_refused_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse(value)


def test_a_mismatched_image_list_names_the_pointer_and_what_it_found() -> None:
    row = {**product_row(1, "A-1", "t"), "images": json.dumps({"url": "x.jpg"})}
    with pytest.raises(InvalidEvent, match=r"uris \(/images/\*/url\): /images is an object, not a list"):
        parse(debezium("c", None, row, lsn=1), None, GALLERY)


# -- hostile change events: anything parses or is refused with a reason -----------------------------------------

ENVELOPES = st.fixed_dictionaries(
    {"op": st.sampled_from(["c", "u", "d", "r", "t", "x"])},
    optional={"before": hostile_documents(), "after": hostile_documents(), "source": hostile_documents()},
)


@FUZZ
@given(ENVELOPES, st.booleans(), st.none() | st.binary(max_size=64))
def test_random_change_events_never_raise_anything_but_invalid_event(
    change: dict[str, object], schema: bool, key: bytes | None
) -> None:
    value = json.dumps({"schema": {"type": "struct"}, "payload": change} if schema else change).encode()
    for fmt in (FORMAT, GALLERY):
        assert_parsed_or_refused(fmt, Incoming(value, key))
