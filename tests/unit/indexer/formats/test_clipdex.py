"""The clipdex format: its own events without a map; a catalog's own product JSON with one."""

from __future__ import annotations

import json

import pytest

from indexer.events import Event
from indexer.formats import Incoming, event_format
from indexer.products import Product, image_id
from shared.errors import InvalidEvent


def test_without_a_map_it_is_clipdexs_own_schema_and_the_key_is_the_id() -> None:
    fmt = event_format("clipdex")
    assert fmt.parse(Incoming(b'{"op": "delete"}', b"sku-1")) == (Event(op="delete", id="sku-1"),)
    with pytest.raises(InvalidEvent, match="empty message"):
        fmt.parse(Incoming(None, b"sku-1"))  # a tombstone is a dead letter here, as before


def test_a_catalogs_own_product_json_through_a_map() -> None:
    mapping = {
        "id": "/sku",
        "uris": "/images/*/src",
        "metadata": {"title": "/title", "category": "/category/name"},
        "version": "/updated_at",
        "op": "/action",
    }
    fmt = event_format("clipdex", json.dumps(mapping))
    product = {
        "sku": "A-1001",
        "title": "Red trail shoe",
        "category": {"name": "shoes"},
        "images": [{"src": "https://cdn.shop.com/a-front.jpg"}, {"src": "https://cdn.shop.com/a-back.jpg"}],
        "updated_at": "2024-05-01T10:00:00Z",
        "action": "upsert",
    }
    (parsed,) = fmt.parse(Incoming(json.dumps(product).encode()))
    assert isinstance(parsed, Product) and parsed.op == "upsert" and parsed.version == 1_714_557_600_000_000
    assert [e.id for e in parsed.images] == [image_id("A-1001", i["src"]) for i in product["images"]]  # type: ignore[index]
    assert parsed.images[0].metadata == {"title": "Red trail shoe", "category": "shoes", "parent": "A-1001"}
    deleted = fmt.parse(Incoming(json.dumps({"sku": "A-1001", "action": "delete"}).encode()))
    assert deleted == (Product("delete", "A-1001"),)
    with pytest.raises(InvalidEvent, match="empty message"):
        fmt.parse(Incoming(None))
    with pytest.raises(InvalidEvent, match="a JSON object, got a list"):
        fmt.parse(Incoming(b"[]"))
