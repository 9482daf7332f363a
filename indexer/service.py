"""The indexer's composition root and its entry points.

    open_indexer(settings, embedder=None) ─▶ the model (its own, or the one `clipdex run` shares with its
        server) + the store opened as a writer + the pipeline + compaction on thresholds beside it

    index_folder   `clipdex index`: bring the store in line with a folder once
    watch_folder   `clipdex watch`, and the indexer half of `clipdex run`: index a folder, then watch it
    consume        `clipdex consume`: Kafka events, until a signal
    retry          `clipdex dlq retry`: dead letters through the pipeline again

One writer per source of items: `index_folder` and `watch_folder` hold their folder's writer lock,
`consume` the Kafka one (`folder_lock`, `kafka_lock`), taken before the model loads, so a second writer
of the same source is refused at once with the holder's pid and command (WriterBusy). Writers of
different sources share a store safely (`shared.stores`). `watch_folder` and `consume` also retry
their own transient dead letters while they run (`indexer.redeliver`).

A store failure (`StoreError`) propagates: the caller stops without committing its source position, and
the CLI exits non-zero. The caller owns signals (`shared.signals`): `stop` set means finish the batch in
flight and return.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from indexer.compaction import Compactor
from indexer.formats import EventFormat, format_from_settings
from indexer.pipeline import Pipeline
from indexer.records import BatchReport, Sink
from indexer.redeliver import Redeliverer, retry_records
from indexer.sources import folder, kafka
from indexer.sources.folder import Folder, FolderSource, FolderSummary, Progress
from indexer.sources.kafka import KafkaSource
from indexer.sources.kafka_client import AioKafkaConsumer, KafkaDeadLetters, require_kafka
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import ConfigError, StoreError
from shared.heartbeat import Heartbeat
from shared.lockfile import Holder
from shared.roles import DeadLetter
from shared.signals import stop_on_signals
from shared.stores import WriteSide, announce_retries, open_writer, writer_lock

logger = logging.getLogger(__name__)


@dataclass
class Indexer:
    """What one indexing process holds: the pipeline (the sink its sources write to) over the store."""

    pipeline: Pipeline
    store: WriteSide
    embedder: Embedder
    settings: Settings

    @asynccontextmanager
    async def redelivering(
        self, prefix: str, source: str, scope: str = "", event_format: EventFormat | None = None
    ) -> AsyncIterator[Redeliverer]:
        """Retry the due dead letters of the items whose ids start with `prefix` while the block runs (their
        messages read in `event_format`, clipdex's own by default), and tell `clipdex dlq retry` in other
        processes (through the lock of `source`/`scope`) it does."""
        announce_retries(self.settings, source, scope, [prefix])
        redeliverer = Redeliverer(
            self.store.catalog, self.pipeline, [prefix], event_format=event_format, check_s=_REDELIVER_CHECK_S
        )
        async with redeliverer.running():
            yield redeliverer


_REDELIVER_CHECK_S = 2.0  # how soon a dead letter that `clipdex dlq retry` hands over is picked up


@asynccontextmanager
async def open_indexer(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    roots: Sequence[Path] = (),
    compaction: bool = True,
) -> AsyncIterator[Indexer]:
    """Load the model (unless given: then the caller closes it), open the store as a writer bound to
    it, and build the pipeline; compact on thresholds beside it while the block runs. Paths may
    resolve under CLIPDEX_ALLOWED_ROOTS and `roots` (the watched folder)."""
    owned = embedder is None

    def load() -> tuple[Embedder, WriteSide]:
        model = embedder or Embedder.from_settings(settings)
        try:
            return model, open_writer(settings, model.identity)
        except BaseException:
            if owned:
                model.close()
            raise

    model, store = await asyncio.to_thread(load)
    try:
        pipeline = Pipeline.from_settings(store.writer, model, settings, roots=roots)
        indexer = Indexer(pipeline, store, model, settings)
        try:
            if compaction and store.compaction is not None:
                async with Compactor.from_settings(store.compaction, settings, model.identity.dim).running():
                    yield indexer
            else:
                yield indexer
        finally:
            await asyncio.to_thread(pipeline.close)
    finally:
        if owned:
            model.close()
        store.close()


@asynccontextmanager
async def open_pipeline(settings: Settings) -> AsyncIterator[Sink]:
    """The sink that `consume` writes to: a pipeline over its own model and store, compacting beside it
    and retrying the transient dead letters of Kafka items."""
    event_format = format_from_settings(settings)
    async with (
        open_indexer(settings) as indexer,
        indexer.redelivering(kafka.SOURCE + ":", kafka.SOURCE, event_format=event_format),
    ):
        yield indexer.pipeline


def folder_lock(settings: Settings, root: Path) -> AbstractContextManager[Holder]:
    """The writer lock of one folder's items in the store (WriterBusy when another process holds it)."""
    path = os.path.abspath(root)
    return writer_lock(settings, folder.SOURCE, path, what=f"the folder {path}")


def kafka_lock(settings: Settings) -> AbstractContextManager[Holder]:
    """The writer lock of the store's Kafka items: one consumer per store."""
    return writer_lock(settings, kafka.SOURCE, what="Kafka events")


# -- folders ------------------------------------------------------------------------------------------------


async def index_folder(
    settings: Settings, root: Path, *, stop: asyncio.Event | None = None, progress: Progress | None = None
) -> FolderSummary:
    """`clipdex index`: bring the store in line with the folder once, then compact if a threshold is passed."""
    _check_folder(root)
    with folder_lock(settings, root):
        async with open_indexer(settings, roots=[root], compaction=False) as indexer:
            source = await asyncio.to_thread(_folder_source, settings, root, indexer)
            summary = await source.index_once(stop, progress)
            if indexer.store.compaction is not None:
                compactor = Compactor.from_settings(indexer.store.compaction, settings, indexer.embedder.identity.dim)
                await asyncio.to_thread(compactor.compact_if_needed)
    return summary


async def watch_folder(
    settings: Settings,
    root: Path,
    stop: asyncio.Event,
    *,
    embedder: Embedder | None = None,
    ready: asyncio.Event | None = None,
) -> FolderSummary:
    """Index `root`, then watch it, until `stop` is set; the batch in flight then is finished and durable
    before this returns. `embedder`: a model this process already loaded (`clipdex run` shares its
    server's). `ready` is set once the watcher is live and the files found at start are indexed (on a
    big first run that takes a while: serve meanwhile, do not wait for it)."""
    _check_folder(root)
    _quiet_watchfiles()
    with folder_lock(settings, root):
        async with open_indexer(settings, embedder=embedder, roots=[root]) as indexer:
            source = await asyncio.to_thread(_folder_source, settings, root, indexer)
            async with indexer.redelivering(source.folder.prefix, folder.SOURCE, str(source.root)):
                return await source.run(stop, ready)


def _folder_source(settings: Settings, root: Path, indexer: Indexer) -> FolderSource:
    """Blocking: the folder's source, under its name in the store (registered on first use)."""
    path = Path(os.path.abspath(root))
    name = indexer.store.writer.register_folder(str(path))
    heartbeat = Heartbeat(settings.data_dir, folder.SOURCE, root=str(path))
    store = indexer.store
    return FolderSource.from_settings(
        Folder(path, name), indexer.pipeline, store.catalog, store.writer.rename_items, settings, heartbeat=heartbeat
    )


def _check_folder(root: Path) -> None:
    """Fail before the model loads (seconds) when the folder is wrong."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory" if root.exists() else f"{root}: no such directory")


def _quiet_watchfiles() -> None:
    """watchfiles logs every change at INFO; the indexer's own batch lines say what matters."""
    chatty = logging.getLogger("watchfiles")
    chatty.setLevel(max(chatty.getEffectiveLevel(), logging.WARNING))


# -- Kafka ----------------------------------------------------------------------------------------------------

OpenSink = Callable[[Settings], AbstractAsyncContextManager[Sink]]  # the pipeline, opened and closed


async def consume(settings: Settings, open_sink: OpenSink = open_pipeline, stop: asyncio.Event | None = None) -> int:
    """`clipdex consume`: the pipeline (store + model) and a consumer group member, until a signal (or
    until `stop` is set, when given)."""
    servers, topic = require_kafka(settings)
    event_format = format_from_settings(settings)  # a wrong map is a ConfigError before anything loads
    if stop is None:
        stop = asyncio.Event()
        stop_on_signals(stop)  # from here on: a signal while the model loads is a clean exit too
    with kafka_lock(settings):
        return await _consume(settings, open_sink, stop, servers, topic, event_format)


async def _consume(
    settings: Settings, open_sink: OpenSink, stop: asyncio.Event, servers: str, topic: str, event_format: EventFormat
) -> int:
    async with open_sink(settings) as sink:
        dead_letters = KafkaDeadLetters(servers, settings.kafka_dlq_topic) if settings.kafka_dlq_topic else None
        heartbeat = Heartbeat(settings.data_dir, kafka.SOURCE, topic=topic, group=settings.kafka_group, servers=servers)
        source = KafkaSource(
            AioKafkaConsumer.from_settings(settings),
            sink,
            batch_size=settings.batch_size,
            max_wait_ms=settings.max_batch_wait_ms,
            dead_letters=dead_letters,
            heartbeat=heartbeat,
            stop=stop,
            describe=f"Kafka broker {servers} (topic {topic}, group {settings.kafka_group}, "
            f"{event_format.name} events)",
            event_format=event_format,
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


# -- dead letters -------------------------------------------------------------------------------------------


async def retry(settings: Settings, letters: Sequence[DeadLetter]) -> BatchReport:
    """Write the dead letters again, as their sources first sent them; the old letters go in the same
    transaction as the outcome (indexed, or a new dead letter)."""
    kafka_letters = any(d.source == kafka.SOURCE for d in letters)
    event_format = format_from_settings(settings) if kafka_letters else None  # a wrong map: before any lock
    records = [record for d in letters for record in retry_records(d, event_format)]
    roots = sorted({root for r in records if (root := folder.root_of(r)) is not None})
    with ExitStack() as locks:  # the writer lock of every source whose items these letters write
        for root in roots:
            locks.enter_context(folder_lock(settings, root))
        if any(r.source == kafka.SOURCE and r.event is not None for r in records):  # not an invalid event's
            locks.enter_context(kafka_lock(settings))
        async with open_indexer(settings, roots=roots, compaction=False) as indexer:
            return await indexer.pipeline.write(records)
