"""The indexer's composition root and its entry points.

    open_indexer(settings, embedder=None) ─▶ the model (its own, or the one `clipdex run` shares with its
        server) + the store opened as a writer + the pipeline + compaction on thresholds beside it

    index_folder   `clipdex index`: bring the store in line with a folder once
    watch_folder   `clipdex watch`, and the indexer half of `clipdex run`: index a folder, then watch it
    consume        `clipdex consume`: Kafka events, until a signal
    retry          `clipdex dlq retry`: dead letters through the pipeline again

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
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from indexer.compaction import Compactor
from indexer.formats import format_from_settings
from indexer.pipeline import Pipeline
from indexer.records import BatchReport, Record, Sink
from indexer.sources import folder, kafka
from indexer.sources.folder import FolderSource, FolderSummary, Progress
from indexer.sources.kafka import KafkaSource
from indexer.sources.kafka_client import AioKafkaConsumer, KafkaDeadLetters, require_kafka
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import ConfigError, StoreError
from shared.heartbeat import Heartbeat
from shared.roles import DeadLetter
from shared.signals import stop_on_signals
from shared.stores import WriteSide, open_writer

logger = logging.getLogger(__name__)


@dataclass
class Indexer:
    """What one indexing process holds: the pipeline (the sink its sources write to) over the store."""

    pipeline: Pipeline
    store: WriteSide
    embedder: Embedder


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
        indexer = Indexer(pipeline, store, model)
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
    """The sink that `consume` writes to: a pipeline over its own model and store, compacting beside it."""
    async with open_indexer(settings) as indexer:
        yield indexer.pipeline


# -- folders ------------------------------------------------------------------------------------------------


async def index_folder(
    settings: Settings, root: Path, *, stop: asyncio.Event | None = None, progress: Progress | None = None
) -> FolderSummary:
    """`clipdex index`: bring the store in line with the folder once, then compact if a threshold is passed."""
    _check_folder(root)
    async with open_indexer(settings, roots=[root], compaction=False) as indexer:
        source = _folder_source(settings, root, indexer)
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
    async with open_indexer(settings, embedder=embedder, roots=[root]) as indexer:
        return await _folder_source(settings, root, indexer).run(stop, ready)


def _folder_source(settings: Settings, root: Path, indexer: Indexer) -> FolderSource:
    heartbeat = Heartbeat(settings.data_dir, folder.SOURCE, root=str(Path(os.path.abspath(root))))
    return FolderSource.from_settings(root, indexer.pipeline, indexer.store.catalog, settings, heartbeat=heartbeat)


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


async def consume(settings: Settings, open_sink: OpenSink = open_pipeline) -> int:
    """`clipdex consume`: the pipeline (store + model) and a consumer group member, until a signal."""
    servers, topic = require_kafka(settings)
    event_format = format_from_settings(settings)
    stop = asyncio.Event()
    stop_on_signals(stop)  # from here on: a signal while the model loads is a clean exit too
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


async def retry(settings: Settings, letters: Sequence[DeadLetter], records: Sequence[Record]) -> BatchReport:
    """Write `records` (the dead letters as their sources first sent them) again; only once that is
    durable, new dead letters included, do the old ones go."""
    roots = sorted({root for r in records if (root := folder.root_of(r)) is not None})
    async with open_indexer(settings, roots=roots, compaction=False) as indexer:
        report = await indexer.pipeline.write(records)
        await asyncio.to_thread(indexer.store.catalog.delete_dead_letters, [d.id for d in letters])
        return report
