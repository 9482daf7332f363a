"""The Kafka-protocol broker of the integration tests: one tansu process per session on a loopback port, or
the external broker named by CLIPDEX_TEST_KAFKA_BOOTSTRAP; a fresh topic for every test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.brokers import EXTERNAL_BOOTSTRAP, TansuBroker, create_topic, unique_topic


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if EXTERNAL_BOOTSTRAP:
        yield EXTERNAL_BOOTSTRAP
        return
    broker = TansuBroker()
    try:
        yield broker.bootstrap
    finally:
        broker.close()


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> str:
    """A new topic with 3 partitions."""
    topic = unique_topic()
    asyncio.run(create_topic(kafka_bootstrap, topic, partitions=3))
    return topic
