"""The aiokafka adapters on their own (the integration tests run them against a real broker)."""

from __future__ import annotations

import pytest

from indexer.sources.kafka import DeadLetterMessage
from indexer.sources.kafka_client import KafkaDeadLetters
from tests.brokers import free_port


async def test_an_unreachable_dead_letter_topic_is_logged_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    letters = KafkaDeadLetters(f"127.0.0.1:{free_port()}", "events.dlq", timeout_s=2)
    letter = DeadLetterMessage(b"k", b"{oops", "not JSON", "events", 0, 7)
    await letters.publish([letter])  # nothing listens there
    await letters.close()
    assert "could not publish 1 dead letters to events.dlq" in caplog.text
