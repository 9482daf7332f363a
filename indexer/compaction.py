"""Compaction on thresholds, beside the indexer: fold the delta into a new main index, off the event loop.

Every `check_interval_s` the compactor asks the store whether the delta passed its size or age threshold
(CLIPDEX_COMPACT_DELTA_SIZE, CLIPDEX_COMPACT_MAX_AGE_S) and, if so, runs `shared.index.compact` in a
thread. Indexing goes on meanwhile; a failed compaction is logged and tried again later (the delta only
grows; nothing is lost). `clipdex compact` runs the same on demand, and a file lock in `compact` keeps
the two from overlapping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from shared.config import Settings
from shared.errors import ClipdexError
from shared.index import CompactionResult, IndexParams, compact, needs_compaction
from shared.store import Store

logger = logging.getLogger(__name__)


class Compactor:
    def __init__(
        self, store: Store, params: IndexParams, dim: int, index_dir: Path, *, check_interval_s: float = 5.0
    ) -> None:
        self.store = store
        self.params = params
        self.dim = dim
        self.index_dir = index_dir
        self.check_interval_s = check_interval_s
        self.compactions = 0

    @classmethod
    def from_settings(cls, store: Store, settings: Settings, dim: int) -> Compactor:
        # Check often enough that the age threshold is kept to within a few percent.
        interval = min(5.0, max(0.1, settings.compact_max_age_s / 20))
        return cls(store, IndexParams.from_settings(settings), dim, settings.index_dir, check_interval_s=interval)

    def compact_if_needed(self) -> CompactionResult | None:
        """Blocking: compact when a threshold is passed."""
        if not needs_compaction(self.store, self.params):
            return None
        result = compact(self.store, self.params, self.dim, self.index_dir)
        self.compactions += 1
        return result

    async def run(self, stop: asyncio.Event) -> None:
        """Check and compact until `stop` is set; a compaction in progress is finished, never abandoned."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.compact_if_needed)
            except (ClipdexError, OSError, RuntimeError):
                logger.exception("compaction failed; searches keep using the current index, trying again later")
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_interval_s)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Compactor]:
        """Run in the background for the duration of the block."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.run(stop), name="clipdex-compactor")
        try:
            yield self
        finally:
            stop.set()
            await task
