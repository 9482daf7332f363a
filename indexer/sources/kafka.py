"""The Kafka source: catalog events from a topic, in a consumer group, committed only once durable.

    broker ─fetch (≤ batch_size records, ≤ max_batch_wait_ms)─▶ Records ─sink.write()─▶ one store transaction
       ▲                                                                   │ dead letters ─▶ <topic>.dlq
       └──────────── commit offset+1 of each partition's last record ◀─────┘   (optional, best effort)

At least once, never lost: auto commit is off, and offsets are committed only after `sink.write` returns,
so a crash anywhere replays the events that were not yet durable (the store makes a replay idempotent).
- A rebalance waits for the batch in flight to be written and committed (`on_partitions_revoked`).
- SIGTERM / SIGINT: the batch in flight is finished and committed, then the consumer leaves the group.
- The broker unreachable at start, or gone for a while mid-stream: retried with backoff, logged, no crash.
- A StoreError from the sink: consumption stops WITHOUT committing; the events replay on restart.

`Consumer` is the few verbs the source needs from a broker client: `AioKafkaConsumer` is the real one,
`indexer.sources.kafka_testing.MemoryConsumer` the fake for unit tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from indexer.dlq import DeadLetterPublisher, KafkaDeadLetters, dead_letters_for
from indexer.events import parse_event, raw_text
from indexer.heartbeat import Heartbeat
from indexer.pipeline import open_pipeline
from indexer.records import BatchReport, Record, Sink
from indexer.service import stop_on_signals
from shared.cliargs import add_setting_flag
from shared.config import Settings
from shared.errors import ClipdexError, ConfigError, InvalidEvent, StoreError

logger = logging.getLogger(__name__)

SOURCE = "kafka"
Offsets = Mapping[tuple[str, int], int]  # (topic, partition) -> the next offset to read
RevokeHandler = Callable[[], Awaitable[None]]
_IDLE_BEAT_S = 2.0  # how often an idle consumer tells `clipdex status` it is alive


class BrokerError(ClipdexError):
    """The broker could not be reached, or refused a request. Wraps aiokafka's errors at the boundary."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class CommitLost(BrokerError):
    """The group rebalanced before a commit: the partition's new owner replays these events (idempotent)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


class Consumer(Protocol):
    """A member of a consumer group, subscribed to one topic, with auto commit off."""

    async def start(self, on_revoked: RevokeHandler) -> None:
        """Join the group. `on_revoked` is awaited before partitions move to another member."""
        ...

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Message]:
        """Up to `max_records` messages, waiting at most `timeout_ms` for the first; in order per partition."""
        ...

    async def commit(self, offsets: Offsets) -> None: ...

    def lag(self) -> int | None:
        """Messages behind the partitions' high-water marks, when known."""
        ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(self.max_s, delay * self.factor)


@dataclass
class SourceStats:
    batches: int = 0
    records: int = 0
    failed: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


def to_record(message: Message) -> Record:
    """A message becomes a record; a message that is not a valid event becomes one with its reason."""
    raw = raw_text(message.value)
    position = (message.partition, message.offset)
    try:
        event = parse_event(message.value, message.key)
    except InvalidEvent as exc:
        return Record(SOURCE, raw, None, str(exc), position)
    return Record(SOURCE, raw, event, None, position)


def next_offsets(messages: Sequence[Message]) -> dict[tuple[str, int], int]:
    """offset+1 of the last message of each partition: where the group resumes."""
    offsets: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        offsets[key] = max(offsets.get(key, 0), m.offset + 1)
    return offsets


class KafkaSource:
    """Fetch a micro-batch, make it durable through the sink, then commit its offsets; until stopped."""

    def __init__(
        self,
        consumer: Consumer,
        sink: Sink,
        *,
        batch_size: int,
        max_wait_ms: int,
        dead_letters: DeadLetterPublisher | None = None,
        backoff: Backoff = Backoff(),
        commit_attempt_s: float = 10.0,
        stop_grace_s: float = 30.0,
        heartbeat: Heartbeat | None = None,
        stop: asyncio.Event | None = None,
        describe: str = "the Kafka broker",
    ) -> None:
        self._consumer = consumer
        self._sink = sink
        self._batch_size = batch_size
        self._max_wait_ms = max_wait_ms
        self._dead_letters = dead_letters
        self._backoff = backoff
        self._commit_attempt_s = commit_attempt_s
        self._stop_grace_s = stop_grace_s
        self._describe = describe
        self._heartbeat = heartbeat
        self._last_beat = 0.0
        self._stopping = stop or asyncio.Event()  # set: finish the batch in flight, commit, return
        self._batch_lock = asyncio.Lock()  # held from fetch to commit: a rebalance waits for it
        self.stats = SourceStats()

    def request_stop(self) -> None:
        """Finish the batch in flight, commit it, and return from `run` (safe from a signal handler)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> SourceStats:
        """Consume until `request_stop`. A StoreError (or any error of the sink) propagates uncommitted."""
        if not await self._start():
            self._beat("stopped")
            return self.stats
        state = "stopped"
        try:
            while not self._stopping.is_set():
                async with self._batch_lock:
                    messages = await self._fetch()
                    if messages:
                        await self._process(messages)
                    elif time.monotonic() - self._last_beat > _IDLE_BEAT_S:
                        self._beat("running")
        except StoreError:
            state = "failed"
            logger.error(
                "the store failed: stopping WITHOUT committing the batch in flight; it replays on restart "
                "(offsets committed by this run: %s)",
                self._resume_points(),
            )
            raise
        finally:
            await self._consumer.stop()
            if self._dead_letters is not None:
                await self._dead_letters.close()
            self._beat(state)
        logger.info("stopped after %d batches, %d records; committed %s", *self._summary())
        return self.stats

    # -- the steps ----------------------------------------------------------------------------------------

    async def _start(self) -> bool:
        delays = self._backoff.delays()
        while not self._stopping.is_set():
            self._beat("connecting")
            try:
                await self._consumer.start(self._on_revoked)
                logger.info("consuming from %s", self._describe)
                return True
            except BrokerError as exc:
                if not exc.retriable:
                    raise
                delay = next(delays)
                logger.warning("%s is unreachable (%s); retrying in %.1f s", self._describe, exc, delay)
                await self._sleep(delay)
        return False

    async def _fetch(self) -> list[Message]:
        try:
            return await self._consumer.fetch(self._batch_size, self._max_wait_ms)
        except BrokerError as exc:
            if not exc.retriable:
                raise
            delay = self._backoff.initial_s
            logger.warning("fetching from %s failed (%s); retrying in %.1f s", self._describe, exc, delay)
            await self._sleep(delay)
            return []

    async def _process(self, messages: list[Message]) -> None:
        records = [to_record(m) for m in messages]
        report = await self._sink.write(records)  # durable when it returns; a StoreError propagates
        if self._dead_letters is not None:
            letters = dead_letters_for(messages, records, report.failures)
            if letters:
                await self._dead_letters.publish(letters)
        offsets = next_offsets(messages)
        committed = await self._commit(offsets)
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.failed += report.failed
        if committed:
            self.stats.committed.update(offsets)
        self._report(messages, report)

    async def _commit(self, offsets: Offsets) -> bool:
        """Commit, retrying while the broker is away. False when the group moved on (the events replay)."""
        delays = self._backoff.delays()
        give_up_at: float | None = None
        while True:
            try:
                await asyncio.wait_for(self._consumer.commit(offsets), self._commit_attempt_s)
                return True
            except CommitLost as exc:
                logger.warning("offsets %s not committed (%s); their new owner replays them", dict(offsets), exc)
                return False
            except (BrokerError, TimeoutError) as exc:
                if isinstance(exc, BrokerError) and not exc.retriable:
                    raise
                reason = str(exc) or "timed out"
            now = time.monotonic()
            if self._stopping.is_set():
                give_up_at = give_up_at or now + self._stop_grace_s
                if now >= give_up_at:
                    logger.error("gave up committing %s while stopping (%s): they replay on restart", offsets, reason)
                    return False
            delay = next(delays)
            logger.warning("commit to %s failed (%s); retrying in %.1f s", self._describe, reason, delay)
            await asyncio.sleep(delay)

    async def _on_revoked(self) -> None:
        # Each batch is committed before the lock is released, so waiting for it is the flush.
        async with self._batch_lock:
            logger.info("partitions revoked: the batch in flight is committed")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on `request_stop`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- reporting ----------------------------------------------------------------------------------------

    def _report(self, messages: Sequence[Message], report: BatchReport) -> None:
        """One log line per batch, a warning per dead letter, and the heartbeat that `clipdex status` reads."""
        stamps = [m.timestamp_ms for m in messages if m.timestamp_ms]
        lag_ms = max(0.0, time.time() * 1000 - min(stamps)) if stamps else 0.0  # produce -> durable
        pending = self._consumer.lag()
        logger.info(
            "batch source=kafka size=%d %s lag_ms=%.0f pending=%s",
            len(messages),
            report.log_fields(),
            lag_ms,
            "?" if pending is None else pending,
        )
        for name, reason in report.failures:
            logger.warning("dead letter: %s: %s", name[:200], reason)
        self._beat("running", report=report, lag_s=lag_ms / 1000)

    def _beat(self, state: str, **fields: Any) -> None:
        if self._heartbeat is not None:
            self._last_beat = time.monotonic()
            self._heartbeat.beat(state=state, pending=self._consumer.lag() or 0, **fields)

    def _resume_points(self) -> dict[str, int]:
        return {f"{t}[{p}]": o for (t, p), o in sorted(self.stats.committed.items())}

    def _summary(self) -> tuple[int, int, dict[str, int]]:
        return self.stats.batches, self.stats.records, self._resume_points()


# -- the real broker client -------------------------------------------------------------------------------


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
            await consumer.start()
        except KafkaError as exc:
            await _quietly(consumer.stop())
            raise BrokerError(f"{exc}", retriable=bool(exc.retriable) or _is_connection(exc)) from exc
        self._consumer = consumer

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Message]:
        consumer = self._started()
        try:
            batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            raise BrokerError(f"{exc}", retriable=bool(exc.retriable)) from exc
        messages = [
            Message(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
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


def require_kafka(settings: Settings) -> tuple[str, str]:
    if not settings.kafka_bootstrap_servers:
        raise ConfigError("no Kafka broker: pass --bootstrap-servers HOST:PORT or set CLIPDEX_KAFKA_BOOTSTRAP_SERVERS")
    if not settings.kafka_topic:
        raise ConfigError("no Kafka topic: pass --topic T or set CLIPDEX_KAFKA_TOPIC")
    return settings.kafka_bootstrap_servers, settings.kafka_topic


# -- `clipdex consume` ----------------------------------------------------------------------------------------

OpenSink = Callable[[Settings], AbstractAsyncContextManager[Sink]]  # the pipeline, opened and closed


def register_consume(sub: Any) -> None:  # argparse's _SubParsersAction is private
    """Add `clipdex consume --bootstrap-servers HOST:PORT --topic T [--group G]`."""
    parser = sub.add_parser(
        "consume",
        help="index catalog change events from a Kafka topic (consumer group, at least once)",
        description="Consume {op, id, uri, metadata, version} events from a Kafka topic and index them. "
        "Offsets are committed only after each micro-batch is durable in the store. SIGTERM or Ctrl-C "
        "finishes the batch in flight, commits it, and exits 0.",
    )
    add_setting_flag(parser, "--bootstrap-servers", "kafka_bootstrap_servers")
    add_setting_flag(parser, "--topic", "kafka_topic")
    add_setting_flag(parser, "--group", "kafka_group")
    add_setting_flag(parser, "--dlq-topic", "kafka_dlq_topic")
    add_setting_flag(parser, "--batch-size", "batch_size", type=int)
    add_setting_flag(parser, "--max-wait-ms", "max_batch_wait_ms", type=int)
    parser.set_defaults(func=_cmd_consume)


def _cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    require_kafka(settings)
    return asyncio.run(consume(settings))


async def consume(settings: Settings, open_sink: OpenSink = open_pipeline) -> int:
    """The composition root of the Kafka indexer: the pipeline (store + model) and a consumer, until a signal."""
    servers, topic = require_kafka(settings)
    stop = asyncio.Event()
    stop_on_signals(stop)  # from here on: a signal while the model loads is a clean exit too
    async with open_sink(settings) as sink:
        dead_letters = KafkaDeadLetters(servers, settings.kafka_dlq_topic) if settings.kafka_dlq_topic else None
        source = KafkaSource(
            AioKafkaConsumer.from_settings(settings),
            sink,
            batch_size=settings.batch_size,
            max_wait_ms=settings.max_batch_wait_ms,
            dead_letters=dead_letters,
            heartbeat=Heartbeat(settings.data_dir, SOURCE, topic=topic, group=settings.kafka_group, servers=servers),
            stop=stop,
            describe=f"Kafka broker {servers} (topic {topic}, group {settings.kafka_group})",
        )
        try:
            await source.run()
        except StoreError as exc:
            print(
                f"clipdex consume: error: the store failed, so the batch in flight was not committed; its "
                f"events replay on restart. Fix the store, then start again. ({exc})",
                file=sys.stderr,
            )
            return 1
    return 0
