"""The composition root of the shared core: settings in, a wired store + embedder + index + search out."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from shared.config import Settings
from shared.embedder import Embedder
from shared.index import IndexParams, LiveIndex
from shared.search import SearchService
from shared.store import Store

logger = logging.getLogger(__name__)


@dataclass
class Core:
    settings: Settings
    store: Store
    embedder: Embedder
    index: LiveIndex
    search: SearchService
    _refresher: Refresher | None = field(default=None, repr=False)

    def start_refresh(self) -> None:
        """Follow the store in a background thread (new vectors, tombstones, new main generations)."""
        if self._refresher is None:
            self._refresher = Refresher(self.index, self.settings.refresh_interval_ms / 1000)
            self._refresher.start()

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()
            self._refresher = None
        self.embedder.close()
        self.store.close()


def build_core(settings: Settings, *, embedder: Embedder | None = None) -> Core:
    """Open the store, load the model, bind the store to it, and load the index."""
    store = Store(settings.db_path, vector_dtype=settings.vector_dtype)
    try:
        embedder = embedder or Embedder.from_settings(settings)
        identity = embedder.identity
        store.bind_model(identity)
        index = LiveIndex(store, identity.dim, IndexParams.from_settings(settings), settings.index_dir)
        index.refresh()
    except BaseException:
        store.close()
        raise
    search = SearchService(store, index, embedder, max_query_chars=settings.max_query_chars)
    return Core(settings, store, embedder, index, search)


class Refresher:
    def __init__(self, index: LiveIndex, interval_s: float) -> None:
        self.index = index
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipdex-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.index.refresh()
            except Exception:  # keep serving the last good state, and say why it is not newer
                logger.exception("index refresh failed; serving the last good state")
