"""The read side's composition: settings in, the model + an opened reader + search out, following the
store's model when a re-embed switches it.

`clipdex serve`, `clipdex mcp`, one-shot searches and `clipdex run` each build one Core; `run` hands its
models to the indexer too, so one process loads each model once.

    refresher tick ─▶ the store's active space still this model's? ── yes ─▶ vectors.refresh()
                           │ no (clipdex reembed switched it)
                           ▼
                      load its model and open a reader of its space (meanwhile queries are answered
                      from the old space, which the store keeps for a grace period) ─▶ warm the text
                      tower ─▶ swap: the next query uses the new pair ─▶ close the old pair once its
                      queries are done

A query takes `core.search` once: the model that encodes its text and the vectors it searches are of
one space, never two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.config import Settings
from shared.embedder import Embedder
from shared.errors import ClipdexError, StoreError
from shared.models import Models
from shared.roles import Catalog, Space, VectorSearch
from shared.search import SearchService
from shared.stores import ReadSide, open_reader
from shared.types import ModelIdentity

logger = logging.getLogger(__name__)

DRAIN_S = 60.0  # an old model and its reader are closed this long after a switch: no query runs longer
RETRY_S = 30.0  # after a failed switch (the new model cannot load here), try again after this long


@dataclass(frozen=True)
class Answering:
    """What one query uses: one model, and the vectors of that model's space."""

    embedder: Embedder
    reader: ReadSide
    search: SearchService

    @property
    def model(self) -> ModelIdentity:
        return self.reader.model


@dataclass
class Core:
    settings: Settings
    models: Models
    answering: Answering
    owns_models: bool = True  # False: `models` belongs to the caller (`clipdex run` shares them)
    switch_error: str | None = None  # why this process still answers with a model the store left
    _refresher: Refresher | None = field(default=None, repr=False)
    _draining: list[tuple[Answering, float]] = field(default_factory=list, repr=False)
    _retry_at: float = field(default=0.0, repr=False)
    _switch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def embedder(self) -> Embedder:
        return self.answering.embedder

    @property
    def reader(self) -> ReadSide:
        return self.answering.reader

    @property
    def search(self) -> SearchService:
        return self.answering.search

    @property
    def catalog(self) -> Catalog:
        return self.answering.reader.catalog

    @property
    def vectors(self) -> VectorSearch:
        return self.answering.reader.vectors

    def start_refresh(self) -> None:
        """Follow the store in a background thread (new vectors, deletes, new main generations, a switch
        to another model)."""
        if self._refresher is None:
            self._refresher = Refresher(self.refresh, self.settings.refresh_interval_ms / 1000)
            self._refresher.start()

    def refresh(self) -> None:
        self.follow_switch()
        self.answering.reader.vectors.refresh()
        self._close_drained()

    def follow_switch(self) -> bool:
        """Answer with the store's active model from now on, if it changed. True when it switched."""
        with self._switch_lock:
            current = self.answering
            active = _active(current.reader.catalog.spaces())
            if active is None or active.model is None or active.model.same_weights(current.model):
                return False
            if time.monotonic() < self._retry_at:
                return False
            try:
                answering = self._open(active)
            except (ClipdexError, OSError, RuntimeError) as exc:
                self.switch_error = (
                    f"the store switched to {active.model.name} / {active.model.pretrained}, which cannot be "
                    f"loaded here ({exc}); still answering with {current.model.name}"
                )
                logger.error("%s; trying again in %.0f s", self.switch_error, RETRY_S)
                self._retry_at = time.monotonic() + RETRY_S
                return False
            self.answering = answering
            self.switch_error = None
            self._draining.append((current, time.monotonic() + DRAIN_S))
        logger.info(
            "now answering with model %s / %s (dim %d), after a re-embed; %s is released in %.0f s",
            active.model.name,
            active.model.pretrained,
            active.model.dim,
            current.model.name,
            DRAIN_S,
        )
        return True

    def _open(self, space: Space) -> Answering:
        embedder = self.models.for_space(space)
        try:
            reader = open_reader(self.settings, embedder.identity)
            embedder.encode_texts(["a photo"])  # the first query then finds the text tower warm
        except BaseException:
            self.models.release(embedder)
            raise
        return _answering(self.settings, embedder, reader)

    def _close_drained(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        with self._switch_lock:
            done = [a for a, at in self._draining if everything or at <= now]
            self._draining = [(a, at) for a, at in self._draining if not (everything or at <= now)]
        for answering in done:
            self._close_answering(answering)

    def _close_answering(self, answering: Answering) -> None:
        answering.reader.close()
        self.models.release(answering.embedder)

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
        self._close_drained(everything=True)
        self._close_answering(self.answering)
        if self.owns_models:
            self.models.close()


def build_core(settings: Settings, *, embedder: Embedder | None = None, models: Models | None = None) -> Core:
    """Load the configured model (unless given: an `embedder` the caller closes, or the `models` of a
    process that shares them), and open the store as a reader bound to it."""
    owned = models is None
    models = models or Models(settings, given=embedder)
    try:
        model = models.configured()
        try:
            reader = open_reader(settings, model.identity)
        except BaseException:
            models.release(model)
            raise
    except BaseException:
        if owned:
            models.close()
        raise
    return Core(settings, models, _answering(settings, model, reader), owns_models=owned)


def _answering(settings: Settings, embedder: Embedder, reader: ReadSide) -> Answering:
    search = SearchService(
        reader.vectors,
        reader.catalog,
        embedder,
        max_query_chars=settings.max_query_chars,
        near_duplicate_cosine=settings.near_duplicate_cosine,
    )
    return Answering(embedder, reader, search)


def _active(spaces: list[Space]) -> Space | None:
    return next((s for s in spaces if s.state == "active"), None)


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
