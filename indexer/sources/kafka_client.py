"""The aiokafka adapters: `AioKafkaConsumer` is the source's `Consumer`, `KafkaDeadLetters` its
`DeadLetterPublisher`. aiokafka's errors are wrapped here, at the boundary, as `BrokerError`s that say
whether a retry may help; nothing else in clipdex imports aiokafka.

Dead letters on a topic are the original messages (same key, same value) with `clipdex.reason`,
`clipdex.topic`, `clipdex.partition` and `clipdex.offset` headers. The SQLite dead letters are the record
that counts; a failure to publish is logged, never raised, so an unreachable dead-letter topic never holds
up indexing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from indexer.sources.kafka import BrokerError, CommitLost, DeadLetterMessage, Message, Offsets, RevokeHandler
from shared.config import Settings
from shared.errors import ConfigError

logger = logging.getLogger(__name__)

_FETCH_GRACE_S = 1.0  # how much longer than its timeout a fetch may wait (see AioKafkaConsumer.fetch)


def require_kafka(settings: Settings) -> tuple[str, str]:
    """The bootstrap servers and the topic, or a ConfigError naming the flag and the variable."""
    if not settings.kafka_bootstrap_servers:
        raise ConfigError("no Kafka broker: pass --bootstrap-servers HOST:PORT or set CLIPDEX_KAFKA_BOOTSTRAP_SERVERS")
    if not settings.kafka_topic:
        raise ConfigError("no Kafka topic: pass --topic T or set CLIPDEX_KAFKA_TOPIC")
    return settings.kafka_bootstrap_servers, settings.kafka_topic


# -- the consumer ------------------------------------------------------------------------------------------


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, on_revoked: RevokeHandler, fetched: dict[TopicPartition, int]) -> None:
        self._on_revoked = on_revoked
        self._fetched = fetched

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            await self._on_revoked()
            for tp in revoked:
                self._fetched.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        logger.info("assigned partitions %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class AioKafkaConsumer:
    """`Consumer` on aiokafka: a group member with auto commit off, reading new groups from the start."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group: str,
        *,
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        fetch_max_wait_ms: int = 100,
        request_timeout_ms: int = 40_000,
        client_id: str = "clipdex-indexer",
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group = group
        self._max_poll_interval_ms = max_poll_interval_ms
        self._session_timeout_ms = session_timeout_ms
        self._fetch_max_wait_ms = fetch_max_wait_ms
        # A join waits up to the session timeout for the other members; a request must outlast it.
        self._request_timeout_ms = max(request_timeout_ms, session_timeout_ms + 5_000)
        self._client_id = client_id
        self._consumer: AIOKafkaConsumer | None = None
        self._fetched: dict[TopicPartition, int] = {}  # the next offset to fetch, for the lag

    @classmethod
    def from_settings(cls, settings: Settings) -> AioKafkaConsumer:
        servers, topic = require_kafka(settings)
        # A batch must finish well within max_poll_interval_ms or the group evicts this member; allow
        # half a second per image, twenty times what ViT-B-32 takes on a laptop CPU, and never < 5 min.
        poll_interval_ms = max(300_000, settings.batch_size * 500)
        return cls(
            servers,
            topic,
            settings.kafka_group,
            max_poll_interval_ms=poll_interval_ms,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            # How long the broker may hold a fetch that finds nothing new. Apache Kafka answers a held fetch
            # as soon as data arrives; tansu answers it late (bench_freshness_kafka: p50 0.27 s with the
            # default 500 ms, 0.18 s with 100 ms), so keep it well under the batch wait.
            fetch_max_wait_ms=min(500, max(10, settings.max_batch_wait_ms // 2)),
        )

    async def start(self, on_revoked: RevokeHandler) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group,
            client_id=self._client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=self._max_poll_interval_ms,
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 3),
            request_timeout_ms=self._request_timeout_ms,
            fetch_max_wait_ms=self._fetch_max_wait_ms,
        )
        consumer.subscribe([self.topic], listener=_Listener(on_revoked, self._fetched))
        try:
            await consumer.start()  # joins the group: waits for the first assignment
        except KafkaError as exc:
            await _quietly(consumer.stop())
            raise BrokerError(f"{exc}", retriable=bool(exc.retriable) or _is_connection(exc)) from exc
        except asyncio.CancelledError:  # a stop while joining: leave, close the connections
            await _quietly(consumer.stop())
            raise
        self._consumer = consumer

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Message]:
        consumer = self._started()
        try:
            # aiokafka's getmany waits, with no time limit, for a rebalance under way to end (Fetcher.
            # fetched_records: records that arrive during one loop back to `wait_for_assignment`). The
            # rebalance waits for on_partitions_revoked, which waits for the source's batch lock, held
            # across this fetch: a member joining mid-stream deadlocked the group (the scale-out test
            # caught it once). Bounded, the fetch comes back empty, the lock is released, the rebalance
            # goes on; nothing was read (cancelled at the wait, before any record is taken).
            batches = await asyncio.wait_for(
                consumer.getmany(timeout_ms=timeout_ms, max_records=max_records),
                timeout_ms / 1000 + _FETCH_GRACE_S,
            )
        except TimeoutError:
            logger.info("a fetch waited out a rebalance; letting it go on")
            return []
        except KafkaError as exc:
            raise BrokerError(f"{exc}", retriable=bool(exc.retriable)) from exc
        messages = [
            Message(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp, tuple(m.headers or ()))
            for tp in sorted(batches, key=lambda tp: tp.partition)
            for m in batches[tp]
        ]
        for m in messages:
            self._fetched[TopicPartition(m.topic, m.partition)] = m.offset + 1
        return messages

    async def commit(self, offsets: Offsets) -> None:
        consumer = self._started()
        try:
            await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except (CommitFailedError, IllegalStateError) as exc:
            raise CommitLost(f"{exc}") from exc
        except KafkaError as exc:
            raise BrokerError(f"{exc}", retriable=bool(exc.retriable)) from exc

    def lag(self) -> int | None:
        if self._consumer is None or not self._fetched:
            return None
        total = 0
        for tp, position in self._fetched.items():
            high = self._consumer.highwater(tp)
            if high is None:
                return None
            total += max(0, high - position)
        return total

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            self._fetched.clear()
            await _quietly(consumer.stop())

    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise BrokerError("the consumer is not started", retriable=False)
        return self._consumer


def _is_connection(exc: KafkaError) -> bool:
    return "bootstrap" in str(exc).lower() or "connect" in type(exc).__name__.lower()


async def _quietly(step: Awaitable[Any]) -> None:
    try:
        await step
    except Exception:  # closing a client that never connected is not worth a crash
        logger.debug("ignored an error while closing a Kafka client", exc_info=True)


# -- the dead-letter producer ---------------------------------------------------------------------------


class KafkaDeadLetters:
    """Publishes dead letters to one topic; the producer starts on first use and again after a failure."""

    def __init__(self, bootstrap_servers: str, topic: str, *, timeout_s: float = 10.0) -> None:
        self.topic = topic
        self._bootstrap_servers = bootstrap_servers
        self._timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None

    async def publish(self, letters: Sequence[DeadLetterMessage]) -> None:
        if not letters:
            return
        try:
            await asyncio.wait_for(self._send(letters), self._timeout_s)
        except Exception as exc:  # best effort: the SQLite dead letters are the record that counts
            logger.warning(
                "could not publish %d dead letters to %s (%s: %s); they are kept in the store",
                len(letters),
                self.topic,
                type(exc).__name__,
                exc,
            )
            await self.close()

    async def _send(self, letters: Sequence[DeadLetterMessage]) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap_servers,
                client_id="clipdex-dlq",
                request_timeout_ms=int(self._timeout_s * 1000),
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        sent = [await self._producer.send(self.topic, value=m.value, key=m.key, headers=m.headers()) for m in letters]
        await asyncio.gather(*sent)
        logger.info("published %d dead letters to %s", len(letters), self.topic)

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                await producer.stop()
            except Exception:
                logger.debug("ignored an error while closing the dead-letter producer", exc_info=True)
