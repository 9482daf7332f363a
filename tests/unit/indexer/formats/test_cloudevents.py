"""CloudEvents 1.0 on Kafka, structured and binary mode: the type says upsert or delete, the map reads data."""

from __future__ import annotations

import json

import pytest

from indexer.events import Event
from indexer.formats import EventFormat, Incoming, event_format
from indexer.products import Product
from shared.errors import InvalidEvent
from tests.catalog_events import cloudevent

MAP = {
    "id": "/sku",
    "uri": "/image_url",
    "metadata": {"title": "/title"},
    "delete_types": ["com.shop.product.deleted"],
}
FORMAT = event_format("cloudevents", json.dumps(MAP))
PRODUCT = {"sku": "A-1001", "image_url": "https://cdn.shop.com/a-1001.jpg", "title": "Red trail shoe"}
UPSERT = Event(op="upsert", id="A-1001", uri="https://cdn.shop.com/a-1001.jpg", metadata={"title": "Red trail shoe"})


def one(fmt: EventFormat, message: Incoming) -> Event | Product:
    (event,) = fmt.parse(message)
    return event


def incoming(value: bytes | None, headers: list[tuple[str, bytes]], key: bytes | None = b"A-1001") -> Incoming:
    return Incoming(value, key, tuple(headers))


@pytest.mark.parametrize("binary", [False, True], ids=["structured", "binary"])
def test_both_modes_read_the_same_event(binary: bool) -> None:
    value, headers = cloudevent("com.shop.product.updated", PRODUCT, event_id="evt-77", binary=binary)
    assert one(FORMAT, incoming(value, headers)) == UPSERT  # the event's id and time are not the item's


@pytest.mark.parametrize("binary", [False, True], ids=["structured", "binary"])
def test_a_delete_type_deletes_even_without_data_when_the_map_reads_the_subject(binary: bool) -> None:
    by_subject = event_format("cloudevents", json.dumps({**MAP, "id": {"pointer": "/subject", "from": "envelope"}}))
    value, headers = cloudevent("com.shop.product.deleted", None, event_id="e", binary=binary, subject="A-1001")
    assert one(by_subject, incoming(value, headers)) == Event(op="delete", id="A-1001")
    value, headers = cloudevent("com.shop.product.deleted", {"sku": "A-1001"}, event_id="e", binary=binary)
    assert one(FORMAT, incoming(value, headers)) == Event(op="delete", id="A-1001")


def test_the_event_time_is_the_version_when_the_map_says_so() -> None:
    timed = event_format("cloudevents", json.dumps({**MAP, "version": {"pointer": "/time", "from": "envelope"}}))
    value, headers = cloudevent("com.shop.product.updated", PRODUCT, event_id="e", time="2024-05-01T10:00:00.250Z")
    event = one(timed, incoming(value, headers))
    assert isinstance(event, Event) and event.version == 1_714_557_600_250_000


def test_only_listed_types_upsert_when_the_map_lists_them() -> None:
    strict = event_format("cloudevents", json.dumps({**MAP, "upsert_types": ["com.shop.product.updated"]}))
    value, headers = cloudevent("com.shop.order.created", PRODUCT, event_id="e")
    with pytest.raises(
        InvalidEvent, match=r'type "com.shop.order.created" is in neither upsert_types nor delete_types'
    ):
        one(strict, incoming(value, headers))
    value, headers = cloudevent("com.shop.product.updated", PRODUCT, event_id="e")
    assert one(strict, incoming(value, headers)) == UPSERT


def test_without_a_map_data_is_a_clipdex_event() -> None:
    plain = event_format("cloudevents")
    data = {"op": "upsert", "id": "A-1", "uri": "a.jpg", "metadata": {"k": 1}, "version": 3}
    for binary in (False, True):
        value, headers = cloudevent("anything", data, event_id="e", binary=binary)
        assert one(plain, incoming(value, headers)) == Event.model_validate(data)
    value, headers = cloudevent("anything", PRODUCT, event_id="e")
    with pytest.raises(InvalidEvent, match="op"):
        one(plain, incoming(value, headers))


def test_a_product_with_several_images() -> None:
    gallery = event_format("cloudevents", json.dumps({"id": "/sku", "uris": "/media/*/href"}))
    data = {"sku": "A-1", "media": [{"href": f"https://cdn.shop.com/a-1-{i}.jpg"} for i in range(3)]}
    value, headers = cloudevent("com.shop.product.updated", data, event_id="e", binary=True)
    product = one(gallery, incoming(value, headers))
    assert isinstance(product, Product) and len(product.images) == 3


def test_a_binary_event_becomes_a_structured_dead_letter_that_reads_back_the_same() -> None:
    value, headers = cloudevent("com.shop.product.updated", PRODUCT, event_id="evt-1", binary=True)
    raw = FORMAT.raw(incoming(value, headers))
    structured = json.loads(raw)
    assert structured["specversion"] == "1.0" and structured["id"] == "evt-1" and structured["data"] == PRODUCT
    assert one(FORMAT, Incoming(raw.encode())) == one(FORMAT, incoming(value, headers))
    value, headers = cloudevent("com.shop.product.updated", PRODUCT, event_id="evt-1")
    assert FORMAT.raw(incoming(value, headers)) == (value or b"").decode()  # structured: as sent


def attrs(**changes: object) -> bytes:
    event = {"specversion": "1.0", "id": "e", "source": "/s", "type": "t", "data": PRODUCT, **changes}
    return json.dumps({k: v for k, v in event.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (Incoming(attrs(specversion="0.3")), r'specversion is a string \("0.3"\), not "1.0"'),
        (Incoming(attrs(specversion=None)), "specversion is missing"),
        (Incoming(attrs(type=None)), "type is missing"),
        (Incoming(attrs(source="")), 'source is a string \\(""\\), not a non-empty string'),
        (Incoming(attrs(id=5)), r"id is a number \(5\)"),
        (Incoming(attrs(data=None, data_base64="aGVsbG8=")), "data_base64"),
        (Incoming(attrs(data="A-1")), r'the map\'s id \(/sku\): data is a string \("A-1"\), not an object or a list'),
        (Incoming(attrs(data={"sku": "A-1"})), r"the map's uri \(/image_url\): not found in data"),
        (Incoming(b"[]"), "not a CloudEvent"),
        (Incoming(None), "empty message"),
        (
            Incoming(b"<xml/>", None, (("ce_specversion", b"1.0"), ("content-type", b"application/xml"))),
            r'data is "application/xml", not JSON',
        ),
        (Incoming(json.dumps(PRODUCT).encode(), None, (("ce_specversion", b"1.0"),)), "id is missing"),
    ],
)
def test_malformed_and_mismatched_cloudevents_are_refused_with_a_reason(message: Incoming, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        one(FORMAT, message)


def test_json_content_types_are_json() -> None:
    for content_type in (b"application/json", b"application/json; charset=utf-8", b"application/vnd.shop+json"):
        headers = (("ce_specversion", b"1.0"), ("ce_id", b"e"), ("ce_source", b"s"), ("ce_type", b"t"))
        message = Incoming(json.dumps(PRODUCT).encode(), None, (*headers, ("content-type", content_type)))
        assert one(FORMAT, message) == UPSERT
