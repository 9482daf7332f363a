"""The indexer's entry points: a one-shot folder index, a folder watcher, and the watcher that `clipdex run`
runs beside the search server on one shared `Core` (one model, one store).

Every entry point compacts on thresholds beside the indexing (off the event loop), and lets a store
failure (`StoreError`) propagate: the caller stops without committing, and the CLI exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from indexer.compaction import Compactor
from indexer.heartbeat import Heartbeat
from indexer.pipeline import Pipeline, open_pipeline
from indexer.sources.folder import SOURCE, FolderSource, FolderSummary, Progress
from shared.config import Settings
from shared.core import Core
from shared.errors import ConfigError

logger = logging.getLogger(__name__)


async def run_folder_indexer(
    core: Core, root: Path, stop: asyncio.Event, *, ready: asyncio.Event | None = None
) -> None:
    """Index `root` into `core`'s store with `core`'s model, then watch it, until `stop` is set.

    The batch in flight when `stop` is set is finished and durable before this returns. `ready` is set
    once the watcher is live and the files found at start are indexed (on a big first run that takes a
    while: serve meanwhile, do not wait for it). Compacts on thresholds in a thread. Raises StoreError
    when the store fails, ConfigError when `root` is not a directory.
    """
    settings = core.settings
    _quiet_watchfiles()
    pipeline = Pipeline.from_settings(core.store, core.embedder, settings, roots=[root])
    try:
        source = FolderSource.from_settings(root, pipeline, core.store, settings, heartbeat=_heartbeat(settings, root))
        async with Compactor.from_settings(core.store, settings, core.embedder.identity.dim).running():
            await source.run(stop, ready)
    finally:
        await asyncio.to_thread(pipeline.close)


async def watch_folder(
    settings: Settings, root: Path, stop: asyncio.Event, *, ready: asyncio.Event | None = None
) -> FolderSummary:
    """`clipdex watch`: the same as `run_folder_indexer`, with its own store and model."""
    _check_folder(root)
    _quiet_watchfiles()
    async with open_pipeline(settings, roots=[root]) as pipeline:
        source = FolderSource.from_settings(
            root, pipeline, pipeline.store, settings, heartbeat=_heartbeat(settings, root)
        )
        return await source.run(stop, ready)


async def index_folder(
    settings: Settings, root: Path, *, stop: asyncio.Event | None = None, progress: Progress | None = None
) -> FolderSummary:
    """`clipdex index`: bring the store in line with the folder once, then compact if a threshold is passed."""
    _check_folder(root)
    async with open_pipeline(settings, roots=[root], compaction=False) as pipeline:
        source = FolderSource.from_settings(
            root, pipeline, pipeline.store, settings, heartbeat=_heartbeat(settings, root)
        )
        summary = await source.index_once(stop, progress)
        compactor = Compactor.from_settings(pipeline.store, settings, pipeline.embedder.identity.dim)
        await asyncio.to_thread(compactor.compact_if_needed)
    return summary


def _check_folder(root: Path) -> None:
    """Fail before the model loads (seconds) when the folder is wrong."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory" if root.exists() else f"{root}: no such directory")


def _quiet_watchfiles() -> None:
    """watchfiles logs every change at INFO; the indexer's own batch lines say what matters."""
    chatty = logging.getLogger("watchfiles")
    chatty.setLevel(max(chatty.getEffectiveLevel(), logging.WARNING))


def _heartbeat(settings: Settings, root: Path) -> Heartbeat:
    return Heartbeat(settings.data_dir, SOURCE, root=str(Path(os.path.abspath(root))))


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT set `stop` (the batch in flight is finished and committed); a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.warning("second %s: exiting without waiting for the batch in flight (it is redone next time)", name)
            os._exit(130)
        logger.info("%s: finishing the batch in flight, then exiting", name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
