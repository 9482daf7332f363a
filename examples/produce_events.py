"""Render a few example images and publish one upsert event per image to Kafka.

The compose file's `seed` service runs this (`docker compose --profile examples up seed`): the images go
to a volume that the indexer and the server mount at /examples, so the indexer can read them. It also
runs outside Docker, against any broker:

    python examples/produce_events.py --bootstrap-servers localhost:9094 --topic catalog-images \
        --images-dir ./images/examples --count 24

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from clipdex.synthetic import write_folder

logger = logging.getLogger("produce_events")


@dataclass(frozen=True)
class ExampleEvent:
    key: str
    value: dict[str, Any]

    def encoded(self) -> tuple[bytes, bytes]:
        return self.key.encode(), json.dumps(self.value).encode()


def build_events(images_dir: Path, count: int, seed: int = 7) -> list[ExampleEvent]:
    """Write `count` images to `images_dir`; return an upsert event for each (the message key is the id)."""
    events = []
    for sample in write_folder(images_dir, count, seed, size=(320, 240)):
        item_id = f"example-{sample.index:05d}"
        events.append(
            ExampleEvent(
                key=item_id,
                value={
                    "op": "upsert",
                    "id": item_id,
                    "uri": str(sample.path.resolve()),
                    "metadata": {
                        "caption": sample.caption,
                        "colour": sample.colour,
                        "shape": sample.shape,
                        "collection": "examples",
                    },
                    "version": 1,
                },
            )
        )
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
            deliveries.append(await producer.send(topic, value=value, key=key))
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
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the broker")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    events = build_events(args.images_dir, args.count, args.seed)
    asyncio.run(publish(args.bootstrap_servers, args.topic, events, args.wait_s))
    logger.info("published %d upsert events to %s (images in %s)", len(events), args.topic, args.images_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
