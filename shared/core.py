"""The read side's composition: settings in, the model + an opened reader + search out.

`clipdex serve`, `clipdex mcp`, one-shot searches and `clipdex run` each build one Core; `run` hands its
embedder to the indexer too, so one process loads the model once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import StoreError
from shared.roles import Catalog, VectorSearch
from shared.search import SearchService
from shared.stores import ReadSide, open_reader

logger = logging.getLogger(__name__)


@dataclass
class Core:
    settings: Settings
    embedder: Embedder
    reader: ReadSide
    search: SearchService
    _refresher: Refresher | None = field(default=None, repr=False)

    @property
    def catalog(self) -> Catalog:
        return self.reader.catalog

    @property
    def vectors(self) -> VectorSearch:
        return self.reader.vectors

    def start_refresh(self) -> None:
        """Follow the store in a background thread (new vectors, deletes, new main generations)."""
        if self._refresher is None:
            self._refresher = Refresher(self.vectors.refresh, self.settings.refresh_interval_ms / 1000)
            self._refresher.start()

    def unavailable(self) -> str | None:
        """Why this process cannot search now (its last refresh failed: the store is unreachable), for a
        load balancer's health check; None when it can."""
        refresher = self._refresher
        if refresher is None or refresher.failing_since is None:
            return None
        since = time.monotonic() - refresher.failing_since
        return f"the store cannot be reached (for {since:.0f} s); searches fail until it is back"

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()
            self._refresher = None
        self.embedder.close()
        self.reader.close()


def build_core(settings: Settings, *, embedder: Embedder | None = None) -> Core:
    """Load the model (unless given), and open the store as a reader bound to it."""
    owned = embedder is None
    embedder = embedder or Embedder.from_settings(settings)
    try:
        reader = open_reader(settings, embedder.identity)
    except BaseException:
        if owned:
            embedder.close()
        raise
    return Core(
        settings,
        embedder,
        reader,
        SearchService(
            reader.vectors,
            reader.catalog,
            embedder,
            max_query_chars=settings.max_query_chars,
            near_duplicate_cosine=settings.near_duplicate_cosine,
        ),
    )


class Refresher:
    def __init__(self, refresh: Callable[[], None], interval_s: float) -> None:
        self.refresh = refresh
        self.interval_s = interval_s
        self.failing_since: float | None = None  # time.monotonic() of the first of the failures in a row
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipdex-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh_once()

    def refresh_once(self) -> None:
        """Refresh; on failure keep serving the last good state, and say why it is not newer, once."""
        try:
            self.refresh()
        except StoreError as exc:
            if self.failing_since is None:
                logger.warning("index refresh failed; serving the last good state: %s", exc)
                self.failing_since = time.monotonic()
        except Exception:
            if self.failing_since is None:
                logger.exception("index refresh failed; serving the last good state")
                self.failing_since = time.monotonic()
        else:
            if self.failing_since is not None:
                logger.info("index refresh works again after %.0f s", time.monotonic() - self.failing_since)
            self.failing_since = None
