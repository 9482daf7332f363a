"""What reading each event format costs, beside clipdex's own events in the same run (the ratio survives load).

For each kind of message, a batch of them goes through `indexer.sources.kafka.to_records` (what the Kafka
source runs, in a worker thread, for every fetched batch): the bounded JSON parse, the envelope, the map,
the schema. Then `resolve.plan` for a batch of products against the stored images of each (the resolver's
extra work for several images per product), beside a batch of as many single-image events.

    python -m bench.bench_formats            # from a checkout, PYTHONPATH=.
    python -m bench.bench_formats --quick

Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from indexer.formats import EventFormat, event_format
from indexer.products import image_id
from indexer.resolve import plan
from indexer.sources.kafka import Message, to_records
from shared.roles import StoredState
from tests.catalog_events import GALLERY_MAP, PRODUCTS_MAP, cloudevent, debezium, debezium_key, product_row

CE_MAP = {"id": "/sku", "uri": "/image_url", "metadata": {"title": "/title", "brand": "/brand"}}


def messages(n: int) -> dict[str, tuple[EventFormat, list[Message]]]:
    """n messages of each kind, with the format that reads them."""

    def url(i: int, side: str = "front") -> str:
        return f"https://cdn.shop.example/img/a-{i}-{side}.jpg"

    def row(i: int, images: int = 0) -> dict[str, Any]:
        urls = [url(i, str(k)) for k in range(images)] if images else None
        return product_row(i, f"A-{i}", f"Red trail running shoe {i}", url(i), images=urls)

    def msgs(values: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]) -> list[Message]:
        return [Message("t", 0, i, k, v, None, tuple(h)) for i, (k, v, h) in enumerate(values)]

    clipdex = [
        (
            f"A-{i}".encode(),
            json.dumps({"op": "upsert", "id": f"A-{i}", "uri": url(i), "metadata": {"title": "t"}}).encode(),
            [],
        )
        for i in range(n)
    ]
    dbz = [(debezium_key(i), debezium("u", row(i), row(i), lsn=i), []) for i in range(n)]
    dbz_schema = [
        (debezium_key(i, schema=True), debezium("u", row(i), row(i), lsn=i, schema=True), []) for i in range(n)
    ]
    ce_structured = [(b"k", *cloudevent("p.updated", row(i), event_id=str(i))) for i in range(n)]
    ce_binary = [(b"k", *cloudevent("p.updated", row(i), event_id=str(i), binary=True)) for i in range(n)]
    gallery5 = [(debezium_key(i), debezium("u", None, row(i, 5), lsn=i), []) for i in range(n)]
    gallery250 = [(debezium_key(i), debezium("u", None, row(i, 250), lsn=i), []) for i in range(max(1, n // 50))]
    products = json.dumps(PRODUCTS_MAP)
    return {
        "clipdex (baseline)": (event_format("clipdex"), msgs(clipdex)),
        "debezium": (event_format("debezium", products), msgs(dbz)),
        "debezium with schema": (event_format("debezium", products), msgs(dbz_schema)),
        "cloudevents structured": (event_format("cloudevents", json.dumps(CE_MAP)), msgs(ce_structured)),
        "cloudevents binary": (event_format("cloudevents", json.dumps(CE_MAP)), msgs(ce_binary)),
        "debezium, 5 images a product": (event_format("debezium", json.dumps(GALLERY_MAP)), msgs(gallery5)),
        "debezium, 250 images a product": (event_format("debezium", json.dumps(GALLERY_MAP)), msgs(gallery250)),
    }


def per_call(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats")
    args = parser.parse_args(argv)
    n, repeat = (64, 5) if args.quick else (512, 15)
    load = os.getloadavg()[0]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}; {n} messages a batch"
    )
    results: dict[str, Any] = {"load": load, "parse": {}}
    base = None
    print(f"{'messages':34} {'bytes':>8} {'µs/message':>11} {'µs/image':>9} {'x baseline':>10}")
    for name, (fmt, batch) in messages(n).items():
        records = to_records(batch, fmt)
        assert all(r.event is not None for r in records), (name, [r.error for r in records if r.event is None][:1])
        images = sum(len(getattr(r.event, "images", ())) or 1 for r in records)
        seconds = per_call(lambda: to_records(batch, fmt), repeat)  # noqa: B023
        us = seconds / len(batch) * 1e6
        base = base or us
        size = statistics.mean(len(m.value or b"") for m in batch)
        print(f"{name:34} {size:8.0f} {us:11.1f} {seconds / images * 1e6:9.1f} {us / base:10.2f}")
        results["parse"][name] = {"us_per_message": us, "us_per_image": seconds / images * 1e6, "ratio": us / base}

    # The resolver: a batch of products, each with 5 stored images of which the event keeps 4 and adds 1,
    # beside a batch of single-image events for as many items, each stored.
    fmt, batch = messages(n)["debezium, 5 images a product"]
    product_records = to_records(batch, fmt)
    stored_products = {
        f"kafka:{image_id(r.event.id, f'https://cdn.shop.example/img/a-{i}-{k}.jpg')}": StoredState(
            "h", 0, "indexed", True
        )
        for i, r in enumerate(product_records)
        if r.event is not None
        for k in range(1, 6)
    }
    single_fmt, single_batch = messages(5 * n)["clipdex (baseline)"]
    single_records = to_records(single_batch, single_fmt)
    stored_single = {f"kafka:A-{i}": StoredState("h", 0, "indexed", True) for i in range(5 * n)}
    single = per_call(lambda: plan(single_records, stored_single), repeat)
    products = per_call(lambda: plan(product_records, stored_products), repeat)
    print(
        f"resolve.plan: {5 * n} single-image events {single * 1e3:.2f} ms; {n} products of 5 images "
        f"(4 kept, 1 new, 1 gone) {products * 1e3:.2f} ms ({products / single:.2f}x)"
    )
    results["plan_ms"] = {"single": single * 1e3, "products": products * 1e3, "ratio": products / single}
    return results


if __name__ == "__main__":
    main()
