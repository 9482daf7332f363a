"""The aiokafka adapters on their own (the integration tests run them against a real broker)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from indexer.sources import kafka_client
from indexer.sources.kafka import DeadLetterMessage
from indexer.sources.kafka_client import AioKafkaConsumer, KafkaDeadLetters
from tests.brokers import free_port


async def test_an_unreachable_dead_letter_topic_is_logged_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    letters = KafkaDeadLetters(f"127.0.0.1:{free_port()}", "events.dlq", timeout_s=2)
    letter = DeadLetterMessage(b"k", b"{oops", "not JSON", "events", 0, 7)
    await letters.publish([letter])  # nothing listens there
    await letters.close()
    assert "could not publish 1 dead letters to events.dlq" in caplog.text


class WaitsOutARebalance:
    """aiokafka's getmany while a rebalance is under way: it waits for the new assignment, however long."""

    def __init__(self) -> None:
        self.cancelled = False

    async def getmany(self, **kwargs: Any) -> dict[Any, Any]:
        try:
            await asyncio.Event().wait()  # the assignment that needs this member's revoke to finish first
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return {}


async def test_a_fetch_never_outwaits_its_timeout_by_more_than_a_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Else a rebalance (which waits for the source's batch lock, held across the fetch) deadlocks."""
    monkeypatch.setattr(kafka_client, "_FETCH_GRACE_S", 0.2)
    consumer = AioKafkaConsumer("127.0.0.1:9", "events", "group")
    stuck = WaitsOutARebalance()
    consumer._consumer = stuck  # type: ignore[assignment]
    started = time.monotonic()
    assert await consumer.fetch(10, timeout_ms=100) == []
    assert stuck.cancelled and time.monotonic() - started < 2
