"""Catalog events as catalogs publish them, built the way the producers document them, for tests.

- Debezium (PostgreSQL connector) change events of a `products` table, with or without the JSON
  converter's schema (https://debezium.io/documentation/reference/stable/connectors/postgresql.html,
  "Data change events"); the key holds the primary key.
- CloudEvents 1.0 in Kafka, structured and binary mode
  (https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/kafka-protocol-binding.md).
"""

from __future__ import annotations

import json
from typing import Any

# The map that reads the products table below: one image per row (`image_url`).
PRODUCTS_MAP = {
    "id": "/sku",
    "uri": "/image_url",
    "metadata": {"title": "/title", "brand": "/brand", "price_cents": "/price_cents"},
}
# The same table, read as products with several images (the `images` jsonb column).
GALLERY_MAP = {
    "id": "/sku",
    "uris": "/images/*/url",
    "metadata": {"title": "/title", "brand": "/brand"},
}

_COLUMNS: list[dict[str, Any]] = [
    {"type": "int32", "optional": False, "default": 0, "field": "id"},
    {"type": "string", "optional": False, "field": "sku"},
    {"type": "string", "optional": False, "field": "title"},
    {"type": "string", "optional": True, "field": "brand"},
    {"type": "int64", "optional": True, "field": "price_cents"},
    {"type": "string", "optional": True, "field": "image_url"},
    {"type": "string", "optional": True, "name": "io.debezium.data.Json", "version": 1, "field": "images"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "updated_at"},
]
_SOURCE_FIELDS: list[dict[str, Any]] = [
    {"type": "string", "optional": False, "field": "version"},
    {"type": "string", "optional": False, "field": "connector"},
    {"type": "string", "optional": False, "field": "name"},
    {"type": "int64", "optional": False, "field": "ts_ms"},
    {
        "type": "string",
        "optional": True,
        "name": "io.debezium.data.Enum",
        "version": 1,
        "parameters": {"allowed": "true,last,false,incremental"},
        "default": "false",
        "field": "snapshot",
    },
    {"type": "string", "optional": False, "field": "db"},
    {"type": "string", "optional": True, "field": "sequence"},
    {"type": "string", "optional": False, "field": "schema"},
    {"type": "string", "optional": False, "field": "table"},
    {"type": "int64", "optional": True, "field": "txId"},
    {"type": "int64", "optional": True, "field": "lsn"},
    {"type": "int64", "optional": True, "field": "xmin"},
]
VALUE_SCHEMA: dict[str, Any] = {
    "type": "struct",
    "fields": [
        {
            "type": "struct",
            "fields": _COLUMNS,
            "optional": True,
            "name": "shop.public.products.Value",
            "field": "before",
        },
        {
            "type": "struct",
            "fields": _COLUMNS,
            "optional": True,
            "name": "shop.public.products.Value",
            "field": "after",
        },
        {
            "type": "struct",
            "fields": _SOURCE_FIELDS,
            "optional": False,
            "name": "io.debezium.connector.postgresql.Source",
            "field": "source",
        },
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
        {
            "type": "struct",
            "fields": [
                {"type": "string", "optional": False, "field": "id"},
                {"type": "int64", "optional": False, "field": "total_order"},
                {"type": "int64", "optional": False, "field": "data_collection_order"},
            ],
            "optional": True,
            "name": "event.block",
            "version": 1,
            "field": "transaction",
        },
    ],
    "optional": False,
    "name": "shop.public.products.Envelope",
    "version": 1,
}
KEY_SCHEMA = {
    "type": "struct",
    "fields": [{"type": "int32", "optional": False, "default": 0, "field": "id"}],
    "optional": False,
    "name": "shop.public.products.Key",
}


def product_row(
    row_id: int,
    sku: str,
    title: str,
    image_url: str | None = None,
    *,
    images: list[str] | None = None,
    brand: str | None = "Acme",
    price_cents: int | None = 4999,
    updated_at_us: int = 1_714_557_600_000_000,
) -> dict[str, Any]:
    """A row of the products table as Debezium renders it (jsonb as a JSON string, timestamps in µs)."""
    return {
        "id": row_id,
        "sku": sku,
        "title": title,
        "brand": brand,
        "price_cents": price_cents,
        "image_url": image_url,
        "images": None if images is None else json.dumps([{"url": u, "alt": title} for u in images]),
        "updated_at": updated_at_us,
    }


def debezium(
    op: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    *,
    lsn: int | None,
    ts_ms: int = 1_714_557_600_123,
    schema: bool = False,
) -> bytes:
    """A change event of the products table: op c, u, d or r (a snapshot read)."""
    payload = {
        "before": before,
        "after": after,
        "source": {
            "version": "2.7.0.Final",
            "connector": "postgresql",
            "name": "shop",
            "ts_ms": ts_ms - 7,
            "snapshot": "true" if op == "r" else "false",
            "db": "shop",
            "sequence": json.dumps([None, str(lsn)]),
            "schema": "public",
            "table": "products",
            "txId": 7781,
            "lsn": lsn,
            "xmin": None,
        },
        "op": op,
        "ts_ms": ts_ms,
        "transaction": None,
    }
    return json.dumps({"schema": VALUE_SCHEMA, "payload": payload} if schema else payload).encode()


def debezium_key(row_id: int, *, schema: bool = False) -> bytes:
    payload = {"id": row_id}
    return json.dumps({"schema": KEY_SCHEMA, "payload": payload} if schema else payload).encode()


Headers = list[tuple[str, bytes]]


def cloudevent(
    event_type: str,
    data: Any,
    *,
    event_id: str,
    binary: bool = False,
    source: str = "/shop/catalog",
    time: str = "2024-05-01T10:00:00.250Z",
    subject: str | None = None,
) -> tuple[bytes | None, Headers]:
    """(value, headers) of a CloudEvent in Kafka: structured (one JSON value) or binary (ce_* headers)."""
    attributes: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": time,
    }
    if subject is not None:
        attributes["subject"] = subject
    if binary:
        headers = [(f"ce_{name}", str(value).encode()) for name, value in attributes.items()]
        headers.append(("content-type", b"application/json"))
        return (None if data is None else json.dumps(data).encode()), headers
    body = {**attributes, "datacontenttype": "application/json"}
    if data is not None:
        body["data"] = data
    return json.dumps(body).encode(), [("content-type", b"application/cloudevents+json; charset=UTF-8")]
