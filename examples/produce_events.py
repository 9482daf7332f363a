"""Render a few example images and publish catalog events for them to Kafka, in any event format.

The compose file's `seed` service runs this (`docker compose --profile examples up seed`): the images go
to a volume that the indexer and the server mount at /examples, so the indexer can read them. It also
runs outside Docker, against any broker:

    python examples/produce_events.py --bootstrap-servers localhost:9094 --topic catalog-images \
        --images-dir ./images/examples --count 24

`--format` chooses what is published (README, "Event formats"); the log names the CLIPDEX_EVENT_FORMAT and
CLIPDEX_EVENT_MAP that read it:

    clipdex                 clipdex's own upsert events, one per image (the default)
    debezium                Debezium change events of a `products` table: a snapshot read per row, then a
                            title-only update, a new image, and a delete with its tombstone
    cloudevents-structured  CloudEvents in structured mode (the event is the message value)
    cloudevents-binary      CloudEvents in binary mode (ce_* headers, the data in the value)
    products                a shop's own product JSON, three images per product

The images are coloured shapes (clipdex/synthetic.py), so queries such as "a red circle" find them with
ViT-B-32 as well as with the demo model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from clipdex.synthetic import write_folder

logger = logging.getLogger("produce_events")


FORMATS = ("clipdex", "debezium", "cloudevents-structured", "cloudevents-binary", "products")
Headers = list[tuple[str, bytes]]

# The CLIPDEX_EVENT_FORMAT and CLIPDEX_EVENT_MAP that read each format.
FORMAT_SETTING = {"debezium": "debezium", "cloudevents-structured": "cloudevents", "cloudevents-binary": "cloudevents"}
PRODUCT_METADATA = {"title": "/title", "colour": "/colour", "shape": "/shape", "collection": "/collection"}
MAPS: dict[str, dict[str, Any]] = {
    "debezium": {"id": "/sku", "uri": "/image_url", "metadata": PRODUCT_METADATA},
    "cloudevents-structured": {
        "id": "/sku",
        "uri": "/image",
        "metadata": PRODUCT_METADATA,
        "version": {"pointer": "/time", "from": "envelope"},
        "delete_types": ["com.example.product.deleted"],
    },
    "products": {"id": "/sku", "uris": "/images/*/url", "metadata": PRODUCT_METADATA, "version": "/updated_at"},
}
MAPS["cloudevents-binary"] = MAPS["cloudevents-structured"]


@dataclass(frozen=True)
class ExampleEvent:
    key: str
    value: dict[str, Any] | None  # None: a tombstone
    headers: Headers = field(default_factory=list)

    def encoded(self) -> tuple[bytes, bytes | None]:
        return self.key.encode(), None if self.value is None else json.dumps(self.value).encode()


def consumer_settings(fmt: str) -> dict[str, str]:
    """The settings `clipdex consume` reads the format with."""
    if fmt not in MAPS:
        return {}
    return {"CLIPDEX_EVENT_FORMAT": FORMAT_SETTING.get(fmt, "clipdex"), "CLIPDEX_EVENT_MAP": json.dumps(MAPS[fmt])}


def build_events(images_dir: Path, count: int, seed: int = 7, fmt: str = "clipdex") -> list[ExampleEvent]:
    """Write `count` images to `images_dir`; return the events that publish them in format `fmt`."""
    samples = list(write_folder(images_dir, count, seed, size=(320, 240)))
    rows = [
        {
            "sku": f"example-{s.index:05d}",
            "title": s.caption,
            "colour": s.colour,
            "shape": s.shape,
            "collection": "examples",
            "image": str(s.path.resolve()),
        }
        for s in samples
    ]
    if fmt == "clipdex":
        return [_clipdex(row) for row in rows]
    if fmt == "debezium":
        return _debezium(rows)
    if fmt in ("cloudevents-structured", "cloudevents-binary"):
        return [_cloudevent(row, n, binary=fmt == "cloudevents-binary") for n, row in enumerate(rows)]
    if fmt == "products":
        return _products(rows)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _clipdex(row: dict[str, Any]) -> ExampleEvent:
    metadata = {"caption": row["title"], "colour": row["colour"], "shape": row["shape"], "collection": "examples"}
    return ExampleEvent(
        row["sku"], {"op": "upsert", "id": row["sku"], "uri": row["image"], "metadata": metadata, "version": 1}
    )


def _debezium(rows: list[dict[str, Any]]) -> list[ExampleEvent]:
    """A snapshot read of every row, then a title-only update, a new image for a row, and a delete."""
    table = {
        n + 1: {"id": n + 1, **{k: v for k, v in row.items() if k != "image"}, "image_url": row["image"]}
        for n, row in enumerate(rows)
    }
    lsn = 24_023_000
    events = []

    def change(op: str, row_id: int, before: Any, after: Any) -> None:
        nonlocal lsn
        lsn += 8
        source = {
            "version": "2.7.0.Final",
            "connector": "postgresql",
            "name": "shop",
            "ts_ms": 1_714_557_600_000 + lsn % 1000,
            "snapshot": "true" if op == "r" else "false",
            "db": "shop",
            "schema": "public",
            "table": "products",
            "txId": 7700 + lsn % 100,
            "lsn": lsn,
        }
        value = {"before": before, "after": after, "source": source, "op": op, "ts_ms": source["ts_ms"] + 5}
        events.append(ExampleEvent(json.dumps({"id": row_id}), value))

    for row_id, row in table.items():
        change("r", row_id, None, row)
    if len(table) >= 3:
        first, second, last = table[1], table[2], table[len(table)]
        change("u", 1, first, {**first, "title": f"{first['title']} (on sale)"})  # metadata only
        change("u", 2, second, {**second, "image_url": last["image_url"]})  # another image: a new vector
        change("d", len(table), last, None)
        events.append(ExampleEvent(json.dumps({"id": len(table)}), None))  # the tombstone after a delete
    return events


def _cloudevent(row: dict[str, Any], n: int, *, binary: bool) -> ExampleEvent:
    attributes = {
        "specversion": "1.0",
        "id": f"example-event-{n:05d}",
        "source": "/examples/catalog",
        "type": "com.example.product.created",
        "time": f"2024-05-01T10:00:{n % 60:02d}Z",
    }
    data = {k: v for k, v in row.items()}
    if binary:
        headers = [(f"ce_{k}", v.encode()) for k, v in attributes.items()] + [("content-type", b"application/json")]
        return ExampleEvent(row["sku"], data, headers)
    return ExampleEvent(
        row["sku"],
        {**attributes, "datacontenttype": "application/json", "data": data},
        [("content-type", b"application/cloudevents+json")],
    )


def _products(rows: list[dict[str, Any]]) -> list[ExampleEvent]:
    """Three images per product, under the first image's sku."""
    events = []
    for start in range(0, len(rows), 3):
        group = rows[start : start + 3]
        lead = group[0]
        product = {k: v for k, v in lead.items() if k != "image"}
        product["images"] = [{"url": r["image"], "alt": r["title"]} for r in group]
        product["updated_at"] = "2024-05-01T10:00:00Z"
        events.append(ExampleEvent(lead["sku"], product))
    return events


async def publish(bootstrap_servers: str, topic: str, events: Sequence[ExampleEvent], wait_s: float) -> None:
    """Send every event and wait for the broker's acknowledgements; retry the first connection for `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
        try:
            await producer.start()
            break
        except KafkaConnectionError:
            await producer.stop()
            if time.monotonic() > deadline:
                raise
            logger.info("broker %s not reachable yet; retrying", bootstrap_servers)
            await asyncio.sleep(2)
    try:
        deliveries = []
        for event in events:
            key, value = event.encoded()
            deliveries.append(await producer.send(topic, value=value, key=key, headers=event.headers or None))
        await asyncio.gather(*deliveries)  # raises if the broker refused any of them
    finally:
        await producer.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, host:port")
    parser.add_argument("--topic", required=True, help="the topic the indexer consumes")
    parser.add_argument("--images-dir", type=Path, required=True, help="where to write the images")
    parser.add_argument("--count", type=int, default=24, help="how many images and events (default 24)")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the images (default 7)")
    parser.add_argument("--format", choices=FORMATS, default="clipdex", help="the event format (default clipdex)")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the broker")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    events = build_events(args.images_dir, args.count, args.seed, args.format)
    asyncio.run(publish(args.bootstrap_servers, args.topic, events, args.wait_s))
    logger.info("published %d %s events to %s (images in %s)", len(events), args.format, args.topic, args.images_dir)
    for name, value in consumer_settings(args.format).items():
        logger.info("read them with %s='%s'", name, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
