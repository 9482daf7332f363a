"""The indexer's composition root and its entry points.

    open_indexer(settings, models=None) ─▶ the model (its own, or the one `clipdex run` shares with its
        server) + the store opened as a writer + the pipeline (which follows a switch of the store's
        model) + compaction on thresholds beside it (+ a pending re-embed, CLIPDEX_REEMBED_IN_INDEXER)

    index_folder   `clipdex index`: bring the store in line with a folder once
    watch_folder   `clipdex watch`, and the indexer half of `clipdex run`: index a folder, then watch it
    consume        `clipdex consume`: Kafka events, until a signal
    reembed        `clipdex reembed`: the configured model into a shadow space, until the store switches to it
    retry          `clipdex dlq retry`: dead letters through the pipeline again

One writer per source of items: `index_folder` and `watch_folder` hold their folder's writer lock,
`consume` the Kafka one (`folder_lock`, `kafka_lock`), taken before the model loads, so a second writer
of the same source is refused at once with the holder's pid and command (WriterBusy). Writers of
different sources share a store safely (`shared.stores`). `watch_folder` and `consume` also retry
their own transient dead letters while they run (`indexer.redeliver`). `reembed` is no source's writer:
it holds `reembed.lock` (one re-embed per data directory) and writes only the shadow space, beside them.

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
from contextlib import AbstractAsyncContextManager, AbstractContextManager, ExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from indexer.compaction import Compactor
from indexer.formats import EventFormat, format_from_settings
from indexer.pipeline import Pipeline
from indexer.records import BatchReport, Sink
from indexer.redeliver import Redeliverer, retry_records
from indexer.reembed import Progress as ReembedProgress
from indexer.reembed import Reembedder, ReembedReport, background_reembed, holder_of_lock, reembed_lock
from indexer.sources import folder, kafka
from indexer.sources.folder import Folder, FolderSource, FolderSummary, Progress
from indexer.sources.kafka import KafkaSource
from indexer.sources.kafka_client import AioKafkaConsumer, KafkaDeadLetters, require_kafka
from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import ConfigError, StoreError
from shared.heartbeat import Heartbeat
from shared.lockfile import Holder
from shared.models import Models
from shared.roles import DeadLetter
from shared.signals import stop_on_signals
from shared.stores import WriteSide, announce_retries, describe, open_writer, writer_lock

logger = logging.getLogger(__name__)


@dataclass
class Indexer:
    """What one indexing process holds: the pipeline (the sink its sources write to) over the store."""

    pipeline: Pipeline
    store: WriteSide
    settings: Settings

    @property
    def embedder(self) -> Embedder:
        return self.pipeline.embedder  # the store's model: another one after a re-embed switched it

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
    models: Models | None = None,
    roots: Sequence[Path] = (),
    compaction: bool = True,
) -> AsyncIterator[Indexer]:
    """Load the model (from `models`, which `clipdex run` shares with its server), open the store as a
    writer bound to it, and build the pipeline, which follows a switch to another model; while the block
    runs, compact on thresholds beside it (and, with CLIPDEX_REEMBED_IN_INDEXER, fill a pending re-embed).
    Paths may resolve under CLIPDEX_ALLOWED_ROOTS and `roots` (the watched folder)."""
    owned = models is None
    models = models or Models(settings)

    def load() -> tuple[Embedder, WriteSide]:
        model = models.configured()
        try:
            return model, open_writer(settings, model.identity)
        except BaseException:
            models.release(model)
            raise

    try:
        model, store = await asyncio.to_thread(load)
    except BaseException:
        if owned:
            models.close()
        raise

    def follow(old: Embedder) -> Embedder:
        """The store switched models: load the active space's, bind the writer to it, let the old go."""
        active = next(s for s in store.catalog.spaces() if s.state == "active")
        new = models.for_space(active)
        try:
            store.writer.bind_model(new.identity)
        except BaseException:
            models.release(new)
            raise
        models.release(old)
        return new

    pipeline = Pipeline.from_settings(store.writer, model, settings, roots=roots, follow=follow)
    try:
        indexer = Indexer(pipeline, store, settings)
        if compaction and store.compaction is not None:
            async with (
                Compactor.from_settings(store.compaction, settings, store.spaces).running(),
                background_reembed(settings, store.spaces, store.catalog, models.for_space, models.release),
            ):
                yield indexer
        else:
            yield indexer
    finally:
        await asyncio.to_thread(pipeline.close)
        models.release(pipeline.embedder)
        if owned:
            models.close()
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
                compactor = Compactor.from_settings(indexer.store.compaction, settings)
                await asyncio.to_thread(compactor.compact_if_needed)
    return summary


async def watch_folder(
    settings: Settings,
    root: Path,
    stop: asyncio.Event,
    *,
    models: Models | None = None,
    ready: asyncio.Event | None = None,
) -> FolderSummary:
    """Index `root`, then watch it, until `stop` is set; the batch in flight then is finished and durable
    before this returns. `models`: the models of this process (`clipdex run` shares its server's).
    `ready` is set once the watcher is live and the files found at start are indexed (on a big first run
    that takes a while: serve meanwhile, do not wait for it)."""
    _check_folder(root)
    _quiet_watchfiles()
    with folder_lock(settings, root):
        async with open_indexer(settings, models=models, roots=[root]) as indexer:
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


# -- re-embedding -------------------------------------------------------------------------------------------


async def reembed(
    settings: Settings,
    stop: asyncio.Event,
    *,
    detach: bool = False,
    on_progress: Callable[[ReembedProgress], None] | None = None,
) -> ReembedReport | None:
    """`clipdex reembed`: the configured model (the new one) into a shadow space, item by item, until the
    store switches to it. Stops early, resumably, when `stop` is set. None with `detach`: the shadow space
    is created and left to indexers started with CLIPDEX_REEMBED_IN_INDEXER."""
    with reembed_lock(settings.data_dir) as mine:
        if not mine:
            raise ConfigError(
                f"a re-embed is already running on {settings.data_dir} (pid {holder_of_lock(settings.data_dir)})"
            )
        with open_writer(settings, None) as store:
            spaces = store.spaces
            if spaces is None:
                raise ConfigError(f"the store at {describe(settings)} cannot re-embed: use the SQLite store")
            await asyncio.to_thread(spaces.drop_spaces, settings.reembed_grace_s)  # leftovers of earlier runs
            models = Models(settings)
            try:
                embedder = await asyncio.to_thread(models.configured)
                configs = str(settings.model_configs) if settings.model_configs else None
                shadow = await asyncio.to_thread(spaces.create_shadow, embedder.identity, configs)
                if detach:
                    return None
                compactor = None
                if store.compaction is not None:
                    compactor = Compactor.from_settings(store.compaction, settings, states={"shadow"})
                identity = embedder.identity
                heartbeat = Heartbeat.reembed(settings.data_dir, model=identity.name, pretrained=identity.pretrained)
                worker = Reembedder(
                    spaces,
                    store.catalog,
                    shadow,
                    embedder,
                    settings,
                    compactor=compactor,
                    on_progress=on_progress,
                    heartbeat=heartbeat,
                )
                return await worker.run(stop)
            finally:
                models.close()


async def drop_previous(settings: Settings, stop: asyncio.Event, say: Callable[[str], None] = logger.info) -> bool:
    """After a switch: keep the previous model's space for the grace period (search processes still
    switching answer from it), then drop it. False when `stop` came first: an indexer's compactor or
    `clipdex compact` drops it later."""
    if settings.reembed_grace_s > 0:
        say(
            f"keeping the previous model's vectors {settings.reembed_grace_s:.0f} s for search processes still "
            "switching (interrupt to leave their removal to a running indexer or `clipdex compact`)"
        )
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.reembed_grace_s)
    if stop.is_set():
        return False
    with open_writer(settings, None) as store:
        assert store.spaces is not None, "a store that switched re-embeds"
        dropped = await asyncio.to_thread(store.spaces.drop_spaces, settings.reembed_grace_s)
    if dropped:
        say("removed the previous model's vectors")
    return True


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
